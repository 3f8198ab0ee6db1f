"""Tests of DSA: each family against a hand-written reference, siamese sharing, seeds, gradients."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from infodistill.augment import DSA, FAMILIES, DSAConfig, DSAParams
from infodistill.errors import UserInputError

GEOMETRIC = ("crop", "cutout", "flip", "scale", "rotate")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, channels: int = 3, height: int = 8, width: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=generator(seed))


def dsa_for(family: str) -> DSA:
    return DSA(DSAConfig(strategy=family))


# ---------------------------------------------------------------- hand-written references


def reference_crop(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[i + dy, j + dx], zero outside, by explicit loops."""
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            if 0 <= i + dy < height and 0 <= j + dx < width:
                out[..., i, j] = x[..., i + dy, j + dx]
    return out


def reference_cutout(x: torch.Tensor, rows: range, cols: range) -> torch.Tensor:
    out = x.clone()
    height, width = x.shape[-2:]
    for i in rows:
        for j in cols:
            if 0 <= i < height and 0 <= j < width:
                out[..., i, j] = 0.0
    return out


def reference_color(x: torch.Tensor, u_brightness: float, u_saturation: float, u_contrast: float) -> torch.Tensor:
    """The published formulas with the default strengths 1.0, 2.0, 0.5, for one sample x (C x H x W)."""
    y = x + (u_brightness - 0.5) * 1.0
    grey = y.mean(dim=0, keepdim=True)
    y = (y - grey) * (u_saturation * 2.0) + grey
    overall = y.mean()
    return (y - overall) * (u_contrast + 0.5) + overall


# ---------------------------------------------------------------- configuration and parsing


def test_strategy_is_split_on_underscores_in_order() -> None:
    assert DSAConfig().families == FAMILIES
    assert DSAConfig(strategy="flip_crop").families == ("flip", "crop")


@pytest.mark.parametrize("strategy", ["color_blur_flip", "", "Flip", "crop_crop"])
def test_bad_strategy_is_refused_naming_it(strategy: str) -> None:
    with pytest.raises(UserInputError) as caught:
        DSAConfig(strategy=strategy)
    message = str(caught.value)
    assert "\n" not in message
    if strategy == "color_blur_flip":
        assert "'blur'" in message and "color, crop, cutout, flip, scale, rotate" in message


@pytest.mark.parametrize(
    "changes",
    [{"mode": "some"}, {"prob_flip": 1.5}, {"ratio_scale": 0.8}, {"ratio_cutout": 0.0}, {"ratio_rotate": -1.0}],
)
def test_bad_settings_are_refused(changes: dict) -> None:
    with pytest.raises(UserInputError):
        DSAConfig(**changes)


# ---------------------------------------------------------------- randomness


def test_same_seed_gives_identical_output_and_other_seed_differs() -> None:
    x = images(32)
    for mode in ("single", "all"):
        dsa = DSA(DSAConfig(mode=mode))
        first = [dsa(x, generator(7)) for _ in range(3)]
        again = [dsa(x, generator(7)) for _ in range(3)]
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    dsa = DSA(DSAConfig(mode="all"))
    assert not torch.allclose(dsa(x, generator(7)), dsa(x, generator(8)))


def test_sampling_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    DSA(DSAConfig(mode="all"))(images(4), generator(0))
    assert torch.equal(torch.rand(5), expected)


def test_per_sample_call_gives_samples_different_transformations() -> None:
    x = images(1).expand(64, -1, -1, -1).contiguous()
    out = dsa_for("flip")(x, generator(3))
    flipped = torch.tensor([torch.equal(o, x[0].flip(-1)) for o in out])
    kept = torch.tensor([torch.equal(o, x[0]) for o in out])
    assert bool((flipped | kept).all())
    assert 10 < int(flipped.sum()) < 54
    out = DSA(DSAConfig(mode="all"))(x, generator(3))
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) == 64


def test_single_mode_chooses_each_family_about_equally_often() -> None:
    dsa = DSA()
    rng = generator(11)
    counts = Counter()
    for _ in range(600):
        params = dsa.sample(1, (8, 8), rng)
        assert len(params.families) == 1
        chosen = params.families[0]
        counts[chosen] += 1
        # only the chosen family's parameters are drawn
        assert (params.flip_mask is not None) == (chosen == "flip")
        assert (params.crop_shift is not None) == (chosen == "crop")
    assert set(counts) == set(FAMILIES)
    # expected 100 each, standard deviation about 9
    assert all(55 <= count <= 145 for count in counts.values()), counts


def test_all_mode_draws_every_family() -> None:
    params = DSA(DSAConfig(mode="all")).sample(5, (8, 8), generator(0))
    assert params.families == FAMILIES
    for field in (
        "brightness_shift",
        "saturation_factor",
        "contrast_factor",
        "crop_shift",
        "cutout_box",
        "flip_mask",
        "scale_factors",
        "rotate_angle",
    ):
        assert getattr(params, field).shape[0] == 5


def test_sampled_values_follow_the_published_ranges() -> None:
    n, height, width = 4000, 32, 24
    params = DSA(DSAConfig(mode="all")).sample(n, (height, width), generator(5))
    assert params.brightness_shift.min() >= -0.5 and params.brightness_shift.max() < 0.5
    assert params.saturation_factor.min() >= 0.0 and params.saturation_factor.max() < 2.0
    assert params.contrast_factor.min() >= 0.5 and params.contrast_factor.max() < 1.5
    # crop: shifts int(32 * 0.125 + 0.5) = 4 rows and int(24 * 0.125 + 0.5) = 3 columns, inclusive
    assert set(params.crop_shift[:, 0].tolist()) == set(range(-4, 5))
    assert set(params.crop_shift[:, 1].tolist()) == set(range(-3, 4))
    # cutout: box 16 x 12, centres in [0, 32 + 1) and [0, 24 + 1) (both sides even)
    box = params.cutout_box
    assert torch.all(box[:, 2] - box[:, 0] == 16) and torch.all(box[:, 3] - box[:, 1] == 12)
    assert set((box[:, 0] + 8).tolist()) == set(range(0, 33))
    assert set((box[:, 1] + 6).tolist()) == set(range(0, 25))
    assert 0.45 < params.flip_mask.float().mean() < 0.55
    scale = params.scale_factors
    assert scale.min() >= 1 / 1.2 and scale.max() < 1.2
    assert abs(torch.corrcoef(scale.T)[0, 1]) < 0.1  # drawn independently
    angle = params.rotate_angle
    assert angle.min() >= -math.radians(15) and angle.max() < math.radians(15)
    assert angle.min() < -math.radians(14) and angle.max() > math.radians(14)


def test_cutout_centre_range_with_odd_box() -> None:
    # H = 5: box int(2.5 + 0.5) = 3 (odd), centres in [0, 5); W = 4: box 2 (even), centres in [0, 5)
    params = dsa_for("cutout").sample(2000, (5, 4), generator(1))
    box = params.cutout_box
    assert torch.all(box[:, 2] - box[:, 0] == 3) and torch.all(box[:, 3] - box[:, 1] == 2)
    assert set((box[:, 0] + 1).tolist()) == set(range(0, 5))
    assert set((box[:, 1] + 1).tolist()) == set(range(0, 5))


# ---------------------------------------------------------------- each family against a reference


@pytest.mark.parametrize("dy, dx", [(0, 0), (2, -1), (-3, 3), (1, 0), (-8, 0)])
def test_crop_is_an_integer_shift_with_zero_fill(dy: int, dx: int) -> None:
    x = images(2, height=6, width=7)
    params = DSAParams(families=("crop",), image_size=(6, 7), crop_shift=torch.tensor([[dy, dx]]))
    assert torch.equal(dsa_for("crop").apply(x, params), reference_crop(x, dy, dx))


def test_crop_per_sample_shifts() -> None:
    x = images(3, height=6, width=6)
    shifts = [(1, 2), (-2, 0), (0, -1)]
    params = DSAParams(families=("crop",), image_size=(6, 6), crop_shift=torch.tensor(shifts))
    out = dsa_for("crop").apply(x, params)
    for k, (dy, dx) in enumerate(shifts):
        assert torch.equal(out[k], reference_crop(x[k], dy, dx))


@pytest.mark.parametrize("centre", [(3, 4), (0, 0), (8, 8), (7, 1)])
def test_cutout_zeroes_exactly_the_box_around_the_centre(centre: tuple[int, int]) -> None:
    # 8 x 8 image: box int(8 * 0.5 + 0.5) = 4, rows centre - 2 .. centre + 1, clipped to the image
    x = images(2, height=8, width=8) + 10.0  # no accidental zeros
    dsa = dsa_for("cutout")
    (cy, cx) = centre
    params = DSAParams(
        families=("cutout",), image_size=(8, 8), cutout_box=torch.tensor([[cy - 2, cx - 2, cy + 2, cx + 2]])
    )
    expected = reference_cutout(x, range(cy - 2, cy + 2), range(cx - 2, cx + 2))
    out = dsa.apply(x, params)
    assert torch.equal(out, expected)
    if centre == (3, 4):
        assert int((out == 0).sum()) == 2 * 3 * 16
    if centre == (8, 8):
        assert int((out == 0).sum()) == 2 * 3 * 4  # only rows 6, 7 and columns 6, 7 remain inside


def test_flip_mirrors_the_last_axis_of_flagged_samples_only() -> None:
    x = images(3)
    params = DSAParams(families=("flip",), image_size=(8, 8), flip_mask=torch.tensor([True, False, True]))
    out = dsa_for("flip").apply(x, params)
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[0, :, :, 0], x[0, :, :, 7])


def test_color_follows_the_published_formulas_for_known_draws() -> None:
    x = images(2, channels=3, height=5, width=4)
    draws = [(0.9, 0.25, 0.1), (0.2, 0.75, 0.8)]
    params = DSAParams(
        families=("color",),
        image_size=(5, 4),
        brightness_shift=torch.tensor([(b - 0.5) * 1.0 for b, _, _ in draws]),
        saturation_factor=torch.tensor([s * 2.0 for _, s, _ in draws]),
        contrast_factor=torch.tensor([c + 0.5 for _, _, c in draws]),
    )
    out = dsa_for("color").apply(x, params)
    for k, draw in enumerate(draws):
        torch.testing.assert_close(out[k], reference_color(x[k], *draw))


def test_sampled_color_matches_the_formula_for_its_draws() -> None:
    """The sampled factors are the published u-transforms: re-derive u and recompute by hand."""
    x = images(4, channels=3)
    params = dsa_for("color").sample(4, (8, 8), generator(2))
    out = dsa_for("color").apply(x, params)
    for k in range(4):
        u = (
            float(params.brightness_shift[k]) + 0.5,
            float(params.saturation_factor[k]) / 2.0,
            float(params.contrast_factor[k]) - 0.5,
        )
        assert all(0.0 <= value < 1.0 for value in u)
        torch.testing.assert_close(out[k], reference_color(x[k], *u))


def test_unit_scale_and_zero_rotation_are_the_identity() -> None:
    x = images(2, height=7, width=9)
    scale = DSAParams(families=("scale",), image_size=(7, 9), scale_factors=torch.tensor([[1.0, 1.0]]))
    rotate = DSAParams(families=("rotate",), image_size=(7, 9), rotate_angle=torch.tensor([0.0]))
    torch.testing.assert_close(dsa_for("scale").apply(x, scale), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(dsa_for("rotate").apply(x, rotate), x, atol=1e-5, rtol=0)


def test_scale_factor_acts_on_the_sampling_grid_of_each_axis() -> None:
    # x[i, j] = j on a 5 x 5 image. Bilinear sampling of a linear ramp is exact. With
    # align_corners=True column j sits at u = -1 + j / 2; sx = 0.5 reads u / 2, i.e. column j / 2 + 1.
    ramp = torch.arange(5.0).repeat(5, 1)[None, None]
    params = DSAParams(families=("scale",), image_size=(5, 5), scale_factors=torch.tensor([[0.5, 1.0]]))
    expected = (torch.arange(5.0) / 2 + 1).repeat(5, 1)[None, None]
    torch.testing.assert_close(dsa_for("scale").apply(ramp, params), expected)
    # the same factor on the other axis leaves a column ramp untouched
    params = DSAParams(families=("scale",), image_size=(5, 5), scale_factors=torch.tensor([[1.0, 0.5]]))
    torch.testing.assert_close(dsa_for("scale").apply(ramp, params), ramp)


def test_rotation_by_90_degrees_is_rot90_counter_clockwise() -> None:
    x = images(2, height=6, width=6)
    params = DSAParams(families=("rotate",), image_size=(6, 6), rotate_angle=torch.tensor([math.pi / 2]))
    out = dsa_for("rotate").apply(x, params)
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    assert not torch.allclose(out, torch.rot90(x, -1, dims=(2, 3)), atol=1e-2)
    # by hand on 2 x 2: [[1, 2], [3, 4]] turned counter-clockwise is [[2, 4], [1, 3]]
    small = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    params = DSAParams(families=("rotate",), image_size=(2, 2), rotate_angle=torch.tensor([math.pi / 2]))
    torch.testing.assert_close(
        dsa_for("rotate").apply(small, params), torch.tensor([[[[2.0, 4.0], [1.0, 3.0]]]]), atol=1e-5, rtol=0
    )


def test_all_mode_is_the_chain_of_references_with_one_composed_resampling() -> None:
    x = images(2, height=8, width=8)
    sx, sy, angle = 1.1, 0.9, 0.2
    params = DSAParams(
        families=FAMILIES,
        image_size=(8, 8),
        brightness_shift=torch.tensor([0.3]),
        saturation_factor=torch.tensor([1.5]),
        contrast_factor=torch.tensor([0.7]),
        crop_shift=torch.tensor([[1, -2]]),
        cutout_box=torch.tensor([[-1, 5, 3, 9]]),
        flip_mask=torch.tensor([True]),
        scale_factors=torch.tensor([[sx, sy]]),
        rotate_angle=torch.tensor([angle]),
    )
    out = DSA(DSAConfig(mode="all")).apply(x, params)

    expected = torch.stack([reference_color(sample, 0.8, 0.75, 0.2) for sample in x])
    expected = reference_crop(expected, 1, -2)
    expected = reference_cutout(expected, range(-1, 3), range(5, 9))
    expected = expected.flip(-1)
    # scale then rotate reads the source at S @ R @ p
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[sx * c, -sx * s, 0.0], [sy * s, sy * c, 0.0]]]).expand(2, 2, 3)
    grid = F.affine_grid(theta, list(expected.shape), align_corners=True)
    expected = F.grid_sample(expected, grid, align_corners=True)
    torch.testing.assert_close(out, expected)


def test_composed_affine_agrees_with_two_resamplings_away_from_the_border() -> None:
    size = 32
    coords = torch.linspace(-1, 1, size)
    smooth = (torch.sin(2 * coords)[:, None] * torch.cos(3 * coords)[None, :])[None, None]
    params = DSAParams(
        families=("scale", "rotate"),
        image_size=(size, size),
        scale_factors=torch.tensor([[1.15, 0.9]]),
        rotate_angle=torch.tensor([0.25]),
    )
    composed = DSA(DSAConfig(strategy="scale_rotate", mode="all")).apply(smooth, params)
    scale_only = DSAParams(families=("scale",), image_size=(size, size), scale_factors=params.scale_factors)
    rotate_only = DSAParams(families=("rotate",), image_size=(size, size), rotate_angle=params.rotate_angle)
    two_steps = dsa_for("rotate").apply(dsa_for("scale").apply(smooth, scale_only), rotate_only)
    centre = slice(8, 24)
    torch.testing.assert_close(composed[..., centre, centre], two_steps[..., centre, centre], atol=0.02, rtol=0)


# ---------------------------------------------------------------- siamese sharing


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_params_transform_every_batch_the_same(family: str) -> None:
    dsa = dsa_for(family)
    a, b = images(3, seed=1), images(5, seed=2)
    for seed in range(4):
        params = dsa.sample(1, (8, 8), generator(seed))
        together = dsa.apply(torch.cat([a, b]), params)
        torch.testing.assert_close(together, torch.cat([dsa.apply(a, params), dsa.apply(b, params)]))
        # one sample alone is transformed exactly like inside the batch
        torch.testing.assert_close(dsa.apply(b[2:3], params), together[5:6])


@pytest.mark.parametrize("family", GEOMETRIC)
def test_geometric_families_are_linear_in_the_images(family: str) -> None:
    dsa = dsa_for(family)
    a, b = images(4, seed=1), images(4, seed=2)
    for seed in range(4):
        out_a, out_b, out_sum = dsa.siamese([a, b, a + b], generator(seed))
        torch.testing.assert_close(out_sum, out_a + out_b, atol=1e-5, rtol=1e-5)


def test_siamese_uses_one_transformation_for_all_batches() -> None:
    dsa = DSA(DSAConfig(mode="all"))
    real, synthetic = images(6, seed=1), images(2, seed=2)
    out_real, out_synthetic, out_both = dsa.siamese([real, synthetic, torch.cat([real, synthetic])], generator(9))
    torch.testing.assert_close(out_both, torch.cat([out_real, out_synthetic]))
    # the same image in both batches is transformed identically
    out_real, out_synthetic = dsa.siamese([real, real[:1]], generator(9))
    torch.testing.assert_close(out_real[:1], out_synthetic)
    assert dsa.siamese([], generator(0)) == []


def test_apply_refuses_mismatched_batch_or_size() -> None:
    dsa = dsa_for("flip")
    params = dsa.sample(3, (8, 8), generator(0))
    with pytest.raises(ValueError, match="batch"):
        dsa.apply(images(4), params)
    with pytest.raises(ValueError, match="size"):
        dsa.apply(images(3, height=6, width=6), params)
    with pytest.raises(ValueError):
        dsa.apply(torch.zeros(8, 8), params)


def test_params_move_to_the_device_of_the_images_and_keep_dtype() -> None:
    dsa = DSA(DSAConfig(mode="all"))
    params = dsa.sample(2, (8, 8), generator(0), device="cpu")
    assert params.crop_shift.device.type == "cpu" and params.rotate_angle.device.type == "cpu"
    assert params.batch_size == 2
    out = dsa.apply(images(2).double(), params)
    assert out.dtype == torch.float64


# ---------------------------------------------------------------- gradients


def fixed_params(family: str) -> DSAParams:
    values = {
        "color": dict(
            brightness_shift=torch.tensor([0.2, -0.3]),
            saturation_factor=torch.tensor([1.3, 0.4]),
            contrast_factor=torch.tensor([0.8, 1.2]),
        ),
        "crop": dict(crop_shift=torch.tensor([[1, -2], [-1, 0]])),
        "cutout": dict(cutout_box=torch.tensor([[-1, 2, 2, 5], [3, 3, 6, 6]])),
        "flip": dict(flip_mask=torch.tensor([True, False])),
        "scale": dict(scale_factors=torch.tensor([[1.13, 0.87], [0.91, 1.07]])),
        "rotate": dict(rotate_angle=torch.tensor([0.21, -0.17])),
    }[family]
    return DSAParams(families=(family,), image_size=(6, 6), **values)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_passes_gradcheck(family: str) -> None:
    dsa = dsa_for(family)
    params = fixed_params(family)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=generator(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: dsa.apply(inp, params), (x,))


def test_all_mode_passes_gradcheck() -> None:
    dsa = DSA(DSAConfig(mode="all"))
    params = dsa.sample(1, (6, 6), generator(4))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=generator(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: dsa.apply(inp, params), (x,))
