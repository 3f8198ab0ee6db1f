"""Cross-architecture evaluation: several models on one set, each equal to that model evaluated alone;
the table, evaluation.json and its CSV; names and flags refused before any training."""

import csv
import dataclasses
import json

import pytest

from infodistill import evaluate as evaluate_module
from infodistill.cli import main
from infodistill.errors import UserInputError
from infodistill.evaluate import (
    EvalResult,
    evaluate_models,
    evaluate_set,
    format_results_table,
    random_subset,
    write_evaluation,
)
from infodistill.training import EvalConfig

MODELS = ["ConvNet-3-8", "ConvNet-2-8"]
BUDGET = ["--runs", "2", "--epochs", "1"]
CONFIG = EvalConfig(runs=2, epochs=1)


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def set_path(striped_root, tmp_path, capsys):
    path = tmp_path / "set.safetensors"
    assert main(["baseline", "--ipc", "2", "--seed", "1", "--out", str(path)]) == 0
    capsys.readouterr()
    return path


@pytest.fixture
def alone(set_path, real):
    """The independent reference: each model scored on its own by evaluate_set with the same settings."""
    from infodistill.artefact import load_set

    distilled = load_set(set_path)
    return [evaluate_set(distilled, real, dataclasses.replace(CONFIG, model=name), progress=False) for name in MODELS]


def fake_result(model, accuracies):
    return EvalResult(model=model, dataset="fashion-mnist", accuracies=accuracies, epochs=1, lr=0.01, labels="hard",
                      augmentation="dsa", train_size=20, test_size=100, batched=False, seconds=0.1)


def test_evaluate_models_equals_each_model_alone_in_order(real):
    subset = random_subset(real, 2, seed=4)
    results = evaluate_models(subset, real, CONFIG, MODELS, progress=False)
    assert [result.model for result in results] == MODELS
    for name, result in zip(MODELS, results):
        reference = evaluate_set(subset, real, dataclasses.replace(CONFIG, model=name), progress=False)
        assert result.accuracies == reference.accuracies and result.seeds == reference.seeds
        assert len(result.accuracies) == 2 and result.epochs == 1


def test_cli_table_json_and_csv_match_the_models_alone(set_path, alone, tmp_path, capsys):
    out = tmp_path / "results" / "evaluation.json"
    code, stdout, stderr = run(capsys, "evaluate", set_path, "--models", ",".join(MODELS), *BUDGET, "--out", out)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    table, wrote = lines[:-1], lines[-1]
    assert len(table) == 2 + len(MODELS) and table[0].startswith("model") and set(table[1]) <= {"-", "+"}
    for line, reference in zip(table[2:], alone):
        cells = [cell.strip() for cell in line.split("|")]
        assert cells[0] == reference.model and cells[1] == f"{reference.mean:.2f} +- {reference.std:.2f}"
        assert cells[2] == "2" and cells[3] == ", ".join(f"{a:.2f}" for a in reference.accuracies)
    assert str(out) in wrote and str(out.with_suffix(".csv")) in wrote

    payload = json.loads(out.read_text())
    assert payload["set"] == str(set_path) and payload["dataset"] == "fashion-mnist"
    assert [entry["model"] for entry in payload["results"]] == MODELS
    for entry, reference in zip(payload["results"], alone):
        expected = reference.to_dict()
        del entry["seconds"], expected["seconds"]
        assert entry == expected

    with out.with_suffix(".csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["model", "mean", "std", "runs", "epochs", "labels", "recipe", "accuracies"]
    assert [row["model"] for row in rows] == MODELS
    for row, reference in zip(rows, alone):
        assert float(row["mean"]) == reference.mean and float(row["std"]) == reference.std
        assert int(row["runs"]) == 2 and int(row["epochs"]) == 1 and row["labels"] == "hard"
        assert row["recipe"] == "protocol"
        assert [float(value) for value in row["accuracies"].split(";")] == reference.accuracies
    assert sorted(path.name for path in out.parent.iterdir()) == ["evaluation.csv", "evaluation.json"]


def test_cli_json_prints_the_file_payload_and_single_model_keeps_its_shape(set_path, alone, tmp_path, capsys):
    out = tmp_path / "many.json"
    code, stdout, _ = run(capsys, "evaluate", set_path, "--models", ",".join(MODELS), *BUDGET, "--out", out, "--json")
    assert code == 0 and json.loads(stdout) == json.loads(out.read_text())

    single = tmp_path / "single.json"
    code, stdout, _ = run(capsys, "evaluate", set_path, "--model", MODELS[1], *BUDGET, "--out", single, "--json")
    assert code == 0
    printed = json.loads(stdout)
    assert printed["model"] == MODELS[1] and printed["accuracies"] == alone[1].accuracies  # the old shape
    written = json.loads(single.read_text())
    assert [entry["accuracies"] for entry in written["results"]] == [alone[1].accuracies]
    assert single.with_suffix(".csv").is_file()


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was trained before all names were checked")

    monkeypatch.setattr(evaluate_module, "evaluate_set", refuse)
    monkeypatch.setattr("infodistill.cli.commands.evaluate_set", refuse)


@pytest.mark.parametrize("models, fragment", [
    ("ConvNet-3-8,Frobnet-7", "Frobnet-7"),
    ("ConvNet-3-8,ConvNet-8-8", "28x28"),   # parses, but too deep for the images
    ("ConvNet-3-8,convnet-3-8", "twice"),
    ("ConvNet-3-8,,AlexNet", "empty"),
])
def test_bad_model_list_exits_2_before_training_and_writes_nothing(set_path, tmp_path, capsys, no_training,
                                                                   models, fragment):
    out = tmp_path / "out" / "evaluation.json"
    code, _, stderr = run(capsys, "evaluate", set_path, "--models", models, *BUDGET, "--out", out)
    assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    if fragment == "Frobnet-7":
        assert "model names:" in stderr


def test_library_refuses_unknown_names_before_training(real, no_training):
    subset = random_subset(real, 1, seed=0)
    with pytest.raises(UserInputError, match="Frobnet"):
        evaluate_models(subset, real, CONFIG, ["ConvNet-2-8", "Frobnet"], progress=False)
    with pytest.raises(UserInputError, match="list of model names"):
        evaluate_models(subset, real, CONFIG, "ConvNet-2-8", progress=False)


@pytest.mark.parametrize("argv", [
    ["--model", "ConvNet-2-8", "--models", "ConvNet-2-8,ConvNet-3-8"],
    ["--models", "ConvNet-2-8", "--out", "results.txt"],
    ["--model", "ConvNet-2-8", "--out", "results"],
])
def test_flag_conflicts_exit_2_with_one_line(argv, tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as caught:
        main(["evaluate", str(tmp_path / "set.safetensors"), *argv])
    assert caught.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_table_and_writer_helpers(tmp_path):
    results = [fake_result("AlexNet", [50.0, 60.0]), fake_result("ResNet18-bn", [70.25])]
    lines = format_results_table(results).splitlines()
    assert len(lines) == 4 and [line.split("|")[0].strip() for line in lines[2:]] == ["AlexNet", "ResNet18-bn"]
    assert "55.00 +- 5.00" in lines[2] and lines[2].endswith("50.00, 60.00")
    assert len({line.index("|") for line in lines if "|" in line}) == 1  # columns line up
    json_path, csv_path = write_evaluation(tmp_path / "e.json", "s.safetensors", results)
    assert csv_path == tmp_path / "e.csv" and json.loads(json_path.read_text())["results"][1]["runs"] == 1
    with pytest.raises(UserInputError, match=r"\.json"):
        write_evaluation(tmp_path / "e.txt", "s.safetensors", results)
    with pytest.raises(UserInputError, match="no evaluation results"):
        write_evaluation(tmp_path / "f.json", "s.safetensors", [])
    assert not (tmp_path / "f.json").exists()
