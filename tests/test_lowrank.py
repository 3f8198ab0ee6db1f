"""Low-rank parameterisation: image counts at equal storage, exact SVD init, decoding, the loop, bad ranks."""

import numpy as np
import pytest
import torch

from infodistill.artefact import load_set
from infodistill.cli import main
from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.loop import DistillConfig, distill
from infodistill.synthetic import LowRankSet, build_synthetic
from infodistill.synthetic.lowrank import truncated_svd_factors


def sampler_of(images_per_class: int, shape: tuple[int, int, int], classes: int = 3, seed: int = 0) -> ClassSampler:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(classes * images_per_class, *shape, generator=generator)
    labels = torch.arange(classes).repeat_interleave(images_per_class)
    return ClassSampler(images, labels, classes)


@pytest.mark.parametrize("shape, rank, multiplier", [((1, 28, 28), 2, 7), ((3, 32, 32), 2, 8), ((3, 32, 32), 1, 16),
                                                    ((1, 28, 28), 14, 1), ((3, 16, 24), 3, 3)])
def test_images_per_class_grow_by_the_floor_of_pixels_over_factor_floats(shape, rank, multiplier):
    channels, height, width = shape
    assert multiplier == height * width // (rank * (height + width))  # the hand-computed cases above
    synthetic = build_synthetic("lowrank", sampler_of(40, shape), 2, "noise", torch.Generator().manual_seed(0),
                                rank=rank)
    assert synthetic.images_per_class == 2 * multiplier
    assert synthetic.images().shape == (3 * 2 * multiplier, *shape)
    assert synthetic.labels.tolist() == [c for c in range(3) for _ in range(2 * multiplier)]
    # Storage: every image costs C * r * (H + W) floats, and the pixel budget is never exceeded.
    assert synthetic.storage_floats() == 3 * 2 * multiplier * channels * rank * (height + width)
    assert synthetic.budget_floats() == 3 * 2 * channels * height * width
    assert synthetic.storage_floats() <= synthetic.budget_floats()


def test_svd_init_reconstructs_an_image_of_rank_r_exactly():
    generator = torch.Generator().manual_seed(1)
    # Rank-2 real images per channel: sums of two outer products.
    left = torch.randn(30, 3, 16, 2, generator=generator)
    right = torch.randn(30, 3, 2, 16, generator=generator)
    real = left @ right
    labels = torch.arange(3).repeat_interleave(10)
    sampler = ClassSampler(real, labels, 3)
    synthetic = LowRankSet.initialise(sampler, 1, "real", torch.Generator().manual_seed(5), rank=2)
    drawn = sampler.sample_classes(synthetic.images_per_class, torch.Generator().manual_seed(5)).flatten(0, 1)
    torch.testing.assert_close(synthetic.images().detach(), drawn, atol=1e-4, rtol=1e-4)


def test_truncated_svd_gives_the_best_rank_r_approximation_of_numpy():
    image = torch.randn(2, 1, 9, 7, generator=torch.Generator().manual_seed(2))
    factor_a, factor_b = truncated_svd_factors(image, 3)
    u, s, vt = np.linalg.svd(image.double().numpy(), full_matrices=False)
    expected = (u[..., :3] * s[..., None, :3]) @ vt[..., :3, :]
    np.testing.assert_allclose((factor_a @ factor_b).numpy(), expected, atol=1e-5)


def test_noise_init_has_unit_variance_entries_and_each_class_decodes_its_own_factors():
    synthetic = build_synthetic("lowrank", sampler_of(5, (1, 28, 28)), 4, "noise", torch.Generator().manual_seed(3))
    images = synthetic.images().detach()
    assert abs(float(images.var()) - 1.0) < 0.05
    for label in range(3):
        torch.testing.assert_close(synthetic.class_images(label).detach(),
                                   images[label * synthetic.images_per_class:(label + 1) * synthetic.images_per_class])


def test_gradients_of_the_images_reach_both_factors():
    synthetic = build_synthetic("lowrank", sampler_of(5, (1, 8, 8)), 1, "noise", torch.Generator().manual_seed(4))
    synthetic.images().pow(2).sum().backward()
    # d/dA sum (AB)^2 = 2 (AB) B^T, written independently.
    with torch.no_grad():
        expected = 2 * (synthetic.factor_a @ synthetic.factor_b) @ synthetic.factor_b.transpose(-1, -2)
    torch.testing.assert_close(synthetic.factor_a.grad, expected)
    assert synthetic.factor_b.grad is not None and synthetic.factor_b.grad.abs().sum() > 0


@pytest.mark.parametrize("rank, fragment", [(0, "rank 0 is invalid"), (29, "rank 29 is invalid"),
                                            (15, "use rank <= 14"), (True, "rank True is invalid")])
def test_bad_ranks_are_refused_naming_the_value(rank, fragment):
    with pytest.raises(UserInputError, match=fragment):
        build_synthetic("lowrank", sampler_of(5, (1, 28, 28)), 1, "noise", torch.Generator(), rank=rank)


def test_dm_with_lowrank_and_cmi_writes_decoded_images_factors_and_the_storage_budget(real, tmp_path):
    from infodistill.proxies import train_proxy_pool

    train_proxy_pool(real, tmp_path / "pool", arch="ConvNetGAP-1-8", count=2, epochs=1, progress=False)
    config = DistillConfig(method="dm", param="lowrank", rank=2, ipc=1, iterations=2, model="ConvNet-2-16",
                           batch_real=16, cmi_weight=1.0, proxies=str(tmp_path / "pool"))
    result = distill(config, tmp_path / "run", progress=False, real=real)
    distilled = load_set(result.artefact)
    assert distilled.images.shape == (70, 1, 28, 28)  # ipc 1 at rank 2 on 28x28: 7 images per class
    torch.testing.assert_close(distilled.images, distilled.stored["factor_a"] @ distilled.stored["factor_b"])
    extra = distilled.metadata.extra
    assert (extra["rank"], extra["storage_floats"], extra["budget_floats"]) == ("2", "7840", "7840")
    assert distilled.metadata.parameterisation == "lowrank" and distilled.metadata.regularizers["cmi"] == 1.0


@pytest.mark.parametrize("rank, fragment", [("0", "rank must be a positive integer, got 0"),
                                            ("40", "rank 40 is invalid; it must be an integer in 1..28")])
def test_the_cli_refuses_a_bad_rank_with_status_2_and_writes_nothing(striped_root, tmp_path, capsys, rank, fragment):
    code = main(["distill", "--param", "lowrank", "--rank", rank, "--iterations", "1", "--quiet",
                 "--out", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
