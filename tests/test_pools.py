"""Proxy pools: training writes complete files with the right metadata, loading checks them, sampling is seeded."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from infodistill import __version__
from infodistill.data import DatasetInfo, RealData
from infodistill.errors import UserInputError
from infodistill.models import build_model
from infodistill.proxies import ProxyMetadata, ProxyPool, save_proxy, train_proxy_pool
from infodistill.seeds import run_seeds
from infodistill.training import top1_accuracy
from reference_training import sgd_reference

INFO = DatasetInfo(name="tiny-stripes", channels=1, image_size=(8, 8), num_classes=3, class_names=("a", "b", "c"),
                   mean=(0.3,), std=(0.3,))
ARCH = "ConvNetGAP-1-8"
TRAINING = dict(arch=ARCH, epochs=1, seed=5, progress=False, batch_size=16)


def stripes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 uint8 noise where class c has a bright row band at rows 2c..2c+1: learnable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    images = torch.randint(0, 80, (count, 1, 8, 8), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        images[index, 0, 2 * label : 2 * label + 2] = 230
    return images, labels


@pytest.fixture(scope="module")
def real() -> RealData:
    train_images, train_labels = stripes(48, seed=1)
    test_images, test_labels = stripes(24, seed=2)
    return RealData(INFO, train_images, train_labels, test_images, test_labels)


@pytest.fixture(scope="module")
def built_pool(real, tmp_path_factory):
    """A directory with two trained proxies (built once for the module; tests copy it before changing it)."""
    directory = tmp_path_factory.mktemp("pool")
    records = train_proxy_pool(real, directory, count=2, **TRAINING)
    return directory, records


def copy_pool(built_pool, tmp_path):
    directory = tmp_path / "pool"
    shutil.copytree(built_pool[0], directory)
    return directory


def metadata_strings(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    assert all(torch.equal(left[name], right[name]) for name in left)


def test_training_writes_numbered_files_with_the_documented_metadata(built_pool):
    directory, records = built_pool
    assert sorted(path.name for path in directory.iterdir()) == ["proxy-0000.safetensors", "proxy-0001.safetensors"]
    assert [record.index for record in records] == [0, 1]
    assert [record.seed for record in records] == run_seeds(5, 2)
    for record in records:
        strings = metadata_strings(record.path)
        assert strings["dataset"] == "tiny-stripes"
        assert strings["arch"] == "ConvNetGAP-1-8-in"
        assert strings["channels"] == "1"
        assert strings["image_size"] == "8x8"
        assert strings["num_classes"] == "3"
        assert json.loads(strings["mean"]) == [0.3] and json.loads(strings["std"]) == [0.3]
        assert int(strings["seed"]) == record.seed
        assert strings["epochs"] == "1"
        assert float(strings["test_accuracy"]) == record.test_accuracy
        assert strings["version"] == __version__
        assert (float(strings["lr"]), float(strings["momentum"]), float(strings["weight_decay"])) == (0.01, 0.9, 1e-3)
        assert (strings["batch_size"], strings["augment"]) == ("16", "none")


def test_saved_weights_are_the_documented_recipe_and_load_back_exactly(built_pool, real):
    directory, records = built_pool
    pool = ProxyPool.load(directory, INFO)
    assert len(pool) == 2 and pool.arch == "ConvNetGAP-1-8-in"
    assert [(r.seed, r.test_accuracy) for r in pool.records] == [(r.seed, r.test_accuracy) for r in records]
    # Independent reference: the documented recipe written out as a plain SGD loop (tests/reference_training.py).
    train_images, train_labels = real.train_tensors()
    test_images, test_labels = real.test_tensors()
    for position, record in enumerate(records):
        saved = load_file(str(record.path))
        assert_same_tensors(saved, pool[position].state_dict())
        reference = sgd_reference(ARCH, train_images, train_labels, record.seed, epochs=1, lr=0.01, momentum=0.9,
                                  weight_decay=1e-3, batch_size=16, num_classes=3)
        assert all(torch.equal(saved[name], tensor) for name, tensor in reference.state_dict().items())
        assert not pool[position].training
        assert not any(parameter.requires_grad for parameter in pool[position].parameters())
        assert top1_accuracy(pool[position], test_images, test_labels) == record.test_accuracy


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(name="cifar10"), "dataset"),
        (dict(num_classes=4, class_names=("a", "b", "c", "d")), "num_classes"),
        (dict(channels=3, mean=(0.3,) * 3, std=(0.3,) * 3), "channels"),
        (dict(image_size=(16, 16)), "image_size"),
        (dict(mean=(0.5,)), "mean"),
        (dict(std=(0.2,)), "std"),
    ],
)
def test_a_pool_for_other_data_is_refused_naming_the_field(built_pool, changes, field):
    other = dataclasses.replace(INFO, **changes)
    with pytest.raises(UserInputError, match=f"{field} is .* in proxy-0000.safetensors, expected") as caught:
        ProxyPool.load(built_pool[0], other)
    assert "\n" not in str(caught.value)


def test_a_truncated_file_is_refused_by_name(built_pool, tmp_path):
    directory = copy_pool(built_pool, tmp_path)
    victim = directory / "proxy-0001.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(UserInputError, match="proxy-0001.safetensors is not a readable safetensors file"):
        ProxyPool.load(directory, INFO)


def test_missing_and_empty_directories_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        ProxyPool.load(tmp_path / "nowhere", INFO)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a proxy")
    with pytest.raises(UserInputError, match="holds no proxy-NNNN.safetensors files"):
        ProxyPool.load(tmp_path / "empty", INFO)


def test_mixed_architectures_are_refused(built_pool, tmp_path):
    directory = copy_pool(built_pool, tmp_path)
    stranger = build_model("ConvNetGAP-1-4", 1, 3, (8, 8), seed=0)
    first = directory / "proxy-0000.safetensors"
    metadata = dataclasses.replace(ProxyMetadata.from_strings(metadata_strings(first), first), arch="ConvNetGAP-1-4-in")
    save_proxy(stranger, directory / "proxy-0002.safetensors", metadata)
    with pytest.raises(UserInputError, match="mixes architectures: arch is 'ConvNetGAP-1-4-in' in proxy-0002"):
        ProxyPool.load(directory, INFO)


def test_sampling_is_seeded_and_draws_distinct_proxies(built_pool):
    pool = ProxyPool.load(built_pool[0], INFO)
    first = [pool.sample_index(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert first[0] == first[1]
    generator_a, generator_b = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert [pool.sample(generator_a) for _ in range(6)] == [pool.sample(generator_b) for _ in range(6)]
    assert sorted(pool.sample_indices(2, torch.Generator().manual_seed(1))) == [0, 1]
    with pytest.raises(UserInputError, match="cannot draw 3 distinct proxies from a pool of 2"):
        pool.sample_indices(3, torch.Generator())


def test_a_continued_build_adds_only_the_missing_proxies_as_an_uninterrupted_build_would(built_pool, real, tmp_path):
    directory = copy_pool(built_pool, tmp_path)
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    records = train_proxy_pool(real, directory, count=3, **TRAINING)
    assert [record.index for record in records] == [0, 1, 2]
    assert all((directory / name).read_bytes() == data for name, data in before.items())
    assert records[2].seed == run_seeds(5, 3)[2] and len({record.seed for record in records}) == 3
    fresh = train_proxy_pool(real, tmp_path / "fresh", count=3, **TRAINING)
    # Same tensors and metadata (not bytes: safetensors writes the metadata keys in hash-map order).
    continued, uninterrupted = records[2].path, tmp_path / "fresh" / "proxy-0002.safetensors"
    assert_same_tensors(load_file(str(continued)), load_file(str(uninterrupted)))
    assert metadata_strings(continued) == metadata_strings(uninterrupted)
    assert [record.seed for record in fresh] == [record.seed for record in records]
    # Asking for no more than what exists trains nothing.
    assert train_proxy_pool(real, directory, count=2, **TRAINING) == records


def test_a_build_into_a_pool_of_another_architecture_or_dataset_is_refused(built_pool, real, tmp_path):
    directory = copy_pool(built_pool, tmp_path)
    with pytest.raises(UserInputError, match="arch 'ConvNetGAP-1-8-in' .*this build has arch 'ConvNetGAP-1-4-in'"):
        train_proxy_pool(real, directory, count=3, **dict(TRAINING, arch="ConvNetGAP-1-4"))
    other = RealData(dataclasses.replace(INFO, name="other"), real.train_images, real.train_labels,
                     real.test_images, real.test_labels)
    with pytest.raises(UserInputError, match="dataset 'tiny-stripes' .*this build has dataset 'other'"):
        train_proxy_pool(other, directory, count=3, **TRAINING)
    assert sorted(path.name for path in directory.iterdir()) == ["proxy-0000.safetensors", "proxy-0001.safetensors"]
