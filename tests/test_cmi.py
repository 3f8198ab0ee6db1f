"""The class-aware CMI: KL form vs an independent entropy-form reference, edge cases, gradients, vmap, sampling."""

import math

import numpy as np
import pytest
import torch

from infodistill.data import DatasetInfo
from infodistill.errors import UserInputError
from infodistill.models import build_model
from infodistill.proxies import ProxyPool
from infodistill.regularizers import CMIRegularizer, cmi_from_features, cmi_per_proxy, empirical_cmi, pool_cmi

INFO = DatasetInfo(name="tiny", channels=1, image_size=(8, 8), num_classes=3, class_names=("a", "b", "c"),
                   mean=(0.5,), std=(0.25,))


def entropy(probabilities) -> float:
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def softmax_rows(features: np.ndarray) -> list[list[float]]:
    rows = []
    for row in features.tolist():
        top = max(row)
        exps = [math.exp(value - top) for value in row]
        total = sum(exps)
        rows.append([value / total for value in exps])
    return rows


def reference_cmi(features: np.ndarray, labels: list[int], per_class: bool = False) -> float:
    """Entropy form, float64, plain loops: sum_y |S_y|/|S| (H(Q_y) - mean_{s in S_y} H(P_s))."""
    probabilities = softmax_rows(features.astype(np.float64))
    terms, weights = [], []
    for y in sorted(set(labels)):
        members = [probabilities[i] for i, label in enumerate(labels) if label == y]
        centroid = [sum(p[d] for p in members) / len(members) for d in range(len(members[0]))]
        terms.append(entropy(centroid) - sum(entropy(p) for p in members) / len(members))
        weights.append(len(members) / len(labels))
    if per_class:
        return sum(terms) / len(terms)
    return sum(w * t for w, t in zip(weights, terms))


def uneven_set(seed: int = 0, scale: float = 3.0):
    """Features of 23 samples over 5 classes of sizes 8, 0 (empty), 1, 5, 9, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 8 + [2] + [3] * 5 + [4] * 9)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    features = scale * torch.randn(len(labels), 7, generator=generator, dtype=torch.float64)
    return features, labels


def tiny_models(count: int, width: int = 8) -> list[torch.nn.Module]:
    return [build_model(f"ConvNetGAP-1-{width}", 1, 3, (8, 8), seed=100 + i).eval() for i in range(count)]


def tiny_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 8, 8, generator=generator), torch.arange(count) % 3


@pytest.mark.parametrize("per_class", [False, True])
def test_kl_form_equals_the_entropy_form_with_empty_and_single_sample_classes(per_class):
    features, labels = uneven_set()
    expected = reference_cmi(features.numpy(), labels.tolist(), per_class=per_class)
    assert expected > 0.01
    value = cmi_from_features(features, labels, num_classes=5, per_class=per_class)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    value32 = cmi_from_features(features.float(), labels, num_classes=5, per_class=per_class)
    assert value32.dtype == torch.float32
    assert value32.item() == pytest.approx(expected, rel=1e-5)
    # Extra empty classes beyond the labels change nothing.
    padded = cmi_from_features(features, labels, num_classes=9, per_class=per_class)
    assert padded.item() == pytest.approx(expected, rel=1e-12)


def test_batched_features_give_one_value_per_leading_index():
    features, labels = uneven_set()
    stacked = torch.stack([features, 0.5 * features, features.flip(1)])
    values = cmi_from_features(stacked, labels, num_classes=5)
    assert values.shape == (3,)
    for row, value in zip(stacked, values):
        assert value.item() == pytest.approx(reference_cmi(row.numpy(), labels.tolist()), rel=1e-12)


def test_zero_when_each_class_is_one_point_and_positive_otherwise():
    generator = torch.Generator().manual_seed(1)
    centres = 4 * torch.randn(3, 16, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    features = centres[labels].clone()
    assert abs(cmi_from_features(features, labels, 3).item()) < 1e-7
    features[0] += 0.1 * torch.randn(16, generator=generator)
    assert cmi_from_features(features, labels, 3).item() > 0


def test_one_sample_per_class_is_exactly_zero_even_for_extreme_features():
    features = torch.tensor([[300.0, -300.0, 0.0], [-1e4, 5.0, 1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    value = cmi_from_features(features, labels, 4)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(features.grad).all()


def test_saturated_softmaxes_stay_finite():
    """Probabilities that underflow to 0 in a whole class must not give log 0 = -inf or NaN."""
    features = torch.tensor([[500.0, 0.0, -500.0], [400.0, 0.0, -600.0], [0.0, 800.0, 0.0], [0.0, 0.0, 900.0]],
                            requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    value = cmi_from_features(features, labels, 2)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert torch.isfinite(features.grad).all()
    expected = reference_cmi(features.detach().numpy(), labels.tolist())
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_invariant_to_permuting_the_samples_with_their_labels():
    features, labels = uneven_set(seed=4)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(9))
    for per_class in (False, True):
        original = cmi_from_features(features, labels, 5, per_class=per_class)
        permuted = cmi_from_features(features[order], labels[order], 5, per_class=per_class)
        assert permuted.item() == pytest.approx(original.item(), rel=1e-12)


def test_bad_labels_are_refused():
    features, labels = uneven_set()
    with pytest.raises(UserInputError, match="labels span 0..4; allowed are 0..3"):
        cmi_from_features(features, labels, 4)
    with pytest.raises(UserInputError, match="one per sample"):
        cmi_from_features(features, labels[:-1], 5)
    with pytest.raises(UserInputError, match="empty set"):
        cmi_from_features(features[:0], labels[:0], 5)


@pytest.mark.parametrize("per_class", [False, True])
def test_gradient_wrt_features_matches_finite_differences(per_class):
    features, labels = uneven_set(seed=2, scale=1.5)
    features = features[:, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cmi_from_features(x, labels, 5, per_class=per_class), (features,))


def test_gradient_wrt_images_through_a_tiny_proxy_matches_finite_differences():
    proxy = build_model("ConvNet-1-4", 1, 3, (8, 8), seed=7).double().eval().requires_grad_(False)
    images = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 0, 1, 1, 1])
    images.requires_grad_(True)
    assert empirical_cmi(proxy, images, labels, 3).item() > 0
    assert torch.autograd.gradcheck(lambda x: empirical_cmi(proxy, x, labels, 3), (images,))


def test_cmi_per_proxy_in_one_vmap_pass_equals_a_loop_over_the_proxies():
    models = tiny_models(3)
    pool = ProxyPool(models, "ConvNetGAP-1-8", INFO)
    images, labels = tiny_images(12)
    images.requires_grad_(True)
    for indices in ([0, 1, 2], [2, 0, 1]):  # views of the storage, and a gathered selection
        values = cmi_per_proxy(pool.stacked(indices), images, labels, 3)
        looped = torch.stack([empirical_cmi(models[i], images, labels, 3) for i in indices])
        assert values.shape == (3,)
        torch.testing.assert_close(values, looped, rtol=1e-5, atol=1e-9)
        (vmap_grad,) = torch.autograd.grad(values.sum(), images)
        (loop_grad,) = torch.autograd.grad(looped.sum(), images)
        torch.testing.assert_close(vmap_grad, loop_grad, rtol=1e-4, atol=1e-9)
    assert all(value > 0 for value in values.tolist())


def test_pool_cmi_gives_every_proxys_value_whatever_the_chunking():
    models = tiny_models(5)
    pool = ProxyPool(models, "ConvNetGAP-1-8", INFO)
    images, labels = tiny_images(10)
    expected = torch.stack([empirical_cmi(model, images, labels, 3) for model in models]).detach()
    for chunk, image_batch, batched in ((16, 512, "on"), (2, 3, "on"), (1, 1, "on"), (16, 4, "off"), (3, 512, "auto")):
        values = pool_cmi(pool, images, labels, 3, chunk=chunk, image_batch=image_batch, batched=batched)
        assert not values.requires_grad
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-9)


def test_regularizer_draws_one_proxy_reproducibly_and_uniformly():
    pool = ProxyPool(tiny_models(4), "ConvNetGAP-1-8", INFO)
    images, labels = tiny_images(6)
    regularizer = CMIRegularizer(pool)
    first = regularizer.loss(images, labels, torch.Generator().manual_seed(11))
    first_index = regularizer.last_indices
    second = regularizer.loss(images, labels, torch.Generator().manual_seed(11))
    assert regularizer.last_indices == first_index and len(first_index) == 1
    assert torch.equal(first, second)
    assert first.item() == pytest.approx(empirical_cmi(pool[first_index[0]], images, labels, 3).item(), rel=1e-6)

    generator = torch.Generator().manual_seed(0)
    counts = [0] * len(pool)
    draws = 800
    for _ in range(draws):
        regularizer.loss(images[:3], labels[:3], generator)
        counts[regularizer.last_indices[0]] += 1
    assert all(150 <= count <= 250 for count in counts), counts  # 200 expected each, std about 12


@pytest.mark.parametrize("batched", ["on", "off"])
def test_regularizer_with_k_proxies_is_the_mean_over_k_distinct_proxies(batched):
    pool = ProxyPool(tiny_models(4), "ConvNetGAP-1-8", INFO)
    images, labels = tiny_images(9)
    images.requires_grad_(True)
    regularizer = CMIRegularizer(pool, proxies_per_step=3, batched=batched)
    assert regularizer.vectorised == (batched == "on")
    value = regularizer.loss(images, labels, torch.Generator().manual_seed(5))
    indices = regularizer.last_indices
    assert len(set(indices)) == 3
    expected = torch.stack([empirical_cmi(pool[i], images, labels, 3) for i in indices]).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(value, images)
    assert grad.abs().sum() > 0
    regularizer.loss(images, labels, torch.Generator().manual_seed(5))
    assert regularizer.last_indices == indices
    with pytest.raises(UserInputError, match="proxies_per_step=5"):
        CMIRegularizer(pool, proxies_per_step=5)
    with pytest.raises(UserInputError, match="batched 'yes' is not one of"):
        CMIRegularizer(pool, batched="yes")


def test_per_class_regularizer_averages_each_class_alone():
    pool = ProxyPool(tiny_models(2), "ConvNetGAP-1-8", INFO)
    images, labels = tiny_images(8)  # classes of sizes 3, 3, 2
    regularizer = CMIRegularizer(pool, per_class=True)
    value = regularizer.loss(images, labels, torch.Generator().manual_seed(0))
    proxy = pool[regularizer.last_indices[0]]
    alone = [empirical_cmi(proxy, images[labels == y], labels[labels == y], 3) for y in range(3)]
    assert value.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)
