"""A run divided over processes (``docs/distributed.md``): how a method's work is shared out
(:func:`plan_split`), each process's share and the gathering of the whole set (:class:`ProcessSplit`), and the
sums over the processes of the logged terms and of the gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infodistill.errors import UserInputError
from infodistill.loop.config import DistillConfig
from infodistill.methods import METHOD_REGISTRY, method_class
from infodistill.parallel import ProcessGroup, all_gather_tensors, all_reduce_sum, partition
from infodistill.regularizers.base import REGULARIZER_REGISTRY, regularizers_on
from infodistill.synthetic import PARAMETERISATION_REGISTRY, SyntheticSet

SPLIT_KINDS = {"classes": "classes", "images": "image_positions", "trajectories": "trajectories"}
"""Each way a method divides a run over processes (``Method.process_split``) -> the context field that
gives a process its share."""


@dataclass(frozen=True)
class ProcessSplit:
    """A run divided over processes (``docs/distributed.md``). Every process holds the whole set and makes
    every random draw; rank r computes the share ``parts[r]``: its classes, its image positions (the j-th
    image of every class), or its trajectories.

    For classes and images a process steps only its own rows of the set (the others get a zero gradient
    there), and the whole set is gathered from the rows' owners when it is logged, checkpointed or written,
    or when a method reads all of it (:meth:`refresh`). For trajectories every process computes a part of
    the gradient of the whole set; the loop sums the gradients, so all processes step the same set."""

    group: ProcessGroup
    kind: str
    parts: tuple[tuple[int, ...], ...]

    @property
    def mine(self) -> tuple[int, ...]:
        """This process's share."""
        return self.parts[self.group.rank]

    @property
    def context_field(self) -> str:
        return SPLIT_KINDS[self.kind]

    @property
    def replicated(self) -> bool:
        """True when every process steps the whole set (gradients summed), False when each steps its rows."""
        return self.kind == "trajectories"

    def _rows(self, synthetic: SyntheticSet, tensor: torch.Tensor, part: tuple[int, ...]) -> torch.Tensor:
        """Indices of the rows of ``tensor`` (a stored tensor of the set, or one of its shape) owned by ``part``."""
        per_class, remainder = divmod(tensor.shape[0], synthetic.num_classes)
        if remainder:
            raise ValueError(f"a tensor of shape {list(tensor.shape)} does not hold {synthetic.num_classes} classes")
        if self.kind == "classes":
            rows = [c * per_class + i for c in part for i in range(per_class)]
        else:
            rows = [c * per_class + j for c in range(synthetic.num_classes) for j in part]
        return torch.tensor(rows, dtype=torch.long, device=tensor.device)

    def gather(self, synthetic: SyntheticSet, tensor: torch.Tensor) -> torch.Tensor:
        """A stored tensor of ``synthetic`` (or one of its shape: momentum, average) made whole: each row from
        the process that steps it. A collective: every process calls it alike."""
        tensor = tensor.detach()
        if self.replicated:
            return tensor
        chunks = all_gather_tensors(self.group, tensor[self._rows(synthetic, tensor, self.mine)])
        whole = tensor.clone()
        for part, chunk in zip(self.parts, chunks):
            whole[self._rows(synthetic, tensor, part)] = chunk
        return whole

    @torch.no_grad()
    def refresh(self, synthetic: SyntheticSet) -> None:
        """Copy the rows other processes stepped into this process's set (a collective)."""
        if self.replicated:
            return
        for parameter in synthetic.parameters():
            parameter.copy_(self.gather(synthetic, parameter))


def plan_split(config: DistillConfig, world_size: int, num_classes: int) -> tuple[str, list[list[int]]]:
    """How a run divides over ``world_size`` processes: (kind, each process's share), the kind being the
    method's ``process_split`` and the shares contiguous runs of classes, image positions or trajectories
    (:func:`~infodistill.parallel.partition`). Refuses, with one line, a method, network,
    regularizer or parameterisation that cannot divide, and more processes than there are shares."""
    config = config.with_method_defaults()
    cls = method_class(config.method)
    kind = cls.process_split
    supported = sorted(name for name in METHOD_REGISTRY if method_class(name).process_split is not None)
    problems = [cls.split_problem(config.model)]
    if kind == "classes":
        problems += [f"the {name.upper()} regularizer does not split over classes" for name in
                     regularizers_on(config) if not REGULARIZER_REGISTRY[name].class_decomposable]
        assert config.param is not None  # with_method_defaults() fills it
        parameterisation = getattr(PARAMETERISATION_REGISTRY.get(config.param), "__self__", None)
        if parameterisation is not None and not parameterisation.rows_by_class:
            problems.append(f"param '{config.param}' stores tensors shared between classes")
    elif kind == "images":
        problems += [f"method '{config.method}' splits its images over processes, and the {name.upper()} "
                     "regularizer needs every image of a class" for name in regularizers_on(config)]
        if config.param != "pixels":
            problems.append(f"method '{config.method}' splits its images over processes, which needs param "
                            f"'pixels' (param '{config.param}' decodes one stored tensor into several images)")
    problems = [problem for problem in problems if problem]
    if problems:
        raise UserInputError(f"{problems[0]}; in {world_size} processes the supported methods are: "
                             f"{', '.join(supported)}; run it in one process")
    if kind == "classes":
        return kind, partition(num_classes, world_size)
    if kind == "images":
        return kind, partition(config.ipc, world_size, "images per class (--ipc)")
    return kind, partition(config.trajectories or 1, world_size, "trajectories per iteration (--trajectories)")


def summed_over_processes(values: dict[str, torch.Tensor], group: ProcessGroup) -> dict[str, float]:
    """The loss terms as numbers, each summed over the processes of a split run (one collective)."""
    if not group.distributed:
        return {name: float(value.detach()) for name, value in values.items()}
    summed = all_reduce_sum(group, torch.stack([value.detach().double() for value in values.values()]))
    return dict(zip(values, summed.tolist()))


def sum_gradients_over_processes(parameters: list[torch.Tensor], group: ProcessGroup) -> None:
    """Replace each parameter's gradient by its sum over the processes (one collective; a missing
    gradient counts as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    summed = all_reduce_sum(group, torch.cat([grad.reshape(-1) for grad in grads]))
    for parameter, chunk in zip(parameters, summed.split([grad.numel() for grad in grads])):
        parameter.grad = chunk.view_as(parameter).to(parameter.dtype)
