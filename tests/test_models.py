"""Tests for infodistill.models: name parsing, shapes, norms, seeding, vmap-compatibility, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from infodistill.errors import UserInputError
from infodistill.models import (
    ConvNet,
    DistillModel,
    ModelSpec,
    build_model,
    has_batch_norm,
    model_names_help,
    parse_model_name,
    register_family,
    registered_families,
)
from infodistill.models import registry as registry_module

NUM_CLASSES = 10
INPUTS = {  # label -> (channels, (height, width))
    "1ch-28px": (1, (28, 28)),
    "3ch-32px": (3, (32, 32)),
    "3ch-64px": (3, (64, 64)),
}
# feature_dim computed by hand for each (model, input):
#  ConvNet-3: 1ch 28px -> first conv pads 3 -> 32 -> 16, 8, 4 -> 128*4*4; 32px -> 4x4; 64px -> 8x8.
#  AlexNet:   1ch 28px -> conv5 pad 4 -> 32 -> pools 16, 8, 4 -> 192*4*4; 32px -> 4x4; 64px -> 8x8.
#  VGG11:     five max-pools: 32 -> 1x1 (28px padded to 32 first); 64 -> 2x2 -> 512*2*2.
#  ResNet18:  global average pool -> 512 always.
EXPECTED_FEATURE_DIM = {
    ("ConvNet-3", "1ch-28px"): 128 * 4 * 4,
    ("ConvNet-3", "3ch-32px"): 128 * 4 * 4,
    ("ConvNet-3", "3ch-64px"): 128 * 8 * 8,
    ("AlexNet", "1ch-28px"): 192 * 4 * 4,
    ("AlexNet", "3ch-32px"): 192 * 4 * 4,
    ("AlexNet", "3ch-64px"): 192 * 8 * 8,
    ("VGG11", "1ch-28px"): 512,
    ("VGG11", "3ch-32px"): 512,
    ("VGG11", "3ch-64px"): 512 * 2 * 2,
    ("ResNet18", "1ch-28px"): 512,
    ("ResNet18", "3ch-32px"): 512,
    ("ResNet18", "3ch-64px"): 512,
}
DEFAULT_FAMILY_NAMES = ("ConvNet-3", "AlexNet", "VGG11", "ResNet18")


def _images(channels: int, size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *size, generator=generator)


# ---------------------------------------------------------------------------------------------
# Shapes and the forward/embed contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "input_label"), sorted(EXPECTED_FEATURE_DIM))
def test_shapes_and_forward_equals_classifier_of_embed(name: str, input_label: str) -> None:
    channels, size = INPUTS[input_label]
    model = build_model(name, channels, NUM_CLASSES, size, seed=0)
    assert isinstance(model, DistillModel)
    assert isinstance(model.classifier, nn.Linear)
    expected_dim = EXPECTED_FEATURE_DIM[(name, input_label)]
    assert model.feature_dim == expected_dim
    x = _images(channels, size)
    with torch.no_grad():
        features = model.embed(x)
        logits = model(x)
    assert features.shape == (2, expected_dim)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(logits, model.classifier(features))


@pytest.mark.parametrize(
    ("name", "channels", "size", "expected_dim"),
    [
        ("ConvNet-4", 3, (64, 64), 128 * 4 * 4),  # the DD choice for 64 px
        ("ConvNet-4-16-none", 1, (28, 28), 16 * 2 * 2),  # 32 -> 16, 8, 4, 2
        ("ConvNet-2-8-bn", 3, (32, 48), 8 * 8 * 12),  # non-square input
        ("ConvNet-5-8", 3, (32, 32), 8 * 1 * 1),  # deepest ConvNet for 32 px: 32 -> 1
        ("VGG13", 3, (32, 32), 512),
        ("VGG16-none", 3, (32, 32), 512),
        ("VGG19-bn", 1, (28, 28), 512),
        ("ResNet10", 3, (64, 64), 512),
        ("ResNet34-bn", 1, (28, 28), 512),
    ],
)
def test_other_depths_widths_and_norms(name: str, channels: int, size: tuple[int, int], expected_dim: int) -> None:
    model = build_model(name, channels, 7, size, seed=1).eval()
    assert model.feature_dim == expected_dim
    with torch.no_grad():
        features = model.embed(_images(channels, size, batch=1))
        logits = model(_images(channels, size, batch=1))
    assert features.shape == (1, expected_dim)
    assert logits.shape == (1, 7)


def test_convnet_parameter_count_matches_hand_count() -> None:
    model = build_model("ConvNet-3", 3, 10, (32, 32), seed=0)
    width = 128
    conv = lambda c_in: c_in * width * 3 * 3 + width  # weights + bias  # noqa: E731
    group_norm = 2 * width  # affine scale + shift
    classifier = width * 4 * 4 * 10 + 10
    expected = conv(3) + group_norm + 2 * (conv(width) + group_norm) + classifier
    assert expected == 320_010
    assert sum(parameter.numel() for parameter in model.parameters()) == expected


def test_too_deep_for_image_size_is_refused_with_name_and_size() -> None:
    with pytest.raises(UserInputError, match=r"ConvNet-6.*32x32"):
        build_model("ConvNet-6", 3, 10, (32, 32))  # 32 -> 16, 8, 4, 2, 1, 0
    with pytest.raises(UserInputError, match=r"VGG11.*16x16"):
        build_model("VGG11", 3, 10, (16, 16))


@pytest.mark.parametrize(
    ("channels", "num_classes", "image_size", "seed", "bad_text"),
    [
        (0, 10, (32, 32), None, "channels"),
        (3, 0, (32, 32), None, "num_classes"),
        (3, 10, (32,), None, "image_size"),
        (3, 10, (32, -1), None, "image_size"),
        (3, 10, (32, 32), "7", "seed"),
    ],
)
def test_bad_build_arguments_are_refused(channels, num_classes, image_size, seed, bad_text) -> None:
    with pytest.raises(UserInputError, match=bad_text):
        build_model("ConvNet-3", channels, num_classes, image_size, seed=seed)


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


def test_instance_norm_normalises_each_channel_of_each_sample() -> None:
    model = build_model("ConvNet-3-16", 3, 10, (32, 32), seed=0)
    norm_layer = model.features[1]
    captured: dict[str, torch.Tensor] = {}
    norm_layer.register_forward_hook(lambda module, inputs, output: captured.update(inp=inputs[0], out=output))
    x = _images(3, (32, 32), batch=4) * 5 + 3
    with torch.no_grad():
        model(x)
    out = captured["out"]
    # Freshly initialised affine (scale 1, shift 0): each (sample, channel) map has mean 0, variance 1.
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(4, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(2, 3), unbiased=False), torch.ones(4, 16), atol=1e-3, rtol=0)

    # With a non-trivial affine, the layer equals a hand-written instance norm.
    with torch.no_grad():
        norm_layer.weight.copy_(torch.linspace(0.5, 2.0, 16))
        norm_layer.bias.copy_(torch.linspace(-1.0, 1.0, 16))
        model(x)
    inp = captured["inp"]
    mean = inp.mean(dim=(2, 3), keepdim=True)
    var = inp.var(dim=(2, 3), keepdim=True, unbiased=False)
    by_hand = (inp - mean) / torch.sqrt(var + 1e-5) * norm_layer.weight.view(1, -1, 1, 1) + norm_layer.bias.view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(captured["out"], by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DEFAULT_FAMILY_NAMES)
def test_instance_norm_models_treat_samples_independently(name: str) -> None:
    model = build_model(f"{name}-in", 3, 10, (32, 32), seed=0)
    x = _images(3, (32, 32), batch=3)
    with torch.no_grad():
        together = model(x)
        alone = model(x[:1])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DEFAULT_FAMILY_NAMES)
def test_norm_token_selects_the_layers(name: str) -> None:
    in_model = build_model(f"{name}-in", 3, 10, (32, 32), seed=0)
    group_norms = [module for module in in_model.modules() if isinstance(module, nn.GroupNorm)]
    assert group_norms, "instance-norm variant has no GroupNorm"
    assert all(norm.num_groups == norm.num_channels and norm.affine for norm in group_norms)
    assert not has_batch_norm(in_model)

    bn_model = build_model(f"{name}-bn", 3, 10, (32, 32), seed=0)
    assert has_batch_norm(bn_model)
    assert not any(isinstance(module, nn.GroupNorm) for module in bn_model.modules())

    none_model = build_model(f"{name}-none", 3, 10, (32, 32), seed=0)
    assert not has_batch_norm(none_model)
    assert not any(isinstance(module, nn.GroupNorm) for module in none_model.modules())


def test_default_norms_per_family() -> None:
    assert not has_batch_norm(build_model("ConvNet-3", 3, 10, (32, 32)))
    alexnet = build_model("AlexNet", 3, 10, (32, 32))
    assert not any(isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)) for module in alexnet.modules())
    assert any(isinstance(module, nn.GroupNorm) for module in build_model("VGG11", 3, 10, (32, 32)).modules())
    assert any(isinstance(module, nn.GroupNorm) for module in build_model("ResNet18", 3, 10, (32, 32)).modules())


# ---------------------------------------------------------------------------------------------
# Name parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ConvNet-3", ModelSpec("ConvNet", 3, 128, "in")),
        ("ConvNet", ModelSpec("ConvNet", 3, 128, "in")),
        ("ConvNet-4", ModelSpec("ConvNet", 4, 128, "in")),
        ("ConvNet-3-bn", ModelSpec("ConvNet", 3, 128, "bn")),
        ("ConvNet-4-128-bn", ModelSpec("ConvNet", 4, 128, "bn")),
        ("ConvNet-3-64-none", ModelSpec("ConvNet", 3, 64, "none")),
        ("convnet-2-32-BN", ModelSpec("ConvNet", 2, 32, "bn")),
        ("AlexNet", ModelSpec("AlexNet", None, None, "none")),
        ("AlexNet-bn", ModelSpec("AlexNet", None, None, "bn")),
        ("alexnet-in", ModelSpec("AlexNet", None, None, "in")),
        ("VGG11", ModelSpec("VGG", 11, None, "in")),
        ("VGG11-bn", ModelSpec("VGG", 11, None, "bn")),
        ("vgg19-none", ModelSpec("VGG", 19, None, "none")),
        ("ResNet18", ModelSpec("ResNet", 18, None, "in")),
        ("ResNet18-bn", ModelSpec("ResNet", 18, None, "bn")),
        ("resnet34", ModelSpec("ResNet", 34, None, "in")),
        ("ResNet10-none", ModelSpec("ResNet", 10, None, "none")),
    ],
)
def test_valid_names_parse(name: str, expected: ModelSpec) -> None:
    spec = parse_model_name(name)
    assert spec == expected
    assert parse_model_name(spec.canonical_name) == spec


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("convnet-4", "ConvNet-4-128-in"), ("alexnet", "AlexNet-none"), ("vgg11-BN", "VGG11-bn"),
     ("ResNet18", "ResNet18-in")],
)
def test_canonical_names(name: str, canonical: str) -> None:
    assert parse_model_name(name).canonical_name == canonical


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Foo",
        "MLP-3",
        "ConvNet3",  # ConvNet takes its depth as a separate token
        "ConvNet-0",
        "ConvNet-3-0",
        "ConvNet-3-128-gn",
        "ConvNet-3-128-bn-extra",
        "ConvNet-3-128-256",
        "ConvNet--3",
        "ConvNet-bn-3",
        "ConvNet-3.5",
        "AlexNet8",
        "AlexNet-5",
        "AlexNet-bn-bn",
        "VGG",
        "VGG12",
        "VGG-11",
        "VGG11-64",
        "ResNet50",
        "ResNet-18",
        "ResNet18-gn",
        "ResNet18-bn-in",
    ],
)
def test_invalid_names_raise_with_name_and_grammar(name: str) -> None:
    with pytest.raises(UserInputError) as raised:
        parse_model_name(name)
    message = str(raised.value)
    assert repr(name) in message
    assert model_names_help() in message
    assert "\n" not in message
    with pytest.raises(UserInputError):
        build_model(name, 3, 10, (32, 32))


def test_help_is_one_line_and_lists_every_family() -> None:
    text = model_names_help()
    assert "\n" not in text
    for family in ("ConvNet", "AlexNet", "VGG", "ResNet"):
        assert family in registered_families()
        assert family in text


def test_registry_accepts_a_new_family_without_touching_existing_code() -> None:
    @register_family("TinyNet", depth_style="none", default_norm="none")
    def build_tiny(spec: ModelSpec, channels: int, num_classes: int, image_size: tuple[int, int]) -> DistillModel:
        return ConvNet(channels, num_classes, image_size, depth=1, width=4, norm=spec.norm)

    try:
        assert parse_model_name("tinynet-bn") == ModelSpec("TinyNet", None, None, "bn")
        assert build_model("TinyNet", 3, 5, (8, 8)).feature_dim == 4 * 4 * 4
        with pytest.raises(ValueError):
            register_family("tinynet", depth_style="none")(build_tiny)
    finally:
        registry_module._FAMILIES.pop("tinynet")


# ---------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------


def _same_weights(first: nn.Module, second: nn.Module) -> bool:
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[key], second_state[key]) for key in first_state
    )


@pytest.mark.parametrize("name", ["ConvNet-3-32", "ResNet10-bn"])
def test_seed_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(1234)
    state_before = torch.get_rng_state()
    first = build_model(name, 3, 10, (32, 32), seed=7)
    assert torch.equal(torch.get_rng_state(), state_before)
    second = build_model(name, 3, 10, (32, 32), seed=7)
    assert torch.equal(torch.get_rng_state(), state_before)
    assert _same_weights(first, second)
    different = build_model(name, 3, 10, (32, 32), seed=8)
    assert not _same_weights(first, different)


def test_no_seed_uses_the_global_rng() -> None:
    torch.manual_seed(3)
    state_before = torch.get_rng_state()
    first = build_model("ConvNet-3-16", 3, 10, (32, 32))
    assert not torch.equal(torch.get_rng_state(), state_before)  # consumed the global stream
    torch.manual_seed(3)
    second = build_model("ConvNet-3-16", 3, 10, (32, 32))
    assert _same_weights(first, second)
    third = build_model("ConvNet-3-16", 3, 10, (32, 32))
    assert not _same_weights(first, third)


# ---------------------------------------------------------------------------------------------
# torch.func compatibility and gradients
# ---------------------------------------------------------------------------------------------


def _vmap_matches_separate_runs(name: str, copies: int, channels: int, size: tuple[int, int]) -> None:
    models = [build_model(name, channels, NUM_CLASSES, size, seed=seed) for seed in range(copies)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run_one(one_params, one_buffers, x):
        return torch.func.functional_call(base, (one_params, one_buffers), (x,))

    x = _images(channels, size, batch=3)
    with torch.no_grad():
        batched = torch.func.vmap(run_one, in_dims=(0, 0, None))(params, buffers, x)
        separate = torch.stack([model(x) for model in models])
    assert batched.shape == (copies, 3, NUM_CLASSES)
    assert not torch.allclose(separate[0], separate[1])  # the copies really differ
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


def test_vmap_over_three_stacked_convnets_equals_separate_runs() -> None:
    _vmap_matches_separate_runs("ConvNet-3", copies=3, channels=3, size=(32, 32))


@pytest.mark.parametrize("name", ["ConvNet-3-16-none", "AlexNet", "VGG11", "ResNet18"])
def test_vmap_works_for_every_no_bn_family(name: str) -> None:
    _vmap_matches_separate_runs(name, copies=2, channels=1, size=(28, 28))


@pytest.mark.parametrize("name", [*DEFAULT_FAMILY_NAMES, "ConvNet-3-bn", "ResNet18-bn"])
def test_gradient_flows_to_the_input(name: str) -> None:
    model = build_model(name, 3, NUM_CLASSES, (32, 32), seed=0)
    x = _images(3, (32, 32)).requires_grad_(True)
    model(x).logsumexp(dim=1).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_embed_gradient_flows_to_the_input() -> None:
    model = build_model("ConvNet-3", 1, NUM_CLASSES, (28, 28), seed=0)
    x = _images(1, (28, 28)).requires_grad_(True)
    model.embed(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
