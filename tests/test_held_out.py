"""Pooled proxies and the held-out CMI: ConvNetGAP's embedding is its last feature map averaged over space;
the CMI refuses unpooled proxies; `cmi --held-out` and `distill --held-out-proxies` measure the set under a
second pool, which must not share a proxy with the optimised one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from infodistill.artefact import load_set
from infodistill.models import build_model, pooled_variant
from infodistill.proxies import ProxyPool
from test_cli import run
from test_cmi import reference_cmi


def test_the_pooled_convnet_embeds_the_spatial_mean_of_the_convnets_last_feature_map():
    pooled = build_model("ConvNetGAP-3-16", 1, 10, (28, 28), seed=3).eval()
    flat = build_model("ConvNet-3-16", 1, 10, (28, 28), seed=3).eval()
    flat.features.load_state_dict(pooled.features.state_dict())  # same convolutions; GAP has no weights
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        spatial = flat.embed(images).view(4, 16, 4, 4)  # 28 (+3 padding on one channel) -> 32 -> 16 -> 8 -> 4
        assert torch.allclose(pooled.embed(images), spatial.mean(dim=(2, 3)), atol=1e-6)
    assert pooled.pooled_embedding and not flat.pooled_embedding and pooled.feature_dim == 16
    assert pooled_variant("ConvNet-3-32") == "ConvNetGAP-3-32-in" and pooled_variant("ResNet18") == "ResNet18-in"


def _pool(capsys, directory, arch="ConvNetGAP-1-8", seed="0", count="2"):
    code, _, err = run(capsys, "proxies", "--arch", arch, "--count", count, "--epochs", "1", "--seed", seed,
                       "--train-per-class", "5", "--out", str(directory), "--json")
    assert code == 0, err


def test_cmi_reports_the_held_out_pool_beside_the_optimised_one(striped_root, tmp_path, capsys):
    _pool(capsys, tmp_path / "a")
    _pool(capsys, tmp_path / "b", seed="100")
    assert run(capsys, "baseline", "--ipc", "3", "--out", str(tmp_path / "set.safetensors"))[0] == 0
    code, out, err = run(capsys, "cmi", str(tmp_path / "set.safetensors"), "--proxies", str(tmp_path / "a"),
                         "--held-out", str(tmp_path / "b"), "--json")
    assert code == 0, err
    report = json.loads(out)
    distilled = load_set(tmp_path / "set.safetensors")
    pool = ProxyPool.load(tmp_path / "b", _info(distilled))
    with torch.no_grad():  # the entropy form, written independently of the library's KL form
        expected = [reference_cmi(pool[k].embed(distilled.images).double().numpy(), distilled.labels.tolist())
                    for k in range(len(pool))]
    assert report["held_out"]["pool_size"] == 2
    assert np.allclose(report["held_out"]["per_proxy"], expected, rtol=1e-4)
    assert report["held_out"]["per_proxy"] != report["per_proxy"]


def _info(distilled):
    from infodistill.data import dataset_info

    return dataset_info(distilled.metadata.dataset)


def test_a_held_out_pool_sharing_a_proxy_or_a_seed_is_refused(striped_root, tmp_path, capsys):
    _pool(capsys, tmp_path / "a")
    assert run(capsys, "baseline", "--ipc", "3", "--out", str(tmp_path / "set.safetensors"))[0] == 0
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(tmp_path / "a" / "proxy-0001.safetensors", copied / "proxy-0000.safetensors")
    _pool(capsys, tmp_path / "same-seed", count="1")  # seed 0 again: the first proxy of pool a, retrained
    for held_out, reason in ((copied, "same file"), (tmp_path / "same-seed", "same training seed")):
        code, out, err = run(capsys, "cmi", str(tmp_path / "set.safetensors"), "--proxies", str(tmp_path / "a"),
                             "--held-out", str(held_out))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert "shares a proxy" in err and reason in err


def test_unpooled_proxies_are_refused_for_the_cmi_in_one_line(striped_root, tmp_path, capsys):
    _pool(capsys, tmp_path / "flat", arch="ConvNet-1-8", count="1")
    assert run(capsys, "baseline", "--ipc", "3", "--out", str(tmp_path / "set.safetensors"))[0] == 0
    code, _, err = run(capsys, "cmi", str(tmp_path / "set.safetensors"), "--proxies", str(tmp_path / "flat"))
    assert code == 2 and "flattened spatial map" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "distill", "--method", "dm", "--model", "ConvNet-1-8", "--batch-real", "4", "--ipc", "2",
                       "--iterations", "1", "--cmi-weight", "1", "--proxies", str(tmp_path / "flat"),
                       "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and "flattened spatial map" in err and not (tmp_path / "run" / "set.safetensors").exists()


def test_distill_logs_the_held_out_cmi(striped_root, tmp_path, capsys):
    _pool(capsys, tmp_path / "a")
    _pool(capsys, tmp_path / "b", seed="100")
    code, _, err = run(capsys, "distill", "--method", "dm", "--model", "ConvNet-1-8", "--batch-real", "4", "--ipc", "2",
                       "--iterations", "2", "--cmi-weight", "auto", "--proxies", str(tmp_path / "a"),
                       "--held-out-proxies", str(tmp_path / "b"), "--monitor-every", "1",
                       "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distilled = load_set(tmp_path / "run" / "set.safetensors")
    held_out = ProxyPool.load(tmp_path / "b", _info(distilled))
    with torch.no_grad():
        expected = np.mean([reference_cmi(held_out[k].embed(distilled.images).double().numpy(),
                                          distilled.labels.tolist()) for k in range(len(held_out))])
    assert all("monitor/cmi_heldout" in line for line in lines)
    assert np.isclose(lines[-1]["monitor/cmi_heldout"], expected, rtol=1e-4)
    calibration = json.loads(distilled.metadata.extra["cmi_calibration"])
    assert calibration["weight"] == distilled.metadata.regularizers["cmi"]
