"""The GPU check is ready to run: bench_gpu.py --tiny reports every item on a CPU, gpu_check.sh answers --help.

These run the scripts as the GPU session will (a subprocess from the repository root) with tiny sizes on the
CPU; they check the report's shape and that every figure is a positive time, never how fast anything was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
CHECK = ROOT / "benchmarks" / "gpu_check.sh"

PRECISION_VARIANTS = {"fp32", "bf16"}
TRAINING_VARIANTS = {"fp32/sequential", "fp32/batched", "bf16/sequential"}
EXPECTED_VARIANTS = {
    "dm_iteration[ipc=10]": PRECISION_VARIANTS,
    "dm_iteration[ipc=50]": PRECISION_VARIANTS,
    "dm_forward_images": {"fp32/one_class_per_pass", "fp32/max_forward_images=4096"},
    "dm_cmi_iteration[ResNet18]": PRECISION_VARIANTS,
    "cmi_proxies_vmap[k=4]": {"fp32/vmap", "fp32/loop"},
    "dsa_outer_step": PRECISION_VARIANTS,
    "mtt_iteration[syn_steps=20]": PRECISION_VARIANTS,
    "mtt_iteration[syn_steps=50]": PRECISION_VARIANTS,
    "evaluation[5x1000]": TRAINING_VARIANTS,
    "proxy_training[ResNet18]": TRAINING_VARIANTS,
}
"""What issue 19 asks the benchmark to time, each in the variants that settle a choice (docs/gpu.md)."""


def run_bench(*arguments: str, timeout: float = 120) -> dict:
    """Run bench_gpu.py from the repository root with one thread; return the one JSON object it prints."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(BENCH), *arguments], cwd=ROOT, env=environment,
                               capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout)  # the whole of stdout is one JSON object


def test_the_tiny_benchmark_reports_every_item_with_positive_times(tmp_path):
    out = tmp_path / "gpu.json"
    report = run_bench("--tiny", "--device", "cpu", "--out", str(out))
    assert json.loads(out.read_text()) == report

    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    for key in ("device_name", "driver_version", "cuda_runtime", "cudnn", "tf32", "python"):
        assert key in machine  # None on a CPU machine, filled on a GPU one
    assert report["settings"]["tiny"] is True and report["settings"]["timer"] == "time.perf_counter"
    assert report["skipped"] == {}

    assert set(report["items"]) == set(EXPECTED_VARIANTS)
    for name, item in report["items"].items():
        assert set(item["variants"]) == EXPECTED_VARIANTS[name], name
        assert item["setting"], name
        for variant, figures in item["variants"].items():
            assert "error" not in figures, (name, variant, figures)
            assert figures["seconds"] > 0, (name, variant)
            assert all(value > 0 for value in figures.get("times", [1.0])), (name, variant)
            assert "peak_memory_mib" in figures  # None on a CPU
    repeated = report["items"]["dm_iteration[ipc=10]"]["variants"]["fp32"]
    assert len(repeated["times"]) == report["settings"]["sizes"]["repeats"] == 2
    assert repeated["seconds"] in repeated["times"]  # the median of the timed calls

    evaluation = report["items"]["evaluation[5x1000]"]["variants"]
    assert [evaluation[variant]["trained_together"] for variant in sorted(TRAINING_VARIANTS)] == [False, True, False]
    assert all(figures["epochs"] == report["items"]["evaluation[5x1000]"]["setting"]["epochs"]
               and not figures["from_warmup"] for figures in evaluation.values())  # a tiny run fits its budget
    proxies = report["items"]["proxy_training[ResNet18]"]["variants"]
    assert all(figures["images_per_second"] > 0 for figures in proxies.values())
    dsa = report["items"]["dsa_outer_step"]["variants"]["fp32"]
    assert dsa["seconds_per_outer_step"] == pytest.approx(dsa["seconds"] / 2)

    ratios = report["ratios"]
    assert set(ratios["bf16_over_fp32"]) == {name for name, variants in EXPECTED_VARIANTS.items()
                                            if "bf16" in variants or "bf16/sequential" in variants}
    assert set(ratios["batched_over_sequential"]) == {"evaluation[5x1000]", "proxy_training[ResNet18]"}
    for group in ("vmap_over_loop", "forward_4096_over_one_class", "dm_cmi_over_dm"):
        assert ratios[group] and all(value > 0 for value in ratios[group].values()), group


def test_a_spent_budget_skips_every_item_and_still_reports():
    report = run_bench("--tiny", "--device", "cpu", "--budget-seconds", "0")
    assert report["items"] == {}
    assert set(report["skipped"]) == set(EXPECTED_VARIANTS)
    assert all("budget" in reason for reason in report["skipped"].values())


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_check_script_explains_itself_and_refuses_unknown_arguments():
    shown = subprocess.run(["bash", str(CHECK), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert all(flag in shown.stdout for flag in ("--smoke", "--cpu-tiny", "OUT"))
    refused = subprocess.run(["bash", str(CHECK), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "unknown argument '--fast'" in refused.stderr
