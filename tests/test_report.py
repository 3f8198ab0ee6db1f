"""``infodistill report``: hand-built run directories with known values in, figures and tables out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from infodistill.artefact import DistilledSet, SetMetadata, save_set
from infodistill.cli.parsers import configure_report_parser
from infodistill.errors import UserInputError
from infodistill.experiments.report import (
    FIGURES,
    command_report,
    load_run,
    load_runs,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = tuple(f"class{index}" for index in range(10))


def write_set(directory: Path, method: str, dataset: str = "fashion-mnist", regularizers: dict | None = None,
              iterations: int = 6, seed: int = 0) -> None:
    """10 classes x 2 images of 1x8x8 with known metadata."""
    generator = torch.Generator().manual_seed(seed)
    metadata = SetMetadata(dataset=dataset, mean=(0.5,), std=(0.25,), classes=CLASSES, method=method, ipc=2,
                           seed=seed, regularizers=regularizers or {}, iterations=iterations)
    distilled = DistilledSet(images=torch.randn(20, 1, 8, 8, generator=generator),
                             labels=torch.arange(10).repeat_interleave(2), metadata=metadata)
    directory.mkdir(parents=True, exist_ok=True)
    save_set(distilled, directory / "set.safetensors", grid=False)


def write_evaluation(
    directory: Path, accuracies: list[float], mean: float, std: float, model: str = "ConvNet-3"
) -> None:
    result = {"model": model, "dataset": "fashion-mnist", "accuracies": accuracies, "mean": mean, "std": std,
              "runs": len(accuracies), "epochs": 300, "labels": "hard"}
    (directory / "evaluation.json").write_text(json.dumps({"set": str(directory / "set.safetensors"),
                                                           "dataset": "fashion-mnist", "results": [result]}))


def write_run(directory: Path, lines: list[dict], method: str = "dm", dataset: str = "fashion-mnist",
              regularizers: dict | None = None) -> Path:
    write_set(directory, method, dataset, regularizers, iterations=len(lines))
    config = {"method": method, "ipc": 2, "dataset": dataset, "cmi_weight": (regularizers or {}).get("cmi"),
              "iterations": len(lines), "seed": 0, "resolved_weights": regularizers or {}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, **line}) + "\n"
                                                     for i, line in enumerate(lines)))
    return directory


def write_baseline(directory: Path, dataset: str = "fashion-mnist", evaluated: bool = True) -> Path:
    write_set(directory, "random", dataset, iterations=0, seed=3)
    if evaluated:
        write_evaluation(directory, [69.5, 71.0], mean=70.25, std=0.75)
    return directory


CMI_LINES = [
    {"loss/dm": 4.0, "loss/cmi": 1.9, "loss/total": 4.19, "monitor/cmi": 2.0},
    {"loss/dm": 3.0, "loss/cmi": 1.7, "loss/total": 3.17},
    {"loss/dm": 2.5, "loss/cmi": 1.4, "loss/total": 2.64, "monitor/cmi": 1.5, "eval/accuracy": 60.0},
    {"loss/dm": 2.0, "loss/cmi": 1.2, "loss/total": 2.12},
    {"loss/dm": 1.8, "loss/cmi": 0.9, "loss/total": 1.89, "monitor/cmi": 1.25},
    {"loss/dm": 1.7, "loss/cmi": 0.8, "loss/total": 1.78, "eval/accuracy": 75.0},
]
PLAIN_LINES = [
    {"loss/dm": 4.0, "loss/total": 4.0, "monitor/cmi": 3.0},
    {"loss/dm": 3.1, "loss/total": 3.1},
    {"loss/dm": 2.6, "loss/total": 2.6, "eval/accuracy": 55.0},
    {"loss/dm": 2.2, "loss/total": 2.2, "monitor/cmi": 2.5},
    {"loss/dm": 2.0, "loss/total": 2.0},
    {"loss/dm": 1.9, "loss/total": 1.9, "eval/accuracy": 70.0},
]


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path, Path]:
    with_cmi = write_run(tmp_path / "dm-cmi", CMI_LINES, regularizers={"cmi": 0.1})
    write_evaluation(with_cmi, [80.0, 82.0], mean=81.0, std=1.0)
    without = write_run(tmp_path / "dm", PLAIN_LINES)
    write_evaluation(without, [78.0, 79.0], mean=78.5, std=0.5)
    return with_cmi, without, write_baseline(tmp_path / "random")


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The first Markdown table's data rows, keyed by run name, as lists of cells."""
    first_table = markdown.split("\n\n")[1]  # the title, then the runs' table
    lines = [line for line in first_table.splitlines() if line.startswith("| ")][1:]  # drop the header
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 200 and image.height >= 200


def test_report_figures_table_gain_and_final_cmi(tmp_path, two_runs):
    with_cmi, without, baseline = two_runs
    runs, base = load_runs([with_cmi, without], baseline)
    out = tmp_path / "report"
    summary = write_report(runs, out, base)

    for name in FIGURES.values():
        assert_png(out / name)
    rows = table_rows((out / "summary.md").read_text())
    assert list(rows) == ["dm-cmi", "dm", "random"]  # one row per run plus the baseline row
    cmi_row, plain_row, base_row = rows["dm-cmi"], rows["dm"], rows["random"]
    assert cmi_row[1:6] == ["dm", "2", "20", "cmi=0.1", "6"]
    assert plain_row[4] == "-" and base_row[1] == "random"
    assert cmi_row[6] == "81.00 +- 1.00 % (ConvNet-3, 2 runs)"
    assert plain_row[6] == "78.50 +- 0.50 % (ConvNet-3, 2 runs)"
    assert base_row[6] == "70.25 +- 0.75 % (ConvNet-3, 2 runs)"
    assert cmi_row[7] == "1.25"  # last monitor/cmi, not the last loss/cmi (0.8)
    assert plain_row[7] == "2.5" and base_row[7] == "-"
    assert cmi_row[8] == "+10.75" and plain_row[8] == "+8.25" and base_row[8] == "-"
    for name in FIGURES.values():
        assert f"]({name})" in (out / "summary.md").read_text()

    stored = json.loads((out / "summary.json").read_text())
    assert stored["figures"] == summary["figures"] == FIGURES
    by_run = {row["run"]: row for row in stored["rows"]}
    assert by_run["dm-cmi"]["gain"] == pytest.approx(10.75)
    assert by_run["dm"]["gain"] == pytest.approx(8.25)
    assert by_run["dm-cmi"]["final_cmi"] == 1.25 and by_run["dm-cmi"]["final_cmi_source"] == "monitor/cmi"
    assert by_run["random"]["reference"] and by_run["random"]["accuracy"]["mean"] == 70.25
    assert by_run["dm-cmi"]["regularizers"] == {"cmi": 0.1}


def test_loss_cmi_when_not_monitored_and_unevaluated_run(tmp_path):
    lines = [{"loss/dm": 2.0, "loss/cmi": 0.7, "loss/total": 2.07}, {"loss/dm": 1.0, "loss/total": 1.0},
             {"loss/dm": 0.9, "loss/cmi": 0.4, "loss/total": 0.94}, {"loss/dm": 0.8, "loss/total": 0.8}]
    run = write_run(tmp_path / "dc-cmi", lines, method="dc", regularizers={"cmi": 0.05})
    baseline = write_baseline(tmp_path / "random")  # a random run given positionally is the reference
    runs, base = load_runs([run, baseline])
    summary = write_report(runs, tmp_path / "out", base)
    rows = table_rows((tmp_path / "out" / "summary.md").read_text())
    assert rows["dc-cmi"][7] == "0.4"  # last loss/cmi, skipping lines that lack it
    assert rows["dc-cmi"][6] == "not evaluated" and rows["dc-cmi"][8] == "-"
    assert summary["reference"] == "random"


def test_no_cmi_and_no_accuracy_logged_still_draws_every_figure(tmp_path):
    run = write_run(tmp_path / "dm", [{"loss/dm": 1.0, "loss/total": 1.0}, {"loss/dm": 0.5, "loss/total": 0.5}])
    write_report(load_runs([run])[0], tmp_path / "out")
    for name in FIGURES.values():
        assert_png(tmp_path / "out" / name)
    rows = table_rows((tmp_path / "out" / "summary.md").read_text())
    assert rows["dm"][6:] == ["not evaluated", "-", "-"]


def test_mixed_datasets_refused_and_nothing_written(tmp_path):
    fashion = write_run(tmp_path / "a", PLAIN_LINES)
    cifar = write_run(tmp_path / "b", PLAIN_LINES, dataset="cifar10")
    out = tmp_path / "report"
    parser = argparse.ArgumentParser()
    configure_report_parser(parser)
    with pytest.raises(UserInputError) as caught:
        command_report(parser.parse_args([str(fashion), str(cifar), "--out", str(out)]))
    message = str(caught.value)
    assert "fashion-mnist" in message and "cifar10" in message and "\n" not in message
    assert not out.exists()
    with pytest.raises(UserInputError, match="cifar10"):  # the baseline's dataset counts too
        load_runs([fashion], write_baseline(tmp_path / "base", dataset="cifar10"))


def test_missing_or_incomplete_directories_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserInputError, match="nowhere.*does not exist"):
        load_run(missing)
    run = write_run(tmp_path / "unfinished", PLAIN_LINES)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(UserInputError) as caught:
        load_run(run)
    assert str(run) in str(caught.value) and "metrics.jsonl" in str(caught.value) and "--resume" in str(caught.value)
    no_set = tmp_path / "empty"
    no_set.mkdir()
    with pytest.raises(UserInputError, match="set.safetensors"):
        load_run(no_set)
    # a baseline needs neither config.yaml nor metrics.jsonl
    assert load_run(write_baseline(tmp_path / "random", evaluated=False)).metrics == []


def test_bad_metrics_line_named_by_number(tmp_path):
    run = write_run(tmp_path / "dm", PLAIN_LINES)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 6, "loss/dm": \n')
    with pytest.raises(UserInputError, match="line 7"):
        load_run(run)


def test_duplicate_names_and_non_random_baseline(tmp_path):
    first = write_run(tmp_path / "seed0" / "dm", PLAIN_LINES)
    second = write_run(tmp_path / "seed1" / "dm", PLAIN_LINES)
    runs, _ = load_runs([first, second])
    assert [run.name for run in runs] == ["seed0/dm", "seed1/dm"]
    with pytest.raises(UserInputError, match="not a random real subset"):
        load_runs([first], second)


def test_command_report_through_its_parser(tmp_path, two_runs, capsys):
    with_cmi, without, baseline = two_runs
    parser = argparse.ArgumentParser()
    configure_report_parser(parser)
    out = tmp_path / "cli-report"
    args = parser.parse_args([str(with_cmi), str(without), "--out", str(out), "--baseline", str(baseline), "--json"])
    assert command_report(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "summary.json").read_text())
    assert [row["run"] for row in printed["rows"]] == ["dm-cmi", "dm", "random"]
    with pytest.raises(SystemExit):  # --out is required
        parser.parse_args([str(with_cmi)])


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_constants_are_refused_in_one_line(tmp_path, two_runs, constant):
    """Python's json reads NaN/Infinity by default; no run writes them and other tools do not read them."""
    with_cmi, without, baseline = two_runs
    evaluation = with_cmi / "evaluation.json"
    evaluation.write_text(evaluation.read_text().replace('"mean": 81.0', f'"mean": {constant}'))
    with pytest.raises(UserInputError, match=f"non-standard JSON constant {constant}") as error:
        load_runs([with_cmi])
    assert "\n" not in str(error.value)
    metrics = without / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"loss/dm": 3.1', f'"loss/dm": {constant}'))
    with pytest.raises(UserInputError, match=f"line 2: holds the non-standard JSON constant {constant}"):
        load_runs([without])
