"""Class-incremental continual learning with a distilled memory (the protocol of the DM and low-rank papers).

The classes of a dataset arrive in ``steps`` groups of equal size. At each step the learner sees the real
training images of the new classes only, distils them into ``ipc`` images per class and appends those to
its memory; the real images are then gone. After every step a fresh network is trained from scratch on
the whole memory (its output layer covers all classes of the dataset) and tested on the real test images
of the classes seen so far. The baseline memory holds ``ipc`` random real training images per class
instead (random exemplars). The protocol is repeated over ``orders`` class orders and reported as
mean +- population std over orders.

Seeds. Every random draw comes from ``derived_seed(seed, stream, order, step)``, a 32-bit number from
``numpy.random.SeedSequence([seed, stream, order, step])``. Class order ``o`` is
``torch.randperm(num_classes)`` under a ``torch.Generator`` seeded with ``derived_seed(seed, ORDER_STREAM, o)``.
The distillation, the step's proxy pool, the random exemplars and the evaluation networks each have their
own stream; both memories of one step are scored with the same network initialisation and minibatch order.

Layout of the output folder::

    continual_settings.json              settings of the first run (a restart must match them)
    order-O/step-S/set.safetensors       the step's distilled set (labels 0..k-1 of the step's classes)
    order-O/step-S/random.safetensors    the step's random exemplars (same labelling)
    order-O/step-S/proxies/              the step's proxy pool (only with a CMI weight)
    order-O/step-S/record.json           the step's result; written last, so its presence marks the step done
    continual.json, continual.png        the results and the figure
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from infodistill.artefact import DistilledSet, SetMetadata, load_set, save_set
from infodistill.data import ClassSampler, DatasetInfo, RealData, load_dataset
from infodistill.errors import UserInputError
from infodistill.experiments.figures import new_figure, save_figure
from infodistill.files import ARTEFACT_NAME, CHECKPOINT_NAME, atomic_path
from infodistill.loop import DistillConfig, check_cmi_weight, distill, parse_cmi_weight
from infodistill.methods import METHOD_REGISTRY, method_class, method_settings
from infodistill.models import parse_model_name, pooled_variant
from infodistill.proxies import train_proxy_pool
from infodistill.regularizers.cmi import cmi_weight_active
from infodistill.seeds import run_seeds
from infodistill.training import EvalConfig, top1_accuracy, train_from_scratch

SETTINGS_NAME = "continual_settings.json"
JSON_NAME = "continual.json"
FIGURE_NAME = "continual.png"
RECORD_NAME = "record.json"
RANDOM_NAME = "random.safetensors"
PROXIES_DIR = "proxies"

RESUMABLE_CHANGES = ("device", "data_root")
"""Settings that may differ between a run and its restart (they do not change what is computed)."""

UNSUPPORTED_SETTINGS = ("experts", "teacher")
"""Method settings that need a network trained on all classes beforehand (expert trajectories, a
teacher): such methods would see future classes, so continual learning refuses them."""

# Independent random streams, one per kind of draw.
ORDER_STREAM, DISTILL_STREAM, PROXY_STREAM, RANDOM_STREAM, EVAL_STREAM = 0, 1, 2, 3, 4


def derived_seed(seed: int, stream: int, order: int, step: int = 0) -> int:
    """A 32-bit seed fixed by (base seed, stream, order, step), independent of every other combination."""
    return int(np.random.SeedSequence([seed, stream, order, step]).generate_state(1)[0])


def supported_methods() -> list[str]:
    """Methods that distil from the step's real data alone (no experts or teacher trained beforehand)."""
    return sorted(name for name in METHOD_REGISTRY
                  if not set(UNSUPPORTED_SETTINGS) & set(method_settings(method_class(name))))


@dataclass(frozen=True)
class ContinualConfig:
    """Everything that defines a continual-learning run. ``iterations``/``batch_real`` ``None``: the method's
    published default; ``cmi_weight`` ``None`` or 0: no CMI term."""

    dataset: str = "fashion-mnist"
    method: str = "dm"
    ipc: int = 10
    cmi_weight: float | str | None = None
    iterations: int | None = None
    epochs: int = EvalConfig.epochs
    steps: int = 5
    orders: int = 5
    model: str = "ConvNet-3"
    eval_model: str = "ConvNet-3"
    batch_real: int | None = None
    seed: int = 0
    device: str = "cpu"
    proxy_epochs: int = 2
    proxy_count: int = 2
    proxy_arch: str | None = None
    """Architecture of each step's proxies (with CMI); None: ``model`` with a pooled embedding
    (``ConvNet-3`` -> ``ConvNetGAP-3``), since the CMI needs pooled proxies."""
    data_root: str | None = None

    @property
    def uses_cmi(self) -> bool:
        """Whether each step's distillation adds the CMI term (and so trains a proxy pool first)."""
        return cmi_weight_active(self.cmi_weight)

    def validate(self) -> ContinualConfig:
        """Refuse values outside their range (those that do not depend on the dataset); return self."""
        method_class(self.method)
        if self.method not in supported_methods():
            raise UserInputError(f"method '{self.method}' needs expert trajectories or a teacher trained on all "
                                 f"classes, which class-incremental learning cannot have; choose one of: "
                                 f"{', '.join(supported_methods())}")
        for name in ("steps", "orders", "epochs", "proxy_epochs", "proxy_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value}")
        check_cmi_weight(self.cmi_weight)
        parse_model_name(self.eval_model)
        if self.proxy_arch is not None:
            parse_model_name(self.proxy_arch)
        # ipc, iterations, batch_real, seed, model, device: checked where the distillation checks them
        self.distill_config(0, 0).validate()
        return self

    def check_fits(self, info: DatasetInfo, smallest_class: int) -> None:
        """Refuse a split or an ipc that this dataset cannot give (``smallest_class``: fewest training images
        of any class)."""
        classes = info.num_classes
        if self.steps > classes or classes % self.steps != 0:
            allowed = ", ".join(str(d) for d in range(1, classes + 1) if classes % d == 0)
            raise UserInputError(f"steps {self.steps} does not split the {classes} classes of '{info.name}' into "
                                 f"equal groups; allowed are: {allowed}")
        if self.ipc > smallest_class:
            raise UserInputError(f"ipc {self.ipc} is above the smallest class size {smallest_class} of "
                                 f"'{info.name}'; allowed are 1..{smallest_class}")

    def distill_config(self, order: int, step: int, dataset: str | None = None,
                       proxies: str | None = None) -> DistillConfig:
        """The distillation settings of one step (``proxies``: the step's pool when CMI is used)."""
        weight = self.cmi_weight if self.uses_cmi else None
        return DistillConfig(
            dataset=dataset or self.dataset, method=self.method, ipc=self.ipc, iterations=self.iterations,
            model=self.model, seed=derived_seed(self.seed, DISTILL_STREAM, order, step),
            cmi_weight=weight if weight is None or weight == "auto" else float(weight),
            proxies=(proxies or PROXIES_DIR) if self.uses_cmi else None, batch_real=self.batch_real,
            device=self.device, data_root=self.data_root)

    def label(self) -> str:
        """The distilled line's name, e.g. ``dm`` or ``dm + CMI 0.1``."""
        if not self.uses_cmi:
            return self.method
        return f"{self.method} + CMI {self.cmi_weight if self.cmi_weight == 'auto' else f'{self.cmi_weight:g}'}"


def class_orders(num_classes: int, orders: int, seed: int) -> list[list[int]]:
    """``orders`` class orders: order ``o`` is ``torch.randperm(num_classes)`` under a generator seeded with
    ``derived_seed(seed, ORDER_STREAM, o)``."""
    if num_classes < 1:
        raise UserInputError(f"num_classes must be a positive integer, got {num_classes}")
    if orders < 1:
        raise UserInputError(f"orders must be a positive integer, got {orders}")
    result = []
    for order in range(orders):
        generator = torch.Generator().manual_seed(derived_seed(seed, ORDER_STREAM, order))
        result.append([int(c) for c in torch.randperm(num_classes, generator=generator)])
    return result


def split_steps(order: list[int], steps: int) -> list[list[int]]:
    """Split a class order into ``steps`` consecutive groups of equal size."""
    if steps < 1 or steps > len(order) or len(order) % steps != 0:
        allowed = ", ".join(str(d) for d in range(1, len(order) + 1) if len(order) % d == 0)
        raise UserInputError(f"steps {steps} does not split {len(order)} classes into equal groups; "
                             f"allowed are: {allowed}")
    size = len(order) // steps
    return [list(order[index * size:(index + 1) * size]) for index in range(steps)]


def restrict_classes(real: RealData, classes: list[int]) -> RealData:
    """``real`` restricted to ``classes`` (both splits), relabelled so that ``classes[i]`` becomes label ``i``;
    the dataset is named e.g. ``fashion-mnist[3,7]``, mean and std are kept."""
    info = real.info
    if not classes or len(set(classes)) != len(classes):
        raise UserInputError(f"classes must be a non-empty list without repeats, got {classes}")
    if any(not 0 <= c < info.num_classes for c in classes):
        raise UserInputError(f"classes {classes} are out of range; allowed are 0..{info.num_classes - 1}")
    lookup = torch.full((info.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))

    def split(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = lookup[labels.to(torch.int64).cpu()]
        keep = local >= 0
        return images[keep.to(images.device)], local[keep].to(labels.device)

    train_images, train_labels = split(real.train_images, real.train_labels)
    test_images, test_labels = split(real.test_images, real.test_labels)
    step_info = DatasetInfo(name=f"{info.name}[{','.join(str(c) for c in classes)}]", channels=info.channels,
                            image_size=(info.image_size[0], info.image_size[1]), num_classes=len(classes),
                            class_names=tuple(info.class_names[c] for c in classes), mean=tuple(info.mean),
                            std=tuple(info.std))
    return RealData(step_info, train_images, train_labels, test_images, test_labels)


def _smallest_class(real: RealData) -> int:
    counts = torch.bincount(real.train_labels.to(torch.int64).cpu(), minlength=real.info.num_classes)
    return int(counts.min())


def _random_exemplars(step_real: RealData, ipc: int, seed: int) -> DistilledSet:
    """``ipc`` random real training images per class of the step (labels 0..k-1), normalised."""
    sampler = ClassSampler(step_real.train_images, step_real.train_labels, step_real.info.num_classes)
    images, labels = sampler.random_subset(ipc, torch.Generator().manual_seed(seed))
    info = step_real.info
    metadata = SetMetadata(dataset=info.name, mean=tuple(info.mean), std=tuple(info.std),
                           classes=tuple(info.class_names), method="random", ipc=ipc, seed=seed)
    return DistilledSet(images=step_real.normalise(images).float().contiguous(), labels=labels.long().cpu(),
                        metadata=metadata)


def _to_global(distilled: DistilledSet, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A step set's images and its labels mapped back to the global class ids."""
    if distilled.num_classes != len(classes):
        raise UserInputError(f"a step set has {distilled.num_classes} classes but the step has {len(classes)}")
    return distilled.images.float().cpu(), torch.tensor(classes, dtype=torch.int64)[distilled.labels.cpu()]


def _write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Store the settings on a first run; on a restart refuse the first setting that differs."""
    path = out_dir / SETTINGS_NAME
    if not path.exists():
        _write_json(path, settings)
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"cannot read '{path}': {error}") from None
    for key, value in settings.items():
        if key not in RESUMABLE_CHANGES and stored.get(key) != value:
            raise UserInputError(f"cannot continue '{out_dir}': {key} was {stored.get(key)!r} in the first run "
                                 f"but is {value!r} now; use the same settings or another --out")


def _evaluate(images: torch.Tensor, labels: torch.Tensor, num_classes: int, test_images: torch.Tensor,
              test_labels: torch.Tensor, config: ContinualConfig, seed: int) -> float:
    """Train a fresh ``eval_model`` from scratch on a memory; top-1 accuracy (percent) on the test images."""
    eval_config = EvalConfig(model=config.eval_model, epochs=config.epochs, runs=1, seed=seed, device=config.device)
    (model,), _ = train_from_scratch(images, labels, num_classes, eval_config, run_seeds(seed, 1), progress=False)
    return top1_accuracy(model, test_images, test_labels)


def _distil_step(config: ContinualConfig, step_real: RealData, step_dir: Path, order: int,
                 step: int) -> DistilledSet:
    """The step's distilled set: loaded when a previous run wrote it, else distilled (resumed from its
    checkpoint when one is there)."""
    artefact = step_dir / ARTEFACT_NAME
    if artefact.exists():
        return load_set(artefact)
    proxies = step_dir / PROXIES_DIR
    if config.uses_cmi:  # trained on this step's classes only: later classes are not known yet
        arch = config.proxy_arch if config.proxy_arch is not None else pooled_variant(config.model)
        train_proxy_pool(step_real, proxies, arch=arch, count=config.proxy_count, epochs=config.proxy_epochs,
                         seed=derived_seed(config.seed, PROXY_STREAM, order, step), device=config.device,
                         progress=False)
    distill_config = config.distill_config(order, step, dataset=step_real.info.name, proxies=str(proxies))
    result = distill(distill_config, step_dir, resume=(step_dir / CHECKPOINT_NAME).exists(), progress=False,
                     real=step_real)
    return load_set(result.artefact)


def _run_step(config: ContinualConfig, real: RealData, memories: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
              seen: list[int], step_classes: list[int], step_dir: Path, order: int, step: int,
              test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Distil the step, draw its random exemplars, append both to their memories, and score each memory
    on the test images of the ``seen`` classes; return the step's record."""
    started = time.perf_counter()
    step_real = restrict_classes(real, step_classes)
    distilled = _distil_step(config, step_real, step_dir, order, step)
    exemplars = _random_exemplars(step_real, config.ipc, derived_seed(config.seed, RANDOM_STREAM, order, step))
    save_set(exemplars, step_dir / RANDOM_NAME)
    memories["distilled"].append(_to_global(distilled, step_classes))
    memories["random"].append(_to_global(exemplars, step_classes))
    test_images, test_labels = test
    mask = torch.isin(test_labels, torch.tensor(seen, dtype=test_labels.dtype))
    eval_seed = derived_seed(config.seed, EVAL_STREAM, order, step)
    record: dict[str, Any] = {"order": order, "step": step, "classes": step_classes, "seen_classes": list(seen),
                              "num_seen": len(seen), "test_images": int(mask.sum()),
                              "regularizer_weights": dict(distilled.metadata.regularizers)}
    for name, memory in memories.items():
        images = torch.cat([part[0] for part in memory])
        labels = torch.cat([part[1] for part in memory])
        record[f"{name}_memory_size"] = len(images)
        record[f"{name}_memory_labels"] = sorted({int(label) for label in labels.tolist()})
        record[f"{name}_accuracy"] = _evaluate(images, labels, real.info.num_classes, test_images[mask],
                                               test_labels[mask], config, eval_seed)
    record["seconds"] = time.perf_counter() - started
    return record


def _summary(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_order": list(values)}


def run_continual(config: ContinualConfig, out_dir: str | Path, real: RealData | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the protocol into ``out_dir``; write ``continual.json`` and ``continual.png`` and
    return the JSON's content."""
    started = time.perf_counter()
    config.validate()
    real = real if real is not None else load_dataset(config.dataset, data_root=config.data_root)
    info = real.info
    config.check_fits(info, _smallest_class(real))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(config)
    _check_settings(out, settings)

    test_images, test_labels = real.test_tensors()
    orders = class_orders(info.num_classes, config.orders, config.seed)
    records: list[list[dict[str, Any]]] = []
    bar = tqdm(total=config.orders * config.steps, desc=f"continual {config.label()}", unit="step",
               disable=not progress)
    with bar:
        for order, classes in enumerate(orders):
            memories: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"distilled": [], "random": []}
            seen: list[int] = []
            order_records = []
            for step, step_classes in enumerate(split_steps(classes, config.steps)):
                step_dir = out / f"order-{order}" / f"step-{step}"
                record_path = step_dir / RECORD_NAME
                seen = seen + step_classes
                if record_path.exists():  # finished before: rebuild the memories from its sets
                    record = json.loads(record_path.read_text())
                    if record.get("classes") != step_classes:
                        raise UserInputError(f"'{record_path}' is for classes {record.get('classes')}, but this "
                                             f"step has {step_classes}; use another --out")
                    memories["distilled"].append(_to_global(load_set(step_dir / ARTEFACT_NAME), step_classes))
                    memories["random"].append(_to_global(load_set(step_dir / RANDOM_NAME), step_classes))
                else:
                    record = _run_step(config, real, memories, seen, step_classes, step_dir, order, step,
                                       (test_images, test_labels))
                    _write_json(record_path, record)
                order_records.append(record)
                bar.update(1)
            records.append(order_records)

    summary = []
    for step in range(config.steps):
        first = records[0][step]
        summary.append({
            "step": step, "num_seen": first["num_seen"], "memory_size": first["distilled_memory_size"],
            "random_memory_size": first["random_memory_size"],
            "distilled": _summary([records[o][step]["distilled_accuracy"] for o in range(config.orders)]),
            "random": _summary([records[o][step]["random_accuracy"] for o in range(config.orders)]),
        })
    payload = {"settings": settings, "dataset": info.name, "num_classes": info.num_classes,
               "label": config.label(), "class_orders": orders,
               "orders": [{"order": o, "classes": orders[o], "steps": records[o]} for o in range(config.orders)],
               "summary": summary, "figure": FIGURE_NAME}
    _plot(payload, out / FIGURE_NAME)
    payload["wall_seconds"] = time.perf_counter() - started
    _write_json(out / JSON_NAME, payload)
    return payload


def _plot(payload: dict[str, Any], path: Path) -> None:
    """Accuracy vs seen classes, mean +- std over orders, for the distilled and the random memory."""
    figure = new_figure(6.0, 4.0)
    axis = figure.subplots()
    seen = [entry["num_seen"] for entry in payload["summary"]]
    for key, label, marker in (("distilled", payload["label"], "o"), ("random", "random exemplars", "s")):
        axis.errorbar(seen, [entry[key]["mean"] for entry in payload["summary"]],
                      yerr=[entry[key]["std"] for entry in payload["summary"]], marker=marker, capsize=3, label=label)
    settings = payload["settings"]
    axis.set_xticks(seen)
    axis.set_xlabel("number of seen classes")
    axis.set_ylabel("test accuracy on seen classes (%)")
    axis.set_title(f"{payload['dataset']}, ipc {settings['ipc']}, {settings['orders']} class orders, "
                   f"{settings['eval_model']}", fontsize="medium")
    axis.legend()
    save_figure(figure, path)


# --------------------------------------------------------------------------------------------------
# command line (``infodistill continual``; its flags are in infodistill/cli/parsers.py)


def continual_config_from_args(args: argparse.Namespace) -> ContinualConfig:
    """The validated :class:`ContinualConfig` the flags describe."""
    return ContinualConfig(
        dataset=args.dataset, method=args.method, ipc=args.ipc, cmi_weight=parse_cmi_weight(args.cmi_weight),
        iterations=args.iterations, epochs=args.epochs, steps=args.steps, orders=args.orders, model=args.model,
        eval_model=args.eval_model, batch_real=args.batch_real, seed=args.seed, device=args.device,
        proxy_epochs=args.proxy_epochs, proxy_count=args.proxy_count, proxy_arch=args.proxy_arch,
        data_root=args.data_root).validate()


def command_continual(args: argparse.Namespace) -> int:
    """Class-incremental learning with a distilled memory against random exemplars: continual.json and
    continual.png in --out."""
    config = continual_config_from_args(args)
    payload = run_continual(config, args.out, progress=not args.quiet)
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(f"continual: {payload['dataset']}, {config.label()} vs random exemplars, ipc {config.ipc}, "
          f"{config.orders} orders x {config.steps} steps, {payload['wall_seconds']:.1f} s")
    print(f"  {'step':>4}  {'seen':>4}  {'memory':>6}  {'distilled':>15}  {'random':>15}")
    for entry in payload["summary"]:
        distilled, random_ = entry["distilled"], entry["random"]
        print(f"  {entry['step'] + 1:>4}  {entry['num_seen']:>4}  {entry['memory_size']:>6}  "
              f"{distilled['mean']:6.2f} +- {distilled['std']:5.2f}  {random_['mean']:6.2f} +- {random_['std']:5.2f}")
    out = Path(args.out)
    print(f"figure: {out / FIGURE_NAME}")
    print(f"numbers: {out / JSON_NAME}")
    return 0
