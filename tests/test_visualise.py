"""Per-sample CMI against an independent softmax/KL reference, ordering by KL, and the ordered PNG grid."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from infodistill.cli import main
from infodistill.errors import UserInputError
from infodistill.evaluate import random_subset
from infodistill.models import build_model
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import pool_cmi
from infodistill.visualise import class_order_by_kl, per_sample_cmi, save_ordered_grid

ARCH = "ConvNetGAP-1-8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def pool_dir(real, tmp_path):
    directory = tmp_path / "pool"
    train_proxy_pool(real, directory, arch=ARCH, count=2, epochs=1, progress=False)
    return directory


@pytest.fixture
def uneven_set(real):
    """3 images per class, except class 0 with one image and class 1 with two."""
    subset = random_subset(real, 3, seed=5)
    labels = subset.labels
    keep = [i for i in range(len(labels)) if not (labels[i] == 0 and (labels[:i] == 0).any())]
    drop_one = next(i for i in range(len(labels)) if labels[i] == 1)
    keep = torch.tensor([i for i in keep if i != drop_one])
    return dataclasses.replace(subset, images=subset.images[keep], labels=labels[keep])


def reference_kl(pool_dir, images, labels, num_classes):
    """Each proxy rebuilt from its file and run directly: P = softmax(embed), Q_y = mean P, KL(P || Q_y) by
    the formula in float64, then averaged over the proxies."""
    per_proxy = []
    for path in sorted(pool_dir.glob("proxy-*.safetensors")):
        model = build_model(ARCH, 1, num_classes, (28, 28))
        model.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            features = model.eval().embed(images).double().numpy()
        p = np.exp(features - features.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        kl = np.zeros(len(p))
        for y in set(labels.tolist()):
            members = labels.numpy() == y
            q = p[members].mean(axis=0)
            kl[members] = (p[members] * (np.log(p[members]) - np.log(q))).sum(axis=1)
        per_proxy.append(kl)
    return np.mean(per_proxy, axis=0)


def test_per_sample_cmi_matches_reference_and_pool_cmi(real, pool_dir, uneven_set):
    pool = ProxyPool.load(pool_dir, real.info)
    images, labels = uneven_set.images, uneven_set.labels
    kl = per_sample_cmi(pool, images, labels, 10)
    assert kl.shape == (len(labels),) and kl.device.type == "cpu"
    expected = reference_kl(pool_dir, images, labels, 10)
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-5, atol=1e-10)
    assert float(kl[labels == 0]) == 0.0  # a class with one sample sits on its centroid
    assert (kl[labels != 0] > 0).all()
    pooled = pool_cmi(pool, images, labels, 10)
    assert float(kl.mean()) == pytest.approx(float(pooled.mean()), rel=1e-5)


def test_class_order_is_ascending_stable_and_a_permutation_per_class(real, pool_dir, uneven_set):
    pool = ProxyPool.load(pool_dir, real.info)
    kl = per_sample_cmi(pool, uneven_set.images, uneven_set.labels, 10)
    order = class_order_by_kl(kl, uneven_set.labels, 10)
    assert len(order) == 10
    for label, indices in enumerate(order):
        assert sorted(indices) == torch.nonzero(uneven_set.labels == label).flatten().tolist()
        values = kl[indices].tolist()
        assert values == sorted(values)
    ties = class_order_by_kl(torch.tensor([0.5, 0.1, 0.5, 0.1, 0.3]), torch.tensor([1, 1, 1, 1, 0]), 3)
    assert ties == [[4], [1, 3, 0, 2], []]
    with pytest.raises(UserInputError, match="0..2"):
        class_order_by_kl(torch.zeros(2), torch.tensor([0, 3]), 3)


def test_ordered_grid_is_a_valid_png(real, uneven_set, tmp_path):
    kl = torch.linspace(0, 1, len(uneven_set.labels))
    folder = tmp_path / "figures"
    for limit in (10, 2):
        path = save_ordered_grid(uneven_set, kl, folder / f"grid{limit}.png", max_per_class=limit)
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert height > width / 2  # ten class rows
    with pytest.raises(UserInputError, match="one value per image"):
        save_ordered_grid(uneven_set, kl[:-1], folder / "bad.png")
    with pytest.raises(UserInputError, match=r"\.png"):
        save_ordered_grid(uneven_set, kl, folder / "bad.jpg")
    assert sorted(p.name for p in folder.iterdir()) == ["grid10.png", "grid2.png"]  # no temporary left


def test_cli_cmi_ordered_grid(real, pool_dir, tmp_path, capsys):
    set_path = tmp_path / "set.safetensors"
    assert main(["baseline", "--ipc", "2", "--out", str(set_path)]) == 0
    capsys.readouterr()
    grid = tmp_path / "figures" / "ordered.png"
    code = main(["cmi", str(set_path), "--proxies", str(pool_dir), "--ordered-grid", str(grid), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and grid.read_bytes()[:8] == PNG_MAGIC
    assert len(report["per_sample_kl"]) == 20
    assert np.mean(report["per_sample_kl"]) == pytest.approx(report["mean"], rel=1e-5)
    code = main(["cmi", str(set_path), "--proxies", str(pool_dir), "--json"])
    assert code == 0 and "per_sample_kl" not in json.loads(capsys.readouterr().out)


def test_cli_ordered_grid_must_be_png(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["cmi", str(tmp_path / "set.safetensors"), "--proxies", str(tmp_path), "--ordered-grid", "x.jpg"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "x.jpg" in err and len(err.strip().splitlines()) == 1
