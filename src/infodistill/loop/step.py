"""One iteration of the loop: for every matching loss the method yields, add the active regularizers and step
the images (:func:`run_iteration`); stop the run when a loss or a stepped tensor stops being finite."""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from typing import Any

import torch

from infodistill.loop.parts import ImageAverage, RegularizerTerm
from infodistill.loop.split import ProcessSplit, sum_gradients_over_processes, summed_over_processes
from infodistill.methods import ClassUpdate, DistillContext, Method
from infodistill.parallel import SINGLE_PROCESS, ProcessGroup, is_main
from infodistill.precision import autocast_context, to_fp32
from infodistill.synthetic import SyntheticSet


class LossDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


_NON_FINITE_PROCESSES = "processes/non_finite"
"""The entry of a split run's end-of-iteration exchange that counts the processes whose tensors became non-finite."""


def computed_in(precision: str, device: torch.device | str, steps: Iterator[Any]) -> Generator[Any, None, None]:
    """The items of ``steps`` (a method's iteration), each computed in ``precision``: the generator is
    advanced inside :func:`~infodistill.precision.autocast_context`, and left outside it between items
    (where the loop steps the optimiser)."""
    try:
        while True:
            with autocast_context(precision, device):
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(steps, "close", None)  # a generator: let it finish as when iterated directly
        if close is not None:
            close()


def regularized_images(synthetic: SyntheticSet, label: int | None,
                       classes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the regularizers see: the whole set, one class for a per-class update, or the classes
    of this process in a run split over processes."""
    if label is not None:
        classes = (label,)
    if classes is None:
        return synthetic.images(), synthetic.labels
    images = [synthetic.class_images(c) for c in classes]
    labels = [synthetic.labels.new_full((len(batch),), c) for batch, c in zip(images, classes)]
    return (images[0], labels[0]) if len(images) == 1 else (torch.cat(images), torch.cat(labels))


def run_iteration(method: Method, terms: list[RegularizerTerm], context: DistillContext,
                  optimizer: torch.optim.Optimizer, average: ImageAverage | None = None,
                  split: ProcessSplit | None = None, precision: str = "fp32") -> dict[str, float]:
    """One iteration: for every matching loss the method yields, add the active regularizers and
    update the images (and the method's learned tensors). For a :class:`ClassUpdate` the regularizers
    see that class's images only. Returns each loss term averaged over the iteration's updates.

    In a run split by class (``context.classes`` set) the method's loss and each regularizer's
    :meth:`~infodistill.regularizers.Regularizer.class_share` cover this process's classes. In a run split
    by trajectory (``split.replicated``) the method's loss covers this process's trajectories, the
    regularizers are computed by rank 0 alone on the whole set, and the gradients are summed over the
    processes before the step. The logged terms, and the divergence check, are sums over the processes.

    ``precision``: the method's and the regularizers' forward passes run in it (``docs/precision.md``);
    every loss term is float32 before it is weighted, summed and logged, and the backward pass and the
    optimiser step run outside autocast on the float32 tensors."""
    group = split.group if split is not None else SINGLE_PROCESS
    device = getattr(context, "device", torch.device("cpu"))  # a minimal context (tests) need not carry it
    learned = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    sums: dict[str, float] = {}
    updates = 0
    non_finite: str | None = None  # in a split run: how this process's first non-finite update is reported
    for step in computed_in(precision, device, method.iteration(context)):
        matching, label = (step.loss, step.label) if isinstance(step, ClassUpdate) else (step, None)
        active = [term for term in terms if term.active(context.iteration)]
        if matching is None:  # another process's class update (a run split by class): a zero step
            _add_update(sums, _skipped_update(method, active, context), context.iteration, group)
            for parameter in learned:
                parameter.grad = torch.zeros_like(parameter)
        else:
            values = _loss_terms(method, active, context, to_fp32(matching), label, split, precision, updates)
            _add_update(sums, values, context.iteration, group)
            optimizer.zero_grad(set_to_none=True)
            # only the set and the method's tensors learn; networks stay untouched
            values["loss/total"].backward(inputs=learned)
            if split is not None and split.replicated:
                sum_gradients_over_processes(learned, group)
        reason = _step(optimizer, method, context.synthetic, average, context.iteration, group)
        non_finite = non_finite or reason
        updates += 1
    if group.distributed:  # one exchange per iteration, so that no process waits for another at every update
        sums = _summed_with_the_other_processes(sums, non_finite, context.iteration, group)
    return {name: value / max(updates, 1) for name, value in sums.items()}


def _loss_terms(method: Method, active: list[RegularizerTerm], context: DistillContext, matching: torch.Tensor,
                label: int | None, split: ProcessSplit | None, precision: str, update: int) -> dict[str, torch.Tensor]:
    """One update's loss terms, each float32: the method's matching loss (given), every active regularizer's on
    the images it concerns (:func:`regularized_images`), and their weighted sum ``loss/total``. In a run split
    by trajectory rank 0 alone computes the regularizers, on the whole set; the others give zero for them. The
    regularizers draw from the stream of this ``update`` (``context.regularizer_generator``), the same in every
    process."""
    synthetic = context.synthetic
    classes = getattr(context, "classes", None)  # a minimal context (tests) need not carry it
    device = getattr(context, "device", torch.device("cpu"))  # nor its device
    values = {f"loss/{method.name}": matching}
    total = matching
    if active:
        images, labels = regularized_images(synthetic, label, classes)
        generator = context.regularizer_generator(update)
        for term in active:
            if split is not None and split.replicated and not is_main(split.group):  # rank 0 adds it for the set
                values[f"loss/{term.name}"] = torch.zeros((), device=matching.device)
                continue
            with autocast_context(precision, device):
                if classes is None or label is not None:
                    value = term.regularizer.loss(images, labels, generator)
                else:
                    value = term.regularizer.class_share(images, labels, generator,
                                                         len(synthetic.labels), synthetic.num_classes)
            value = to_fp32(value)
            values[f"loss/{term.name}"] = value
            total = total + term.weight * value
    values["loss/total"] = total
    return values


def _summed_with_the_other_processes(sums: dict[str, float], non_finite: str | None, iteration: int,
                                     group: ProcessGroup) -> dict[str, float]:
    """The iteration's logged terms of a split run summed over its processes (one exchange), with the number of
    processes whose update made a tensor non-finite (``non_finite``: this process's reason, or None). A total
    that is not finite, or any such process, stops every process here together (:class:`LossDiverged`), so that
    none writes the state."""
    exchanged = {name: torch.tensor(value, dtype=torch.float64) for name, value in sums.items()}
    exchanged[_NON_FINITE_PROCESSES] = torch.tensor(float(non_finite is not None), dtype=torch.float64)
    sums = summed_over_processes(exchanged, group)
    _check_finite(sums["loss/total"], iteration)
    if sums.pop(_NON_FINITE_PROCESSES) > 0:
        raise LossDiverged(non_finite or f"an update of iteration {iteration} made the tensors of "
                           "another process non-finite")
    return sums


def _add_update(sums: dict[str, float], values: dict[str, torch.Tensor], iteration: int, group: ProcessGroup) -> None:
    """Add one update's loss terms to ``sums``. In one process a NaN or infinite total stops the run at once;
    in several, each process holds only its part, and the total is checked once their sums are exchanged at
    the end of the iteration (every process then stops together; the last good checkpoint is kept either way)."""
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach())
    if not group.distributed:
        _check_finite(sums["loss/total"], iteration)


def _check_finite(total: float, iteration: int) -> None:
    if not math.isfinite(total):
        raise LossDiverged(f"the loss became {total} at iteration {iteration}")


def _skipped_update(method: Method, active: list[RegularizerTerm], context: DistillContext) -> dict[str, torch.Tensor]:
    """For a class update another process computes: zero for every loss term (the owner's terms make up the
    sums over the processes; each update's draws are a stream of their own, so there is nothing to replay)."""
    zero = torch.zeros((), device=getattr(context, "device", torch.device("cpu")))
    return {f"loss/{method.name}": zero, **{f"loss/{term.name}": zero for term in active}, "loss/total": zero}


def _step(optimizer: torch.optim.Optimizer, method: Method, synthetic: SyntheticSet, average: ImageAverage | None,
          iteration: int = 0, group: ProcessGroup = SINGLE_PROCESS) -> str | None:
    """The optimiser step, the method's projection and the image average's update, after every image update.

    Then every stepped tensor (the set's, a learned lr, soft-label logits, projection heads) must be finite:
    in one process a non-finite one stops the run at once (:class:`LossDiverged`), before anything of this
    state can reach a checkpoint or the artefact. In a split run the process returns the reason instead, and
    :func:`run_iteration` stops every process together after the iteration's one exchange. Returns None when
    all is finite. The check only reads the tensors, so a finite run computes exactly as without it."""
    optimizer.step()
    with torch.no_grad():
        method.project(synthetic)
    if average is not None:
        average.update(synthetic)
    bad = _non_finite_tensor(optimizer)
    if bad is None:
        return None
    reason = f"the update at iteration {iteration} made '{bad}' non-finite"
    if not group.distributed:
        raise LossDiverged(reason)
    return reason


def _non_finite_tensor(optimizer: torch.optim.Optimizer) -> str | None:
    """The checkpoint name (``<group name>.<position>``) of the first tensor the optimiser steps that holds a NaN
    or an infinity, else None (one device synchronisation for all of them). A group without a name (an optimiser
    built outside the loop) is named by its index."""
    named = [(f"{group.get('name', index)}.{position}", parameter)
             for index, group in enumerate(optimizer.param_groups)
             for position, parameter in enumerate(group["params"])]
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).cpu()
    if bool(finite.all()):
        return None
    return next(name for (name, _), ok in zip(named, finite.tolist()) if not ok)
