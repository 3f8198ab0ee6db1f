"""SRe2L and DWA: the recovery loss against hand computations and an independent per-batch reference,
DWA's weight perturbation, relabelling, clipping, refusals, and runs through the loop (resume included)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.methods import DistillContext, MethodSetup
from infodistill.methods.base import POSITION_DRAWS
from infodistill.methods.sre2l import (
    DWA,
    SRe2L,
    augment_batches,
    draw_augmentations,
    perturb_parameters,
    recovery_terms,
)
from infodistill.models import build_model
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.seeds import stream_generator
from infodistill.synthetic import PixelSet, SyntheticSet

TEACHER_ARCH = "ConvNetGAP-2-8-bn"  # pooled: the resume test uses the teacher as its CMI pool too


@pytest.fixture
def teacher_dir(real, tmp_path):
    directory = tmp_path / "teacher"
    train_proxy_pool(real, directory, arch=TEACHER_ARCH, count=1, epochs=1, progress=False)
    return directory


def _setup(real, ipc, init="real", seed=0):
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    synthetic = PixelSet.initialise(sampler, ipc, init, torch.Generator().manual_seed(seed))
    return MethodSetup(synthetic=synthetic, sampler=sampler, info=real.info, device=torch.device("cpu"),
                       model_name="ConvNet-3", generator=torch.Generator().manual_seed(seed + 1), fresh=True, init=init)


def _context(setup, seed=5):
    return DistillContext(iteration=0, generator=torch.Generator().manual_seed(seed), synthetic=setup.synthetic,
                          sampler=setup.sampler, info=setup.info, augment=None, device=torch.device("cpu"),
                          model_name=setup.model_name)


def _reference_loss(network, images, labels, bn_weight, first_bn_weight, variance_weight, parameters=None):
    """The official hook's formula, written out independently: one batch, one forward pass."""
    terms = []

    def hook(module, inputs, output):
        x = inputs[0]
        channels = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape(channels, -1).var(1, unbiased=False)
        distance_var = torch.norm(module.running_var - var, 2)
        terms.append(torch.norm(module.running_mean - mean, 2) + variance_weight * distance_var)

    handles = [m.register_forward_hook(hook) for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        logits = network(images) if parameters is None else functional_call(network, parameters, (images,))
    finally:
        for handle in handles:
            handle.remove()
    batch_norm = first_bn_weight * terms[0] + sum(terms[1:])
    return F.cross_entropy(logits, labels) + bn_weight * batch_norm


def _random_teacher(seed=0):
    """A TEACHER_ARCH network with running statistics from a train-mode pass over random images, in eval mode."""
    network = build_model(TEACHER_ARCH, channels=1, num_classes=10, image_size=(28, 28), seed=seed)
    network.train()
    with torch.no_grad():
        network(torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5)
    return network.eval().requires_grad_(False)


def _state(network):
    return {name: tensor.detach().clone() for name, tensor in network.state_dict().items()}


# ---- the batch-norm statistics term -------------------------------------------------------------------


def test_bn_term_is_zero_when_the_batch_statistics_are_the_running_ones():
    teacher = _random_teacher()
    images = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    # Set each layer's running statistics to the batch statistics of its input, layer by layer (a layer's
    # input depends on the earlier layers' running statistics in eval mode).
    for layer in layers:
        captured = {}
        handle = layer.register_forward_hook(lambda m, inputs, out, into=captured: into.update(x=inputs[0]))
        with torch.no_grad():
            teacher(images)
        handle.remove()
        x = captured["x"]
        layer.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        layer.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    labels = torch.arange(10)
    cross_entropy, batch_norm = recovery_terms(teacher, images.unsqueeze(0), labels, 10.0, 1.0)
    assert batch_norm.shape == (1,) and batch_norm.abs().item() < 1e-4
    assert torch.allclose(cross_entropy, F.cross_entropy(teacher(images), labels).view(1))


def _one_layer_net():
    """BatchNorm2d(2) -> flatten -> zero linear layer: logits are 0, so CE = log(2) for two classes."""
    bn = nn.BatchNorm2d(2)
    linear = nn.Linear(4, 2)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    net = nn.Sequential(bn, nn.Flatten(), linear).eval().requires_grad_(False)
    return net, bn


def _hand_batch():
    """Two images (1 x 2 channels x 1 x 2): channel 0 holds 1, 3, 5, 7 (mean 4, biased var 5), channel 1 holds
    0, 0, 2, 2 (mean 1, var 1)."""
    return torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])


def test_bn_term_equals_the_hand_computed_value_for_one_layer():
    net, bn = _one_layer_net()
    bn.running_mean.copy_(torch.tensor([1.0, 5.0]))  # mean differences (3, -4): norm 5
    bn.running_var.copy_(torch.tensor([2.0, 5.0]))  # variance differences (3, -4): norm 5
    method = SRe2L(teacher="unused", bn_weight=0.5, first_bn_weight=3.0, variance_weight=2.0)
    method.network = net
    losses = method.batch_losses(_hand_batch().unsqueeze(0), torch.tensor([0, 1]))
    # CE = log 2; BN term = first multiplier 3 * (5 + 2 * 5) = 45; loss = log 2 + 0.5 * 45
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(math.log(2) + 0.5 * 45, rel=1e-6)


@pytest.mark.parametrize("first_bn_weight, variance_weight", [(1.0, 1.0), (10.0, 1.0), (10.0, 11.0), (0.0, 2.0)])
def test_first_bn_multiplier_and_variance_weight_enter_as_stated(first_bn_weight, variance_weight):
    first = nn.BatchNorm2d(2, eps=0.0)  # running mean 0, var 1, weight 1, bias 0, eps 0: the identity
    second = nn.BatchNorm2d(2)
    second.running_mean.copy_(torch.tensor([1.0, 5.0]))
    second.running_var.copy_(torch.tensor([2.0, 5.0]))
    linear = nn.Linear(4, 2)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    net = nn.Sequential(first, second, nn.Flatten(), linear).eval()
    cross_entropy, batch_norm = recovery_terms(net, _hand_batch().unsqueeze(0), torch.tensor([0, 1]),
                                               first_bn_weight, variance_weight)
    # first layer: ||(4, 1) - 0|| = sqrt(17), ||(5, 1) - (1, 1)|| = 4; second layer: 5 and 5
    first_term = math.sqrt(17) + variance_weight * 4
    second_term = 5 + variance_weight * 5
    assert batch_norm.item() == pytest.approx(first_bn_weight * first_term + second_term, rel=1e-6)
    assert cross_entropy.item() == pytest.approx(math.log(2), rel=1e-6)


# ---- per-batch statistics and augmentation --------------------------------------------------------------


def test_the_yielded_loss_is_the_sum_of_the_batches_own_losses(real, teacher_dir):
    setup = _setup(real, ipc=3, init="real")
    method = SRe2L(teacher=str(teacher_dir), jitter=0, bn_weight=1.0)
    method.prepare(setup)
    with torch.no_grad():  # give the three batches (image j of every class) clearly different statistics
        setup.synthetic.pixels.view(10, 3, 1, 28, 28).mul_(torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1, 1))
    (loss,) = list(method.iteration(_context(setup)))
    teacher = ProxyPool.load(teacher_dir, real.info)[0]
    by_class = setup.synthetic.images_by_class().detach()
    expected = sum(_reference_loss(teacher, by_class[:, j], torch.arange(10), 1.0, 10.0, 1.0) for j in range(3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # ...and differs from three times one loss with the statistics of all 30 images together
    pooled = _reference_loss(teacher, by_class.flatten(0, 1), torch.arange(10).repeat_interleave(3), 1.0, 10.0, 1.0)
    assert abs(pooled.item() * 3 - loss.item()) > 1e-2 * loss.item()
    loss.backward()
    assert setup.synthetic.pixels.grad is not None and setup.synthetic.pixels.grad.abs().sum() > 0


def test_every_batch_gets_its_own_jitter_and_flip(real, teacher_dir):
    draws = draw_augmentations(200, 4, True, torch.Generator().manual_seed(0))
    assert {dy for _, dy, _ in draws} == set(range(5)) and {dx for _, _, dx in draws} == set(range(5))
    assert {flipped for flipped, _, _ in draws} == {True, False}
    assert not any(flipped for flipped, _, _ in draw_augmentations(50, 4, False, torch.Generator().manual_seed(0)))
    batches = torch.randn(3, 2, 1, 5, 6)
    chosen = [(True, 1, 2), (False, 0, 3), (False, 4, 0)]
    augmented = augment_batches(batches, chosen)
    assert torch.equal(augmented[0], torch.roll(batches[0].flip(-1), shifts=(1, 2), dims=(2, 3)))
    assert torch.equal(augmented[1], torch.roll(batches[1], shifts=(0, 3), dims=(2, 3)))
    assert torch.equal(augmented[2], torch.roll(batches[2], shifts=(4, 0), dims=(2, 3)))
    # the iteration's loss is the per-batch reference on the batches augmented with the iteration's draws
    setup = _setup(real, ipc=2, init="noise")
    method = SRe2L(teacher=str(teacher_dir), jitter=4, flip=True)
    method.prepare(setup)
    (loss,) = list(method.iteration(_context(setup, seed=9)))
    batches = setup.synthetic.images_by_class().detach().transpose(0, 1)
    # batch j is augmented from its position's own stream, (seed 9, POSITION_DRAWS, j)
    draws = [draw_augmentations(1, 4, True, stream_generator(9, POSITION_DRAWS, j))[0] for j in range(2)]
    augmented = augment_batches(batches, draws)
    teacher = ProxyPool.load(teacher_dir, real.info)[0]
    expected = sum(_reference_loss(teacher, batch, torch.arange(10), 0.01, 10.0, 1.0) for batch in augmented)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- DWA's weight perturbation --------------------------------------------------------------------------


def _norm(delta):
    return torch.sqrt(sum((tensor ** 2).sum() for tensor in delta.values())).item()


def _difference(perturbed, network):
    return {name: perturbed[name] - parameter for name, parameter in network.named_parameters()}


def test_one_perturbation_step_is_rho_along_the_normalised_gradient():
    teacher = _random_teacher()
    images = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(10)
    perturbed = perturb_parameters(teacher, images, labels, rho=0.015, steps=1)
    # independent reference: a trainable copy, loss.backward(), one global-norm-normalised step
    trainable = copy.deepcopy(teacher).requires_grad_(True)
    F.cross_entropy(trainable(images), labels).backward()
    gradients = {name: parameter.grad for name, parameter in trainable.named_parameters()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in gradients.values()))
    delta = _difference(perturbed, teacher)
    assert _norm(delta) == pytest.approx(0.015, rel=1e-5)
    for name, gradient in gradients.items():
        assert torch.allclose(delta[name], 0.015 * gradient / norm, rtol=1e-3, atol=1e-7)  # float32: (p + e) - p


class _LogitBias(nn.Module):
    """Logits = a learned bias (the images only pass a parameter-free batch-norm layer): with one image per
    class, the CE gradient is softmax(b) - 1/2 per class, whose direction (1, -1)/sqrt(2) never changes while
    b_0 > b_1, so all normalised ascent steps agree."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(1, affine=False)
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return 0.0 * self.norm(x).flatten(1).sum(1, keepdim=True) + self.bias


def test_k_steps_reach_norm_rho_when_the_directions_agree_and_stay_within_it_otherwise():
    network = _LogitBias().double().eval()  # float64: twelve float32 additions to b would round by ~3e-5 of rho
    images = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    perturbed = perturb_parameters(network, images, torch.tensor([0, 1]), rho=0.015, steps=12)
    delta = _difference(perturbed, network)
    assert _norm(delta) == pytest.approx(0.015, rel=1e-9)
    assert torch.allclose(delta["bias"], torch.tensor([0.015, -0.015], dtype=torch.float64) / math.sqrt(2), atol=1e-12)
    # a real network's directions change from step to step: the steps add up to at most rho
    teacher = _random_teacher()
    real_like = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    many = _norm(_difference(perturb_parameters(teacher, real_like, torch.arange(10), 0.015, 12), teacher))
    assert 0.5 * 0.015 < many <= 0.015 * (1 + 1e-5)


def test_dwa_perturbs_each_batch_towards_a_higher_loss_and_leaves_the_teacher_unchanged(real, teacher_dir):
    setup = _setup(real, ipc=2, init="real")
    method = DWA(teacher=str(teacher_dir), jitter=0, dwa_steps=3)
    before_pool = _state(ProxyPool.load(teacher_dir, real.info)[0])
    method.prepare(setup)
    method_teacher = method.network
    initial = setup.synthetic.images_by_class().detach().clone()
    labels = torch.arange(10)
    teacher = ProxyPool.load(teacher_dir, real.info)[0]
    assert len(method.perturbed) == 2
    for j, parameters in sorted(method.perturbed.items()):
        batch = initial[:, j]
        delta = _difference(parameters, teacher)
        assert 0 < _norm(delta) <= 0.015 * (1 + 1e-5)
        assert set(parameters) == {name for name, _ in teacher.named_parameters()}
        plain = F.cross_entropy(teacher(batch), labels)
        adjusted = F.cross_entropy(functional_call(teacher, parameters, (batch,)), labels)
        assert adjusted > plain
    assert not torch.equal(method.perturbed[0]["classifier.weight"], method.perturbed[1]["classifier.weight"])
    # the iteration's loss: every batch against its own perturbed teacher, variance weight 11
    (loss,) = list(method.iteration(_context(setup)))
    expected = sum(_reference_loss(teacher, initial[:, j], labels, 0.01, 10.0, 11.0, method.perturbed[j])
                   for j in range(2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    method.artefact_tensors()
    after = _state(method_teacher)
    assert after.keys() == before_pool.keys()
    assert all(torch.equal(after[name], before_pool[name]) for name in after)  # parameters and running statistics
    assert all(parameter.grad is None for parameter in method_teacher.parameters())


# ---- relabel, clipping, refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SRe2L, DWA])
def test_soft_labels_are_the_unperturbed_teachers_softmax_at_temperature(cls, real, teacher_dir):
    setup = _setup(real, ipc=2, init="real")
    method = cls(teacher=str(teacher_dir), relabel_temperature=4.0)
    method.prepare(setup)
    with torch.no_grad():
        setup.synthetic.pixels.add_(0.1)  # the labels follow the current images
    soft = method.artefact_tensors()["soft_labels"]
    teacher = ProxyPool.load(teacher_dir, real.info)[0]
    with torch.no_grad():
        expected = torch.softmax(teacher(setup.synthetic.pixels) / 4.0, dim=1)
    assert soft.shape == (20, 10)
    assert torch.allclose(soft, expected, atol=1e-6)
    assert torch.allclose(soft.sum(dim=1), torch.ones(20), atol=1e-6)
    assert method.artefact_metadata() == {"teacher": str(teacher_dir), "relabel_temperature": "4.0"}


def test_project_clips_pixels_to_the_valid_range(real, teacher_dir):
    setup = _setup(real, ipc=2, init="noise")
    method = SRe2L(teacher=str(teacher_dir))
    method.prepare(setup)
    with torch.no_grad():
        setup.synthetic.pixels.mul_(50.0)
        inside = setup.synthetic.pixels.clone()
        method.project(setup.synthetic)
    pixels = setup.synthetic.pixels
    mean, std = real.info.mean[0], real.info.std[0]
    low, high = (0 - mean) / std, (1 - mean) / std
    assert pixels.min().item() == pytest.approx(low, rel=1e-6) and pixels.max().item() == pytest.approx(high, rel=1e-6)
    kept = (inside >= low) & (inside <= high)
    assert kept.any() and torch.equal(pixels[kept], inside[kept])
    # in pixel units the clipped images lie in [0, 1]
    assert real.denormalise(pixels).min() >= -1e-6 and real.denormalise(pixels).max() <= 1 + 1e-6

    class Coded(SyntheticSet):
        def __init__(self):
            super().__init__(10, 1)
            self.code = nn.Parameter(torch.full((10, 1, 28, 28), 100.0))

        def images(self):
            return self.code

    coded = Coded()
    method.project(coded)  # no pixels attribute: left as it is
    assert torch.equal(coded.code, torch.full((10, 1, 28, 28), 100.0))


def test_refusals(real, teacher_dir, tmp_path):
    no_bn = tmp_path / "no-bn"
    train_proxy_pool(real, no_bn, arch="ConvNetGAP-1-8", count=1, epochs=1, progress=False)
    with pytest.raises(UserInputError, match=r"ConvNetGAP-1-8-in.*ConvNetGAP-1-8-bn"):
        SRe2L(teacher=str(no_bn)).prepare(_setup(real, ipc=1, init="noise"))
    with pytest.raises(UserInputError, match="init 'real'.*noise"):
        DWA(teacher=str(teacher_dir)).prepare(_setup(real, ipc=1, init="noise"))
    with pytest.raises(UserInputError, match="--teacher"):
        SRe2L()
    with pytest.raises(UserInputError, match="dwa_steps"):
        DWA(teacher=str(teacher_dir), dwa_steps=0)
    with pytest.raises(UserInputError, match="relabel_temperature"):
        SRe2L(teacher=str(teacher_dir), relabel_temperature=0.0)
    with pytest.raises(UserInputError, match="jitter"):
        SRe2L(teacher=str(teacher_dir), jitter=-1)


def test_published_defaults():
    sre2l, dwa = SRe2L.defaults(10), DWA.defaults(10)
    for defaults in (sre2l, dwa):
        assert (defaults.iterations, defaults.lr_images, defaults.optimizer, defaults.betas, defaults.lr_schedule,
                defaults.augment) == (1000, 0.25, "adam", (0.5, 0.9), "cosine", False)
    assert (sre2l.init, dwa.init) == ("noise", "real")
    method, adjusted = SRe2L(teacher="t"), DWA(teacher="t")
    assert (method.bn_weight, method.first_bn_weight, method.variance_weight, method.jitter,
            method.relabel_temperature) == (0.01, 10.0, 1.0, 4, 30.0)
    assert (adjusted.variance_weight, adjusted.dwa_rho, adjusted.dwa_steps) == (11.0, 0.015, 12)


# ---- through the loop ------------------------------------------------------------------------------------


def test_sre2l_runs_through_the_loop_and_writes_soft_labels(real, teacher_dir, tmp_path):
    from infodistill.artefact import load_set
    from infodistill.loop import DistillConfig, distill

    config = DistillConfig(method="sre2l", teacher=str(teacher_dir), ipc=2, iterations=3, checkpoint_every=2)
    result = distill(config, tmp_path / "run", progress=False, real=real)
    assert (result.config.init, result.config.optimizer, result.config.lr_schedule) == ("noise", "adam", "cosine")
    distilled = load_set(result.artefact)
    assert distilled.images.shape == (20, 1, 28, 28)
    assert distilled.soft_labels is not None and distilled.soft_labels.shape == (20, 10)
    assert torch.allclose(distilled.soft_labels.sum(dim=1), torch.ones(20), atol=1e-5)
    assert distilled.metadata.extra["relabel_temperature"] == "30.0"
    assert distilled.metadata.extra["teacher"] == str(teacher_dir)
    low, high = (0 - real.info.mean[0]) / real.info.std[0], (1 - real.info.mean[0]) / real.info.std[0]
    assert distilled.images.min() >= low - 1e-6 and distilled.images.max() <= high + 1e-6
    teacher = ProxyPool.load(teacher_dir, real.info)[0]
    with torch.no_grad():
        expected = torch.softmax(teacher(distilled.images) / 30.0, dim=1)
    assert torch.allclose(distilled.soft_labels, expected, atol=1e-6)


def test_a_resumed_dwa_run_with_cmi_is_bit_identical_to_an_uninterrupted_one(real, teacher_dir, tmp_path,
                                                                                monkeypatch):
    from conftest import initial_pixel_images, run_killed_after_iteration
    from infodistill.artefact import load_set
    from infodistill.loop import DistillConfig, distill

    # The teacher's pool doubles as the CMI proxy pool: CMI composes with recovery like with any method.
    config = DistillConfig(method="dwa", teacher=str(teacher_dir), ipc=2, iterations=5, checkpoint_every=2,
                           dwa_steps=3, cmi_weight=0.5, proxies=str(teacher_dir))
    whole = distill(config, tmp_path / "whole", progress=False, real=real)
    run_killed_after_iteration(2, config, tmp_path / "killed", real, monkeypatch)  # checkpoint after two kept
    resumed = distill(config, tmp_path / "killed", resume=True, progress=False, real=real)

    a, b = load_set(whole.artefact), load_set(resumed.artefact)
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels, b.soft_labels) and a.metadata == b.metadata
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert '"loss/cmi"' in (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert a.metadata.regularizers == {"cmi": 0.5}
    assert whole.config.init == "real" and not torch.equal(a.images, initial_pixel_images(config, real))
