"""A network as a pure function of one flat parameter vector, for unrolled training (MTT, DATM).

Trajectory matching differentiates through several SGD steps of a student network with respect to
the synthetic images and the step size. Holding the student's weights as one flat vector, and
running the network through ``torch.func.functional_call`` on views of it, makes one SGD step an
ordinary differentiable function ``theta' = theta - lr * grad L(theta; x, y)``, and the expert
checkpoints (stored flat) directly comparable with it.

Memory: the unrolled graph keeps every step's activations (and those of its gradient) until the
backward pass, so memory grows linearly with the number of steps. ``memory="checkpoint"`` runs each
step as :class:`_RecomputedStep`: the forward pass keeps only the step's inputs (the flat weights, the
step size, the batch), and the backward pass rebuilds one step's graph at a time to propagate through
it (one extra forward and gradient per step). ``torch.utils.checkpoint`` does not help here: a step
calls ``torch.autograd.grad`` inside its own forward, and the non-reentrant checkpoint still kept most
of each step's tensors (measured for 20 steps of ConvNet-3-32 on 100 Fashion-MNIST-sized images: 1.43 GiB
added instead of 1.82 GiB; this class adds 0.31 GiB at 10 and at 40 steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from infodistill.errors import UserInputError
from infodistill.models import has_batch_norm

MEMORY_MODES = ("full", "checkpoint")


class FunctionalStudent:
    """``model``'s architecture as a function of a flat vector holding its parameters in
    ``named_parameters()`` order (the layout expert trajectories are stored in)."""

    def __init__(self, model: nn.Module) -> None:
        if has_batch_norm(model):
            raise UserInputError("trajectory matching needs a model without batch norm (e.g. ConvNet-3, instance norm)")
        self.module = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [parameter.shape for _, parameter in model.named_parameters()]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.buffers = dict(model.named_buffers())

    @property
    def size(self) -> int:
        """Number of parameters (the length of a flat vector)."""
        return sum(self.sizes)

    def flatten(self, model: nn.Module) -> Tensor:
        """The flat vector of a module of the same architecture."""
        return parameters_to_vector(model.parameters()).detach()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` shaped as the model's parameters (gradients flow through them)."""
        if flat.shape != (self.size,):
            raise ValueError(f"a flat parameter vector of this model has {self.size} values, got {tuple(flat.shape)}")
        pieces = flat.split(self.sizes)
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def __call__(self, flat: Tensor, images: Tensor) -> Tensor:
        """Logits of ``images`` under the weights ``flat``."""
        return functional_call(self.module, {**self.unflatten(flat), **self.buffers}, (images,))

    def sgd_step(self, flat: Tensor, lr: Tensor, images: Tensor, targets: Tensor) -> Tensor:
        """One SGD step on cross-entropy (hard or soft targets), differentiable in every input."""
        loss = F.cross_entropy(self(flat, images), targets)
        (gradient,) = torch.autograd.grad(loss, flat, create_graph=True)
        return flat - lr * gradient

    def unroll(self, start: Tensor, lr: Tensor, batches: list[tuple[Tensor, Tensor]], memory: str = "full") -> Tensor:
        """The weights after one SGD step per (images, targets) batch, starting from ``start``."""
        if memory not in MEMORY_MODES:
            raise UserInputError(f"memory '{memory}' is not one of: {', '.join(MEMORY_MODES)}")
        flat = start.detach().requires_grad_(True)
        for images, targets in batches:
            if memory == "checkpoint":
                flat = _RecomputedStep.apply(self, flat, lr, images, targets)
            else:
                flat = self.sgd_step(flat, lr, images, targets)
        return flat


class _RecomputedStep(torch.autograd.Function):
    """One SGD step whose graph is rebuilt in the backward pass instead of being kept (constant memory
    in the number of unrolled steps)."""

    @staticmethod
    def forward(ctx, student: FunctionalStudent, flat: Tensor, lr: Tensor, images: Tensor, targets: Tensor) -> Tensor:
        ctx.student = student
        ctx.save_for_backward(flat, lr, images, targets)
        with torch.enable_grad():
            weights = flat.detach().requires_grad_(True)
            loss = F.cross_entropy(student(weights, images.detach()), targets.detach())
            (gradient,) = torch.autograd.grad(loss, weights)
        return flat.detach() - lr.detach() * gradient

    @staticmethod
    def backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:
        flat, lr, images, targets = ctx.saved_tensors
        inputs = [tensor.detach().requires_grad_(needed)
                  for tensor, needed in zip((flat, lr, images, targets), ctx.needs_input_grad[1:])]
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        with torch.enable_grad():
            weights = inputs[0] if inputs[0].requires_grad else inputs[0].detach().requires_grad_(True)
            stepped = ctx.student.sgd_step(weights, inputs[1], inputs[2], inputs[3])
            gradients = iter(torch.autograd.grad(stepped, wanted, upstream, allow_unused=True))
        return (None, *(next(gradients) if tensor.requires_grad else None for tensor in inputs))


def normalised_distance(student: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """MTT's loss: ||student - target||^2 / ||start - target||^2 (1 when the student did not move)."""
    return (student - target).pow(2).sum() / (start - target).pow(2).sum().clamp_min(1e-12)
