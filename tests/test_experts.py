"""Expert trajectories (MTT) and ZCA whitening: what is stored, top-up builds, load checks, the command."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infodistill.cli import main
from infodistill.data import WhitenedData, ZCAWhitening, load_dataset, whiten
from infodistill.errors import UserInputError
from infodistill.experts import ExpertMetadata, ExpertTrajectories, train_experts
from infodistill.models import build_model
from infodistill.seeds import run_seeds
from reference_training import sgd_reference

MODEL = "ConvNet-1-4"
SETTINGS = {"model": MODEL, "epochs": 2, "lr": 0.02, "batch_size": 64, "augment": "dsa", "seed": 3, "progress": False}


def flat(model: torch.nn.Module) -> torch.Tensor:
    """Independent flattening: every parameter, in named_parameters() order."""
    return torch.cat([parameter.detach().flatten() for _, parameter in model.named_parameters()])


def trajectory(path) -> torch.Tensor:
    tensors = load_file(str(path))
    assert list(tensors) == ["trajectory"]
    return tensors["trajectory"]


def metadata_strings(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_stored_rows_are_the_initial_weights_and_the_weights_of_the_mtt_recipe(real, tmp_path):
    records = train_experts(real, tmp_path / "experts", count=2, **SETTINGS)
    assert [record.index for record in records] == [0, 1]
    assert [record.seed for record in records] == run_seeds(3, 2)
    assert sorted(path.name for path in (tmp_path / "experts").iterdir()) == [
        "expert-0000.safetensors", "expert-0001.safetensors"]
    train_images, train_labels = real.train_tensors()
    for record in records:
        rows = trajectory(record.path)
        initial = build_model(MODEL, 1, 10, (28, 28), seed=record.seed)
        assert rows.shape == (3, flat(initial).numel()) and rows.dtype == torch.float32
        assert torch.equal(rows[0], flat(initial))
        # independent reference: MTT's recipe as a plain SGD loop (tests/reference_training.py)
        reference = sgd_reference(MODEL, train_images, train_labels, record.seed, epochs=2, lr=0.02, momentum=0.0,
                                  weight_decay=0.0, batch_size=64, dsa=True)
        assert torch.equal(rows[-1], flat(reference))
        assert not torch.equal(rows[1], rows[0]) and not torch.equal(rows[2], rows[1])
        strings = metadata_strings(record.path)
        assert strings["format"] == "infodistill-expert-v1" and strings["model"] == "ConvNet-1-4-in"
        assert (strings["epochs"], strings["batch_size"], strings["augment"]) == ("2", "64", "dsa")
        assert (float(strings["lr"]), float(strings["zca"]), int(strings["seed"])) == (0.02, 0.0, record.seed)
        assert float(strings["test_accuracy"]) == record.test_accuracy
        layout = [[name, list(parameter.shape)] for name, parameter in initial.named_parameters()]
        assert json.loads(strings["layout"]) == layout

    experts = ExpertTrajectories.load(tmp_path / "experts", real.info, model="convnet-1-4", zca=0.0)
    assert len(experts) == 2 and experts.trajectories.shape == (2, 3, rows.shape[1])
    assert (experts.model, experts.epochs, experts.lr, experts.zca) == ("ConvNet-1-4-in", 2, 0.02, 0.0)
    assert experts.layout == [(name, tuple(shape)) for name, shape in layout]
    assert [record.seed for record in experts.records] == [record.seed for record in records]
    assert torch.equal(experts.weights(1, 2), trajectory(records[1].path)[2])
    assert torch.equal(flat(experts.build_model(seed=records[0].seed)), experts.weights(0, 0))
    draws = [experts.sample_index(torch.Generator().manual_seed(4)) for _ in range(2)]
    assert draws[0] == draws[1] and draws[0] in (0, 1)
    with pytest.raises(UserInputError, match="epoch 3 is out of range"):
        experts.weights(0, 3)


def test_an_interrupted_build_ends_with_the_files_of_an_uninterrupted_one(real, tmp_path):
    first = train_experts(real, tmp_path / "continued", count=1, **SETTINGS)
    continued = train_experts(real, tmp_path / "continued", count=2, **SETTINGS)
    assert continued[0] == first[0] and [record.index for record in continued] == [0, 1]
    at_once = train_experts(real, tmp_path / "at-once", count=2, **SETTINGS)
    assert [record.seed for record in at_once] == [record.seed for record in continued]
    for left, right in zip(continued, at_once):
        assert torch.equal(trajectory(left.path), trajectory(right.path))
        assert metadata_strings(left.path) == metadata_strings(right.path)
    # Nothing more to train; a build with another recipe into the same directory is refused by field.
    assert train_experts(real, tmp_path / "at-once", count=2, **SETTINGS) == at_once
    with pytest.raises(UserInputError, match="already holds experts with lr 0.02 .*this build has lr 0.05"):
        train_experts(real, tmp_path / "at-once", count=3, **dict(SETTINGS, lr=0.05))


@pytest.fixture
def built(real, tmp_path):
    directory = tmp_path / "experts"
    train_experts(real, directory, count=2, **dict(SETTINGS, epochs=1, augment="none"))
    return directory


def test_load_refuses_other_data_model_zca_and_broken_files(real, built):
    other = dataclasses.replace(real.info, name="mnist")
    with pytest.raises(UserInputError, match="dataset is 'fashion-mnist' in expert-0000.safetensors, expected 'mnist'"):
        ExpertTrajectories.load(built, other)
    with pytest.raises(UserInputError, match="model is 'ConvNet-1-4-in' in expert-0000.*expected 'ConvNet-3-128-in'"):
        ExpertTrajectories.load(built, real.info, model="ConvNet-3")
    with pytest.raises(UserInputError, match="zca is 0.0 in expert-0000.safetensors, expected 0.1") as caught:
        ExpertTrajectories.load(built, real.info, zca=0.1)
    assert "\n" not in str(caught.value)

    victim = built / "expert-0001.safetensors"
    strings = metadata_strings(victim)
    rows = trajectory(victim)
    save_file({"trajectory": rows[:1].clone()}, str(victim), metadata=dict(strings, epochs="0"))
    with pytest.raises(UserInputError, match="disagree: epochs is 0 in expert-0001.safetensors but 1 in expert-0000"):
        ExpertTrajectories.load(built, real.info)
    save_file({"trajectory": rows}, str(victim), metadata=strings)
    assert len(ExpertTrajectories.load(built, real.info)) == 2
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(UserInputError, match="expert-0001.safetensors is not a readable safetensors file"):
        ExpertTrajectories.load(built, real.info)


def test_missing_directories_and_batch_norm_models_are_refused(real, tmp_path):
    with pytest.raises(UserInputError, match="does not exist; build them with 'infodistill experts --dataset"):
        ExpertTrajectories.load(tmp_path / "nowhere", real.info)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no expert-NNNN.safetensors files"):
        ExpertTrajectories.load(tmp_path / "empty", real.info)
    with pytest.raises(UserInputError, match="experts need a model without batch norm") as caught:
        train_experts(real, tmp_path / "bn", count=1, **dict(SETTINGS, model="ConvNet-1-4-bn"))
    assert "\n" not in str(caught.value) and not (tmp_path / "bn").exists()
    for bad, fragment in (({"epochs": 0}, "epochs must be a positive integer, got 0"),
                          ({"lr": -1.0}, "lr must be a positive finite number, got -1.0"),
                          ({"batch_size": 0}, "batch_size must be a positive integer"),
                          ({"seed": -2}, "seed must be a non-negative integer"),
                          ({"augment": "flip"}, "augment 'flip' is not one of: dsa, none"),
                          ({"zca": -0.1}, "zca must be a finite number >= 0")):
        with pytest.raises(UserInputError, match=fragment):
            train_experts(real, tmp_path / "bad", count=1, **dict(SETTINGS, **bad))
    with pytest.raises(UserInputError, match="count must be a positive integer, got 0"):
        train_experts(real, tmp_path / "bad", count=0, **SETTINGS)
    assert not (tmp_path / "bad").exists()


def test_experts_on_zca_whitened_data(real, tmp_path):
    records = train_experts(real, tmp_path / "zca", count=1, **dict(SETTINGS, epochs=1, zca=0.1))
    assert metadata_strings(records[0].path)["zca"] == "0.1"
    whitened = whiten(real, 0.1)
    reference = sgd_reference(MODEL, *whitened.train_tensors(), records[0].seed, epochs=1, lr=0.02, momentum=0.0,
                              weight_decay=0.0, batch_size=64, dsa=True)
    assert torch.equal(trajectory(records[0].path)[-1], flat(reference))
    assert ExpertTrajectories.load(tmp_path / "zca", real.info, zca=0.1).zca == 0.1
    with pytest.raises(UserInputError, match="zca is 0.1 in expert-0000.safetensors, expected 0.0"):
        ExpertTrajectories.load(tmp_path / "zca", real.info, zca=0.0)


def test_zca_whitening_matches_numpy_and_whitens_the_dominant_directions(real):
    epsilon = 1e-4
    train = real.train_tensors()[0]
    whitening = ZCAWhitening(train, epsilon)
    # Independent computation of the same matrix with numpy.
    samples = train.reshape(len(train), -1).double().numpy()
    covariance = np.cov(samples, rowvar=False)
    values, vectors = np.linalg.eigh(covariance)
    expected = vectors @ np.diag(1.0 / np.sqrt(np.clip(values, 0, None) + epsilon)) @ vectors.T
    assert np.allclose(whitening.matrix.numpy(), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert np.allclose(whitening.mean.numpy(), samples.mean(axis=0))

    whitened = whitening(train)
    assert whitened.shape == train.shape and whitened.dtype == torch.float32
    whitened_covariance = np.cov(whitened.reshape(len(train), -1).double().numpy(), rowvar=False)
    dominant = vectors[:, values > 1000 * epsilon]
    assert dominant.shape[1] >= 20
    projected = dominant.T @ whitened_covariance @ dominant
    assert np.abs(projected - np.eye(dominant.shape[1])).max() < 2e-3
    assert torch.allclose(whitening.inverse(whitened), train, atol=1e-3)
    assert torch.equal(ZCAWhitening(train, epsilon).matrix, whitening.matrix)  # fitting is deterministic


def test_whitened_data_whitens_both_splits_with_the_training_fit(real):
    data = whiten(real, 0.1)
    assert isinstance(data, WhitenedData) and data.info == real.info
    whitening = ZCAWhitening(real.train_tensors()[0], 0.1)
    train_images, train_labels = data.train_tensors()
    test_images, test_labels = data.test_tensors()
    assert torch.equal(train_labels, real.train_labels) and torch.equal(test_labels, real.test_labels)
    assert torch.allclose(train_images, whitening(real.train_tensors()[0]), atol=1e-5)
    assert torch.allclose(test_images, whitening(real.test_tensors()[0]), atol=1e-5)
    assert data.whitening is data.whitening  # fitted once
    assert torch.allclose(data.normalise(real.test_images[0]), test_images[0], atol=1e-5)
    assert torch.allclose(data.denormalise(test_images), real.test_images.float() / 255, atol=1e-3)
    with pytest.raises(UserInputError, match="ZCA epsilon must be a positive finite number, got 0"):
        whiten(real, 0)


def test_experts_command_writes_files_and_refuses_bad_values(striped_root, tmp_path, capsys):
    out = tmp_path / "experts"
    argv = ["experts", "--model", MODEL, "--count", "2", "--epochs", "1", "--batch-size", "64", "--augment", "none",
            "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [expert["index"] for expert in report["experts"]] == [0, 1]
    loaded = ExpertTrajectories.load(out, load_dataset("fashion-mnist").info, model=MODEL)
    assert loaded.trajectories.shape[:2] == (2, 2)
    assert main([*argv, "--count", "1"]) == 0
    assert "expert-0001.safetensors: test accuracy" in capsys.readouterr().out

    for bad, fragment in ((["--epochs", "0"], "--epochs must be a positive integer, got 0"),
                          (["--lr", "0"], "--lr must be a positive finite number"),
                          (["--zca", "-1"], "--zca must be >= 0"),
                          (["--model", "ConvNet-1-4-bn"], "experts need a model without batch norm"),
                          (["--model", "Nonsense-3"], "bad model name 'Nonsense-3'")):
        fresh = tmp_path / "fresh"
        code = main(["experts", "--model", MODEL, "--epochs", "1", "--out", str(fresh), *bad])
        error = capsys.readouterr().err
        assert code == 2 and fragment in error and error.count("\n") == 1, error
        assert not fresh.exists()
    with pytest.raises(SystemExit) as exited:
        main(["experts", "--augment", "flip", "--out", str(tmp_path / "fresh")])
    assert exited.value.code == 2 and "invalid choice: 'flip'" in capsys.readouterr().err


def test_metadata_round_trips_through_strings():
    metadata = ExpertMetadata(dataset="d", num_classes=2, channels=1, image_size=(4, 6), mean=(0.5,), std=(0.25,),
                              model="ConvNet-1-4-in", epochs=3, lr=0.01, batch_size=8, augment="dsa", zca=0.1, seed=7,
                              test_accuracy=55.5, layout=(("a.weight", (4, 1, 3, 3)), ("a.bias", (4,))))
    strings = metadata.to_strings()
    assert strings["image_size"] == "4x6" and json.loads(strings["layout"]) == [["a.weight", [4, 1, 3, 3]],
                                                                                   ["a.bias", [4]]]
    assert ExpertMetadata.from_strings(strings, "x") == metadata
    with pytest.raises(UserInputError, match="expert file x: metadata field 'layout' is malformed"):
        ExpertMetadata.from_strings(dict(strings, layout="{}"), "x")
    with pytest.raises(UserInputError, match="not written by 'infodistill experts'"):
        ExpertMetadata.from_strings(dict(strings, format="infodistill-proxy-v1"), "x")
