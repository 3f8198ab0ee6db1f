"""Distribution matching (DM) and gradient matching (DC / DSA) against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infodistill.augment import DSA, DSAParams
from infodistill.data import ClassSampler, DatasetInfo
from infodistill.errors import UserInputError
from infodistill.methods import (
    METHOD_REGISTRY,
    DatasetCondensation,
    DistillContext,
    DistributionMatching,
    GradientMatching,
    SiameseAugmentedCondensation,
    gradient_distance,
    method_class,
)
from infodistill.models import build_model
from infodistill.synthetic import PixelSet

SHAPE = (3, 8, 8)
CLASSES = 3


def make_context(
    *,
    seed: int = 0,
    per_class: int = 12,
    ipc: int = 2,
    model: str = "ConvNet-1-8",
    augment: DSA | None = None,
    real_requires_grad: bool = False,
) -> DistillContext:
    """A 3-class, 8x8 context over random 'normalised' real images; synthetic set initialised from real."""
    data_generator = torch.Generator().manual_seed(100)
    images = torch.randn(CLASSES * per_class, *SHAPE, generator=data_generator)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    order = torch.randperm(len(labels), generator=data_generator)
    images, labels = images[order], labels[order]
    if real_requires_grad:
        images.requires_grad_(True)
    sampler = ClassSampler(images, labels, CLASSES)
    synthetic = PixelSet.initialise(sampler, ipc, "real", torch.Generator().manual_seed(7))
    info = DatasetInfo(
        name="toy",
        channels=SHAPE[0],
        image_size=SHAPE[1:],
        num_classes=CLASSES,
        class_names=tuple(f"class{c}" for c in range(CLASSES)),
        mean=(0.0,) * SHAPE[0],
        std=(1.0,) * SHAPE[0],
    )
    return DistillContext(
        iteration=0,
        generator=torch.Generator().manual_seed(seed),
        synthetic=synthetic,
        sampler=sampler,
        info=info,
        augment=augment,
        device=torch.device("cpu"),
        model_name=model,
    )


def capture_networks(context: DistillContext) -> list[nn.Module]:
    """Record every network the method asks the context for."""
    networks: list[nn.Module] = []
    fresh = context.fresh_network

    def recording() -> nn.Module:
        networks.append(fresh())
        return networks[-1]

    context.fresh_network = recording  # type: ignore[method-assign]
    return networks


def run_loop(method, context: DistillContext, lr: float = 0.1) -> list[Tensor]:
    """What the shared loop does with the yielded losses: backward and an image SGD step each."""
    optimizer = torch.optim.SGD(context.synthetic.parameters(), lr=lr, momentum=0.5)
    losses = []
    for loss in method.iteration(context):
        losses.append(loss.detach().clone())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def weights(network: nn.Module) -> list[Tensor]:
    return [parameter.detach().clone() for parameter in network.parameters()]


def same_weights(first: list[Tensor], second: list[Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))


class SpyDSA(DSA):
    """DSA that records every parameter draw and every application (which draw, on which batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn: list[DSAParams] = []
        self.applied: list[tuple[int, int, bool]] = []  # (draw id, batch size, batch requires grad)

    def sample(self, batch_size, image_size, generator, device=None) -> DSAParams:
        params = super().sample(batch_size, image_size, generator, device)
        self.drawn.append(params)
        return params

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        self.applied.append((id(params), x.shape[0], x.requires_grad))
        return super().apply(x, params)


# ---------------------------------------------------------------------------------------------
# gradient_distance


def test_gradient_distance_linear_rows_hand_computed():
    # Rows (output channels): orthogonal -> 1, identical -> 0, opposite -> 2, scaled -> 0.
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    synthetic = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, -1.0], [4.0, 0.0]])
    assert gradient_distance([real], [synthetic]).item() == pytest.approx(1 + 0 + 2 + 0, abs=1e-5)


def test_gradient_distance_conv_is_per_output_channel_and_ignores_1d():
    # Channel 0: (1,0,0,0) vs (0,0,0,1) -> orthogonal, 1. Channel 1: (1,1,1,1) vs (1,1,1,-1):
    # dot 2, norms 2 * 2 -> cos 0.5 -> 0.5. Per-channel total 1.5 (a whole-tensor cosine would give 0.6).
    real = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # 2 x 1 x 2 x 2
    synthetic = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [1.0, -1.0]]]])
    conv = gradient_distance([real], [synthetic]).item()
    assert conv == pytest.approx(1.5, abs=1e-5)

    bias_real, bias_synthetic = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])  # opposite, yet ignored
    linear_real, linear_synthetic = torch.tensor([[1.0, 0.0]]), torch.tensor([[-3.0, 0.0]])  # opposite: 2
    total = gradient_distance([real, bias_real, linear_real], [synthetic, bias_synthetic, linear_synthetic])
    assert total.item() == pytest.approx(1.5 + 2.0, abs=1e-5)
    assert gradient_distance([bias_real], [bias_synthetic]).item() == 0.0


def test_gradient_distance_matches_cosine_similarity_on_network_gradients():
    network = build_model("ConvNet-2-8", channels=3, num_classes=CLASSES, image_size=(8, 8), seed=3)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 6, *SHAPE, generator=generator)
    labels = torch.tensor([1] * 6)
    params = list(network.parameters())
    grads = [torch.autograd.grad(F.cross_entropy(network(batch), labels), params) for batch in images]
    reference = sum(
        (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)).sum()
        for a, b in zip(*grads)
        if a.dim() > 1
    )
    assert gradient_distance(grads[0], grads[1]).item() == pytest.approx(float(reference), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# DM


class FlattenEmbed(nn.Module):
    """A 'network' whose embedding is the flattened image: the DM loss is a plain mean difference."""

    def embed(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def test_dm_matching_loss_hand_computed():
    # Class 0: real mean (2, 3), synthetic mean (0, 0) -> 4 + 9. Class 1: real (1, 1), synthetic (1, 2) -> 1.
    real = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2), torch.tensor([[1.0, 1.0]]).view(1, 1, 1, 2)]
    synthetic_0 = torch.zeros(1, 1, 1, 2, requires_grad=True)
    synthetic_1 = torch.tensor([[1.0, 3.0], [1.0, 1.0]]).view(2, 1, 1, 2).requires_grad_(True)
    for real_batch in real:
        real_batch.requires_grad_(True)
    loss = DistributionMatching().matching_loss(FlattenEmbed(), real, [synthetic_0, synthetic_1])
    assert loss.item() == pytest.approx(14.0)
    loss.backward()
    # d/ds ||m_r - mean(s)||^2 = -2 (m_r - m_s) / n_s
    assert torch.allclose(synthetic_0.grad.flatten(), torch.tensor([-4.0, -6.0]))
    assert torch.allclose(synthetic_1.grad.view(2, 2), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert all(real_batch.grad is None for real_batch in real)


@pytest.mark.parametrize("norm", ["in", "bn"])
def test_dm_vectorised_loss_equals_per_class_loop(norm):
    network = build_model(f"ConvNet-2-8-{norm}", channels=3, num_classes=CLASSES, image_size=(8, 8), seed=5)
    network.train().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    real = [torch.randn(n, *SHAPE, generator=generator) for n in (5, 7, 5)]
    synthetic = torch.randn(CLASSES, 2, *SHAPE, generator=generator)

    per_class_reference = sum(
        (network.embed(r).mean(0) - network.embed(s).mean(0)).pow(2).sum() for r, s in zip(real, synthetic)
    )
    all_classes_real = network.embed(torch.cat(real)).split([5, 7, 5])
    all_classes_syn = network.embed(synthetic.flatten(0, 1)).view(CLASSES, 2, -1)
    batched_reference = sum((r.mean(0) - s.mean(0)).pow(2).sum() for r, s in zip(all_classes_real, all_classes_syn))

    per_class = DistributionMatching(per_class_forward=True).matching_loss(network, real, synthetic)
    assert torch.allclose(per_class, per_class_reference, rtol=1e-5)
    vectorised = DistributionMatching(max_forward_images=None).matching_loss(network, real, synthetic)
    assert torch.allclose(vectorised, batched_reference, rtol=1e-5)
    if norm == "in":  # instance norm: one forward for all classes is exactly the per-class computation
        assert torch.allclose(vectorised, per_class_reference, rtol=1e-5)
        chunked = DistributionMatching(max_forward_images=6).matching_loss(network, real, synthetic)
        assert torch.allclose(chunked, per_class_reference, rtol=1e-5)
        as_tensor = DistributionMatching().matching_loss(network, torch.stack(real[:1] * 3), synthetic)
        as_list = DistributionMatching().matching_loss(network, real[:1] * 3, list(synthetic))
        assert torch.allclose(as_tensor, as_list, rtol=1e-5)


class RecordingSampler(ClassSampler):
    def __init__(self, sampler: ClassSampler) -> None:
        super().__init__(sampler.images, sampler.labels, sampler.num_classes)
        self.requests: list[tuple[int, int]] = []

    def sample(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        self.requests.append((c, n))
        return super().sample(c, n, generator)


def test_dm_iteration_yields_once_with_frozen_random_network_and_reaches_pixels():
    context = make_context(per_class=12)
    context.sampler = RecordingSampler(context.sampler)
    networks = capture_networks(context)
    method = DistributionMatching(batch_real=5)
    losses = list(method.iteration(context))
    assert len(losses) == 1 and len(networks) == 1
    assert networks[0].training and not any(p.requires_grad for p in networks[0].parameters())
    assert context.sampler.requests == [(0, 5), (1, 5), (2, 5)]
    losses[0].backward()
    assert context.synthetic.pixels.grad is not None and context.synthetic.pixels.grad.abs().sum() > 0

    context = make_context(per_class=4)  # batch_real larger than a class: the whole class
    context.sampler = RecordingSampler(context.sampler)
    list(DistributionMatching(batch_real=256).iteration(context))
    assert context.sampler.requests == [(0, 4), (1, 4), (2, 4)]


def test_dm_siamese_augmentation_shares_parameters_per_class():
    # Every class's real batch is its synthetic images in another order, so with the same
    # transformation on both the loss is zero; with independent draws it is not.
    spy = SpyDSA()
    context = make_context(per_class=4, ipc=4, augment=spy)
    loss = next(DistributionMatching().iteration(context))
    assert loss.item() < 1e-8
    assert len(spy.drawn) == CLASSES and all(params.batch_size == 1 for params in spy.drawn)
    for params in spy.drawn:
        uses = [(size, grad) for draw, size, grad in spy.applied if draw == id(params)]
        assert sorted(uses) == [(4, False), (4, True)]  # one real batch (no grad), one synthetic batch

    class IndependentDSA(DSA):
        def siamese(self, batches, generator):
            return [self(batch, generator) for batch in batches]

    context = make_context(per_class=4, ipc=4, augment=IndependentDSA())
    assert next(DistributionMatching().iteration(context)).item() > 1e-3


# ---------------------------------------------------------------------------------------------
# DC / DSA


def test_gradient_matching_iteration_trains_network_between_yields_only():
    context = make_context(real_requires_grad=True)
    networks = capture_networks(context)
    method = GradientMatching(outer_loop=3, inner_loop=2, batch_train=4)
    optimizer = torch.optim.SGD(context.synthetic.parameters(), lr=0.1, momentum=0.5)
    snapshots = []
    count = 0
    for loss in method.iteration(context):
        count += 1
        snapshots.append(weights(networks[0]))
        optimizer.zero_grad()
        loss.backward()
        grad = context.synthetic.pixels.grad
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
        assert context.sampler.images.grad is None  # the real data receives no gradient
        optimizer.step()
    assert count == 3 and len(networks) == 1
    assert not same_weights(snapshots[0], snapshots[1])
    assert not same_weights(snapshots[1], snapshots[2])
    assert same_weights(snapshots[2], weights(networks[0]))  # not trained after the last update

    context = make_context()
    networks = capture_networks(context)
    assert len(run_loop(GradientMatching(), context)) == 1  # ipc 2 -> nearest published (ipc 1): (1, 1)


def test_gradient_matching_network_optimizer_is_plain_sgd():
    # One inner step on a single minibatch must be exactly theta - lr_net * grad (no momentum, no decay).
    context = make_context(ipc=1)
    networks = capture_networks(context)
    method = GradientMatching(outer_loop=2, inner_loop=1, lr_net=0.05, batch_train=64)
    iterator = method.iteration(context)
    next(iterator)
    network = networks[0]
    before = weights(network)
    network.zero_grad()
    loss = F.cross_entropy(network(context.synthetic.images().detach()), context.synthetic.labels)
    expected_grads = torch.autograd.grad(loss, list(network.parameters()))
    next(iterator)
    for old, grad, new in zip(before, expected_grads, network.parameters()):
        assert torch.allclose(new.detach(), old - 0.05 * grad, atol=1e-6)


def test_dsa_matching_is_siamese_and_inner_training_is_per_sample():
    spy = SpyDSA()
    context = make_context(augment=spy)
    iterator = GradientMatching(outer_loop=2, inner_loop=1, batch_train=4).iteration(context)
    next(iterator)
    assert len(spy.drawn) == CLASSES
    for params in spy.drawn:
        uses = [(size, grad) for draw, size, grad in spy.applied if draw == id(params)]
        assert sorted(uses) == [(2, True), (12, False)]  # the synthetic pair and the class's 12 real images
    spy.drawn.clear()
    spy.applied.clear()
    next(iterator)  # inner training on 6 synthetic images in batches of 4, then matching again
    training = spy.drawn[:2]
    assert [params.batch_size for params in training] == [4, 2]
    assert [size for _, size, _ in spy.applied[:2]] == [4, 2]


def test_gradient_matching_batch_norm_matches_with_frozen_statistics():
    context = make_context(model="ConvNet-1-8-bn")
    networks = capture_networks(context)
    iterator = GradientMatching(outer_loop=2, inner_loop=1).iteration(context)
    for loss in iterator:
        norms = [m for m in networks[0].modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms)
        assert all(m.running_mean.abs().sum() > 0 for m in norms)
        assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("ipc", "expected"),
    [(1, (1, 1)), (10, (10, 50)), (20, (20, 25)), (30, (30, 20)), (40, (40, 15)), (50, (50, 10)),
     (7, (10, 50)), (3, (1, 1)), (15, (10, 50)), (100, (50, 10))],
)
def test_gradient_matching_loop_table(ipc, expected):
    assert GradientMatching().loops(ipc) == expected


def test_gradient_matching_explicit_loops_override():
    assert GradientMatching(outer_loop=4).loops(10) == (4, 50)
    assert GradientMatching(inner_loop=0).loops(50) == (50, 0)
    assert GradientMatching(outer_loop=2, inner_loop=3).loops(1) == (2, 3)


# ---------------------------------------------------------------------------------------------
# Registry, defaults, settings, determinism


def test_registry_and_published_defaults():
    assert method_class("dm") is DistributionMatching
    assert method_class("dc") is DatasetCondensation and method_class("dsa") is SiameseAugmentedCondensation
    assert {"dm", "dc", "dsa"} <= set(METHOD_REGISTRY)
    dm = DistributionMatching.defaults(10)
    assert (dm.iterations, dm.lr_images, dm.momentum_images, dm.batch_real, dm.augment) == (20000, 1.0, 0.5, 256, True)
    for cls, augment in ((DatasetCondensation, False), (SiameseAugmentedCondensation, True)):
        d = cls.defaults(50)
        assert (d.iterations, d.lr_images, d.momentum_images, d.batch_real, d.augment) == (1000, 0.1, 0.5, 256, augment)
    with pytest.raises(UserInputError, match="nope"):
        method_class("nope")


@pytest.mark.parametrize(
    "build",
    [
        lambda: DistributionMatching(batch_real=0),
        lambda: DistributionMatching(max_forward_images=0),
        lambda: GradientMatching(batch_real=0),
        lambda: GradientMatching(outer_loop=0),
        lambda: GradientMatching(inner_loop=-1),
        lambda: GradientMatching(lr_net=0.0),
        lambda: GradientMatching(batch_train=0),
    ],
)
def test_bad_settings_are_user_errors(build):
    with pytest.raises(UserInputError):
        build()


@pytest.mark.parametrize(
    "make_method", [lambda: DistributionMatching(), lambda: GradientMatching(outer_loop=2, inner_loop=2, batch_train=4)]
)
def test_same_seed_gives_same_losses(make_method):
    def run(seed: int) -> tuple[list[Tensor], Tensor]:
        context = make_context(seed=seed, augment=DSA())
        losses = run_loop(make_method(), context)
        return losses, context.synthetic.pixels.detach()

    first_losses, first_pixels = run(11)
    second_losses, second_pixels = run(11)
    assert len(first_losses) == len(second_losses)
    assert all(torch.equal(a, b) for a, b in zip(first_losses, second_losses))
    assert torch.equal(first_pixels, second_pixels)
    other_losses, _ = run(12)
    assert not all(torch.equal(a, b) for a, b in zip(first_losses, other_losses))
    assert all(math.isfinite(loss.item()) for loss in first_losses)
