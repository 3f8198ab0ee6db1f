"""The shape of the project's entry points: every benchmark script answers --help, and the experiment commands
(report, continual) run through the top-level `infodistill` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path for path in (ROOT / "benchmarks").glob("*.py") if '__name__ == "__main__"' in path.read_text())


def infodistill(*argv: str, data: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"INFODISTILL_DATA": str(data)} if data else {})}
    return subprocess.run([sys.executable, "-m", "infodistill", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd)


def test_only_the_shared_helper_module_is_not_a_script():
    helpers = sorted(path.name for path in (ROOT / "benchmarks").glob("*.py") if path not in SCRIPTS)
    assert helpers == ["report.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_script_answers_help(script):
    completed = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               cwd=script.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage:")


@pytest.mark.parametrize("command", ["report", "continual", "sweep", "theory"])
def test_the_experiment_commands_answer_help_through_the_top_level_command(command):
    completed = infodistill(command, "--help")
    assert completed.returncode == 0 and completed.stdout.startswith(f"usage: infodistill {command}"), completed.stderr


def test_distill_then_report_through_the_top_level_command(striped_root, tmp_path):
    run = tmp_path / "run"
    tiny = ["--ipc", "1", "--iterations", "2", "--model", "ConvNet-1-8", "--batch-real", "4", "--quiet"]
    completed = infodistill("distill", *tiny, "--out", str(run), data=striped_root)
    assert completed.returncode == 0, completed.stderr
    completed = infodistill("report", str(run), "--out", str(tmp_path / "report"), "--json", data=striped_root)
    assert completed.returncode == 0, completed.stderr
    assert isinstance(json.loads(completed.stdout), dict)
    assert any((tmp_path / "report").iterdir())


def test_continual_runs_through_the_top_level_command(striped_root, tmp_path):
    out = tmp_path / "continual"
    completed = infodistill("continual", "--method", "dm", "--ipc", "1", "--iterations", "1", "--epochs", "1",
                            "--steps", "2", "--orders", "1", "--model", "ConvNet-1-8", "--eval-model", "ConvNet-1-8",
                            "--batch-real", "4", "--out", str(out), data=striped_root)
    assert completed.returncode == 0, completed.stderr
    assert any(out.iterdir())
