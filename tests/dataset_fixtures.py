"""Writers of tiny dataset fixtures in the real on-disk formats, independent of the package's readers.

Each writer puts files where the real dataset would sit under a data root and returns the arrays it
wrote (uint8 images as N x C x H x W, int64 labels), so tests can compare the loader's output with
values known before the loader ran.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class WrittenSplits(NamedTuple):
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] = ()


def random_split(rng: np.random.Generator, count: int, channels: int, size: int, classes: int):
    images = rng.integers(0, 256, size=(count, channels, size, size), dtype=np.uint8)
    labels = rng.integers(0, classes, size=count).astype(np.int64)
    return images, labels


# ---- IDX ---------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x00 0x00 0x08 ndim, big-endian sizes, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist_like(
    raw_folder: Path, rng: np.random.Generator, compress: bool, n_train: int = 12, n_test: int = 7
) -> WrittenSplits:
    """The four IDX files of MNIST / Fashion-MNIST in ``raw_folder`` (28x28, labels 0..9)."""
    train_images, train_labels = random_split(rng, n_train, 1, 28, 10)
    test_images, test_labels = random_split(rng, n_test, 1, 28, 10)
    arrays = (train_images[:, 0], train_labels, test_images[:, 0], test_labels)
    for name, array in zip(FASHION_MNIST_FILES, arrays):
        write_idx(raw_folder / name, array.astype(np.uint8), compress=compress)
    return WrittenSplits(train_images, train_labels, test_images, test_labels)


# ---- CIFAR pickles as Python 2 wrote them -------------------------------------------------------


class Python2StylePickler(pickle._Pickler):  # the pure-Python pickler lets us replace opcodes
    """Protocol-2 pickler that writes bytes and str the way Python 2's cPickle wrote ``str``.

    The published CIFAR files come from Python 2: strings are BINSTRING opcodes (read back as bytes
    with ``encoding='bytes'``) and numpy globals are named ``numpy.core.multiarray``.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj, name=None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)


def write_python2_pickle(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        Python2StylePickler(handle, protocol=2).dump(value)


def write_cifar10(root: Path, rng: np.random.Generator, per_batch: int = 4, n_test: int = 5) -> WrittenSplits:
    """``<root>/cifar-10-batches-py`` with five data batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    train_images, train_labels = random_split(rng, 5 * per_batch, 3, 32, 10)
    for batch in range(5):
        part = slice(batch * per_batch, (batch + 1) * per_batch)
        write_python2_pickle(
            folder / f"data_batch_{batch + 1}",
            {
                b"batch_label": b"training batch %d of 5" % (batch + 1),
                b"labels": [int(label) for label in train_labels[part]],
                b"data": train_images[part].reshape(per_batch, 3072),
                b"filenames": [b"image_%d.png" % i for i in range(per_batch)],
            },
        )
    test_images, test_labels = random_split(rng, n_test, 3, 32, 10)
    write_python2_pickle(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test_labels],
         b"data": test_images.reshape(n_test, 3072)},
    )
    write_python2_pickle(
        folder / "batches.meta",
        {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in names], b"num_vis": 3072},
    )
    return WrittenSplits(train_images, train_labels, test_images, test_labels, names)


def write_cifar100(root: Path, rng: np.random.Generator, n_train: int = 9, n_test: int = 6) -> WrittenSplits:
    """``<root>/cifar-100-python`` with train, test and meta (fine and coarse labels)."""
    folder = root / "cifar-100-python"
    names = tuple(f"fine{index:02d}" for index in range(100))
    written = []
    for split, count in (("train", n_train), ("test", n_test)):
        images, labels = random_split(rng, count, 3, 32, 100)
        write_python2_pickle(
            folder / split,
            {
                b"filenames": [b"x.png"] * count,
                b"batch_label": split.encode(),
                b"fine_labels": [int(v) for v in labels],
                b"coarse_labels": [int(v) // 5 for v in labels],
                b"data": images.reshape(count, 3072),
            },
        )
        written += [images, labels]
    write_python2_pickle(
        folder / "meta",
        {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c%d" % i for i in range(20)]},
    )
    return WrittenSplits(*written, names)


# ---- SVHN ---------------------------------------------------------------------------------------


def write_svhn(
    root: Path, rng: np.random.Generator, n_train: int = 8, n_test: int = 5
) -> tuple[WrittenSplits, np.ndarray]:
    """``<root>/svhn/{train,test}_32x32.mat``; returns the splits (digit labels) and the raw train ``y`` (1..10)."""
    import scipy.io

    written = []
    raw_train_y = None
    for split, count in (("train", n_train), ("test", n_test)):
        images, digits = random_split(rng, count, 3, 32, 10)
        digits[:2] = [0, 0]  # make sure the 10 -> 0 mapping is exercised
        raw_y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(count, 1)
        x = images.transpose(2, 3, 1, 0)  # N C H W -> H W C N, as in the published files
        (root / "svhn").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(root / "svhn" / f"{split}_32x32.mat"), {"X": x, "y": raw_y})
        written += [images, digits]
        raw_train_y = raw_y if raw_train_y is None else raw_train_y
    return WrittenSplits(*written, tuple(str(d) for d in range(10))), raw_train_y


# ---- Tiny-ImageNet --------------------------------------------------------------------------------


def _decoded(path: Path) -> np.ndarray:
    """What the JPEG at ``path`` decodes to (C x H x W RGB uint8), decoded here independently."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()


def write_tiny_imagenet(
    root: Path, rng: np.random.Generator, per_class: int = 2, grayscale_every: int = 7
) -> WrittenSplits:
    """``<root>/tiny-imagenet-200`` with 200 wnids, ``per_class`` train JPEGs each, and a small val split.

    Every ``grayscale_every``-th image is a grayscale JPEG (as some real ones are). Expected pixels
    are the fixture's own decode of each written JPEG (JPEG is lossy), labels come from the layout.
    """
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{index:08d}" for index in range(1000, 1200)]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # class order = file order
    order = list(reversed(wnids))
    words = [f"{wnid}\tname of {wnid}, other name" for wnid in wnids[::2]]  # half the wnids get names
    (folder / "words.txt").write_text("n99999999\tunused\n" + "\n".join(words) + "\n")
    counter = 0

    def save(path: Path) -> np.ndarray:
        nonlocal counter
        counter += 1
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        if counter % grayscale_every == 0:
            Image.fromarray(pixels[:, :, 0], mode="L").save(path, format="JPEG")
        else:
            Image.fromarray(pixels, mode="RGB").save(path, format="JPEG")
        return _decoded(path)

    train_images, train_labels = [], []
    for label, wnid in enumerate(order):
        for index in range(per_class):
            train_images.append(save(folder / "train" / wnid / "images" / f"{wnid}_{index}.JPEG"))
            train_labels.append(label)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val_images, val_labels, annotation_lines = [], [], []
    for index in range(11):
        label = int(rng.integers(0, 200))
        name = f"val_{index}.JPEG"
        val_images.append(save(folder / "val" / "images" / name))
        val_labels.append(label)
        annotation_lines.append(f"{name}\t{order[label]}\t0\t1\t60\t61")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotation_lines) + "\n")
    names = tuple(f"name of {wnid}" if int(wnid[1:]) % 2 == 0 else wnid for wnid in order)
    return WrittenSplits(
        np.stack(train_images), np.asarray(train_labels, dtype=np.int64),
        np.stack(val_images), np.asarray(val_labels, dtype=np.int64), names,
    )


# ---- ImageFolder --------------------------------------------------------------------------------


def write_image_folder(
    base: Path,
    rng: np.random.Generator,
    classes: tuple[str, ...] = ("zebra", "apple", "mango"),
    per_class: dict[str, int] | None = None,
    grayscale: bool = False,
    size: tuple[int, int] = (5, 7),
    test_name: str = "test",
) -> WrittenSplits:
    """PNG files in ``base/train/<class>/`` and ``base/<test_name>/<class>/`` (lossless, so exact).

    Classes are labelled in sorted order of their folder names, as an ImageFolder does.
    """
    height, width = size
    per_class = per_class or {}
    sorted_classes = sorted(classes)
    written = []
    for split in ("train", test_name):
        images, labels = [], []
        for label, class_name in enumerate(sorted_classes):
            for index in range(per_class.get(class_name, 3)):
                if grayscale:
                    pixels = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
                    image = Image.fromarray(pixels, mode="L")
                    images.append(pixels[None])
                else:
                    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                    image = Image.fromarray(pixels, mode="RGB")
                    images.append(pixels.transpose(2, 0, 1))
                path = base / split / class_name / f"img_{index:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                labels.append(label)
        written += [np.stack(images), np.asarray(labels, dtype=np.int64)]
    return WrittenSplits(*written, tuple(sorted_classes))
