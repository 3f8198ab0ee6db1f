"""A result made of two files (an artefact and its PNG grid; evaluation.json and its CSV) is replaced whole or
not at all: a failure while writing the second file keeps the old pair, leaves no new file and no temporary,
and the error names the file that failed."""

from __future__ import annotations

import pytest
import torch

from infodistill import artefact, evaluate
from infodistill.artefact import DistilledSet, SetMetadata, load_set, save_set
from infodistill.errors import UserInputError
from infodistill.evaluate import EvalResult, write_evaluation
from infodistill.files import atomic_paths


def _set(seed: int) -> DistilledSet:
    metadata = SetMetadata(dataset="fashion-mnist", mean=(0.5,), std=(0.25,), classes=tuple("abcdefghij"),
                           method="random", ipc=1, seed=seed)
    images = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return DistilledSet(images=images, labels=torch.arange(10), metadata=metadata)


def test_atomic_paths_renames_all_or_none(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("old a")
    second.write_text("old b")
    with pytest.raises(RuntimeError):
        with atomic_paths(first, second) as (a, b):
            a.write_text("new a")
            raise RuntimeError("the second file could not be written")
    assert (first.read_text(), second.read_text()) == ("old a", "old b")
    with atomic_paths(first, second) as (a, b):
        a.write_text("new a")
        b.write_text("new b")
    assert (first.read_text(), second.read_text()) == ("new a", "new b")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporaries left


def test_a_failing_png_keeps_the_old_artefact_and_its_png(tmp_path, monkeypatch):
    path = tmp_path / "set.safetensors"
    save_set(_set(0), path)
    old_png = (tmp_path / "set.png").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artefact, "save_image", full_disk)
    with pytest.raises(UserInputError, match=r"cannot write '.*set\.png': No space left"):
        save_set(_set(1), path)
    assert torch.equal(load_set(path).images, _set(0).images)  # the old set, not the new one
    assert (tmp_path / "set.png").read_bytes() == old_png
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.png", "set.safetensors"]


def test_a_failing_csv_keeps_the_old_evaluation_pair(tmp_path, monkeypatch):
    result = EvalResult(model="ConvNet-3", dataset="fashion-mnist", accuracies=[80.0, 82.0], epochs=2, lr=0.01,
                        labels="hard", augmentation="dsa", train_size=10, test_size=10, batched=False, seconds=1.0)
    json_path, csv_path = write_evaluation(tmp_path / "evaluation.json", "set.safetensors", [result])
    old = (json_path.read_text(), csv_path.read_text())

    class FailingWriter:
        def __init__(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate.csv, "writer", FailingWriter)
    with pytest.raises(UserInputError, match=r"cannot write '.*evaluation\.csv': No space left"):
        write_evaluation(tmp_path / "evaluation.json", "other.safetensors", [result])
    assert (json_path.read_text(), csv_path.read_text()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.csv", "evaluation.json"]
