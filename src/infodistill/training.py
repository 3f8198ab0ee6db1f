"""Training networks from scratch on labelled images: the recipe, the two training paths, top-1 accuracy.

One fresh network per seed is trained on a labelled set (class indices or soft-label rows) with the
recipe of an :class:`EvalConfig`: SGD or AdamW, a step, constant or cosine learning-rate schedule,
optional DSA augmentation, forward passes in fp32 or bf16. The evaluation protocol
(:mod:`infodistill.evaluate`), the proxy pools (:mod:`infodistill.proxies`), the expert trajectories
(:mod:`infodistill.experts`) and the experiments all train their networks here.

The runs can be trained one after another (plain modules) or together, as one vectorised model over
stacked parameters (``torch.func.vmap``). Both consume every run's random numbers in the same order,
so they train the same networks up to floating-point rounding; ``batched="auto"`` picks the one that
is faster on the device (see ``benchmarks/bench_evaluate.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from infodistill.augment import DSA
from infodistill.config import check_seed
from infodistill.errors import UserInputError
from infodistill.models import build_model, parse_model_name
from infodistill.precision import autocast_context, check_precision, resolve_precision, to_fp32

AUGMENTATIONS = ("dsa", "none")
LR_SCHEDULES = ("half", "constant", "cosine")
BATCHED_CHOICES = ("auto", "on", "off")
OPTIMIZERS = ("sgd", "adamw")
RECIPES = ("auto", "protocol", "kd")


@dataclass(frozen=True)
class EvalConfig:
    """How networks are trained from scratch on a labelled set, and how the set is scored: the model, the
    training recipe and the number of runs (the evaluation protocol's settings, also the recipe of proxies
    and experts)."""

    model: str = "ConvNet-3"
    runs: int = 5
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str = "dsa"
    lr_schedule: str = "half"
    seed: int = 0
    batched: str = "auto"
    use_soft_labels: bool = True
    use_learned_lr: bool = True
    device: str = "cpu"
    test_batch_size: int = 1024
    optimizer: str = "sgd"
    temperature: float = 1.0
    recipe: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        """Refuse values outside their range, naming the value and what is allowed."""
        positive_ints = {"runs": self.runs, "epochs": self.epochs, "batch_size": self.batch_size,
                         "test_batch_size": self.test_batch_size}
        for name, value in positive_ints.items():
            if value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value}")
        if not 0 < self.lr < math.inf:
            raise UserInputError(f"lr must be positive and finite, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UserInputError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:
            raise UserInputError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        check_seed(self.seed)
        if self.augment not in AUGMENTATIONS:
            raise UserInputError(f"augment '{self.augment}' is not one of: {', '.join(AUGMENTATIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserInputError(f"lr_schedule '{self.lr_schedule}' is not one of: {', '.join(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserInputError(f"optimizer '{self.optimizer}' is not one of: {', '.join(OPTIMIZERS)}")
        if self.recipe not in RECIPES:
            raise UserInputError(f"recipe '{self.recipe}' is not one of: {', '.join(RECIPES)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserInputError(f"temperature must be a positive number, got {self.temperature}")
        if self.batched not in BATCHED_CHOICES:
            raise UserInputError(f"batched '{self.batched}' is not one of: {', '.join(BATCHED_CHOICES)}")
        parse_model_name(self.model)
        resolve_device(self.device)
        check_precision(self.precision)
        if self.batched == "on" and self.precision == "bf16":
            raise UserInputError(f"batched 'on' cannot compute in {self.precision}: autocast does not reach the "
                                 "convolutions of the vectorised (vmap) training; use batched 'auto' or 'off'")


def resolve_device(name: str) -> torch.device:
    """Turn 'cpu' / 'cuda' / 'cuda:N' into a device, refusing one this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device '{name}' is not valid; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"device '{name}' is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device '{name}' is not available on this machine; use --device cpu")
    return device


def lr_at_epoch(base_lr: float, epoch: int, epochs: int, schedule: str = "half") -> float:
    """The protocol's step schedule ("half"): the base rate, then x0.1 for the second half of the
    epochs; the base rate throughout ("constant"); or a cosine decay per epoch ("cosine", the KD recipe)."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    decayed = schedule == "half" and epoch >= math.ceil(epochs / 2)
    return base_lr * (0.1 if decayed else 1.0)


def _minibatches(size: int, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return torch.randperm(size, generator=generator).split(batch_size)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _run_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
              reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against class indices (hard labels) or probability rows (soft labels), of the logits
    divided by ``temperature``. Against soft labels at temperature T this is KL(soft || softmax(logits / T))
    plus the labels' entropy, a constant: the KD loss's gradient."""
    return F.cross_entropy(logits / temperature if temperature != 1.0 else logits, targets, reduction=reduction)


def _make_optimizer(parameters, lr: float, config: EvalConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


@dataclass
class _TrainingJob:
    """What both training paths share: the data, the recipe, one generator per run, progress."""

    images: torch.Tensor
    targets: torch.Tensor
    config: EvalConfig
    lr: float
    generators: Sequence[torch.Generator]
    augment: DSA | None
    advance: Callable[[int], None]
    after_epoch: Callable[[int, int, nn.Module], None] | None = None

    def augmented(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = self.images[index]
        return self.augment(batch, generator) if self.augment is not None else batch


def _train_sequential(models: Sequence[nn.Module], job: _TrainingJob) -> None:
    images, targets, config, lr = job.images, job.targets, job.config, job.lr
    for run, (model, generator) in enumerate(zip(models, job.generators)):
        optimizer = _make_optimizer(model.parameters(), lr, config)
        model.train()
        for epoch in range(config.epochs):
            _set_lr(optimizer, lr_at_epoch(lr, epoch, config.epochs, config.lr_schedule))
            for index in _minibatches(len(images), config.batch_size, generator):
                batch = job.augmented(index, generator)
                with autocast_context(config.precision, images.device):
                    logits = to_fp32(model(batch))
                loss = _run_loss(logits, targets[index], config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            job.advance(1)
            if job.after_epoch is not None:
                job.after_epoch(run, epoch, model)


def _train_together(models: Sequence[nn.Module], job: _TrainingJob) -> None:
    """Train all runs as one vectorised model over stacked parameters; write the weights back."""
    images, targets, config, lr, generators = job.images, job.targets, job.config, job.lr, job.generators
    for model in models:
        model.train()
    params, buffers = stack_module_state(list(models))
    template = copy.deepcopy(models[0]).to("meta")

    def forward(run_params, run_buffers, batch):
        return functional_call(template, (run_params, run_buffers), (batch,))

    forward_all = vmap(forward)
    # Elementwise SGD on stacked tensors equals one independent SGD per run.
    optimizer = _make_optimizer(params.values(), lr, config)
    runs = len(models)
    for epoch in range(config.epochs):
        _set_lr(optimizer, lr_at_epoch(lr, epoch, config.epochs, config.lr_schedule))
        schedules = [_minibatches(len(images), config.batch_size, generator) for generator in generators]
        for step_indices in zip(*schedules):
            batches = [job.augmented(index, generator) for index, generator in zip(step_indices, generators)]
            logits = forward_all(params, buffers, torch.stack(batches))  # float32 only (use_batched_training)
            step_targets = torch.stack([targets[index] for index in step_indices])
            per_sample = _run_loss(logits.flatten(0, 1), step_targets.flatten(0, 1), config.temperature, "none")
            loss = per_sample.view(runs, -1).mean(dim=1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        job.advance(runs)
    with torch.no_grad():
        for run, model in enumerate(models):
            for name, parameter in model.named_parameters():
                parameter.copy_(params[name][run])
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name][run])


def bf16_measured(config: EvalConfig) -> bool:
    """Whether evaluating with ``config`` in bf16 was measured faster with the accuracy held, so that
    ``precision: auto`` may use it: ConvNet models trained with the protocol recipe (not KD), one run at a
    time (docs/precision.md)."""
    return parse_model_name(config.model).family == "ConvNet" and config.recipe != "kd" and config.batched != "on"


def use_batched_training(config: EvalConfig, device: torch.device) -> bool:
    """Whether to train the runs together. 'auto': on GPUs, where small batches leave the device idle;
    on CPU the vectorised path measured slower than the plain one (benchmarks/README.md). Never in bf16:
    autocast does not reach convolutions inside ``torch.func.vmap`` (they stayed float32, torch 2.14)."""
    if config.batched == "off" or config.runs == 1 or config.precision != "fp32":
        return False
    if config.batched == "on":
        return True
    return device.type == "cuda"


def train_from_scratch(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    config: EvalConfig,
    seeds: Sequence[int],
    lr: float | None = None,
    progress: bool = True,
    after_epoch: Callable[[int, int, nn.Module], None] | None = None,
) -> tuple[list[nn.Module], bool]:
    """Train one freshly initialised model per seed on (images, targets); return them trained.

    ``targets`` are class indices (int64) or probability rows (float, soft labels). Each seed fixes
    the run's initial weights, its minibatch order and its augmentation draws.
    ``after_epoch(run, epoch, model)`` is called after every epoch of every run (e.g. to record
    expert trajectories); it makes the runs train one after another.
    ``config.precision``: the training forward passes compute in it (the backward pass follows them);
    the weights and the optimiser stay float32 (``docs/precision.md``).
    Returns the models and whether they were trained together (vectorised).
    """
    device = resolve_device(config.device)
    config = replace(config, precision=resolve_precision(config.precision, device, measured=False))
    channels, height, width = images.shape[1:]
    models: list[nn.Module] = [
        build_model(config.model, channels=channels, num_classes=num_classes, image_size=(height, width),
                    seed=seed).to(device)
        for seed in seeds
    ]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    augment = DSA() if config.augment == "dsa" else None
    together = after_epoch is None and use_batched_training(config, device)
    trainer = _train_together if together else _train_sequential
    bar = tqdm(total=config.epochs * len(models), desc=f"train {config.model} x{len(models)}",
               unit="epoch", disable=not progress, leave=False)
    with bar:
        job = _TrainingJob(images.to(device), targets.to(device), config, lr if lr is not None else config.lr,
                           generators, augment, bar.update, after_epoch)
        trainer(models, job)
    return models, together


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024,
                  precision: str = "fp32") -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on a labelled set; the forward passes
    compute in ``precision``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for batch, batch_labels in zip(images.split(batch_size), labels.split(batch_size)):
        with autocast_context(precision, device):
            logits = model(batch.to(device))
        predictions = logits.argmax(dim=1)
        correct += int((predictions == batch_labels.to(device)).sum())
    return 100.0 * correct / len(labels)
