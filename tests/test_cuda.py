"""CPU-vs-CUDA agreement of the computations that have only ever run on a CPU (docs/gpu.md).

Every test marked ``cuda`` computes one thing twice, on the CPU and on a second device, from the same
seeds, and checks that the two results agree within a tolerance stated (with its reason) beside it. The
second device comes from :func:`other_device`: ``cuda`` when torch sees a GPU, else the tests skip,
UNLESS the environment variable ``INFODISTILL_CUDA_TESTS_ON_CPU=1`` is set: then the second device is
the CPU as well. On a CPU machine that only proves that the tests run (the fixtures, the tiny settings,
the comparisons, the paths that differ by setting, e.g. vmap against a loop); it says nothing about
whether a GPU agrees. ``benchmarks/gpu_check.sh`` runs them on a GPU with ``pytest -m cuda``.

Tolerances are for IEEE float32 on both sides: the module turns TF32 off for its tests (cuDNN uses TF32
for float32 convolutions on Ampere and later GPUs by default; its 10-bit mantissa would need about 1e-3
relative and hide real errors), and one test measures the library's default, TF32 convolutions, apart.
Errors are compared as norms of whole tensors relative to the CPU tensor's norm (:func:`relative_error`),
so that near-zero elements of a gradient do not make an elementwise tolerance meaningless; each
reference is also checked to be nonzero, so that two vacuous results cannot agree.

How the bounds were chosen: each quantity was computed on the CPU in float32 and in float64 (same draws,
same initial weights). A float32 result on a GPU rounds differently from the CPU's, but about as much, so it
should lie about as far from the CPU's as the CPU's lies from float64 (the "float64 gap" quoted at each
test). Each bound is roughly 10x or more that gap, and far below what a wrong draw, seed, batch or
learning rate changes (quoted too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from infodistill.augment import DSA, FAMILIES, DSAConfig
from infodistill.data import ClassSampler, RealData
from infodistill.experts import train_experts
from infodistill.methods import DistillContext, DistributionMatching, MethodSetup, TrajectoryMatching
from infodistill.models import build_model
from infodistill.proxies import ProxyPool
from infodistill.regularizers import CMIRegularizer, cmi_from_features, pool_cmi
from infodistill.seeds import run_seeds
from infodistill.synthetic import PixelSet
from infodistill.training import EvalConfig, train_from_scratch

CPU_ENV_VAR = "INFODISTILL_CUDA_TESTS_ON_CPU"
"""Set to 1 to run the ``cuda`` tests with the CPU as the second device (checks the harness, not a GPU)."""
MODEL = "ConvNet-2-16"
CPU = torch.device("cpu")


def other_device() -> torch.device:
    """The device compared with the CPU: ``cuda`` when available; the CPU when ``INFODISTILL_CUDA_TESTS_ON_CPU=1``;
    otherwise the calling test is skipped."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(CPU_ENV_VAR) == "1":
        return CPU
    pytest.skip(f"no CUDA device (set {CPU_ENV_VAR}=1 to run these tests with the CPU as the second device)")


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 on the CPU; the reference must be nonzero."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    assert value.shape == reference.shape, (value.shape, reference.shape)
    scale = float(reference.norm())
    assert scale > 0, "the reference is zero: the comparison would prove nothing"
    return float((value - reference).norm()) / scale


@pytest.fixture
def device() -> torch.device:
    return other_device()


@pytest.fixture(autouse=True)
def strict_fp32() -> Iterator[None]:
    """IEEE float32 on CUDA for each test (no TF32 in cuDNN convolutions or cuBLAS matmuls); restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_second_device_is_cuda_the_cpu_on_request_or_the_test_skips(monkeypatch):
    """The helper itself (not marked ``cuda``: it needs no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert other_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(CPU_ENV_VAR, "1")
    assert other_device() == CPU
    for value in ("0", ""):
        monkeypatch.setenv(CPU_ENV_VAR, value)
        with pytest.raises(pytest.skip.Exception, match=CPU_ENV_VAR):
            other_device()
    monkeypatch.delenv(CPU_ENV_VAR)
    with pytest.raises(pytest.skip.Exception):
        other_device()


# ----------------------------------------------------------------------------------------------
# DM: one iteration's loss and image gradient
# ----------------------------------------------------------------------------------------------


def dm_context(real: RealData, device: torch.device, ipc: int = 3, seed: int = 2) -> DistillContext:
    """A DM context on ``device``: the real training set, a pixel set of ``ipc`` real images per class, DSA;
    every random draw from CPU generators, so both devices draw the same."""
    images, labels = real.train_tensors()
    sampler = ClassSampler(images.to(device), labels.to(device), real.info.num_classes)
    synthetic = PixelSet.initialise(sampler, ipc, "real", torch.Generator().manual_seed(1)).to(device)
    return DistillContext(iteration=0, generator=torch.Generator().manual_seed(seed), synthetic=synthetic,
                          sampler=sampler, info=real.info, augment=DSA(), device=device, model_name=MODEL)


def dm_loss_and_gradient(real: RealData, device: torch.device) -> tuple[Tensor, Tensor]:
    """DM's loss for one iteration (30 real images per class, one fresh network) and its gradient w.r.t. the set.
    ``max_forward_images="auto"`` embeds the 300 real images in two passes on the CPU and one on CUDA."""
    context = dm_context(real, device)
    (loss,) = list(DistributionMatching(batch_real=30).iteration(context))
    loss.backward()
    return loss.detach(), context.synthetic.pixels.grad


@pytest.mark.cuda
def test_a_dm_iteration_gives_the_same_loss_and_image_gradient(real, device):
    loss_cpu, grad_cpu = dm_loss_and_gradient(real, CPU)
    loss_other, grad_other = dm_loss_and_gradient(real, device)
    # float64 gap 1.5e-7 (loss), 2.5e-4 (gradient): DM's gradient is the difference of two close class means,
    # which magnifies float32 rounding. Another iteration seed changes the gradient by ~100 %, the loss by ~4 %.
    assert relative_error(loss_other, loss_cpu) < 1e-5
    assert relative_error(grad_other, grad_cpu) < 2e-3


@pytest.mark.cuda
def test_a_dm_iteration_agrees_under_the_default_tf32_convolutions(real, device):
    """What a run gets by default: the library leaves cuDNN's TF32 on (torch's default), so float32
    convolutions on a recent GPU compute with a 10-bit mantissa."""
    loss_cpu, grad_cpu = dm_loss_and_gradient(real, CPU)
    torch.backends.cudnn.allow_tf32 = True
    loss_other, grad_other = dm_loss_and_gradient(real, device)
    # The bound is what bf16 gives, which docs/precision.md measured as accuracy-neutral for DM: bf16 autocast on
    # the CPU was 2.0e-3 (loss) and 4.5e-2 (gradient) from float32 here. TF32 keeps 3 more mantissa bits than
    # bf16, so it should be about 8x closer; above these bounds it would be coarser than bf16.
    assert relative_error(loss_other, loss_cpu) < 5e-3
    assert relative_error(grad_other, grad_cpu) < 5e-2


# ----------------------------------------------------------------------------------------------
# DSA: the same draw applied on both devices
# ----------------------------------------------------------------------------------------------


def dsa_draw(x: Tensor, device: torch.device, seed: int, mode: str) -> tuple[list[Tensor], Tensor, tuple[str, ...]]:
    """DSA applied on ``device`` with a draw from a CPU generator seeded ``seed``: in mode ``single`` one shared
    (siamese) draw for two batches, as DM and DSA do; in mode ``all`` one draw per sample of every family, as
    evaluation and MTT do. Returns the outputs, the gradient of a fixed weighted sum w.r.t. ``x``, the families."""
    augment = DSA(DSAConfig(mode=mode))
    inputs = x.to(device).requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    if mode == "single":
        params = augment.sample(1, tuple(x.shape[-2:]), generator, device=device)
        outputs = [augment.apply(batch, params) for batch in (inputs, 2.0 * inputs)]
    else:
        params = augment.sample(len(x), tuple(x.shape[-2:]), generator, device=device)
        outputs = [augment.apply(inputs, params)]
    weights = torch.linspace(-1.0, 1.0, x.numel()).view_as(x).to(device)
    sum(((output * weights).sum() for output in outputs), torch.zeros((), device=device)).backward()
    return [output.detach() for output in outputs], inputs.grad, params.families


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["single", "all"])
def test_a_dsa_draw_transforms_and_differentiates_alike_on_both_devices(mode, device):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    transformed: set[str] = set()  # the families of draws that changed the images (a flip may flip none)
    for seed in range(16 if mode == "single" else 3):
        outputs_cpu, grad_cpu, families = dsa_draw(x, CPU, seed, mode)
        outputs_other, grad_other, families_other = dsa_draw(x, device, seed, mode)
        assert families_other == families  # the draw is made on the CPU generator either way
        if not torch.equal(outputs_cpu[0], x):
            transformed.update(families)
        for output_cpu, output_other in zip(outputs_cpu, outputs_other, strict=True):
            # pixel arithmetic and bilinear resampling in float32: a few ulp (6e-8) per pixel, also in the
            # gradient (CUDA's grid_sample backward adds with atomics, in no fixed order); 1e-5 is ~100 ulp.
            assert relative_error(output_other, output_cpu) < 1e-5, (seed, families)
        assert relative_error(grad_other, grad_cpu) < 1e-5, (seed, families)
    assert transformed == set(FAMILIES)  # every family was compared on images it changed


# ----------------------------------------------------------------------------------------------
# CMI: the term and its gradient, from features and through a pool of proxies
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("per_class", [False, True])
def test_cmi_from_features_and_its_gradient_agree(per_class, device):
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 6 + [1] * 3 + [3] * 7 + [4])  # uneven classes, class 2 empty, class 4 alone
    features = 2.0 * torch.randn(len(labels), 32, generator=generator)

    def value_and_gradient(on: torch.device) -> tuple[Tensor, Tensor]:
        leaf = features.to(on).requires_grad_(True)
        value = cmi_from_features(leaf, labels.to(on), 5, per_class=per_class)
        value.backward()
        return value.detach(), leaf.grad

    value_cpu, grad_cpu = value_and_gradient(CPU)
    value_other, grad_other = value_and_gradient(device)
    # identical float32 inputs and float64 softmax/KL arithmetic (differences ~1e-15), returned in float32:
    # value and gradient may round to neighbouring float32 numbers (6e-8 apart), nothing more.
    assert relative_error(value_other, value_cpu) < 1e-6
    assert relative_error(grad_other, grad_cpu) < 1e-6


def tiny_pool(real: RealData, device: torch.device, count: int = 3) -> ProxyPool:
    """``count`` pooled proxies (ConvNetGAP-1-8, random weights: the computation does not depend on training)."""
    info = real.info
    models = [build_model("ConvNetGAP-1-8", info.channels, info.num_classes, info.image_size, seed=10 + k).to(device)
              for k in range(count)]
    return ProxyPool(models, "ConvNetGAP-1-8", info)


@pytest.mark.cuda
def test_the_pools_cmi_and_the_regularizers_gradient_agree_vmapped_against_looped(real, device):
    """On the second device the proxies run as one vmap pass (what ``batched='auto'`` does on CUDA), on the CPU
    one after another (what it does there): the comparison covers both the device and the vectorisation."""
    context = dm_context(real, CPU)
    images, labels = context.synthetic.images().detach(), context.synthetic.labels

    values_cpu = pool_cmi(tiny_pool(real, CPU), images, labels, 10, batched="off")
    values_other = pool_cmi(tiny_pool(real, device), images.to(device), labels.to(device), 10, batched="on")
    assert values_cpu.shape == (3,) and bool((values_cpu > 0).all())
    # float64 gap 1.3e-6: float32 features into float64 KL values of nearby softmaxes
    assert relative_error(values_other, values_cpu) < 1e-4

    def loss_and_gradient(on: torch.device, batched: str) -> tuple[Tensor, Tensor]:
        regularizer = CMIRegularizer(tiny_pool(real, on), proxies_per_step=2, batched=batched)
        assert regularizer.vectorised == (batched == "on")
        leaf = images.to(on).requires_grad_(True)
        value = regularizer.loss(leaf, labels.to(on), torch.Generator().manual_seed(4))
        value.backward()
        return value.detach(), leaf.grad

    loss_cpu, grad_cpu = loss_and_gradient(CPU, "off")
    loss_other, grad_other = loss_and_gradient(device, "on")
    # float64 gap 5.7e-7 (value), 1.2e-5 (gradient through the softmax and the proxies' convolutions)
    assert relative_error(loss_other, loss_cpu) < 1e-5
    assert relative_error(grad_other, grad_cpu) < 2e-4


# ----------------------------------------------------------------------------------------------
# Evaluation: vectorised (vmap) runs on the device against sequential runs on the CPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("batched", ["on", "off"])
def test_evaluation_runs_train_the_same_networks(real, device, batched):
    images, labels = real.train_tensors()
    subset = ClassSampler(images, labels, 10).random_subset(2, torch.Generator().manual_seed(5))
    config = EvalConfig(model="ConvNet-1-8", runs=3, epochs=3, batch_size=8, augment="dsa", precision="fp32")
    seeds = run_seeds(7, 3)
    reference, together = train_from_scratch(*subset, 10, EvalConfig(**{**config.__dict__, "batched": "off"}), seeds,
                                             progress=False)
    trained, together_other = train_from_scratch(
        *subset, 10, EvalConfig(**{**config.__dict__, "batched": batched, "device": str(device)}), seeds,
        progress=False)
    assert (together, together_other) == (False, batched == "on")
    initial = [build_model("ConvNet-1-8", 1, 10, (28, 28), seed=seed) for seed in seeds]
    test_images = real.test_tensors()[0][:50]
    for start, one, other in zip(initial, reference, trained, strict=True):
        # the change of all weights over 9 SGD steps, not the weights (mostly their identical initial values),
        # as one vector (a conv bias before instance norm moves by weight decay alone, ~1e-5, below float32's
        # resolution of the bias itself): float64 gap 5e-7; lr 0.011 for 0.01 changes it by 8 %, batch 9 by 50 %.
        moved = [torch.cat([(p.detach().cpu() - p0).flatten() for p, p0 in zip(model.parameters(), start.parameters())])
                 for model in (one, other)]
        assert relative_error(moved[1], moved[0]) < 1e-4
        with torch.no_grad():
            assert relative_error(other.eval()(test_images.to(device)), one.eval()(test_images)) < 1e-4


# ----------------------------------------------------------------------------------------------
# MTT: the unrolled student steps, from experts loaded onto the device
# ----------------------------------------------------------------------------------------------


def mtt_loss_and_gradients(real: RealData, experts: str, device: torch.device, memory: str) -> tuple[Tensor, ...]:
    """One MTT iteration (3 student steps on DSA-augmented batches of the set) on ``device``: the loss and its
    gradients w.r.t. the images and the learned step size."""
    images, labels = real.train_tensors()
    sampler = ClassSampler(images.to(device), labels.to(device), real.info.num_classes)
    synthetic = PixelSet.initialise(sampler, 2, "real", torch.Generator().manual_seed(1)).to(device)
    method = TrajectoryMatching(experts=experts, ipc=2, syn_steps=3, expert_epochs=2, max_start_epoch=2,
                                batch_syn=10, memory=memory)
    method.prepare(MethodSetup(synthetic, sampler, real.info, device, "ConvNet-1-8", torch.Generator().manual_seed(2),
                               fresh=True, init="real"))
    context = DistillContext(iteration=0, generator=torch.Generator().manual_seed(3), synthetic=synthetic,
                             sampler=sampler, info=real.info, augment=DSA(), device=device, model_name="ConvNet-1-8")
    (loss,) = list(method.iteration(context))
    loss.backward()
    return loss.detach(), synthetic.pixels.grad, method.lr.grad


@pytest.mark.cuda
@pytest.mark.parametrize("memory", ["full", "checkpoint"])
def test_mtts_unrolled_student_gives_the_same_loss_and_gradients(real, tmp_path, device, memory):
    train_experts(real, tmp_path / "experts", model="ConvNet-1-8", count=1, epochs=3, batch_size=64, progress=False)
    loss_cpu, images_cpu, lr_cpu = mtt_loss_and_gradients(real, str(tmp_path / "experts"), CPU, memory)
    loss_other, images_other, lr_other = mtt_loss_and_gradients(real, str(tmp_path / "experts"), device, memory)
    # float64 gap 1.5e-7 (loss) and 1.4e-6 (image gradient, through 3 unrolled steps and their second-order
    # backward pass); the step size's gradient is one float32 scalar, bounded like the images'.
    assert relative_error(loss_other, loss_cpu) < 1e-5
    assert relative_error(images_other, images_cpu) < 1e-4
    assert relative_error(lr_other, lr_cpu) < 1e-4
