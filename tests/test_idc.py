"""IDC: the multi-formation parameterisation against loop-based references, and IDC's per-class matching."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infodistill.artefact import load_set
from infodistill.augment import DSA
from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.loop import DistillConfig, distill
from infodistill.methods import (
    IDC,
    ClassUpdate,
    DistillContext,
    gradient_distance,
    method_class,
)
from infodistill.methods.base import CLASS_DRAWS
from infodistill.methods.idc import match_distance
from infodistill.seeds import stream_generator
from infodistill.synthetic import (
    PARAMETERISATION_REGISTRY,
    MultiFormationSet,
    PixelSet,
    build_synthetic,
)
from infodistill.synthetic.multi import decode, encode
from test_methods import capture_networks  # tests/ is on the path (as dataset_fixtures)


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny networks run fastest on one thread; two threads on a busy 2-core machine are 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_decode(stored: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """Plain loops: for each stored image, each tile in row-major order, upsampled on its own."""
    _, _, height, width = stored.shape
    tile_h, tile_w = height // factor, width // factor
    out = []
    for image in stored:
        for i in range(factor):
            for j in range(factor):
                tile = image[:, i * tile_h : (i + 1) * tile_h, j * tile_w : (j + 1) * tile_w].unsqueeze(0)
                if mode == "bilinear":
                    up = F.interpolate(tile, size=(height, width), mode="bilinear", align_corners=False)
                else:
                    up = F.interpolate(tile, size=(height, width), mode="nearest")
                out.append(up[0])
    return torch.stack(out)


def toy_sampler(classes: int = 3, per_class: int = 20, shape: tuple[int, int, int] = (2, 8, 8)) -> ClassSampler:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(classes * per_class, *shape, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    order = torch.randperm(len(labels), generator=generator)
    return ClassSampler(images[order], labels[order], classes)


# --- the multi-formation parameterisation ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_decode_matches_a_per_tile_loop(factor, mode):
    stored = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(factor))
    decoded = decode(stored, factor, mode)
    assert decoded.shape == (3 * factor**2, 2, 8, 8)
    torch.testing.assert_close(decoded, reference_decode(stored, factor, mode), rtol=0, atol=1e-6)


def test_decode_keeps_classes_in_order_and_tiles_row_major():
    sampler = toy_sampler()
    synthetic = MultiFormationSet.initialise(sampler, 2, "noise", torch.Generator().manual_seed(0), factor=2)
    assert synthetic.stored_per_class == 2 and synthetic.images_per_class == 8
    assert synthetic.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    images = synthetic.images()
    reference = reference_decode(synthetic.stored.detach(), 2, "bilinear")
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-6)
    for label in range(3):
        torch.testing.assert_close(synthetic.class_images(label), images[label * 8 : (label + 1) * 8], rtol=0, atol=0)


@pytest.mark.parametrize("factor", [2, 4])
def test_encode_inverts_nearest_decoding_exactly(factor):
    stored = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(encode(decode(stored, factor, "nearest"), factor), stored)


def test_encode_of_tile_constant_images_decodes_back_to_the_constants_with_bilinear():
    factor = 2
    values = torch.randn(2 * factor**2, 3, generator=torch.Generator().manual_seed(2))  # per image and channel
    images = values[:, :, None, None].expand(-1, -1, 8, 8).contiguous()
    stored = encode(images, factor)
    assert stored.shape == (2, 3, 8, 8)
    torch.testing.assert_close(stored[0, :, :4, 4:], values[1, :, None, None].expand(3, 4, 4))  # tile (0, 1)
    torch.testing.assert_close(decode(stored, factor, "bilinear"), images)


def test_encode_area_averages_each_block():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    stored = encode(image.repeat(4, 1, 1, 1), 2)
    block_means = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    torch.testing.assert_close(stored[0, 0, :2, :2], block_means)
    torch.testing.assert_close(stored[0, 0, 2:, 2:], block_means)


@pytest.mark.parametrize("ipc", [1, 3])
def test_storage_budget_equals_pixels_while_the_decoded_set_is_factor_squared_larger(ipc):
    sampler = toy_sampler()
    pixels = PixelSet.initialise(sampler, ipc, "real", torch.Generator().manual_seed(0))
    multi = MultiFormationSet.initialise(sampler, ipc, "real", torch.Generator().manual_seed(0), factor=2)
    stored = sum(parameter.numel() for parameter in multi.parameters())
    assert stored == sum(parameter.numel() for parameter in pixels.parameters())
    assert len(multi.images()) == 3 * ipc * 4 == len(multi.labels)
    assert torch.bincount(multi.labels).tolist() == [ipc * 4] * 3


def test_real_init_encodes_drawn_real_images_of_each_class():
    sampler = toy_sampler()
    synthetic = MultiFormationSet.initialise(sampler, 2, "real", torch.Generator().manual_seed(4), factor=2)
    drawn = sampler.sample_classes(8, torch.Generator().manual_seed(4))  # classes x 8 x C x H x W
    assert torch.equal(synthetic.stored.detach(), encode(drawn.flatten(0, 1), 2))
    for label in range(3):  # each stored image of class c comes from real images of class c
        images = sampler.images[sampler.labels == label]
        for image in drawn[label]:
            assert any(torch.equal(image, candidate) for candidate in images)


@pytest.mark.parametrize("init", ["real", "noise"])
def test_factor_one_is_the_pixel_set(init):
    sampler = toy_sampler()
    pixels = PixelSet.initialise(sampler, 2, init, torch.Generator().manual_seed(9))
    multi = MultiFormationSet.initialise(sampler, 2, init, torch.Generator().manual_seed(9), factor=1)
    assert torch.equal(multi.images(), pixels.images())
    assert torch.equal(multi.labels, pixels.labels)


def test_build_synthetic_passes_factor_and_upsample_and_pixels_ignore_them():
    sampler = toy_sampler()
    multi = build_synthetic("multi", sampler, 1, "real", torch.Generator().manual_seed(0), factor=4, upsample="nearest")
    assert "multi" in PARAMETERISATION_REGISTRY
    assert isinstance(multi, MultiFormationSet) and (multi.factor, multi.upsample) == (4, "nearest")
    assert multi.images_per_class == 16
    pixels = build_synthetic("pixels", sampler, 1, "real", torch.Generator().manual_seed(0), factor=4,
                             upsample="nearest")
    assert isinstance(pixels, PixelSet)


@pytest.mark.parametrize(
    "settings, fragment",
    [({"factor": 3}, "factor 3 does not divide the image size 8x8"), ({"factor": 0}, "factor 0"),
     ({"factor": 2.0}, "factor 2.0"), ({"upsample": "bicubic"}, "upsample 'bicubic'"),
     ({"factor": 4, "ipc": 2}, "factor 4 draws 32 real images")],
)
def test_bad_settings_are_refused_in_one_line(settings, fragment):
    sampler = toy_sampler()
    ipc = settings.pop("ipc", 1)
    with pytest.raises(UserInputError) as error:
        MultiFormationSet.initialise(sampler, ipc, "real", torch.Generator().manual_seed(0), **settings)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_gradients_flow_from_decoded_images_to_the_stored_tiles(mode):
    sampler = toy_sampler()
    synthetic = MultiFormationSet.initialise(sampler, 2, "real", torch.Generator().manual_seed(0), factor=2,
                                             upsample=mode)
    decoded_index = 1 * 4 + 2  # stored image 1, tile (1, 0)
    synthetic.images()[decoded_index].sum().backward()
    gradient = synthetic.stored.grad
    assert gradient is not None
    touched = gradient.abs().sum(dim=(1, 2, 3)) > 0
    assert touched.tolist() == [False, True] + [False] * 4  # only stored image 1
    tile = gradient[1, :, 4:, :4]
    assert (tile != 0).all()
    outside = gradient[1].clone()
    outside[:, 4:, :4] = 0
    assert (outside == 0).all()  # each tile only feeds its own decoded image
    if mode == "nearest":
        assert torch.equal(tile, torch.full_like(tile, 4.0))  # each stored pixel appears in a 2x2 block


# --- IDC's matching ---------------------------------------------------------------------------------


def idc_context(real, *, seed: int = 0, model: str = "ConvNet-2-8", augment: DSA | None = None,
                ipc: int = 1) -> DistillContext:
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    synthetic = MultiFormationSet.initialise(sampler, ipc, "real", torch.Generator().manual_seed(1), factor=2)
    return DistillContext(iteration=0, generator=torch.Generator().manual_seed(seed), synthetic=synthetic,
                          sampler=sampler, info=real.info, augment=augment, device=torch.device("cpu"),
                          model_name=model)


def small_idc(**changes) -> IDC:
    settings = {"batch_real": 8, "outer_loop": 2, "net_steps": 1, "batch_net": 8}
    settings.update(changes)
    return IDC(**settings)


def test_idc_updates_every_class_in_order_each_outer_step(real):
    context = idc_context(real)
    steps = list(small_idc().iteration(context))
    assert all(isinstance(step, ClassUpdate) for step in steps)
    assert [step.label for step in steps] == list(range(10)) * 2
    assert all(step.loss.dim() == 0 and step.loss.requires_grad for step in steps)


@pytest.mark.parametrize("metric", ["mse", "l1", "cos"])
@pytest.mark.parametrize("augmented", [False, True])
def test_first_class_loss_equals_a_hand_computed_distance_on_the_same_draws(real, metric, augmented):
    augment = DSA() if augmented else None
    context = idc_context(real, seed=3, augment=augment)
    networks = capture_networks(context)
    first = next(small_idc(match_metric=metric).iteration(context))
    assert first.label == 0
    network = networks[0]

    # class 0's draws of round 0 come from its own stream, (seed 3, CLASS_DRAWS, round 0, class 0)
    generator = stream_generator(3, CLASS_DRAWS, 0, 0)
    real_batch = context.sampler.sample(0, 8, generator)
    synthetic = context.synthetic.class_images(0)  # 4 decoded images <= batch_syn: no subset drawn
    if augment is not None:
        real_batch, synthetic = augment.siamese([real_batch, synthetic], generator)
    convs = [module.weight for module in network.modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 2
    real_grads = torch.autograd.grad(F.cross_entropy(network(real_batch), torch.zeros(8, dtype=torch.long)), convs)
    syn_grads = torch.autograd.grad(F.cross_entropy(network(synthetic), torch.zeros(4, dtype=torch.long)), convs)
    if metric == "mse":
        expected = sum(((a - b) ** 2).sum() for a, b in zip(real_grads, syn_grads))
    elif metric == "l1":
        expected = sum((a - b).abs().sum() for a, b in zip(real_grads, syn_grads))
    else:
        expected = gradient_distance(real_grads, syn_grads)
    torch.testing.assert_close(first.loss.detach(), expected, rtol=1e-5, atol=1e-8)


def test_match_distance_by_hand():
    real = [torch.tensor([[[[1.0, 2.0]]], [[[0.0, 1.0]]]])]  # 2 x 1 x 1 x 2
    synthetic = [torch.tensor([[[[1.0, 0.0]]], [[[0.0, -1.0]]]])]
    assert float(match_distance(real, synthetic, "mse")) == pytest.approx(8.0)
    assert float(match_distance(real, synthetic, "l1")) == pytest.approx(4.0)
    # rows: cos((1,2),(1,0)) = 1/sqrt(5); cos((0,1),(0,-1)) = -1
    assert float(match_distance(real, synthetic, "cos")) == pytest.approx((1 - 5**-0.5) + 2, rel=1e-5)
    with pytest.raises(UserInputError, match="match_metric 'l2'"):
        match_distance(real, synthetic, "l2")


def test_the_network_trains_on_real_data_between_outer_steps_but_not_after_the_last(real):
    context = idc_context(real)
    networks = capture_networks(context)
    steps = small_idc(net_steps=2).iteration(context)

    def snapshot() -> list[torch.Tensor]:
        return [parameter.detach().clone() for parameter in networks[0].parameters()]

    first_round = [next(steps) for _ in range(10)]
    before = snapshot()
    second_round = [next(steps) for _ in range(10)]
    after_training = snapshot()
    assert not all(torch.equal(a, b) for a, b in zip(before, after_training))
    assert next(steps, None) is None
    assert all(torch.equal(a, b) for a, b in zip(after_training, snapshot()))
    assert [step.label for step in first_round + second_round] == list(range(10)) * 2
    assert len(networks) == 1


def test_large_classes_are_subsampled_to_batch_syn(real):
    context = idc_context(real, ipc=2)  # 8 decoded images per class
    method = small_idc(batch_syn=3)
    _, synthetic = method.class_batches(context, 4)
    assert synthetic.shape == (3, 1, 28, 28)
    class_images = context.synthetic.class_images(4).detach()
    assert all(any(torch.equal(image, candidate) for candidate in class_images) for image in synthetic.detach())


def test_batch_norm_networks_match_with_frozen_statistics(real):
    context = idc_context(real, model="ConvNet-2-8-bn")
    steps = list(small_idc().iteration(context))
    assert [step.label for step in steps] == list(range(10)) * 2
    assert all(torch.isfinite(step.loss) for step in steps)


def test_models_without_convolutions_are_refused():
    with pytest.raises(UserInputError, match="convolution weights"):
        IDC.matched_parameters(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "MLP")


@pytest.mark.parametrize(
    "settings, fragment",
    [({"outer_loop": 0}, "outer_loop=0"), ({"net_steps": -1}, "net_steps=-1"), ({"batch_net": 1.5}, "batch_net=1.5"),
     ({"match_metric": "l2"}, "match_metric 'l2'"), ({"lr_net": 0}, "lr_net=0"), ({"batch_real": True}, "batch_real")],
)
def test_bad_idc_settings_are_refused_in_one_line(settings, fragment):
    with pytest.raises(UserInputError) as error:
        IDC(**settings)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_published_settings():
    assert method_class("idc") is IDC
    defaults = IDC.defaults(10)
    assert (defaults.iterations, defaults.momentum_images, defaults.batch_real, defaults.augment, defaults.param) == (
        2000, 0.5, 64, True, "multi")
    assert defaults.lr_images == pytest.approx(5e-3 / 0.2**2)
    assert IDC.defaults(50).lr_images == pytest.approx(5 * defaults.lr_images)
    assert IDC.PUBLISHED_OUTER_LOOP == 100
    assert IDC.published_net_steps("cifar10") == 32 and IDC.published_net_steps("cifar100") == 32
    assert IDC.published_net_steps("svhn") == 8
    assert IDC.normalised_lr(10, (0.5, 0.25)) == pytest.approx(5e-3 * (4 + 16) / 2)
    method = IDC()
    assert (method.batch_net, method.match_metric, method.batch_syn, method.lr_net) == (64, "mse", 128, 0.01)


# --- through the shared loop ------------------------------------------------------------------------------


LOOP = {"dataset": "fashion-mnist", "method": "idc", "param": "multi", "factor": 2, "ipc": 1, "iterations": 2,
        "model": "ConvNet-2-8", "outer_loop": 2, "net_steps": 1, "batch_net": 16, "batch_real": 16,
        "checkpoint_every": 2}


@pytest.mark.parametrize("with_cmi", [False, True])
def test_idc_runs_through_the_loop_with_and_without_cmi(real, tmp_path, with_cmi):
    extra = {}
    if with_cmi:
        from infodistill.proxies import train_proxy_pool

        pool = tmp_path / "pool"
        train_proxy_pool(real, pool, arch="ConvNetGAP-1-8", count=2, epochs=1, progress=False)
        extra = {"cmi_weight": 100.0, "proxies": str(pool)}
    result = distill(DistillConfig(**LOOP, **extra), tmp_path / "run", progress=False, real=real)
    distilled = load_set(result.artefact)
    assert distilled.images.shape == (40, 1, 28, 28)
    assert torch.bincount(distilled.labels).tolist() == [4] * 10
    assert distilled.metadata.parameterisation == "multi"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1]
    assert all("loss/idc" in line and "loss/total" in line for line in lines)
    if with_cmi:
        assert all(line["loss/cmi"] > 0 for line in lines)  # four decoded images per class: CMI is not 0
    images, labels = real.train_tensors()
    initial = MultiFormationSet.initialise(ClassSampler(images, labels, 10), 1, "real",
                                           _init_generator(result.config.seed), factor=2).images().detach()
    assert not torch.equal(distilled.images, initial)


def _init_generator(seed: int) -> torch.Generator:
    from infodistill.loop import INIT_STREAM

    return stream_generator(seed, INIT_STREAM)


def test_the_loop_fills_idc_defaults():
    config = DistillConfig(dataset="fashion-mnist", method="idc").with_method_defaults()
    assert (config.param, config.iterations, config.batch_real, config.augment) == ("multi", 2000, 64, True)
    assert (config.factor, config.upsample) == (2, "bilinear")


def test_cli_refuses_a_factor_that_does_not_divide_the_image_size(striped_root, tmp_path, capsys):
    from infodistill.cli import main as cli_main

    code = cli_main(["distill", "--method", "idc", "--ipc", "1", "--factor", "3", "--iterations", "1", "--quiet",
                     "--out", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "factor 3 does not divide the image size 28x28" in error and "\n" not in error
    assert not (tmp_path / "run").exists()
