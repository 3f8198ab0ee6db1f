"""The MIM4DD contrastive regularizer: InfoNCE vs a looped reference, closed forms, invariances, gradients, layers."""

import math

import pytest
import torch
import torch.nn.functional as F

from infodistill.data.sampler import ClassSampler
from infodistill.errors import UserInputError
from infodistill.models import build_model
from infodistill.regularizers.mim import MIMRegularizer, block_ends, info_nce, layer_features

CLASSES = 3
SHAPE = (1, 8, 8)


def reference_info_nce(syn, syn_labels, real, real_labels, temperature) -> float:
    """Plain-Python supervised InfoNCE: explicit loops over anchors, candidates and positives."""
    def unit(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    syn = [unit(row) for row in syn.tolist()]
    real = [unit(row) for row in real.tolist()]
    syn_labels, real_labels = syn_labels.tolist(), real_labels.tolist()
    total = 0.0
    for i, anchor in enumerate(syn):
        scores = [sum(a * b for a, b in zip(anchor, candidate)) / temperature for candidate in real]
        top = max(scores)
        log_denominator = top + math.log(sum(math.exp(s - top) for s in scores))
        positives = [j for j in range(len(real)) if real_labels[j] == syn_labels[i]]
        total += -sum(scores[p] - log_denominator for p in positives) / len(positives)
    return total / len(syn)


def random_features(seed: int = 0, dim: int = 6):
    """9 synthetic anchors over classes 0..2 (sizes 4, 1, 4) and 13 real candidates over 0..3 (class 3 only real)."""
    generator = torch.Generator().manual_seed(seed)
    syn_labels = torch.tensor([0, 2, 1, 0, 2, 2, 0, 0, 2])
    real_labels = torch.tensor([3, 0, 1, 1, 2, 0, 3, 2, 1, 0, 2, 1, 3])
    syn = torch.randn(len(syn_labels), dim, generator=generator, dtype=torch.float64)
    real = torch.randn(len(real_labels), dim, generator=generator, dtype=torch.float64)
    return syn, syn_labels, real, real_labels


def make_sampler(per_class=(10, 10, 10), seed: int = 100, requires_grad: bool = False) -> ClassSampler:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    images = torch.randn(len(labels), *SHAPE, generator=generator)
    if requires_grad:
        images.requires_grad_(True)
    return ClassSampler(images, labels, len(per_class))


class Factory:
    """A network factory like the loop's fresh network: seed drawn from the generator; remembers what it built."""

    def __init__(self, name: str = "ConvNet-2-8", fixed: torch.nn.Module | None = None):
        self.name, self.fixed, self.built = name, fixed, []

    def __call__(self, generator: torch.Generator) -> torch.nn.Module:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        network = self.fixed if self.fixed is not None else build_model(self.name, 1, CLASSES, SHAPE[1:], seed=seed)
        self.built.append(network)
        return network


def synthetic_images(seed: int = 5, labels=(0, 0, 1, 1, 2, 2)):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    return torch.randn(len(labels), *SHAPE, generator=generator), labels


def reproduce(regularizer: MIMRegularizer, factory: Factory, seed: int):
    """The network and real batch a loss call with generator seed ``seed`` draws, by the documented order."""
    generator = torch.Generator().manual_seed(seed)
    network = factory(generator)
    real, real_labels = [], []
    for c in range(regularizer.sampler.num_classes):
        n = min(regularizer.real_per_class, regularizer.sampler.class_count(c))
        real.append(regularizer.sampler.sample(c, n, generator))
        real_labels += [c] * n
    return network, torch.cat(real).detach(), torch.tensor(real_labels)


# ---------------------------------------------------------------- info_nce on features


@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_info_nce_equals_a_looped_reference(temperature):
    syn, syn_labels, real, real_labels = random_features()
    value = info_nce(syn, syn_labels, real, real_labels, temperature)
    expected = reference_info_nce(syn, syn_labels, real, real_labels, temperature)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value32 = info_nce(syn.float(), syn_labels, real.float(), real_labels, temperature)
    assert value32.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_closed_form_orthogonal_classes():
    """Class 0 real = e1 (m0 times), class 1 real = e2 (m1 times), anchors of class 0 = e1:
    s = 1/t for positives, 0 for negatives, so loss = -log(e^{1/t} / (m0 e^{1/t} + m1)) = log(m0 + m1 e^{-1/t})."""
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    m0, m1, t = 3, 5, 0.25
    real = torch.stack([e1] * m0 + [e2] * m1).double()
    real_labels = torch.tensor([0] * m0 + [1] * m1)
    syn = torch.stack([2 * e1, 0.5 * e1]).double()  # lengths do not matter: features are normalised
    value = info_nce(syn, torch.tensor([0, 0]), real, real_labels, t)
    assert value.item() == pytest.approx(math.log(m0 + m1 * math.exp(-1 / t)), rel=1e-12)
    # Anchors of class 1 = e2 see the mirror image.
    value = info_nce(torch.stack([e2]).double(), torch.tensor([1]), real, real_labels, t)
    assert value.item() == pytest.approx(math.log(m1 + m0 * math.exp(-1 / t)), rel=1e-12)


def test_info_nce_is_log_m_when_every_similarity_is_equal():
    """All anchors orthogonal to all real samples (or all samples the same vector): every s_ij is equal,
    so each positive's log-probability is -log M and the loss is log M, whatever the classes."""
    generator = torch.Generator().manual_seed(3)
    real = torch.cat([torch.randn(7, 3, generator=generator, dtype=torch.float64),
                      torch.zeros(7, 2, dtype=torch.float64)], dim=1)
    real_labels = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    syn = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]] * 4, dtype=torch.float64)
    value = info_nce(syn, torch.tensor([0, 1, 2, 2]), real, real_labels, 0.1)
    assert value.item() == pytest.approx(math.log(7), rel=1e-12)
    same = torch.ones(7, 5, dtype=torch.float64)
    value = info_nce(same[:3], torch.tensor([2, 0, 1]), same, real_labels, 0.05)
    assert value.item() == pytest.approx(math.log(7), rel=1e-12)


def test_info_nce_decreases_as_synthetic_features_move_to_their_class():
    syn, syn_labels, real, real_labels = random_features(seed=1)
    unit_real = F.normalize(real, dim=1)
    centres = torch.stack([unit_real[real_labels == c].mean(dim=0) for c in range(4)])
    target = centres[syn_labels]
    values = [info_nce((1 - a) * syn + a * target, syn_labels, real, real_labels, 0.1).item()
              for a in (0.0, 0.5, 0.9, 1.0)]
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values
    # Moving towards another class's centre raises it instead.
    wrong = centres[(syn_labels + 1) % 4]
    assert info_nce(wrong, syn_labels, real, real_labels, 0.1).item() > values[0]


def test_info_nce_is_invariant_to_the_order_of_samples_and_to_feature_scale():
    syn, syn_labels, real, real_labels = random_features(seed=2)
    generator = torch.Generator().manual_seed(9)
    syn_order = torch.randperm(len(syn), generator=generator)
    real_order = torch.randperm(len(real), generator=generator)
    original = info_nce(syn, syn_labels, real, real_labels, 0.2)
    permuted = info_nce(syn[syn_order], syn_labels[syn_order], real[real_order], real_labels[real_order], 0.2)
    torch.testing.assert_close(permuted, original, rtol=1e-12, atol=0)
    scales = torch.rand(len(syn), 1, generator=generator, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(info_nce(syn * scales, syn_labels, real * 3, real_labels, 0.2), original)


def test_info_nce_is_stable_at_a_tiny_temperature_and_refuses_anchors_without_positives():
    syn, syn_labels, real, real_labels = random_features(seed=4)
    syn.requires_grad_(True)
    value = info_nce(syn, syn_labels, real, real_labels, 1e-4)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(syn.grad).all()
    reference = reference_info_nce(syn.detach(), syn_labels, real, real_labels, 1e-4)
    assert value.item() == pytest.approx(reference, rel=1e-9)
    with pytest.raises(UserInputError, match=r"synthetic classes \[2\] have no real sample"):
        info_nce(syn.detach(), syn_labels, real[real_labels != 2], real_labels[real_labels != 2], 0.1)
    with pytest.raises(UserInputError, match="temperature=0"):
        info_nce(syn.detach(), syn_labels, real, real_labels, 0)


# ---------------------------------------------------------------- the regularizer end to end


def test_loss_equals_the_reference_on_the_drawn_network_and_real_batch():
    sampler = make_sampler(per_class=(10, 3, 7))  # class 1 smaller than real_per_class: all 3 are used
    factory = Factory("ConvNet-2-8")
    regularizer = MIMRegularizer(sampler, factory, real_per_class=5, projection_dim=4, temperature=0.3)
    images, labels = synthetic_images()
    value = regularizer.loss(images, labels, torch.Generator().manual_seed(21))
    network, real, real_labels = reproduce(regularizer, factory, 21)
    assert real_labels.tolist() == [0] * 5 + [1] * 3 + [2] * 5
    weight, bias = regularizer.parameters()
    with torch.no_grad():
        syn_z = network.features(images).flatten(1) @ weight.T + bias
        real_z = network.features(real).flatten(1) @ weight.T + bias
    expected = reference_info_nce(syn_z.double(), labels, real_z.double(), real_labels, 0.3)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # Same generator seed, same value; another seed draws another network and batch.
    again = regularizer.loss(images, labels, torch.Generator().manual_seed(21))
    assert torch.equal(value, again)
    assert regularizer.loss(images, labels, torch.Generator().manual_seed(22)).item() != pytest.approx(value.item())


def test_two_layers_average_the_pooled_first_block_and_the_embedding():
    sampler = make_sampler()
    factory = Factory("ConvNet-2-8")
    regularizer = MIMRegularizer(sampler, factory, real_per_class=4, projection_dim=5, temperature=0.2, layers=2)
    assert regularizer.feature_dims == (8, 8 * 3 * 3)  # 8 channels after block 1; 8 x 3 x 3 flattened at the end
    images, labels = synthetic_images(labels=(0, 1, 2, 2))
    value = regularizer.loss(images, labels, torch.Generator().manual_seed(4))
    network, real, real_labels = reproduce(regularizer, factory, 4)
    w1, b1, w2, b2 = regularizer.parameters()
    with torch.no_grad():
        first = network.features[:4]  # conv, norm, ReLU, AvgPool2d of block 1
        terms = [
            reference_info_nce((first(images).mean(dim=(2, 3)) @ w1.T + b1).double(), labels,
                               (first(real).mean(dim=(2, 3)) @ w1.T + b1).double(), real_labels, 0.2),
            reference_info_nce((network.embed(images) @ w2.T + b2).double(), labels,
                               (network.embed(real) @ w2.T + b2).double(), real_labels, 0.2),
        ]
    assert abs(terms[0] - terms[1]) > 1e-3  # the two layers really differ
    assert value.item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_layer_features_picks_the_deepest_blocks_before_the_embedding():
    network = build_model("ConvNet-3-8", 1, CLASSES, (16, 16), seed=0)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = layer_features(network, images, 3)
        assert [f.shape[1] for f in features] == [8, 8, network.feature_dim]
        torch.testing.assert_close(features[0], network.features[:4](images).mean(dim=(2, 3)))
        torch.testing.assert_close(features[1], network.features[:8](images).mean(dim=(2, 3)))
        torch.testing.assert_close(features[2], network.embed(images))
        two = layer_features(network, images, 2)
        torch.testing.assert_close(two[0], features[1])  # layers=2 adds the block just before the embedding
    resnet = build_model("ResNet10", 1, CLASSES, (8, 8), seed=0)
    assert len(block_ends(resnet)) == 4  # four residual blocks; the last one's pooled output is embed
    assert [f.shape[1] for f in layer_features(resnet, images[:, :, :8, :8], 4)] == [64, 128, 256, 512]
    assert not any(m.__dict__["_forward_hooks"] for m in network.modules())  # hooks removed


def test_too_many_layers_or_no_embed_is_refused():
    sampler = make_sampler()
    with pytest.raises(UserInputError, match="layers=3 is not allowed for ConvNet: it has 1 block.*use 1..2"):
        MIMRegularizer(sampler, Factory("ConvNet-2-8"), layers=3)
    with pytest.raises(UserInputError, match="no embed"):
        MIMRegularizer(sampler, lambda generator: torch.nn.Linear(64, 4))


def test_gradients_reach_images_and_heads_from_both_sides_but_not_the_network_or_real_images():
    sampler = make_sampler(requires_grad=True)
    network = build_model("ConvNet-2-8", 1, CLASSES, SHAPE[1:], seed=3)
    factory = Factory(fixed=network)
    regularizer = MIMRegularizer(sampler, factory, real_per_class=4, projection_dim=6, layers=2)
    images, labels = synthetic_images()
    images.requires_grad_(True)
    value = regularizer.loss(images, labels, torch.Generator().manual_seed(1))
    value.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in regularizer.parameters())
    assert all(p.grad is None and p.requires_grad for p in network.parameters())  # untouched, flags restored
    assert sampler.images.grad is None

    # The head gradient includes the real side: it differs from the synthetic-only gradient.
    _, real, real_labels = reproduce(regularizer, factory, 1)
    w1, b1, w2, b2 = [p.detach().clone().requires_grad_(True) for p in regularizer.parameters()]
    with torch.no_grad():
        syn_h = layer_features(network, images, 2)
        real_h = layer_features(network, real, 2)

    def total(real_side_grad: bool):
        heads = [(w1, b1), (w2, b2)]
        terms = []
        for (w, b), s, r in zip(heads, syn_h, real_h):
            real_w, real_b = (w, b) if real_side_grad else (w.detach(), b.detach())
            terms.append(info_nce(s @ w.T + b, labels, r @ real_w.T + real_b, real_labels, 0.1))
        return sum(terms) / 2

    both = torch.autograd.grad(total(True), [w1, b1, w2, b2])
    synthetic_only = torch.autograd.grad(total(False), [w1, b1, w2, b2])
    for grad, p in zip(both, regularizer.parameters()):
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(both[2], synthetic_only[2], rtol=1e-3, atol=1e-6)


def test_loss_is_invariant_to_the_order_of_the_synthetic_samples():
    sampler = make_sampler()
    regularizer = MIMRegularizer(sampler, Factory(), real_per_class=6)
    images, labels = synthetic_images(labels=(0, 2, 1, 1, 0, 2, 2))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    original = regularizer.loss(images, labels, torch.Generator().manual_seed(8))
    permuted = regularizer.loss(images[order], labels[order], torch.Generator().manual_seed(8))
    torch.testing.assert_close(permuted, original, rtol=1e-5, atol=1e-6)


def test_one_class_batch_still_has_every_class_as_negatives():
    sampler = make_sampler(per_class=(10, 2, 10))
    factory = Factory()
    regularizer = MIMRegularizer(sampler, factory, real_per_class=5, temperature=0.5)
    images, labels = synthetic_images(labels=(1, 1, 1))
    value = regularizer.loss(images, labels, torch.Generator().manual_seed(2))
    network, real, real_labels = reproduce(regularizer, factory, 2)
    assert real_labels.tolist() == [0] * 5 + [1] * 2 + [2] * 5
    weight, bias = regularizer.parameters()
    with torch.no_grad():
        expected = reference_info_nce((network.embed(images) @ weight.T + bias).double(), labels,
                                      (network.embed(real) @ weight.T + bias).double(), real_labels, 0.5)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert value.item() > 0.1  # with 10 negatives it is far from the trivial 0 of a positives-only batch


def test_optimising_images_and_heads_lowers_the_loss():
    sampler = make_sampler()
    regularizer = MIMRegularizer(sampler, Factory(), real_per_class=6, projection_dim=8)
    images, labels = synthetic_images()
    images.requires_grad_(True)
    optimiser = torch.optim.Adam([images, *regularizer.parameters()], lr=0.05)
    start = regularizer.loss(images, labels, torch.Generator().manual_seed(0)).item()
    for _ in range(15):
        optimiser.zero_grad()
        regularizer.loss(images, labels, torch.Generator().manual_seed(0)).backward()
        optimiser.step()
    end = regularizer.loss(images, labels, torch.Generator().manual_seed(0)).item()
    assert end < start - 0.2, (start, end)


def test_heads_are_drawn_from_init_generator_only():
    sampler = make_sampler()
    state = torch.get_rng_state()
    first = MIMRegularizer(sampler, Factory(), projection_dim=7, init_generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither read nor advanced
    second = MIMRegularizer(sampler, Factory(), projection_dim=7, init_generator=torch.Generator().manual_seed(5))
    other = MIMRegularizer(sampler, Factory(), projection_dim=7, init_generator=torch.Generator().manual_seed(6))
    default = MIMRegularizer(sampler, Factory(), projection_dim=7)
    seed0 = MIMRegularizer(sampler, Factory(), projection_dim=7, init_generator=torch.Generator().manual_seed(0))
    assert [p.shape for p in first.parameters()] == [(7, 72), (7,)]
    assert all(p.requires_grad and p.is_leaf for p in first.parameters())
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not torch.equal(first.parameters()[0], other.parameters()[0])
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), seed0.parameters()))
    bound = 1 / math.sqrt(72)
    assert all(p.abs().max() <= bound for p in first.parameters())


def test_state_dict_round_trip_copies_in_place():
    sampler = make_sampler()
    source = MIMRegularizer(sampler, Factory(), projection_dim=3, layers=2,
                            init_generator=torch.Generator().manual_seed(1))
    target = MIMRegularizer(sampler, Factory(), projection_dim=3, layers=2,
                            init_generator=torch.Generator().manual_seed(2))
    tensors = target.parameters()
    target.load_state_dict(source.state_dict())
    assert all(a is b for a, b in zip(tensors, target.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters()))
    with pytest.raises(UserInputError, match="expected"):
        target.load_state_dict({"head0.weight": torch.zeros(3, 8)})


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("temperature", 0.0, "temperature=0.0 is not allowed; use a finite number > 0"),
        ("temperature", -1, "temperature=-1"),
        ("temperature", float("nan"), "temperature=nan"),
        ("projection_dim", 0, "projection_dim=0 is invalid; it must be an integer >= 1"),
        ("real_per_class", 0, "real_per_class=0 is invalid"),
        ("real_per_class", 2.5, "real_per_class=2.5"),
        ("layers", 0, "layers=0 is invalid"),
        ("layers", True, "layers=True"),
    ],
)
def test_bad_values_are_refused(argument, value, message):
    with pytest.raises(UserInputError, match=message.replace(".", r"\.").replace("+", r"\+")):
        MIMRegularizer(make_sampler(), Factory(), **{argument: value})
