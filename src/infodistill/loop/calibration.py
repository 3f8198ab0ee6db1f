"""The CMI weight 'auto': the weight that sets the CMI term's gradient on the initial set to a measured ratio
of the matching loss's gradient (``docs/cmi.md``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from infodistill.errors import UserInputError
from infodistill.loop.step import computed_in, regularized_images
from infodistill.methods import ClassUpdate, DistillContext, Method
from infodistill.precision import autocast_context, to_fp32
from infodistill.regularizers import CMIRegularizer, cmi_from_features

PUBLISHED_CMI_WEIGHTS: dict[str, float] = {"dm": 8000.0, "dc": 5e4, "dsa": 5e4, "idc": 100.0}
"""The CMI paper's lambda at IPC 10 on CIFAR-10, per method (methods.md, section 1, from the official code)."""


CMI_TARGET_RATIOS: dict[str, dict[int, float]] = {
    "dm": {10: 0.44, 50: 0.29},
    "dsa": {10: 1.46},
    "dc": {10: 1.46},
    "idc": {10: 0.024},
}
"""'auto''s target ratio ||lambda * grad CMI(S_0)|| / ||grad L_method(S_0)|| per method and IPC: the ratio the
paper's lambda (DM 8000 / 2000 at IPC 10 / 50, DSA 5e4, IDC 100 per class) gives on the initial set under a
pool of the paper's proxies (instance-norm ResNet18, 512-d pooled), measured on Fashion-MNIST at the paper's
256 real images per class with ``benchmarks/bench_cmi_calibration.py`` (docs/cmi.md, which gives the pool and
each figure). DM at IPC 10 / 50: 0.44 / 0.29, DSA at IPC 10: 1.46, IDC at IPC 10: 0.024 (4 ResNet18-IN,
82.8-83.5 % test accuracy). DC takes DSA's ratio (the paper
gives both one lambda); methods without a published lambda take DM's; the nearest measured IPC is used (the
smaller on a tie)."""


CALIBRATION_DRAWS = 3
"""Iterations of the calibration stream whose matching-loss gradients 'auto' averages (one random network
each for DM): the norm of one draw varies with the network."""


@dataclass(frozen=True)
class CMICalibration:
    """How 'auto' chose the CMI weight on the initial set S_0, recorded in config.yaml and the artefact:
    ``weight = scale * target_ratio * method_grad_norm / cmi_grad_norm``, the norms taken over the tensors
    the optimiser steps (the pixels of a pixel set)."""

    target_ratio: float
    scale: float
    method_grad_norm: float
    cmi_grad_norm: float
    initial_loss: float
    initial_cmi: float
    weight: float

    @property
    def ratio(self) -> float:
        """The gradient ratio the weight gives on S_0: ``weight * cmi_grad_norm / method_grad_norm``."""
        return self.weight * self.cmi_grad_norm / self.method_grad_norm

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


def cmi_target_ratio(method: str, ipc: int) -> float:
    """The gradient ratio 'auto' aims at for ``method`` at ``ipc`` (:data:`CMI_TARGET_RATIOS`)."""
    by_ipc = CMI_TARGET_RATIOS.get(method, CMI_TARGET_RATIOS["dm"])
    return by_ipc[min(by_ipc, key=lambda measured: (abs(measured - ipc), measured))]


def _gradient_norm(value: torch.Tensor, learned: Sequence[torch.Tensor]) -> float:
    grads = torch.autograd.grad(value, learned, allow_unused=True)
    return math.sqrt(sum(float(grad.double().pow(2).sum()) for grad in grads if grad is not None))


def initial_gradients(method: Method, regularizer: CMIRegularizer, contexts: list[DistillContext],
                      precision: str = "fp32") -> tuple[float, float, float, float]:
    """(mean matching loss, mean norm of its gradient, CMI, norm of the CMI's gradient) on the initial set.

    The matching loss is the method's first loss of each context (one per calibration draw); its gradient
    is taken over the tensors the optimiser steps. The CMI is the mean over the WHOLE pool (not one random
    draw, so the weight does not hinge on one proxy), on the images that loss concerns (the whole set, or
    one class's for a per-class update), with the regularizer's per-class rule."""
    losses, norms, label = [], [], None
    learned = [parameter for parameter in contexts[0].synthetic.parameters()]
    for context in contexts:
        steps = computed_in(precision, context.device, method.iteration(context))
        first = next(steps)
        loss = first.loss if isinstance(first, ClassUpdate) else first
        assert loss is not None  # only a run split by class yields a ClassUpdate without a loss
        matching = to_fp32(loss)
        label = first.label if isinstance(first, ClassUpdate) else None
        losses.append(float(matching.detach()))
        norms.append(_gradient_norm(matching, learned))
        steps.close()
    synthetic = contexts[0].synthetic
    images, labels = regularized_images(synthetic, label)
    pool = regularizer.pool
    with autocast_context(precision, contexts[0].device):
        values = [cmi_from_features(pool[index].embed(images), labels, pool.num_classes,
                                    per_class=regularizer.per_class) for index in range(len(pool))]
    cmi = to_fp32(torch.stack(values).mean())
    return float(np.mean(losses)), float(np.mean(norms)), float(cmi.detach()), _gradient_norm(cmi, learned)


def calibrate_cmi_weight(method: Method, regularizer: CMIRegularizer, contexts: list[DistillContext],
                         target_ratio: float, scale: float = 1.0, precision: str = "fp32") -> CMICalibration:
    """The 'auto' rule: lambda such that ``||lambda * grad CMI|| = scale * target_ratio * ||grad L_method||``
    on the initial set (:func:`initial_gradients`). The gradient ratio, not the loss ratio, is what sets
    how hard the term pulls against the matching loss (docs/cmi.md). The contexts come from a separate random
    stream, so calibrating does not change the run's iterations."""
    loss, method_norm, cmi, cmi_norm = initial_gradients(method, regularizer, contexts, precision)
    if not (cmi_norm > 0 and math.isfinite(cmi_norm)):
        raise UserInputError(f"cmi_weight 'auto' cannot calibrate: the CMI term's gradient on the initial set is "
                             f"{cmi_norm:g} (CMI {cmi:g}; with one image per class every class is its own centroid); "
                             "give a number instead")
    if not (method_norm > 0 and math.isfinite(method_norm)):
        raise UserInputError(f"cmi_weight 'auto' cannot calibrate: the matching loss's gradient on the initial set "
                             f"is {method_norm:g}; give a number instead")
    weight = scale * target_ratio * method_norm / cmi_norm
    return CMICalibration(target_ratio=target_ratio, scale=scale, method_grad_norm=method_norm, cmi_grad_norm=cmi_norm,
                          initial_loss=loss, initial_cmi=cmi, weight=weight)
