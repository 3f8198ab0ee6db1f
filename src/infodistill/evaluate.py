"""The evaluation protocol of the dataset-distillation papers, and the random-subset baseline.

A fresh network is trained from scratch on a labelled set and tested on the full real test set; this
is repeated for several runs with different seeds and reported as mean and standard deviation.
Published recipe (DC/DSA/DM/MTT): ConvNet-3, SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
learning rate x0.1 for the second half of training, DSA augmentation, 1000 epochs.

The networks are trained by :func:`infodistill.training.train_from_scratch` (one after another or
together, vectorised); this module adds the protocol around it: the set's labels and learned rate, the
KD recipe, the seeds of the runs, the real test set.

:func:`evaluate_models` scores one set with several architectures (cross-architecture generalisation);
:func:`write_evaluation` stores results as evaluation.json (the format other commands read) plus a CSV.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infodistill.artefact import DistilledSet, SetMetadata
from infodistill.data import ClassSampler, DatasetInfo, RealData
from infodistill.data.zca import whiten
from infodistill.errors import UserInputError
from infodistill.files import atomic_paths
from infodistill.models import build_model, model_names_help, parse_model_name
from infodistill.parallel import ProcessGroup, all_gather_objects, rank_device
from infodistill.precision import resolve_precision
from infodistill.seeds import run_seeds
from infodistill.training import EvalConfig, bf16_measured, resolve_device, top1_accuracy, train_from_scratch

KD_RECIPE: dict[str, Any] = {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "lr_schedule": "cosine"}
"""SRe2L's relabel recipe (the student training of its CIFAR and ImageNet-1K relabel scripts): AdamW lr 0.001,
weight decay 0.01, cosine decay, loss KL(teacher soft labels at temperature T || softmax(student logits / T)).
The soft labels are the ones stored in the set (the official scripts query the teacher afresh on every
augmented, mixed-up batch, which a stored set cannot hold). ``recipe="auto"`` uses it for sets that carry a
``relabel_temperature`` (SRe2L, DWA)."""


@dataclass
class EvalResult:
    """Per-run test accuracies (percent) and how they were obtained."""

    model: str
    dataset: str
    accuracies: list[float]
    epochs: int
    lr: float
    labels: str
    augmentation: str
    train_size: int
    test_size: int
    batched: bool
    seconds: float
    seeds: list[int] = field(default_factory=list)
    learned_lr: bool = False
    recipe: str = "protocol"
    temperature: float = 1.0
    precision: str = "fp32"

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Population standard deviation over runs (numpy's default, as the papers' code reports)."""
        return float(np.std(self.accuracies))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std, "runs": len(self.accuracies)}

    def summary(self) -> str:
        labels = "the set's soft labels" if self.labels == "soft" else "hard labels"
        lr = f"the set's learned lr {self.lr:g}" if self.learned_lr else f"lr {self.lr:g}"
        if self.recipe == "kd":
            lr = f"KD recipe (AdamW lr {self.lr:g}, cosine, temperature {self.temperature:g})"
        return (
            f"{self.model} on {self.dataset} ({self.test_size} test images), {len(self.accuracies)} runs x "
            f"{self.epochs} epochs, {self.train_size} training images, {labels}, "
            f"augmentation {self.augmentation}, {lr}"
            + (f", {self.precision} compute" if self.precision != "fp32" else "")
            + f": {self.mean:.2f} +- {self.std:.2f} %"
        )


def check_set_fits(distilled: DistilledSet, info: DatasetInfo) -> None:
    """Refuse a set whose image shape or class count does not match the dataset it is scored on."""
    expected = (info.channels, *info.image_size)
    if distilled.image_shape != expected:
        raise UserInputError(
            f"the set's images are {'x'.join(map(str, distilled.image_shape))} but dataset "
            f"'{info.name}' has {'x'.join(map(str, expected))} images"
        )
    if distilled.num_classes != info.num_classes:
        raise UserInputError(
            f"the set has {distilled.num_classes} classes but dataset '{info.name}' has {info.num_classes}"
        )


def evaluate_set(
    distilled: DistilledSet, real: RealData, config: EvalConfig, progress: bool = True,
    run_indices: Sequence[int] | None = None,
) -> EvalResult:
    """Score a distilled (or selected) set with the protocol: N runs from scratch, real test set.

    ``run_indices`` trains only those of the ``config.runs`` runs (each with its own seed from
    :func:`run_seeds`), e.g. the share of one process; the result lists them in the given order."""
    config.validate()
    check_set_fits(distilled, real.info)
    if "zca" in distilled.metadata.extra:
        real = whiten(real, float(distilled.metadata.extra["zca"]))  # the set lives in whitened space
    started = time.perf_counter()
    soft_labels = distilled.soft_labels if config.use_soft_labels else None
    soft = soft_labels is not None
    targets = soft_labels if soft_labels is not None else distilled.labels
    relabelled = "relabel_temperature" in distilled.metadata.extra
    if config.recipe == "kd" or (config.recipe == "auto" and soft and relabelled):
        temperature = float(distilled.metadata.extra.get("relabel_temperature", config.temperature))
        config = replace(config, **KD_RECIPE, temperature=temperature, use_learned_lr=False, recipe="kd")
    config = replace(config, precision=resolve_precision(config.precision, resolve_device(config.device),
                                                         bf16_measured(config)))
    learned = distilled.lr if config.use_learned_lr else None
    learned_lr = learned is not None
    lr = float(learned.item()) if learned is not None else config.lr
    seeds = run_seeds(config.seed, config.runs)
    if run_indices is not None:
        if any(not 0 <= index < config.runs for index in run_indices):
            raise UserInputError(f"run indices {list(run_indices)} must lie in 0..{config.runs - 1}")
        seeds = [seeds[index] for index in run_indices]
    models, together = train_from_scratch(distilled.images, targets, real.info.num_classes, config, seeds,
                                          lr=lr, progress=progress)
    test_images, test_labels = real.test_tensors()
    accuracies = [top1_accuracy(model, test_images, test_labels, config.test_batch_size, config.precision)
                  for model in models]
    return EvalResult(
        model=config.model,
        dataset=real.info.name,
        accuracies=accuracies,
        epochs=config.epochs,
        lr=lr,
        labels="soft" if soft else "hard",
        augmentation=config.augment,
        train_size=len(distilled.images),
        test_size=len(test_labels),
        batched=together,
        seconds=time.perf_counter() - started,
        seeds=seeds,
        learned_lr=learned_lr,
        recipe="kd" if config.recipe == "kd" else "protocol",
        temperature=config.temperature,
        precision=config.precision,
    )


def random_subset(real: RealData, ipc: int, seed: int) -> DistilledSet:
    """The fair baseline: ``ipc`` real training images per class, drawn at random with ``seed``."""
    sampler = ClassSampler(real.train_images, real.train_labels, real.info.num_classes)
    subset_uint8, subset_labels = sampler.random_subset(ipc, torch.Generator().manual_seed(seed))
    metadata = SetMetadata(
        dataset=real.info.name,
        mean=tuple(real.info.mean),
        std=tuple(real.info.std),
        classes=tuple(real.info.class_names),
        method="random",
        ipc=ipc,
        seed=seed,
    )
    return DistilledSet(images=real.normalise(subset_uint8).float().contiguous(), labels=subset_labels.long(),
                        metadata=metadata)



# ----------------------------------------------------------------------------------------------
# Cross-architecture evaluation: one set, several models, one table and one evaluation.json
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "mean", "std", "runs", "epochs", "labels", "recipe", "accuracies")
"""Columns of the CSV written beside an evaluation.json; ``accuracies`` holds the runs joined by ';'."""
EVALUATION_NAME = "evaluation.json"
"""Where a run directory keeps its evaluation (the name ``sweep`` writes and ``report`` reads)."""


def check_model_names(models: Sequence[str]) -> list[str]:
    """The names of ``models`` as a list, each parsed; refuse an empty list, a malformed name or a repeat.

    Checked up front so that a typo in the last name does not surface after the first models trained.
    """
    if isinstance(models, str) or not isinstance(models, Sequence):
        raise UserInputError(f"models must be a list of model names, got {models!r}; {model_names_help()}")
    names = list(models)
    if not names:
        raise UserInputError(f"models is empty; give at least one model name; {model_names_help()}")
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise UserInputError(f"model name {name!r} is empty; {model_names_help()}")
        canonical = parse_model_name(name).canonical_name
        if canonical in seen:
            raise UserInputError(f"model {name!r} is listed twice (as {seen[canonical]!r} and {name!r}); "
                                 "give each model once")
        seen[canonical] = name
    return names


def _check_buildable(name: str, distilled: DistilledSet, num_classes: int) -> None:
    """Build ``name`` for the set's image shape on the meta device (no memory, no compute), so that a
    model too deep for the images is refused before any model trains."""
    channels, height, width = distilled.image_shape
    with torch.device("meta"):
        build_model(name, channels=channels, num_classes=num_classes, image_size=(height, width))


def evaluate_models(
    distilled: DistilledSet,
    real: RealData,
    config: EvalConfig,
    models: Sequence[str],
    progress: bool = True,
) -> list[EvalResult]:
    """Score one set with several architectures (cross-architecture generalisation), in the given order.

    Each model is :func:`evaluate_set` with ``config``'s recipe, runs and seeds and only the model
    replaced, so every entry equals that model evaluated alone. All names, the settings and the set's
    fit to the data (including whether each model can take the images) are checked before any training.
    """
    configs = _model_configs(distilled, real, config, models)
    return [evaluate_set(distilled, real, model_config, progress=progress) for model_config in configs]


def _model_configs(
    distilled: DistilledSet, real: RealData, config: EvalConfig, models: Sequence[str]
) -> list[EvalConfig]:
    """``config`` for each model, after checking the names, the settings and that each model takes the set."""
    names = check_model_names(models)
    configs = [replace(config, model=name) for name in names]
    for model_config in configs:
        model_config.validate()
    check_set_fits(distilled, real.info)
    for name in names:
        _check_buildable(name, distilled, real.info.num_classes)
    return configs


def check_evaluation_processes(processes: int, models: int, runs: int) -> None:
    """Refuse more processes than (model, run) jobs: a process would have nothing to train."""
    if processes > models * runs:
        raise UserInputError(f"{processes} processes is more than the {models * runs} (model, run) jobs "
                             f"({models} model(s) x {runs} run(s)); use at most {models * runs}")


def evaluate_spread(
    distilled: DistilledSet,
    real: RealData,
    config: EvalConfig,
    models: Sequence[str],
    group: ProcessGroup,
    progress: bool = True,
) -> list[EvalResult]:
    """:func:`evaluate_models` over the processes of ``group`` (every process calls it alike).

    The (model, run) jobs go to the processes round-robin; each process trains its runs one at a time
    (``batched`` off), each run with its seed from :func:`run_seeds`, so every run is the one a single
    process trains sequentially. The results are gathered and every process returns the same list;
    only ``seconds`` (the wall time of the whole evaluation) and ``batched`` (False) may differ from a
    one-process evaluation, which trains the runs together on GPUs."""
    started = time.perf_counter()
    configs = _model_configs(distilled, real, config, models)
    check_evaluation_processes(group.world_size, len(configs), config.runs)
    device = str(rank_device(group, resolve_device(config.device)))
    jobs = [(model, run) for model in range(len(configs)) for run in range(config.runs)]
    mine = [(model, run, evaluate_set(distilled, real, replace(configs[model], batched="off", device=device),
                                      progress=progress, run_indices=[run]))
            for model, run in jobs[group.rank :: group.world_size]]
    finished = sorted((job for part in all_gather_objects(group, mine) for job in part), key=lambda job: job[:2])
    seconds = time.perf_counter() - started
    results = []
    for model in range(len(configs)):
        runs = [result for index, _, result in finished if index == model]
        results.append(replace(runs[0], accuracies=[a for result in runs for a in result.accuracies],
                               seeds=[seed for result in runs for seed in result.seeds], batched=False,
                               seconds=seconds))
    return results


def evaluation_payload(set_path: str | Path, results: Sequence[EvalResult], extra: dict | None = None) -> dict:
    """The evaluation.json content: ``{"set", "dataset", "results": [EvalResult.to_dict(), ...]}`` plus the
    entries of ``extra`` (e.g. ``scores``, :mod:`infodistill.scores`)."""
    if not results:
        raise UserInputError("there are no evaluation results to report; evaluate at least one model")
    return {"set": str(set_path), "dataset": results[0].dataset, "results": [result.to_dict() for result in results],
            **(extra or {})}


def write_evaluation(path: str | Path, set_path: str | Path, results: Sequence[EvalResult],
                     extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``path`` (evaluation.json, see :func:`evaluation_payload`, with ``extra``'s entries) and the same
    results as a CSV beside it (same stem, ``.csv``), each atomically; return both paths.

    The JSON is the format other commands read; the CSV (one row per model, accuracies joined by ';')
    is for spreadsheets and plotting.
    """
    path = Path(path)
    if path.suffix != ".json":
        raise UserInputError(f"evaluation output '{path}' must end in .json")
    payload = evaluation_payload(set_path, results, extra)
    csv_path = path.with_suffix(".csv")
    written = path
    try:
        # the old pair stays until both new files are written
        with atomic_paths(path, csv_path) as (json_temporary, csv_temporary):
            json_temporary.write_text(json.dumps(payload, indent=2) + "\n")
            written = csv_path
            with csv_temporary.open("w", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(CSV_COLUMNS)
                for result in results:
                    writer.writerow([result.model, repr(result.mean), repr(result.std), len(result.accuracies),
                                     result.epochs, result.labels, result.recipe,
                                     ";".join(repr(float(accuracy)) for accuracy in result.accuracies)])
    except OSError as error:
        raise UserInputError(f"cannot write '{written}': {error.strerror or error}") from None
    return path, csv_path


def format_results_table(results: Sequence[EvalResult]) -> str:
    """A plain-text table, one row per result in order: model | mean +- std | runs | per-run accuracies."""
    header = ("model", "accuracy % (mean +- std)", "runs", "per-run accuracies %")
    rows = [
        (result.model, f"{result.mean:.2f} +- {result.std:.2f}", str(len(result.accuracies)),
         ", ".join(f"{accuracy:.2f}" for accuracy in result.accuracies))
        for result in results
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells[:-1], widths)]
        return " | ".join([*padded, cells[-1]]).rstrip()

    separator = "-+-".join("-" * width for width in widths)
    return "\n".join([line(header), separator, *(line(row) for row in rows)])
