"""benchmarks/paper_scale_cmi.py (the paper-scale CMI check for a GPU) runs end to end with tiny settings on a
CPU, resumes from its own folder, and its paired difference is the mean of the per-seed differences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_scale_cmi.py"


def _run(work: Path) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--quiet", "--device", "cpu", "--work", str(work)],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_paper_scale_script_runs_tiny_on_a_cpu_and_resumes(striped_root, tmp_path):
    report = _run(tmp_path / "work")
    assert report["tiny"] and report["skipped"] == []
    assert report["pools"]["optimised"]["size"] == 2 and report["pools"]["held_out"]["size"] == 1
    plain, regularized = report["results"]["dm"], report["results"]["dm+cmi"]
    assert plain["regularizers"] == {} and regularized["regularizers"]["cmi"] > 0
    calibration = regularized["cmi_calibration"]
    # the auto weight gives the recorded gradient ratio: weight * ||grad CMI|| / ||grad L|| = target
    assert calibration["weight"] * calibration["cmi_grad_norm"] / calibration["method_grad_norm"] == pytest.approx(
        calibration["target_ratio"] * calibration["scale"])
    differences = [b - a for a, b in zip(plain["accuracies"], regularized["accuracies"])]
    assert report["dm+cmi_minus_dm_points"]["mean"] == pytest.approx(sum(differences) / len(differences))
    assert report["dm+cmi_minus_dm_points"]["pairs"] == len(differences) == 2

    again = _run(tmp_path / "work")  # everything reused: the same sets, so the same scores
    assert again["results"]["dm"]["accuracies"] == plain["accuracies"]
    assert again["results"]["dm+cmi"]["accuracies"] == regularized["accuracies"]
