"""The distillation loop: one loop for every method x parameterisation x regularizers.

Per iteration the loop builds a :class:`~infodistill.methods.DistillContext` with the iteration's own
random stream, and for each matching loss the method yields it adds the weighted regularizers,
steps the image optimiser, and logs every term. Around that it keeps the run safe and repeatable:

- seeds: every iteration draws from a generator derived from (seed, iteration), so a run resumed
  from a checkpoint at iteration k continues exactly as the uninterrupted run did (bit for bit on CPU);
- checkpoints: the synthetic set, the optimiser's momentum and the resolved settings, written
  atomically every ``checkpoint_every`` iterations; ``resume`` continues from the last one;
- a loss that becomes NaN or infinite, or an update that makes a stepped tensor so, stops the run at that
  iteration (in every process of a split run); the last good checkpoint stays as it was, and no artefact
  is written from non-finite state;
- the run directory: one run at a time (an OS lock, taken by rank 0), and a fresh run never overwrites
  files already there;
- logs: every loss term per iteration to ``metrics.jsonl`` and TensorBoard (``tb/``);
- output: the artefact ``set.safetensors`` with its PNG grid, and ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from infodistill.artefact import save_set
from infodistill.data import ClassSampler, RealData, load_dataset
from infodistill.data.zca import whiten
from infodistill.errors import UserInputError
from infodistill.files import RunFiles, atomic_path
from infodistill.loop.calibration import CALIBRATION_DRAWS, calibrate_cmi_weight, cmi_target_ratio
from infodistill.loop.checkpoint import MetricsLog, held_run_directory, load_checkpoint, save_checkpoint
from infodistill.loop.config import DistillConfig
from infodistill.loop.monitor import check_held_out, evaluate_now, monitored_cmi
from infodistill.loop.output import check_finite_set, distilled_set
from infodistill.loop.parts import (
    CALIBRATION_STREAM,
    REGULARIZER_STREAM,
    RegularizerTerm,
    RunParts,
    build_run_parts,
    make_context,
    run_precision,
    schedule_factor,
)
from infodistill.loop.split import ProcessSplit, plan_split
from infodistill.loop.step import LossDiverged, run_iteration
from infodistill.parallel import SINGLE_PROCESS, ProcessGroup, is_main, rank_device
from infodistill.proxies import ProxyPool, load_proxy_pool
from infodistill.regularizers import CMIRegularizer, Regularizer
from infodistill.regularizers.base import REGULARIZER_REGISTRY, RegularizerSetup, regularizers_on
from infodistill.seeds import stream_generator
from infodistill.trained import LoadCache
from infodistill.training import resolve_device

log = logging.getLogger("infodistill")


@dataclass
class DistillResult:
    """Where a finished run wrote its outputs, and the settings it resolved."""

    out_dir: Path
    artefact: Path
    config: DistillConfig
    regularizer_weights: dict[str, float]
    iterations: int
    seconds: float


def distill(config: DistillConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
            real: RealData | None = None, cache: LoadCache | None = None,
            group: ProcessGroup = SINGLE_PROCESS) -> DistillResult:
    """Run (or resume) a distillation and write its artefact, config and metrics into ``out_dir``.

    ``real`` (the loaded dataset) and ``cache`` (pools and trajectories already read) let several runs
    in one process share what they read; the result is the same as reading it afresh.

    ``group``: this process's place in a run over several processes (every process calls ``distill``
    with the same arguments). The work is then divided between the processes as the method says
    (:class:`ProcessSplit`, ``docs/distributed.md``): by class, by image position or by trajectory;
    rank 0 gathers the whole set and alone writes files. The artefact is the one a single process writes
    (for trajectories: up to the order of the gradient sum)."""
    started = time.perf_counter()
    config.validate()
    config = config.with_method_defaults()
    files = RunFiles(out_dir)
    with held_run_directory(files, resume, config, group):
        return _distill_in(config, files, resume, progress, real, cache, group, started)


def _distill_in(config: DistillConfig, files: RunFiles, resume: bool, progress: bool, real: RealData | None,
                cache: LoadCache | None, group: ProcessGroup, started: float) -> DistillResult:
    """:func:`distill` in its run directory, which this run holds (rank 0 has its lock): build the run, start it
    afresh or from its checkpoint, write ``config.yaml``, iterate, and write the artefact."""
    device = rank_device(group, resolve_device(config.device))
    # 'auto' is fixed here, so config.yaml and the checkpoint record what the run computes in.
    config = dataclasses.replace(config, precision=run_precision(config, device))
    real = _run_data(config, real)
    split = _process_split(config, group, real.info.num_classes)
    sampler = _class_sampler(config, real, device)
    parts = _run_parts(config, real, sampler, device, resume, cache, split)
    regularizers = _regularizers(config, real, sampler, device, parts, cache, is_main(group))
    if is_main(group):
        files.root.mkdir(parents=True, exist_ok=True)
    if resume:
        start, weights, calibrated = load_checkpoint(files, parts.synthetic, parts.optimizer, config, parts.average,
                                                     processes=group.world_size)
    else:
        start = 0
        weights, calibrated = _fresh_weights(config, real, sampler, device, parts, regularizers.cmi, is_main(group))
    terms = _terms(config, regularizers, weights)
    run = _Run(config, files, group, device, real, sampler, split, parts, regularizers, terms, weights, calibrated)
    _write_config(run)
    _iterate(run, start, progress)
    return _finish(run, started)


@dataclass(frozen=True)
class _Regularizers:
    """The run's proxy pools and regularizers: the pool of ``--proxies`` (or None), every registered regularizer
    the config turns on (by name, in registration order; their weights come later), the held-out pool (or None)."""

    pool: ProxyPool | None
    built: dict[str, Regularizer]
    held_out: ProxyPool | None

    @property
    def cmi(self) -> CMIRegularizer | None:
        """The CMI term, whose weight 'auto' calibrates, when it is on."""
        cmi = self.built.get("cmi")
        return cmi if isinstance(cmi, CMIRegularizer) else None


@dataclass(frozen=True)
class _Run:
    """What the steps of a run share once it is built and its weights are known."""

    config: DistillConfig
    files: RunFiles
    group: ProcessGroup
    device: torch.device
    real: RealData
    sampler: ClassSampler
    split: ProcessSplit | None
    parts: RunParts
    regularizers: _Regularizers
    terms: list[RegularizerTerm]
    weights: dict[str, float]
    calibrated: dict[str, float] | None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return is_main(self.group)


def _run_data(config: DistillConfig, real: RealData | None) -> RealData:
    """The dataset of the run: ``real``, else loaded; ZCA-whitened when the run asks."""
    real = real if real is not None else load_dataset(config.dataset, data_root=config.data_root)
    if config.zca > 0:
        real = whiten(real, config.zca)  # every tensor the run sees, and the artefact, are in whitened space
    return real


def _process_split(config: DistillConfig, group: ProcessGroup, num_classes: int) -> ProcessSplit | None:
    """This process's share of a run over several processes (:func:`plan_split`); None in one process."""
    if not group.distributed:
        return None
    kind, per_rank = plan_split(config, group.world_size, num_classes)
    return ProcessSplit(group, kind, tuple(tuple(share) for share in per_rank))


def _class_sampler(config: DistillConfig, real: RealData, device: torch.device) -> ClassSampler:
    """The training images by class, on ``device``; refuses more images per class than the smallest class has."""
    train_images, train_labels = real.train_tensors()
    sampler = ClassSampler(train_images.to(device), train_labels.to(device), real.info.num_classes)
    if config.ipc > sampler.smallest_class_size():
        raise UserInputError(
            f"ipc {config.ipc} is above the smallest class size {sampler.smallest_class_size()} of '{real.info.name}'"
        )
    return sampler


def _run_parts(config: DistillConfig, real: RealData, sampler: ClassSampler, device: torch.device, resume: bool,
               cache: LoadCache | None, split: ProcessSplit | None) -> RunParts:
    """The set, the method and the optimiser (:func:`build_run_parts`), for this process's share of a split run."""
    parts = build_run_parts(config, real, sampler, device, fresh=not resume, cache=cache,
                            image_positions=split.mine if split is not None and split.kind == "images" else None)
    if split is not None and not split.replicated and len(parts.optimizer.param_groups) > 1:
        # plan_split has checked the parameterisation; tensors learned beside the set are not split by row
        raise UserInputError(f"method '{config.method}' learns tensors beside the set, which a run split by "
                             f"{split.kind} cannot divide; run it in one process")
    return parts


def _regularizers(config: DistillConfig, real: RealData, sampler: ClassSampler, device: torch.device,
                  parts: RunParts, cache: LoadCache | None, writer: bool) -> _Regularizers:
    """Load the proxy pools and build every registered regularizer the config turns on (those that learn
    tensors add them to the optimiser)."""
    pool = None
    if config.proxies is not None:
        pool = load_proxy_pool(config.proxies, real.info, device=str(device), cache=cache)
    if config.uses_cmi and config.ipc == 1 and config.param == "pixels" and writer:
        log.warning("CMI is identically 0 at ipc 1 with pixel images: each class has one image, so its "
                    "centroid equals that image's output; the term will do nothing")
    def setup() -> RegularizerSetup:  # each regularizer gets its own generator of the regularizers' stream
        return RegularizerSetup(config=config, sampler=sampler, info=real.info, device=device, pool=pool,
                                generator=stream_generator(config.seed, REGULARIZER_STREAM), optimizer=parts.optimizer)

    built = {name: REGULARIZER_REGISTRY[name].build(setup()) for name in regularizers_on(config)}
    held_out = None
    if config.held_out_proxies is not None:
        held_out = load_proxy_pool(config.held_out_proxies, real.info, device=str(device), cache=cache)
        check_held_out(pool, held_out)
    return _Regularizers(pool, built, held_out)


def _fresh_weights(config: DistillConfig, real: RealData, sampler: ClassSampler, device: torch.device,
                   parts: RunParts, cmi: CMIRegularizer | None,
                   writer: bool) -> tuple[dict[str, float], dict[str, float] | None]:
    """The CMI weight of a fresh run (none without the CMI term), and how 'auto' chose it (else None)."""
    if cmi is None:
        return {}, None
    if config.cmi_weight != "auto":
        assert config.cmi_weight is not None  # uses_cmi: a number here
        return {"cmi": float(config.cmi_weight)}, None
    # The first losses over every class, computed whole by every process (no split): the same
    # numbers, bit for bit, as in a one-process run.
    contexts = [make_context(config, draw, parts.synthetic, sampler, real, parts.augment, device, CALIBRATION_STREAM)
                for draw in range(CALIBRATION_DRAWS)]
    calibration = calibrate_cmi_weight(parts.method, cmi, contexts, cmi_target_ratio(config.method, config.ipc),
                                       config.cmi_auto_scale, config.precision)
    if writer:
        log.info("cmi_weight auto: lambda = %.6g (gradient ratio %.3g on the initial set)",
                 calibration.weight, calibration.ratio)
    return {"cmi": calibration.weight}, calibration.to_dict()


def _terms(config: DistillConfig, regularizers: _Regularizers, weights: dict[str, float]) -> list[RegularizerTerm]:
    """The regularizer terms, each with its weight (from ``weights`` where the run resolved it, as 'auto' or a
    checkpoint does, else its setting) and frequency; ``weights`` gains every term's weight."""
    terms = []
    for name, regularizer in regularizers.built.items():
        cls = REGULARIZER_REGISTRY[name]
        weight = weights[name] if name in weights else float(getattr(config, cls.weight_field))
        terms.append(RegularizerTerm(name, regularizer, weight, cls.every(config)))
    weights.update({term.name: term.weight for term in terms})
    return terms


def _write_config(run: _Run) -> None:
    """``config.yaml``: the resolved settings, the regularizers' weights and how 'auto' chose the CMI weight."""
    if run.writer:
        with atomic_path(run.files.config) as temporary:
            temporary.write_text(yaml.safe_dump({**dataclasses.asdict(run.config), "resolved_weights": run.weights,
                                                 **({"cmi_calibration": run.calibrated} if run.calibrated else {})},
                                                sort_keys=False))


def _iterate(run: _Run, start: int, progress: bool) -> None:
    """Iterations ``start`` to the last, each logged (``metrics.jsonl``, TensorBoard, the progress bar) with the
    evaluation and the CMI monitoring that fall on it; a checkpoint every ``checkpoint_every`` and at the end."""
    config, parts = run.config, run.parts
    assert config.iterations is not None  # with_method_defaults() fills it
    metrics = MetricsLog(run.files, start) if run.writer else None
    bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations,
               disable=not (progress and run.writer),
               desc=f"distill {config.method}" + (" + cmi" if run.terms else "")
               + (f" x{run.group.world_size} processes" if run.split is not None else ""), unit="it")
    last_good = start
    try:
        for iteration in bar:
            logged = _iteration(run, iteration, last_good)
            done = iteration + 1
            _evaluate_periodically(run, done, logged)
            _monitor_cmi(run, done, logged)
            if metrics is not None:
                metrics.write(iteration, logged)
            bar.set_postfix({name.split("/")[-1]: f"{value:.4g}" for name, value in logged.items()
                             if isinstance(value, float)})
            if done % config.checkpoint_every == 0 or done == config.iterations:
                save_checkpoint(run.files, parts.synthetic, parts.optimizer, done, config, run.weights, parts.average,
                                run.split, run.calibrated)
                last_good = done
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()


def _iteration(run: _Run, iteration: int, last_good: int) -> dict[str, Any]:
    """One iteration at its scheduled learning rate (:func:`run_iteration`): the logged loss terms. A diverged
    loss stops the run, naming the last good checkpoint (``last_good`` iterations) that stays."""
    config, parts = run.config, run.parts
    assert config.iterations is not None and config.lr_schedule is not None  # with_method_defaults() fills them
    context = make_context(config, iteration, parts.synthetic, run.sampler, run.real, parts.augment, run.device,
                           split=run.split)
    factor = schedule_factor(config.lr_schedule, iteration, config.iterations)
    for param_group in parts.optimizer.param_groups:
        param_group["lr"] = param_group["base_lr"] * factor
    try:
        return run_iteration(parts.method, run.terms, context, parts.optimizer, parts.average, run.split,
                             config.precision)
    except LossDiverged as diverged:
        kept = (f"the last good checkpoint (iteration {last_good}) is kept in '{run.files.checkpoint}'"
                if run.files.checkpoint.exists() else "no checkpoint was written yet")
        raise LossDiverged(f"{diverged}; stopped; {kept}") from None


def _evaluate_periodically(run: _Run, done: int, logged: dict[str, Any]) -> None:
    """Every ``eval_every`` iterations: the current set's accuracy into ``logged`` (:func:`evaluate_now`)."""
    config, parts = run.config, run.parts
    if config.eval_every and done % config.eval_every == 0:
        snapshot = distilled_set(parts.synthetic, parts.method, parts.average, config, run.real, run.weights, done,
                                 run.split)
        if run.writer:  # rank 0 evaluates; the others wait for it at their next collective
            evaluated = evaluate_now(snapshot, run.real, config, run.device)
            logged["eval/accuracy"] = evaluated.mean
            logged["eval/accuracies"] = evaluated.accuracies


def _monitor_cmi(run: _Run, done: int, logged: dict[str, Any]) -> None:
    """With a pool, every ``monitor_every`` iterations and at the end: the set's CMI under the pool and under the
    held-out pool into ``logged`` (:func:`monitored_cmi`)."""
    config, parts, pool = run.config, run.parts, run.regularizers.pool
    if pool is not None and config.monitor_every and (done % config.monitor_every == 0 or
                                                      done == config.iterations):
        for key, monitor_pool in (("monitor/cmi", pool), ("monitor/cmi_heldout", run.regularizers.held_out)):
            if monitor_pool is None or not monitor_pool.pooled:
                continue
            monitored = monitored_cmi(monitor_pool, parts.synthetic, parts.average, run.real.info.num_classes,
                                      run.split)
            if monitored is not None:
                logged[key] = monitored


def _finish(run: _Run, started: float) -> DistillResult:
    """Write the artefact of the finished run (rank 0), recording how 'auto' chose the CMI weight."""
    config, parts = run.config, run.parts
    assert config.iterations is not None  # with_method_defaults() fills it
    distilled = distilled_set(parts.synthetic, parts.method, parts.average, config, run.real, run.weights,
                              config.iterations, run.split)
    if run.calibrated is not None:
        extra = {**distilled.metadata.extra, "cmi_calibration": json.dumps(run.calibrated)}
        distilled = dataclasses.replace(distilled, metadata=dataclasses.replace(distilled.metadata, extra=extra))
    check_finite_set(distilled, run.files)
    if run.writer:
        save_set(distilled, run.files.artefact)
    return DistillResult(out_dir=run.files.root, artefact=run.files.artefact, config=config,
                         regularizer_weights=run.weights, iterations=config.iterations,
                         seconds=time.perf_counter() - started)
