"""Sweeps: the grid's cells, resuming (finished cells skipped, cut-off cells resumed), shared loading,
and bad sweep files refused before anything is written."""

import json

import pytest
import torch

import infodistill.experiments.sweep as sweep_module
from conftest import run_killed_after_iteration
from infodistill.artefact import load_set
from infodistill.cli import main
from infodistill.errors import UserInputError
from infodistill.evaluate import evaluate_set
from infodistill.experiments.sweep import Sweep, cell_name, parse_sweep
from infodistill.loop import DistillConfig, LossDiverged, distill
from infodistill.proxies import train_proxy_pool
from infodistill.training import EvalConfig

TINY = {"method": "dm", "ipc": 2, "iterations": 2, "model": "ConvNet-1-8", "batch_real": 8, "checkpoint_every": 1}
EVAL = {"model": "ConvNet-1-8", "epochs": 2, "runs": 1}


def tiny_sweep(grid=None, **distill_values):
    return parse_sweep({"distill": {**TINY, **distill_values}, "grid": grid or {"seed": [0, 1]}, "evaluate": EVAL})


def states(out):
    return {name: entry["status"] for name, entry in json.loads((out / "sweep.json").read_text())["cells"].items()}


def test_the_cells_are_the_product_of_the_grid_in_order():
    spec = parse_sweep({"distill": TINY, "grid": {"seed": [0, 1], "lr_images": [0.5, 1, 2.0]}, "evaluate": EVAL})
    cells = spec.cells()
    assert [(cell.config.seed, cell.config.lr_images) for cell in cells] == [
        (0, 0.5), (0, 1.0), (0, 2.0), (1, 0.5), (1, 1.0), (1, 2.0)]
    assert cells[1].name == "seed-0_lr_images-1" == cell_name({"seed": 0, "lr_images": 1})
    assert all(cell.config.ipc == 2 and cell.config.method == "dm" for cell in cells)


def test_a_sweep_scores_every_cell_and_the_baseline_as_evaluate_would(striped_root, real, tmp_path):
    out = tmp_path / "sweep"
    Sweep(tiny_sweep(), out, progress=False).run()
    assert states(out) == {"baseline-fashion-mnist-ipc2-seed0": "done", "baseline-fashion-mnist-ipc2-seed1": "done",
                           "seed-0": "done", "seed-1": "done"}
    # an independent reference: the cell's set distilled and evaluated on its own
    alone = distill(DistillConfig(**TINY, seed=1), tmp_path / "alone", progress=False, real=real)
    expected = evaluate_set(load_set(alone.artefact), real, EvalConfig(**EVAL), progress=False).accuracies
    evaluation = json.loads((out / "cells" / "seed-1" / "evaluation.json").read_text())
    assert evaluation["results"][0]["accuracies"] == expected
    assert torch.equal(load_set(out / "cells" / "seed-1" / "set.safetensors").images, load_set(alone.artefact).images)


def test_a_restart_skips_finished_cells_and_evaluates_an_unscored_one(striped_root, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    Sweep(tiny_sweep(), out, progress=False).run()
    scored = json.loads((out / "cells" / "seed-0" / "evaluation.json").read_text())["results"][0]["accuracies"]
    (out / "cells" / "seed-0" / "evaluation.json").unlink()

    def no_distill(*args, **kwargs):
        raise AssertionError("a cell whose set exists must not be distilled again")

    monkeypatch.setattr(sweep_module, "distill", no_distill)
    Sweep(tiny_sweep(), out, progress=False).run()
    assert states(out)["seed-0"] == "done" and states(out)["seed-1"] == "skipped"
    again = json.loads((out / "cells" / "seed-0" / "evaluation.json").read_text())["results"][0]["accuracies"]
    assert again == scored


def test_a_cell_cut_off_mid_distillation_resumes_from_its_checkpoint(striped_root, real, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    spec = parse_sweep({"distill": {**TINY, "iterations": 4}, "grid": {"seed": [0]}, "evaluate": EVAL,
                        "baseline": False})
    run_killed_after_iteration(1, spec.cells()[0].config, out / "cells" / "seed-0", real, monkeypatch)
    assert (out / "cells" / "seed-0" / "checkpoint.safetensors").exists()
    assert not (out / "cells" / "seed-0" / "set.safetensors").exists()
    Sweep(spec, out, progress=False).run()
    whole = distill(spec.cells()[0].config, tmp_path / "whole", progress=False, real=real)
    assert torch.equal(load_set(out / "cells" / "seed-0" / "set.safetensors").images, load_set(whole.artefact).images)


def test_cells_share_the_loaded_dataset_and_pool(striped_root, real, tmp_path, monkeypatch):
    train_proxy_pool(real, tmp_path / "pool", arch="ConvNetGAP-1-8", count=2, epochs=1, progress=False)
    loads = []
    original = sweep_module.load_dataset
    monkeypatch.setattr(sweep_module, "load_dataset", lambda *a, **k: loads.append(a) or original(*a, **k))
    spec = tiny_sweep(grid={"cmi_weight": [0.0, 1.0, 5.0]}, proxies=str(tmp_path / "pool"))
    sweep = Sweep(spec, tmp_path / "sweep", progress=False)
    sweep.run()
    assert len(loads) == 1 and sweep.cache.reads == 1
    lines = (tmp_path / "sweep" / "cells" / "cmi_weight-5" / "metrics.jsonl").read_text().splitlines()
    assert "loss/cmi" in json.loads(lines[0])


def test_a_diverged_cell_is_recorded_and_the_others_still_run(striped_root, tmp_path, monkeypatch):
    original = sweep_module.distill

    def diverge_for_seed_0(config, *args, **kwargs):
        if config.seed == 0:
            raise LossDiverged("the loss became nan at iteration 0")
        return original(config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "distill", diverge_for_seed_0)
    out = tmp_path / "sweep"
    code = main(["sweep", "--out", str(out), "--quiet", "--no-baseline", *[f"--set={k}={v}" for k, v in TINY.items()],
                 "--grid", "seed=0,1", "--epochs", "2", "--runs", "1", "--models", "ConvNet-1-8"])
    assert code == 1
    assert states(out) == {"seed-0": "failed", "seed-1": "done"}
    assert "nan" in json.loads((out / "sweep.json").read_text())["cells"]["seed-0"]["error"]


@pytest.mark.parametrize("mapping, fragment", [
    ({"grid": {"cmi_wieght": [1.0]}}, "unknown grid key 'cmi_wieght'"),
    ({"grid": {"seed": []}}, "grid key 'seed' must list at least one value"),
    ({"grid": {"device": ["cpu"]}}, "grid key 'device'"),
    ({"grid": {"ipc": [0]}}, "ipc must be a positive integer, got 0"),
    ({"grid": {"seed": [0]}, "evaluate": {"models": ["ConvNet-X"]}}, "ConvNet-X"),
    ({"grid": {"seed": [0]}, "evaluate": {"epoch": 3}}, "unknown key 'epoch'"),
    ({"grid": {"seed": [0]}, "extra": 1}, "unknown section 'extra'"),
    ({"grid": {"seed": [0]}, "distill": {"proxies": "no/such/pool"}}, "no/such/pool"),
])
def test_bad_sweeps_are_refused_naming_the_value(mapping, fragment):
    with pytest.raises(UserInputError, match=fragment.replace("(", r"\(")):
        parse_sweep({"distill": TINY, **mapping} if "distill" not in mapping else {
            **mapping, "distill": {**TINY, **mapping["distill"]}})


def test_the_command_refuses_an_unknown_grid_key_with_exit_2_and_writes_nothing(striped_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "--grid", "lamda=0,1"]) == 2
    error = capsys.readouterr().err
    assert "unknown grid key 'lamda'" in error and error.count("\n") == 1
    assert not out.exists()


def test_a_restart_with_other_settings_is_refused_and_keeps_the_results(striped_root, tmp_path):
    out = tmp_path / "sweep"
    Sweep(tiny_sweep(), out, progress=False).run()
    before = (out / "sweep.json").read_text()
    with pytest.raises(UserInputError, match="other 'distill' settings"):
        Sweep(tiny_sweep(iterations=3), out, progress=False).run()
    assert (out / "sweep.json").read_text() == before
    assert (out / "cells" / "seed-0" / "evaluation.json").exists()


def test_the_command_feeds_report_with_every_cell_and_the_baseline(striped_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--out", str(out), "--quiet", "--report", *[f"--set={k}={v}" for k, v in TINY.items()],
                 "--grid", "lr_images=0.5,2", "--epochs", "2", "--runs", "1", "--models", "ConvNet-1-8"])
    assert code == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    names = sorted(row["run"] for row in summary["rows"])
    assert names == ["baseline-fashion-mnist-ipc2-seed0", "lr_images-0.5", "lr_images-2"]
    for row in summary["rows"]:
        evaluation = json.loads((out / ("cells" if row["run"].startswith("lr") else "") / row["run"] /
                                 "evaluation.json").read_text())
        assert row["accuracy"]["mean"] == pytest.approx(evaluation["results"][0]["mean"])
    assert (out / "report" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
