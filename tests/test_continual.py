"""Class-incremental continual learning: class orders and steps, the per-step data, the bookkeeping of a tiny
run (seen classes, memory sizes and labels, test images), resumption, bad input, the outputs and the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from infodistill.artefact import load_set
from infodistill.cli.parsers import configure_continual_parser
from infodistill.errors import UserInputError
from infodistill.experiments import continual
from infodistill.experiments.continual import (
    FIGURE_NAME,
    JSON_NAME,
    SETTINGS_NAME,
    ContinualConfig,
    class_orders,
    command_continual,
    restrict_classes,
    run_continual,
    split_steps,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ContinualConfig(method="dm", ipc=1, iterations=2, epochs=2, steps=5, orders=2, model="ConvNet-3-8",
                       eval_model="ConvNet-3-8")


def band_class(images: torch.Tensor) -> torch.Tensor:
    """The class of each striped fixture image (N x 1 x 28 x 28, pixel units): the brightest 3-row band 2c+2..2c+4."""
    rows = images.mean(dim=(1, 3))
    scores = torch.stack([rows[:, 2 * c + 2:2 * c + 5].mean(dim=1) for c in range(10)], dim=1)
    return scores.argmax(dim=1)


def records(payload: dict) -> list:
    """Every step record of a run, without its wall time."""
    return [[{key: value for key, value in record.items() if key != "seconds"} for record in order["steps"]]
            for order in payload["orders"]]


def test_class_orders_are_seeded_permutations():
    orders = class_orders(10, 3, seed=0)
    assert len(orders) == 3
    for order in orders:
        assert sorted(order) == list(range(10))
    assert orders == class_orders(10, 3, seed=0)
    assert len({tuple(order) for order in orders}) == 3
    assert class_orders(10, 3, seed=1) != orders
    assert class_orders(10, 2, seed=0) == orders[:2]  # order o depends on (seed, o) only
    with pytest.raises(UserInputError, match="orders must be a positive integer, got 0"):
        class_orders(10, 0, seed=0)


def test_split_steps_partitions_in_order():
    order = [4, 1, 9, 0, 3, 7, 2, 8, 6, 5]
    assert split_steps(order, 5) == [[4, 1], [9, 0], [3, 7], [2, 8], [6, 5]]
    assert split_steps(order, 1) == [order]
    assert split_steps(order, 10) == [[c] for c in order]
    for steps in (3, 0, 11):
        with pytest.raises(UserInputError, match=f"steps {steps} .*allowed are: 1, 2, 5, 10"):
            split_steps(order, steps)


def test_restrict_classes_keeps_the_step_classes_relabelled(real):
    step = restrict_classes(real, [7, 2])
    assert step.info.name == "fashion-mnist[7,2]"
    assert step.info.num_classes == 2
    assert step.info.class_names == (real.info.class_names[7], real.info.class_names[2])
    assert (step.info.mean, step.info.std) == (real.info.mean, real.info.std)
    for images, labels, original_images, original_labels, per_class in (
            (step.train_images, step.train_labels, real.train_images, real.train_labels, 30),
            (step.test_images, step.test_labels, real.test_images, real.test_labels, 10)):
        assert torch.bincount(labels, minlength=2).tolist() == [per_class, per_class]
        assert torch.equal(images[labels == 0], original_images[original_labels == 7])
        assert torch.equal(images[labels == 1], original_images[original_labels == 2])
    assert band_class(step.train_images.float()).tolist() == [[7, 2][label] for label in step.train_labels.tolist()]
    with pytest.raises(UserInputError, match="out of range"):
        restrict_classes(real, [3, 10])


def test_tiny_run_bookkeeping_and_outputs(real, tmp_path):
    out = tmp_path / "run"
    payload = run_continual(TINY, out, real=real, progress=False)
    k = 2
    assert payload["class_orders"] == class_orders(10, 2, seed=0)
    for order in payload["orders"]:
        seen: list[int] = []
        for step, record in enumerate(order["steps"]):
            assert record["classes"] == order["classes"][step * k:(step + 1) * k]
            seen += record["classes"]
            assert record["num_seen"] == (step + 1) * k
            assert record["seen_classes"] == seen
            assert record["distilled_memory_size"] == record["random_memory_size"] == TINY.ipc * (step + 1) * k
            assert record["distilled_memory_labels"] == record["random_memory_labels"] == sorted(seen)
            assert record["test_images"] == 10 * len(seen)  # the test images of the seen classes only
            for key in ("distilled_accuracy", "random_accuracy"):
                assert 0 <= record[key] <= 100
            # the saved step sets carry the step's labels 0..k-1, in the step's class order
            step_dir = out / f"order-{order['order']}" / f"step-{step}"
            for name in ("set.safetensors", "random.safetensors"):
                step_set = load_set(step_dir / name)
                assert step_set.metadata.dataset == f"fashion-mnist[{','.join(map(str, record['classes']))}]"
                assert sorted(step_set.labels.tolist()) == list(range(k))
                if name == "random.safetensors":  # real images: their band shows the global class
                    global_labels = torch.tensor(record["classes"])[step_set.labels]
                    assert torch.equal(band_class(step_set.denormalised()), global_labels)
    for step, entry in enumerate(payload["summary"]):
        assert entry["num_seen"] == (step + 1) * k
        assert entry["memory_size"] == TINY.ipc * (step + 1) * k
        for key in ("distilled", "random"):
            values = [order["steps"][step][f"{key}_accuracy"] for order in payload["orders"]]
            assert entry[key]["per_order"] == values
            assert entry[key]["mean"] == pytest.approx(np.mean(values))
            assert entry[key]["std"] == pytest.approx(np.std(values))  # population std
    assert json.loads((out / JSON_NAME).read_text()) == payload
    assert json.loads((out / SETTINGS_NAME).read_text()) == dataclasses.asdict(TINY)
    assert (out / FIGURE_NAME).read_bytes().startswith(PNG_SIGNATURE)


def test_restart_skips_finished_steps_and_gives_the_same_numbers(real, tmp_path, monkeypatch):
    config = dataclasses.replace(TINY, steps=2)
    reference = run_continual(config, tmp_path / "reference", real=real, progress=False)

    original = continual.distill
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:  # interrupted while distilling order 1's second step
            raise KeyboardInterrupt
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(continual, "distill", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_continual(config, out, real=real, progress=False)
    assert not (out / JSON_NAME).exists()

    def counted(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(continual, "distill", counted)
    resumed = run_continual(config, out, real=real, progress=False)
    assert [path.relative_to(out).as_posix() for path in calls] == ["order-1/step-1"]
    # the last step was trained on the memory rebuilt from the saved sets of the earlier one
    assert records(resumed) == records(reference)
    assert resumed["summary"] == reference["summary"]

    calls.clear()
    again = run_continual(config, out, real=real, progress=False)
    assert calls == []
    assert records(again) == records(reference)


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": 3}, "steps 3 does not split the 10 classes .*allowed are: 1, 2, 5, 10"),
    ({"steps": 11}, "steps 11"),
    ({"orders": 0}, "orders must be a positive integer, got 0"),
    ({"ipc": 0}, "ipc must be a positive integer, got 0"),
    ({"ipc": 31}, "ipc 31 is above the smallest class size 30"),
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"iterations": 0}, "iterations must be a positive integer, got 0"),
    ({"cmi_weight": -1.0}, "cmi_weight must be a number >= 0"),
    ({"method": "mtt"}, "method 'mtt' needs expert trajectories.*choose one of: dc, dm, dsa, idc"),
])
def test_bad_input_is_refused_naming_the_value(real, tmp_path, changes, message):
    with pytest.raises(UserInputError, match=message):
        run_continual(dataclasses.replace(TINY, **changes), tmp_path / "run", real=real, progress=False)
    assert not (tmp_path / "run" / SETTINGS_NAME).exists()


def test_restart_with_other_settings_is_refused(real, tmp_path, monkeypatch):
    config = dataclasses.replace(TINY, steps=1, orders=1)
    run_continual(config, tmp_path / "run", real=real, progress=False)
    monkeypatch.setattr(continual, "distill", lambda *args, **kwargs: pytest.fail("distilled on a refused restart"))
    with pytest.raises(UserInputError, match="ipc was 1 in the first run but is 2 now"):
        run_continual(dataclasses.replace(config, ipc=2), tmp_path / "run", real=real, progress=False)
    with pytest.raises(UserInputError, match="seed was 0 in the first run but is 3 now"):
        run_continual(dataclasses.replace(config, seed=3), tmp_path / "run", real=real, progress=False)
    run_continual(dataclasses.replace(config, device="cpu", data_root="elsewhere"), tmp_path / "run", real=real,
                  progress=False)  # where the data lies and the device do not change what is computed


def test_cmi_trains_a_proxy_pool_on_each_step_only(real, tmp_path, monkeypatch):
    trained = []
    original = continual.train_proxy_pool

    def recording(step_real, out_dir, **kwargs):
        trained.append((step_real.info.name, sorted(set(step_real.train_labels.tolist()))))
        return original(step_real, out_dir, **kwargs)

    monkeypatch.setattr(continual, "train_proxy_pool", recording)
    config = dataclasses.replace(TINY, ipc=2, steps=2, orders=1, cmi_weight=0.5, proxy_epochs=1, proxy_count=1)
    payload = run_continual(config, tmp_path / "run", real=real, progress=False)
    classes = payload["class_orders"][0]
    assert trained == [(f"fashion-mnist[{','.join(map(str, classes[:5]))}]", [0, 1, 2, 3, 4]),
                       (f"fashion-mnist[{','.join(map(str, classes[5:]))}]", [0, 1, 2, 3, 4])]
    for step in range(2):
        assert payload["orders"][0]["steps"][step]["regularizer_weights"] == {"cmi": 0.5}
        assert (tmp_path / "run" / "order-0" / f"step-{step}" / "proxies" / "proxy-0000.safetensors").is_file()
    assert payload["label"] == "dm + CMI 0.5"


def test_command_prints_the_table_and_json(tmp_path, striped_root, capsys):
    parser = argparse.ArgumentParser()
    configure_continual_parser(parser)
    flags = ["--out", str(tmp_path / "run"), "--method", "dm", "--ipc", "1", "--iterations", "2", "--epochs", "2",
             "--steps", "2", "--orders", "2", "--model", "ConvNet-3-8", "--eval-model", "ConvNet-3-8", "--quiet"]
    assert command_continual(parser.parse_args(flags)) == 0
    lines = capsys.readouterr().out.splitlines()
    payload = json.loads((tmp_path / "run" / JSON_NAME).read_text())
    rows = [line.split() for line in lines if line.strip() and line.split()[0] in ("1", "2")]
    assert [row[:3] for row in rows] == [["1", "5", "5"], ["2", "10", "10"]]
    for row, entry in zip(rows, payload["summary"]):
        assert float(row[3]) == pytest.approx(entry["distilled"]["mean"], abs=0.01)
        assert float(row[8]) == pytest.approx(entry["random"]["std"], abs=0.01)
    assert command_continual(parser.parse_args(flags + ["--json"])) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"] == payload["summary"]
    with pytest.raises(UserInputError, match="cmi_weight must be a number >= 0 or 'auto', got 'lots'"):
        command_continual(parser.parse_args(flags + ["--cmi-weight", "lots"]))
