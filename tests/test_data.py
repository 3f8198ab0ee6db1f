"""Dataset readers, normalisation and the class-wise sampler, checked against fixture files written in
the real formats (see ``dataset_fixtures``) whose contents are known before the loader reads them."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset_fixtures as fixtures
from infodistill.data import (
    DATASET_NAMES,
    ClassSampler,
    RealData,
    dataset_info,
    load_dataset,
    resolve_data_root,
)
from infodistill.data import datasets as datasets_module
from infodistill.data import formats as formats_module
from infodistill.errors import UserInputError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No INFODISTILL_DATA and a HOME with nothing in it, so only explicit settings count."""
    monkeypatch.delenv("INFODISTILL_DATA", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def assert_split(actual_images, actual_labels, expected_images, expected_labels):
    assert actual_images.dtype == torch.uint8
    assert actual_labels.dtype == torch.int64
    np.testing.assert_array_equal(actual_images.numpy(), expected_images)
    np.testing.assert_array_equal(actual_labels.numpy(), expected_labels)


def assert_all_splits(data: RealData, written: fixtures.WrittenSplits):
    assert_split(data.train_images, data.train_labels, written.train_images, written.train_labels)
    assert_split(data.test_images, data.test_labels, written.test_images, written.test_labels)


# ---- IDX ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_mnist_idx_files_are_read_exactly(tmp_path, rng, compress):
    written = fixtures.write_mnist_like(tmp_path / "MNIST" / "raw", rng, compress=compress)
    data = load_dataset("mnist", data_root=tmp_path)
    assert data.train_images.shape == (12, 1, 28, 28)
    assert_all_splits(data, written)
    assert data.info.name == "mnist"
    assert data.info.class_names == tuple("0123456789")
    assert data.info.mean == (0.1307,) and data.info.std == (0.3081,)


def test_fashion_mnist_prefers_the_data_root_over_debian(tmp_path, rng):
    written = fixtures.write_mnist_like(tmp_path / "FashionMNIST" / "raw", rng, compress=True, n_train=5, n_test=3)
    data = load_dataset("fashion-mnist", data_root=tmp_path)
    assert_all_splits(data, written)
    assert data.info.class_names[0] == "T-shirt/top" and data.info.class_names[9] == "Ankle boot"


def test_fashion_mnist_found_in_debian_folder_without_configuration(clean_environment):
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in fixtures.FASHION_MNIST_FILES):
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is absent (apt-get install dataset-fashion-mnist to run this)")
    data = load_dataset("fashion-mnist")
    assert data.train_images.shape == (60000, 1, 28, 28)
    assert data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [1000] * 10
    assert data.train_images.dtype == torch.uint8


def test_fashion_mnist_class_names_follow_the_datasets_label_table():
    # the label table published with Fashion-MNIST: 7 is Sneaker and 8 is Bag (figures label rows by it)
    names = dataset_info("fashion-mnist").class_names
    assert names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot")


def test_truncated_idx_file_is_refused_naming_the_file(tmp_path, rng):
    raw = tmp_path / "MNIST" / "raw"
    fixtures.write_mnist_like(raw, rng, compress=False)
    images_path = raw / "train-images-idx3-ubyte"
    images_path.write_bytes(images_path.read_bytes()[:-100])
    with pytest.raises(UserInputError) as caught:
        load_dataset("mnist", data_root=tmp_path)
    message = str(caught.value)
    assert str(images_path) in message and "truncated" in message and "\n" not in message


def test_idx_file_with_wrong_magic_and_broken_gzip_are_refused(tmp_path, rng):
    raw = tmp_path / "MNIST" / "raw"
    fixtures.write_mnist_like(raw, rng, compress=True)
    labels_path = raw / "train-labels-idx1-ubyte.gz"
    images_path = raw / "train-images-idx3-ubyte.gz"
    with gzip.open(labels_path, "wb") as handle:  # an image file's header where labels belong
        handle.write(fixtures.idx_bytes(np.zeros((12, 2, 2), dtype=np.uint8)))
    with pytest.raises(UserInputError, match="magic number 0x00000803; expected 0x00000801"):
        load_dataset("mnist", data_root=tmp_path)
    images_path.write_bytes(images_path.read_bytes()[:40])  # a cut-off gzip stream
    with pytest.raises(UserInputError, match="gzip") as caught:
        formats_module.read_idx(images_path, formats_module.IDX_IMAGES_MAGIC)
    assert str(images_path) in str(caught.value)


# ---- data root, missing files, names ----------------------------------------------------------------


def test_data_root_precedence(clean_environment, monkeypatch, tmp_path):
    assert resolve_data_root(None) == clean_environment / ".cache" / "infodistill" / "data"
    monkeypatch.setenv("INFODISTILL_DATA", str(tmp_path / "from-env"))
    assert resolve_data_root(None) == tmp_path / "from-env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_environment_variable_is_used_to_find_data(clean_environment, monkeypatch, tmp_path, rng):
    written = fixtures.write_mnist_like(tmp_path / "envroot" / "MNIST" / "raw", rng, compress=False)
    monkeypatch.setenv("INFODISTILL_DATA", str(tmp_path / "envroot"))
    assert_all_splits(load_dataset("mnist"), written)


def test_missing_files_message_names_every_path_and_the_remedies(tmp_path):
    with pytest.raises(UserInputError) as caught:
        load_dataset("mnist", data_root=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    for name in fixtures.FASHION_MNIST_FILES:
        assert str(tmp_path / "MNIST" / "raw" / name) in message
    assert "--download" in message and "INFODISTILL_DATA" in message

    with pytest.raises(UserInputError) as caught:
        load_dataset("svhn", data_root=tmp_path)
    assert str(tmp_path / "svhn" / "train_32x32.mat") in str(caught.value)
    assert str(tmp_path / "svhn" / "test_32x32.mat") in str(caught.value)


def test_missing_fashion_mnist_mentions_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(UserInputError) as caught:
        load_dataset("fashion-mnist", data_root=tmp_path / "root")
    message = str(caught.value)
    assert str(tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert str(tmp_path / "no-debian" / "t10k-labels-idx1-ubyte") in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def test_unknown_dataset_lists_the_allowed_names(tmp_path):
    with pytest.raises(UserInputError) as caught:
        load_dataset("imagenet-22k", data_root=tmp_path)
    message = str(caught.value)
    assert "'imagenet-22k'" in message and "folder:PATH" in message
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet"):
        assert name in message
    with pytest.raises(UserInputError):
        dataset_info("nope")


def test_dataset_info_needs_no_files(tmp_path):
    assert DATASET_NAMES == ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet")
    expected = {
        "fashion-mnist": (1, (28, 28), 10),
        "mnist": (1, (28, 28), 10),
        "cifar10": (3, (32, 32), 10),
        "cifar100": (3, (32, 32), 100),
        "svhn": (3, (32, 32), 10),
        "tiny-imagenet": (3, (64, 64), 200),
    }
    for name, (channels, size, classes) in expected.items():
        info = dataset_info(name, data_root=tmp_path / "empty")
        assert (info.channels, info.image_size, info.num_classes) == (channels, size, classes)
        assert len(info.class_names) == classes and len(info.mean) == len(info.std) == channels
    assert dataset_info("cifar10").std == (0.2023, 0.1994, 0.2010)
    assert dataset_info("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")


# ---- CIFAR ------------------------------------------------------------------------------------------


def test_cifar10_python2_pickles_are_read_exactly(tmp_path, rng):
    written = fixtures.write_cifar10(tmp_path, rng)
    data = load_dataset("cifar10", data_root=tmp_path)
    assert data.train_images.shape == (20, 3, 32, 32)
    assert_all_splits(data, written)
    assert data.info.class_names == written.class_names
    # the row layout is 1024 red, then 1024 green, then 1024 blue values, each row-major
    first_row = written.train_images[0].reshape(3072)
    assert data.train_images[0, 1, 0, 0].item() == first_row[1024]
    assert data.train_images[0, 2, 31, 31].item() == first_row[3071]


def test_cifar100_uses_fine_labels_and_names(tmp_path, rng):
    written = fixtures.write_cifar100(tmp_path, rng)
    data = load_dataset("cifar100", data_root=tmp_path)
    assert_all_splits(data, written)
    assert data.info.class_names == written.class_names and data.info.num_classes == 100
    assert data.info.mean == (0.5071, 0.4866, 0.4409)


def test_restricted_unpickler_refuses_code_execution(tmp_path, rng):
    fixtures.write_cifar10(tmp_path, rng)
    marker = tmp_path / "pwned"
    # protocol-0 pickle that would call os.system("touch <marker>") when loaded
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(UserInputError) as caught:
        load_dataset("cifar10", data_root=tmp_path)
    assert "os.system" in str(caught.value) and "data_batch_3" in str(caught.value)
    assert not marker.exists()

    eval_pickle = tmp_path / "eval.pkl"
    eval_pickle.write_bytes(pickle.dumps(eval))  # names builtins.eval
    with pytest.raises(UserInputError, match="builtins.eval"):
        formats_module.load_restricted_pickle(eval_pickle)


def test_restricted_unpickler_reads_modern_numpy_pickles(tmp_path):
    array = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072) % 251
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({b"data": array, b"labels": [3, 4]}, protocol=protocol))
        loaded = formats_module.load_restricted_pickle(path)
        np.testing.assert_array_equal(loaded[b"data"], array)
        assert loaded[b"labels"] == [3, 4]


# ---- SVHN -------------------------------------------------------------------------------------------


def test_svhn_mat_files_map_label_10_to_digit_0(tmp_path, rng):
    written, raw_train_y = fixtures.write_svhn(tmp_path, rng)
    assert (raw_train_y[:2, 0] == 10).all()  # the file really says 10 for the first two images
    data = load_dataset("svhn", data_root=tmp_path)
    assert data.train_images.shape == (8, 3, 32, 32)
    assert_all_splits(data, written)
    assert data.train_labels[:2].tolist() == [0, 0]
    assert int(data.train_labels.max()) <= 9


# ---- Tiny-ImageNet ----------------------------------------------------------------------------------


def test_tiny_imagenet_train_val_and_cache_reuse(tmp_path, rng):
    written = fixtures.write_tiny_imagenet(tmp_path, rng)
    data = load_dataset("tiny-imagenet", data_root=tmp_path)
    assert data.train_images.shape == (400, 3, 64, 64)
    assert data.test_images.shape == (11, 3, 64, 64)
    assert_all_splits(data, written)
    assert data.info.class_names == written.class_names
    assert dataset_info("tiny-imagenet", data_root=tmp_path).class_names == written.class_names

    folder = tmp_path / "tiny-imagenet-200"
    assert (folder / "infodistill-cache.safetensors").is_file()
    first_wnid = (folder / "wnids.txt").read_text().split()[0]
    (folder / "train" / first_wnid / "images" / f"{first_wnid}_0.JPEG").unlink()
    (folder / "val" / "images" / "val_3.JPEG").unlink()
    again = load_dataset("tiny-imagenet", data_root=tmp_path)
    assert_all_splits(again, written)


def test_tiny_imagenet_loads_when_the_cache_cannot_be_written(tmp_path, rng, monkeypatch):
    written = fixtures.write_tiny_imagenet(tmp_path, rng, per_class=1)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(datasets_module, "save_file", refuse)
    data = load_dataset("tiny-imagenet", data_root=tmp_path)
    assert_all_splits(data, written)
    folder = tmp_path / "tiny-imagenet-200"
    assert not (folder / "infodistill-cache.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---- folder:PATH ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grayscale", [True, False], ids=["gray", "rgb"])
def test_image_folder_reads_pixels_classes_and_statistics(tmp_path, rng, grayscale):
    written = fixtures.write_image_folder(tmp_path / "set", rng, grayscale=grayscale, per_class={"apple": 2})
    data = load_dataset(f"folder:{tmp_path / 'set'}")
    assert_all_splits(data, written)
    info = data.info
    assert info.name == f"folder:{(tmp_path / 'set').resolve()}"
    assert info.class_names == ("apple", "mango", "zebra")
    assert info.channels == (1 if grayscale else 3) and info.image_size == (5, 7)
    pixels = written.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(info.std, pixels.std(axis=(0, 2, 3)), rtol=1e-9)
    assert dataset_info(f"folder:{tmp_path / 'set'}") == info


def test_image_folder_accepts_val_when_test_is_absent(tmp_path, rng):
    written = fixtures.write_image_folder(tmp_path / "set", rng, test_name="val")
    assert_all_splits(load_dataset(f"folder:{tmp_path / 'set'}"), written)


def test_image_folder_mixed_gray_and_rgb_becomes_rgb(tmp_path, rng):
    fixtures.write_image_folder(tmp_path / "set", rng, grayscale=True)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(rgb, mode="RGB").save(tmp_path / "set" / "train" / "mango" / "zz_rgb.png")
    data = load_dataset(f"folder:{tmp_path / 'set'}")
    assert data.info.channels == 3
    gray_first = data.train_images[0]  # first apple image, gray replicated to three channels
    assert torch.equal(gray_first[0], gray_first[1]) and torch.equal(gray_first[1], gray_first[2])
    mango_last = data.train_images[data.train_labels == 1][-1]
    np.testing.assert_array_equal(mango_last.numpy(), rgb.transpose(2, 0, 1))


def test_image_folder_refuses_mixed_sizes(tmp_path, rng):
    fixtures.write_image_folder(tmp_path / "set", rng)
    from PIL import Image

    odd = tmp_path / "set" / "test" / "mango" / "odd.png"
    Image.fromarray(np.zeros((9, 4, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(UserInputError) as caught:
        load_dataset(f"folder:{tmp_path / 'set'}")
    message = str(caught.value)
    assert str(odd) in message and "4x9" in message and "7x5" in message


def test_image_folder_missing_splits_and_unknown_test_class(tmp_path, rng):
    with pytest.raises(UserInputError, match="train"):
        load_dataset(f"folder:{tmp_path / 'nothing'}")
    fixtures.write_image_folder(tmp_path / "set", rng)
    (tmp_path / "set" / "test" / "kiwi").mkdir()
    with pytest.raises(UserInputError, match="kiwi"):
        load_dataset(f"folder:{tmp_path / 'set'}")


# ---- normalisation ----------------------------------------------------------------------------------


def make_real_data(info_name: str, images: torch.Tensor) -> RealData:
    labels = torch.zeros(len(images), dtype=torch.int64)
    return RealData(dataset_info(info_name), images, labels, images.clone(), labels.clone())


def test_normalise_matches_hand_computation_and_round_trips():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    data = make_real_data("mnist", images)
    normalised = data.normalise(images)
    assert normalised.dtype == torch.float32
    expected = [(0 - 0.1307) / 0.3081, (0.2 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081]
    np.testing.assert_allclose(normalised.flatten().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(data.denormalise(normalised).flatten().numpy(), [0.0, 0.2, 1.0], atol=1e-6)

    rgb = torch.full((2, 3, 2, 2), 102, dtype=torch.uint8)  # 102 / 255 = 0.4
    cifar = make_real_data("cifar10", rgb)
    per_channel = cifar.normalise(rgb)[0, :, 0, 0].numpy()
    expected_rgb = [(0.4 - 0.4914) / 0.2023, (0.4 - 0.4822) / 0.1994, (0.4 - 0.4465) / 0.2010]
    np.testing.assert_allclose(per_channel, expected_rgb, rtol=1e-6)
    single = cifar.normalise(rgb[0])  # one C x H x W image works too
    np.testing.assert_allclose(single[:, 0, 0].numpy(), expected_rgb, rtol=1e-6)
    train_images, train_labels = cifar.train_tensors()
    assert train_images.dtype == torch.float32 and train_labels is cifar.train_labels
    restored = cifar.denormalise(train_images) * 255
    np.testing.assert_allclose(restored.numpy(), rgb.float().numpy(), atol=1e-4)
    assert cifar.denormalise(torch.full((3, 1, 1), 10.0)).max() > 1  # no clamping


# ---- ClassSampler -----------------------------------------------------------------------------------


@pytest.fixture
def sampler() -> ClassSampler:
    """20 images whose single pixel is their own index; classes 0:8, 1:5, 2:7 images, interleaved."""
    labels = torch.tensor([0, 1, 2, 0, 0, 2, 1, 0, 2, 0, 1, 2, 0, 2, 1, 0, 2, 0, 1, 2])
    images = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1)
    return ClassSampler(images, labels, num_classes=3)


def drawn_indices(batch: torch.Tensor) -> list[int]:
    return [int(v) for v in batch.flatten()]


def test_sampler_counts(sampler):
    assert sampler.counts().tolist() == [8, 5, 7]
    assert [sampler.class_count(c) for c in range(3)] == [8, 5, 7]
    assert sampler.smallest_class_size() == 5


def test_sample_returns_distinct_images_of_the_class_only(sampler):
    class_of = sampler.labels.tolist()
    generator = torch.Generator().manual_seed(0)
    for c in range(3):
        for n in (1, 3, sampler.class_count(c)):
            batch = sampler.sample(c, n, generator)
            assert batch.shape == (n, 1, 1, 1)
            indices = drawn_indices(batch)
            assert len(set(indices)) == n
            assert all(class_of[i] == c for i in indices)
    everything = drawn_indices(sampler.sample(1, 5, generator))
    assert sorted(everything) == [1, 6, 10, 14, 18]


def test_sample_is_deterministic_per_seed(sampler):
    first = sampler.sample(0, 4, torch.Generator().manual_seed(7))
    second = sampler.sample(0, 4, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    draws = {tuple(drawn_indices(sampler.sample(0, 4, torch.Generator().manual_seed(seed)))) for seed in range(10)}
    assert len(draws) > 1


def test_sample_refuses_bad_sizes_and_classes(sampler):
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(UserInputError, match=r"n=6 .*class 1, which has 5"):
        sampler.sample(1, 6, generator)
    for bad in (0, -1):
        with pytest.raises(UserInputError, match=f"n={bad}"):
            sampler.sample(0, bad, generator)
    with pytest.raises(UserInputError, match="class 3"):
        sampler.sample(3, 1, generator)
    with pytest.raises(UserInputError, match="class 1"):
        sampler.sample_classes(6, generator)
    with pytest.raises(UserInputError, match="ipc=0"):
        sampler.random_subset(0, generator)


def test_sample_classes_gives_one_batch_per_class(sampler):
    class_of = sampler.labels.tolist()
    batches = sampler.sample_classes(5, torch.Generator().manual_seed(3))
    assert batches.shape == (3, 5, 1, 1, 1)
    for c in range(3):
        indices = drawn_indices(batches[c])
        assert len(set(indices)) == 5 and all(class_of[i] == c for i in indices)


def test_random_subset_is_balanced_and_ordered_by_class(sampler):
    class_of = sampler.labels.tolist()
    images, labels = sampler.random_subset(4, torch.Generator().manual_seed(5))
    assert images.shape == (12, 1, 1, 1)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    indices = drawn_indices(images)
    assert len(set(indices)) == 12
    assert [class_of[i] for i in indices] == labels.tolist()
    again, _ = sampler.random_subset(4, torch.Generator().manual_seed(5))
    assert torch.equal(images, again)


def test_sampler_refuses_labels_out_of_range():
    with pytest.raises(UserInputError, match="0..1"):
        ClassSampler(torch.zeros(3, 1), torch.tensor([0, 1, 2]), num_classes=2)


def test_sampler_on_loaded_data_returns_that_class(tmp_path, rng):
    written = fixtures.write_mnist_like(tmp_path / "MNIST" / "raw", rng, compress=False, n_train=40)
    data = load_dataset("mnist", data_root=tmp_path)
    images, labels = data.train_tensors()
    sampler = ClassSampler(images, labels, data.info.num_classes)
    c = int(np.bincount(written.train_labels).argmax())
    batch = sampler.sample(c, 2, torch.Generator().manual_seed(0))
    expected = {data.normalise(torch.from_numpy(img)).numpy().tobytes()
                for img in written.train_images[written.train_labels == c]}
    assert all(image.numpy().tobytes() in expected for image in batch)


def test_training_subset_is_class_balanced_and_drawn_from_the_training_split(striped_root):
    real = load_dataset("fashion-mnist")
    subset = real.training_subset(4, seed=3)
    assert torch.bincount(subset.train_labels).tolist() == [4] * 10
    originals = {(bytes(image.numpy().tobytes()), int(label))
                 for image, label in zip(real.train_images, real.train_labels)}
    assert all((bytes(image.numpy().tobytes()), int(label)) in originals
               for image, label in zip(subset.train_images, subset.train_labels))
    assert len({bytes(image.numpy().tobytes()) for image in subset.train_images}) == 40
    assert torch.equal(subset.test_images, real.test_images)
    assert torch.equal(real.training_subset(4, seed=3).train_images, subset.train_images)
