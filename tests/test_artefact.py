"""The artefact: exact round trip, PNG grid with one row per class, atomic writes, clear refusals."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import infodistill.artefact as artefact_module
from infodistill.artefact import DistilledSet, SetMetadata, grid_path_for, load_set, save_set
from infodistill.errors import UserInputError

MEAN, STD = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)


def make_set(classes=3, ipc=2, size=(5, 7), soft=False, lr=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(ipc)[torch.randperm(classes * ipc, generator=generator)]
    images = torch.randn(classes * ipc, 3, *size, generator=generator)
    metadata = SetMetadata(dataset="toy", mean=MEAN, std=STD, classes=tuple(f"c{i}" for i in range(classes)),
                           method="random", ipc=ipc, seed=seed, regularizers={"cmi": 2000.0}, iterations=12)
    soft_labels = torch.softmax(torch.randn(classes * ipc, classes, generator=generator), 1) if soft else None
    return DistilledSet(images=images, labels=labels, metadata=metadata, soft_labels=soft_labels,
                        lr=None if lr is None else torch.tensor([lr]))


def test_round_trip_is_exact(tmp_path):
    original = make_set(soft=True, lr=0.0123)
    path = save_set(original, tmp_path / "set.safetensors")
    loaded = load_set(path)
    assert torch.equal(loaded.images, original.images)
    assert torch.equal(loaded.labels, original.labels)
    assert torch.equal(loaded.soft_labels, original.soft_labels)
    assert loaded.lr.item() == pytest.approx(0.0123)
    assert loaded.metadata == original.metadata
    assert loaded.metadata.regularizers == {"cmi": 2000.0}


def test_grid_has_one_row_per_class_with_that_class_images(tmp_path):
    classes, ipc, (height, width) = 3, 2, (5, 7)
    distilled = make_set(classes, ipc, (height, width))
    save_set(distilled, tmp_path / "set.safetensors")
    grid = np.asarray(Image.open(grid_path_for(tmp_path / "set.safetensors")).convert("RGB"))
    assert grid.shape == (classes * (height + 1) + 1, ipc * (width + 1) + 1, 3)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for label in range(classes):
        members = [i for i in range(len(distilled.labels)) if distilled.labels[i] == label]  # in stored order
        for column, index in enumerate(members):
            expected = ((distilled.images[index] * std + mean).clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
            top, left = 1 + label * (height + 1), 1 + column * (width + 1)
            tile = grid[top:top + height, left:left + width].transpose(2, 0, 1)
            assert np.array_equal(tile, expected.numpy())


def test_missing_truncated_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_set(tmp_path / "absent.safetensors")
    path = save_set(make_set(), tmp_path / "set.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserInputError, match="truncated"):
        load_set(truncated)
    foreign = tmp_path / "foreign.safetensors"
    torch.save({"images": torch.zeros(1)}, foreign)  # a pickle: must be refused, never unpickled
    with pytest.raises(UserInputError, match="not a readable safetensors"):
        load_set(foreign)


def test_inconsistent_contents_are_refused(tmp_path):
    bad_labels = make_set()
    bad_labels.labels = bad_labels.labels + 5
    with pytest.raises(UserInputError, match="labels span"):
        save_set(bad_labels, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    from safetensors.torch import save_file
    save_file({"images": torch.zeros(2, 3, 4, 4)}, str(tmp_path / "nolabels.safetensors"))
    with pytest.raises(UserInputError, match="lacks the tensor 'labels'"):
        load_set(tmp_path / "nolabels.safetensors")


def test_failed_write_keeps_the_previous_artefact_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_set(make_set(seed=1), tmp_path / "set.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artefact_module, "save_file", crash)
    with pytest.raises(UserInputError, match="cannot write"):
        save_set(make_set(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["set.png", "set.safetensors"]
