"""Real image datasets read from their published on-disk formats into uint8 tensors in memory.

Every built-in dataset is one entry in :data:`DATASET_REGISTRY` (its fixed description, a reader
that turns a data root into arrays, and a downloader); ``folder:PATH`` datasets are handled by the
prefix registry :data:`DATASET_PREFIXES`. Readers are written here rather than borrowed from
torchvision so that they never unpickle arbitrary code (CIFAR), check the files they read (IDX
headers, shapes, label ranges) and turn every problem into one readable :class:`UserInputError`.
torchvision is used only to download.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import io
import math
import os
import pickle
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from infodistill.errors import UserInputError
from infodistill.files import atomic_path

DATA_ENV_VAR = "INFODISTILL_DATA"
"""Environment variable naming the data root when none is passed explicitly."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the four ``.gz`` IDX files."""

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_CACHE_NAME = "infodistill-cache.safetensors"
TINY_IMAGENET_CACHE_FORMAT = "infodistill-tiny-imagenet-v1"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
"""File suffixes (lower case) that a ``folder:PATH`` dataset treats as images."""

GRAYSCALE_MODES = ("1", "L", "LA")
"""PIL modes counted as grayscale when deciding whether a folder dataset has 1 or 3 channels."""

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


# ----------------------------------------------------------------------------------------------
# Public data types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the evaluation need to know about a dataset, without its pixels."""

    name: str
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need {self.channels} entries, got {self.mean} / {self.std}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {self.num_classes} classes but {len(self.class_names)} class names")


@dataclass
class RealData:
    """A dataset held in memory as uint8 images (N x C x H x W) and int64 labels, both splits."""

    info: DatasetInfo
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def _statistics(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.info.mean, dtype=torch.float32, device=reference.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, dtype=torch.float32, device=reference.device).view(-1, 1, 1)
        return mean, std

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Pixel values 0..255 -> float32 ``(x / 255 - mean) / std`` per channel (C x H x W or a batch)."""
        mean, std = self._statistics(images_uint8)
        return (images_uint8.to(torch.float32) / 255.0 - mean) / std

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalise`: float images in [0, 1] pixel units (not clamped)."""
        mean, std = self._statistics(images)
        return images.to(torch.float32) * std + mean

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 training images and their labels."""
        return self.normalise(self.train_images), self.train_labels

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 test images and their labels."""
        return self.normalise(self.test_images), self.test_labels

    def training_subset(self, per_class: int, seed: int) -> RealData:
        """The same data with a class-balanced random part of the training split (``per_class`` images
        of each class, drawn with ``seed``); the test split is kept whole. For quick experts and demos."""
        from infodistill.data.sampler import ClassSampler

        sampler = ClassSampler(self.train_images, self.train_labels, self.info.num_classes)
        images, labels = sampler.random_subset(per_class, torch.Generator().manual_seed(seed))
        return dataclasses.replace(self, train_images=images, train_labels=labels)


class Splits(NamedTuple):
    """What a reader returns: uint8 N x C x H x W arrays, integer labels, optional class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] | None = None


class MissingFiles(Exception):
    """Raised by a reader when the files are not there; carries every path it looked for."""

    def __init__(self, paths: Sequence[str]):
        super().__init__(", ".join(paths))
        self.paths = list(paths)


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: its fixed description, how to read it and how to download it.

    ``read(root)`` returns :class:`Splits` or raises :class:`MissingFiles`; ``download(root)``
    fetches the files into the data root; ``describe(root)`` (optional) refines the fixed info from
    small side files (Tiny-ImageNet's class names); ``how_to_get`` is appended to the missing-files
    message.
    """

    info: DatasetInfo
    read: Callable[[Path], Splits]
    download: Callable[[Path], None]
    describe: Callable[[Path], DatasetInfo] | None = None
    how_to_get: str = ""


# ----------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------


MAX_IDX_BYTES = 1 << 32
"""The largest IDX payload read (4 GiB; the largest real one, EMNIST's, is under 1 GiB): a header claiming more
is refused before anything is decompressed."""


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading bytes, through gzip when its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx_stream(path: Path, handle: io.BufferedIOBase, expected_magic: int) -> tuple[tuple[int, ...], bytes]:
    """The shape in the header and exactly the payload it announces, read from ``handle``: the header is
    checked first, so a small compressed file that expands to gigabytes is refused after a few bytes."""
    head = handle.read(4)
    if len(head) < 4:
        raise UserInputError(f"IDX file {path} is truncated: {len(head)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(head, "big")
    if magic != expected_magic:
        raise UserInputError(f"IDX file {path} has magic number 0x{magic:08x}; expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    sizes = handle.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise UserInputError(
            f"IDX file {path} is truncated inside its header ({4 + len(sizes)} of {4 + 4 * ndim} bytes)")
    shape = tuple(int.from_bytes(sizes[4 * i : 4 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    if expected > MAX_IDX_BYTES:
        raise UserInputError(f"IDX file {path} announces shape {list(shape)}: {expected} bytes, more than the "
                             f"{MAX_IDX_BYTES} this reader accepts")
    payload = handle.read(expected + 1)  # one byte more tells a file longer than its header says
    if len(payload) != expected:
        problem = "truncated" if len(payload) < expected else "longer than its header says"
        found = len(payload) if len(payload) < expected else "more"
        raise UserInputError(f"IDX file {path} is {problem}: shape {list(shape)} needs {expected} data bytes, "
                             f"found {found}")
    return shape, payload


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Parse an IDX file (plain or ``.gz``) holding unsigned bytes; check its header and length.

    The header is a big-endian 32-bit magic number (0x0000080D: unsigned bytes, D dimensions)
    followed by D big-endian 32-bit sizes; the payload must hold exactly their product of bytes.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as handle:
            shape, payload = _read_idx_stream(path, handle, expected_magic)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserInputError(f"IDX file {path} is not a complete gzip file ({error})") from error
    except OSError as error:
        raise UserInputError(f"cannot read IDX file {path}: {error.strerror or error}") from error
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (plain name preferred, else ``.gz``), or None if any is absent."""
    found = {}
    for role, stem in _IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            return None
    return found


def _read_idx_images_and_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise UserInputError(f"IDX file {images_path} holds {images.ndim}-d data; expected N x H x W images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserInputError(
            f"IDX file {labels_path} holds {list(labels.shape)} labels; expected {len(images)} to match {images_path}"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def _idx_search_folders(folder_name: str, extra_folders: Callable[[], Sequence[Path]], root: Path) -> list[Path]:
    return [root / folder_name / "raw", *extra_folders()]


def _read_idx_dataset(folder_name: str, extra_folders: Callable[[], Sequence[Path]], root: Path) -> Splits:
    """Read the first folder that holds all four IDX files: ``<root>/<folder_name>/raw``, then extras."""
    folders = _idx_search_folders(folder_name, extra_folders, root)
    for folder in folders:
        files = _find_idx_files(folder)
        if files is not None:
            train = _read_idx_images_and_labels(files["train_images"], files["train_labels"])
            test = _read_idx_images_and_labels(files["test_images"], files["test_labels"])
            return Splits(*train, *test)
    raise MissingFiles([f"{folder / stem}[.gz]" for folder in folders for stem in _IDX_FILES.values()])


def _debian_fashion_mnist_folders() -> list[Path]:
    return [DEBIAN_FASHION_MNIST_DIR]


def _no_extra_folders() -> list[Path]:
    return []


# ----------------------------------------------------------------------------------------------
# CIFAR (restricted unpickling)
# ----------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes objects."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_PICKLE_ALLOWED: dict[tuple[str, str], tuple[str, str] | Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): _latin1_encode,
}
"""Globals a CIFAR pickle may name (as written by Python 2 or 3), mapped to what they resolve to."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, dicts, lists and strings, and nothing else.

    Any other global (``os.system``, ``builtins.eval``, ...) is refused, so a crafted file cannot run
    code while being loaded.
    """

    def find_class(self, module: str, name: str) -> Any:
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
        if callable(target):
            return target
        target_module, target_name = target
        return getattr(importlib.import_module(target_module), target_name)


def load_restricted_pickle(path: str | os.PathLike) -> Any:
    """Load a CIFAR-style pickle (``encoding='bytes'``) through :class:`RestrictedUnpickler`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise UserInputError(f"pickle file {path} was refused or is malformed: {error}") from error
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise UserInputError(
            f"pickle file {path} is truncated or malformed: {error or type(error).__name__}"
        ) from error
    except OSError as error:
        raise UserInputError(f"cannot read pickle file {path}: {error.strerror or error}") from error


def _entry(mapping: Any, key: str, path: Path) -> Any:
    """``mapping[key]`` whether the pickle stored the key as bytes (Python 2) or str."""
    if isinstance(mapping, dict):
        for candidate in (key.encode(), key):
            if candidate in mapping:
                return mapping[candidate]
    raise UserInputError(f"pickle file {path} has no entry '{key}' (is it the right file?)")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_cifar_batches(paths: Sequence[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = load_restricted_pickle(path)
        data = np.asarray(_entry(batch, "data", path))
        batch_labels = np.asarray(_entry(batch, label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserInputError(
                f"pickle file {path}: 'data' is {data.dtype} {list(data.shape)}; expected uint8 N x 3072"
            )
        if batch_labels.shape != (len(data),):
            raise UserInputError(f"pickle file {path}: {batch_labels.size} labels for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _read_cifar(
    folder_name: str,
    train_files: Sequence[str],
    test_file: str,
    meta_file: str,
    label_key: str,
    names_key: str,
    root: Path,
) -> Splits:
    folder = root / folder_name
    needed = [folder / name for name in (*train_files, test_file, meta_file)]
    if not all(path.is_file() for path in needed):
        raise MissingFiles([str(path) for path in needed])
    train_images, train_labels = _read_cifar_batches([folder / name for name in train_files], label_key)
    test_images, test_labels = _read_cifar_batches([folder / test_file], label_key)
    meta_path = folder / meta_file
    names = tuple(_text(name) for name in _entry(load_restricted_pickle(meta_path), names_key, meta_path))
    return Splits(train_images, train_labels, test_images, test_labels, names)


# ----------------------------------------------------------------------------------------------
# SVHN (MATLAB v5)
# ----------------------------------------------------------------------------------------------


def _read_svhn_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # imported here: scipy is slow to import and only SVHN needs it

    try:
        contents = scipy.io.loadmat(str(path))
    except Exception as error:  # scipy raises many types (MatReadError, ValueError, OSError, ...)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserInputError(f"cannot read MATLAB file {path}: {reason}") from error
    if "X" not in contents or "y" not in contents:
        raise UserInputError(f"MATLAB file {path} lacks the variables 'X' and 'y' of an SVHN file")
    images, labels = np.asarray(contents["X"]), np.asarray(contents["y"]).reshape(-1).astype(np.int64)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.dtype != np.uint8:
        raise UserInputError(f"MATLAB file {path}: X is {images.dtype} {list(images.shape)}; expected uint8 32x32x3xN")
    if len(labels) != images.shape[3]:
        raise UserInputError(f"MATLAB file {path}: {len(labels)} labels for {images.shape[3]} images")
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise UserInputError(
            f"MATLAB file {path}: labels span {labels.min()}..{labels.max()}; SVHN labels are 1..10"
        )
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def _read_svhn(root: Path) -> Splits:
    folder = root / "svhn"
    train_path, test_path = folder / "train_32x32.mat", folder / "test_32x32.mat"
    if not (train_path.is_file() and test_path.is_file()):
        raise MissingFiles([str(train_path), str(test_path)])
    return Splits(*_read_svhn_file(train_path), *_read_svhn_file(test_path))


# ----------------------------------------------------------------------------------------------
# Image files (Tiny-ImageNet, folder:PATH)
# ----------------------------------------------------------------------------------------------


def _decode_images(paths: Sequence[Path], mode: str, size: tuple[int, int]) -> np.ndarray:
    """Decode image files into an N x C x H x W uint8 array, in parallel threads (PIL releases the GIL).

    ``size`` is (H, W); an image of another size is refused naming the file.
    """
    height, width = size
    channels = 1 if mode == "L" else 3
    decoded = np.empty((len(paths), height, width, channels), dtype=np.uint8)

    def decode(index: int) -> None:
        path = paths[index]
        try:
            with Image.open(path) as image:
                if image.size != (width, height):
                    raise UserInputError(
                        f"image {path} is {image.size[1]}x{image.size[0]} (HxW); "
                        f"expected {height}x{width} like the others"
                    )
                decoded[index] = np.asarray(image.convert(mode)).reshape(height, width, channels)
        except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
            if isinstance(error, UserInputError):
                raise
            raise UserInputError(f"cannot decode image {path}: {error}") from error

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(decode, range(len(paths))):
            pass
    return np.ascontiguousarray(decoded.transpose(0, 3, 1, 2))


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> bool:
    """Write a safetensors file via a temporary file and ``os.replace``; False if it cannot be written."""
    try:
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
        return True
    except OSError:
        return False


# ---- Tiny-ImageNet ---------------------------------------------------------------------------

_TINY_SPLIT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _tiny_imagenet_wnids(folder: Path) -> list[str]:
    wnids_path = folder / "wnids.txt"
    wnids = [line.strip() for line in wnids_path.read_text().splitlines() if line.strip()]
    if len(wnids) != 200 or len(set(wnids)) != 200:
        raise UserInputError(f"{wnids_path} lists {len(set(wnids))} distinct wnids; Tiny-ImageNet has 200")
    return wnids


def _tiny_imagenet_class_names(folder: Path, wnids: Sequence[str]) -> tuple[str, ...]:
    """First name of each wnid from ``words.txt`` (optional); the wnid itself where none is given."""
    words: dict[str, str] = {}
    words_path = folder / "words.txt"
    if words_path.is_file():
        wanted = set(wnids)
        for line in words_path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, names = line.partition("\t")
            if wnid in wanted and names.strip():
                words[wnid] = names.split(",")[0].strip()
    return tuple(words.get(wnid, wnid) for wnid in wnids)


def _read_tiny_imagenet_cache(cache_path: Path, wnids: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached arrays if the cache exists, is intact and was made for these wnids; else None."""
    if not cache_path.is_file():
        return None
    try:
        with safe_open(str(cache_path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != TINY_IMAGENET_CACHE_FORMAT or metadata.get("wnids") != ",".join(wnids):
                return None
            arrays = {key: handle.get_tensor(key) for key in _TINY_SPLIT_KEYS}
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        warnings.warn(f"ignoring unreadable Tiny-ImageNet cache {cache_path}: {error}", stacklevel=3)
        return None
    shapes_ok = all(
        arrays[images].ndim == 4 and arrays[images].shape[1:] == (3, 64, 64) and arrays[images].dtype == np.uint8
        and arrays[labels].shape == (arrays[images].shape[0],)
        for images, labels in (("train_images", "train_labels"), ("test_images", "test_labels"))
    )
    return arrays if shapes_ok else None


def _read_tiny_imagenet(root: Path) -> Splits:
    """Train from ``train/<wnid>/images``, test from ``val`` (labels from ``val_annotations.txt``).

    The decoded arrays are cached in ``infodistill-cache.safetensors`` beside the data; later loads
    read that instead of 110,000 JPEGs. An unwritable folder just means no cache.
    """
    folder = root / "tiny-imagenet-200"
    annotations_path = folder / "val" / "val_annotations.txt"
    needed = [folder / "wnids.txt", folder / "train", folder / "val" / "images", annotations_path]
    if not all(path.exists() for path in needed):
        raise MissingFiles([str(path) for path in needed])
    wnids = _tiny_imagenet_wnids(folder)
    class_names = _tiny_imagenet_class_names(folder, wnids)
    cache_path = folder / TINY_IMAGENET_CACHE_NAME
    cached = _read_tiny_imagenet_cache(cache_path, wnids)
    if cached is not None:
        return Splits._make([*(cached[key] for key in _TINY_SPLIT_KEYS), class_names])

    label_of = {wnid: index for index, wnid in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        images_folder = folder / "train" / wnid / "images"
        if not images_folder.is_dir():
            raise MissingFiles([str(images_folder)])
        files = sorted(path for path in images_folder.iterdir() if _is_image_file(path))
        train_paths += files
        train_labels += [label_of[wnid]] * len(files)
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for line_number, line in enumerate(annotations_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserInputError(
                f"{annotations_path} line {line_number}: expected 'file<TAB>wnid<TAB>...' "
                f"with a wnid from wnids.txt, got {line[:80]!r}"
            )
        test_paths.append(folder / "val" / "images" / fields[0])
        test_labels.append(label_of[fields[1]])

    arrays = {
        "train_images": _decode_images(train_paths, "RGB", (64, 64)),
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "test_images": _decode_images(test_paths, "RGB", (64, 64)),
        "test_labels": np.asarray(test_labels, dtype=np.int64),
    }
    _atomic_save_tensors(
        {key: torch.from_numpy(value) for key, value in arrays.items()},
        cache_path,
        metadata={"format": TINY_IMAGENET_CACHE_FORMAT, "wnids": ",".join(wnids)},
    )
    return Splits._make([*(arrays[key] for key in _TINY_SPLIT_KEYS), class_names])


def _describe_tiny_imagenet(root: Path) -> DatasetInfo:
    """The fixed info, with real class names when ``wnids.txt`` (and ``words.txt``) are present."""
    info = DATASET_REGISTRY["tiny-imagenet"].info
    folder = root / "tiny-imagenet-200"
    if not (folder / "wnids.txt").is_file():
        return info
    wnids = _tiny_imagenet_wnids(folder)
    return dataclasses.replace(info, class_names=_tiny_imagenet_class_names(folder, wnids))


# ---- folder:PATH -----------------------------------------------------------------------------


def _folder_classes(split_folder: Path) -> list[str]:
    """Class folder names in sorted order, as torchvision's ImageFolder (hidden folders skipped)."""
    return sorted(entry.name for entry in os.scandir(split_folder) if entry.is_dir() and not entry.name.startswith("."))


def _folder_files(split_folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, class_name in enumerate(classes):
        class_folder = split_folder / class_name
        if not class_folder.is_dir():
            continue
        files = sorted(path for path in class_folder.rglob("*") if _is_image_file(path))
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _load_image_folder(argument: str, data_root: Path) -> RealData:
    """Read an ImageFolder tree ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (or ``val``).

    All images must share the size of the first; the data has 1 channel if every image is
    grayscale, else 3 (RGB). Mean and std are measured on the train split.
    """
    if not argument:
        raise UserInputError("dataset 'folder:' needs a path, e.g. folder:/data/my-images")
    base = Path(argument).expanduser().resolve()
    train_folder = base / "train"
    test_folder = next((base / name for name in ("test", "val") if (base / name).is_dir()), base / "test")
    if not train_folder.is_dir() or not test_folder.is_dir():
        raise UserInputError(
            f"dataset 'folder:{argument}' needs {train_folder}/<class>/<images> and "
            f"{base / 'test'}/<class>/<images> (or {base / 'val'}); missing: "
            f"{', '.join(str(p) for p in (train_folder, test_folder) if not p.is_dir())}"
        )
    classes = _folder_classes(train_folder)
    if not classes:
        raise UserInputError(f"{train_folder} holds no class folders; expected {train_folder}/<class>/<images>")
    unknown = sorted(set(_folder_classes(test_folder)) - set(classes))
    if unknown:
        raise UserInputError(
            f"{test_folder} has class folders {unknown} that {train_folder} lacks; classes are: {', '.join(classes)}"
        )
    train_paths, train_labels = _folder_files(train_folder, classes)
    test_paths, test_labels = _folder_files(test_folder, classes)
    empty = [name for label, name in enumerate(classes) if label not in set(train_labels)]
    if empty:
        raise UserInputError(
            f"train class folder(s) {', '.join(str(train_folder / n) for n in empty)} hold no images "
            f"(allowed suffixes: {' '.join(IMAGE_EXTENSIONS)})"
        )

    size: tuple[int, int] | None = None  # (W, H) as PIL reports it
    all_grayscale = True
    for path in train_paths + test_paths:  # headers only: PIL reads the size and mode lazily
        try:
            with Image.open(path) as image:
                image_size, mode = image.size, image.mode
        except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
            raise UserInputError(f"cannot read image {path}: {error}") from error
        if size is None:
            size, first = image_size, path
        elif image_size != size:
            raise UserInputError(
                f"image {path} is {image_size[0]}x{image_size[1]} (WxH) but {first} is {size[0]}x{size[1]}; "
                "all images of a folder dataset must share one size"
            )
        all_grayscale = all_grayscale and mode in GRAYSCALE_MODES
    assert size is not None
    mode = "L" if all_grayscale else "RGB"
    height_width = (size[1], size[0])
    train_images = torch.from_numpy(_decode_images(train_paths, mode, height_width))
    test_images = torch.from_numpy(_decode_images(test_paths, mode, height_width))
    mean, std = _channel_statistics(train_images)
    info = DatasetInfo(
        name=f"folder:{base}",
        channels=1 if all_grayscale else 3,
        image_size=height_width,
        num_classes=len(classes),
        class_names=tuple(classes),
        mean=mean,
        std=std,
    )
    return RealData(
        info=info,
        train_images=train_images,
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=test_images,
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
    )


def _channel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1] units; a zero std becomes 1."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_squares += (block * block).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------------------------
# Downloads (torchvision), registry
# ----------------------------------------------------------------------------------------------


def _download_with_torchvision(class_name: str, subfolder: str, split_arguments: Sequence[dict], root: Path) -> None:
    """Instantiate a torchvision dataset class with ``download=True`` once per split argument set."""
    import torchvision.datasets  # imported here: slow, and only needed to download

    dataset_class = getattr(torchvision.datasets, class_name)
    target = root / subfolder if subfolder else root
    target.mkdir(parents=True, exist_ok=True)
    for arguments in split_arguments:
        dataset_class(root=str(target), download=True, **arguments)


def _download_tiny_imagenet(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    download_and_extract_archive(
        TINY_IMAGENET_URL, download_root=str(root), filename="tiny-imagenet-200.zip", md5=TINY_IMAGENET_MD5
    )


_DIGITS = tuple(str(digit) for digit in range(10))
_CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
    dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
    leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
    otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road
    rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower
    sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
    willow_tree wolf woman worm""".split()
)
_TRAIN_AND_TEST = ({"train": True}, {"train": False})

DATASET_REGISTRY: dict[str, DatasetSpec] = {
    spec.info.name: spec
    for spec in (
        DatasetSpec(
            info=DatasetInfo(
                "fashion-mnist", 1, (28, 28), 10,
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
                (0.2861,), (0.3530,),
            ),
            read=functools.partial(_read_idx_dataset, "FashionMNIST", _debian_fashion_mnist_folders),
            download=functools.partial(_download_with_torchvision, "FashionMNIST", "", _TRAIN_AND_TEST),
            how_to_get="or run `apt-get install dataset-fashion-mnist` "
                       "(installs it in /usr/share/datasets/fashion-mnist)",
        ),
        DatasetSpec(
            info=DatasetInfo("mnist", 1, (28, 28), 10, _DIGITS, (0.1307,), (0.3081,)),
            read=functools.partial(_read_idx_dataset, "MNIST", _no_extra_folders),
            download=functools.partial(_download_with_torchvision, "MNIST", "", _TRAIN_AND_TEST),
        ),
        DatasetSpec(
            info=DatasetInfo(
                "cifar10", 3, (32, 32), 10,
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
                (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
            ),
            read=functools.partial(
                _read_cifar, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch", "batches.meta", "labels", "label_names",
            ),
            download=functools.partial(_download_with_torchvision, "CIFAR10", "", ({"train": True},)),
        ),
        DatasetSpec(
            info=DatasetInfo(
                "cifar100", 3, (32, 32), 100, _CIFAR100_CLASSES,
                (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
            ),
            read=functools.partial(_read_cifar, "cifar-100-python", ("train",), "test", "meta", "fine_labels",
                                   "fine_label_names"),
            download=functools.partial(_download_with_torchvision, "CIFAR100", "", ({"train": True},)),
        ),
        DatasetSpec(
            info=DatasetInfo("svhn", 3, (32, 32), 10, _DIGITS, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
            read=_read_svhn,
            download=functools.partial(_download_with_torchvision, "SVHN", "svhn",
                                       ({"split": "train"}, {"split": "test"})),
        ),
        DatasetSpec(
            info=DatasetInfo(
                "tiny-imagenet", 3, (64, 64), 200, tuple(f"class_{index:03d}" for index in range(200)),
                (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
            ),
            read=_read_tiny_imagenet,
            download=_download_tiny_imagenet,
            describe=_describe_tiny_imagenet,
        ),
    )
}
"""Built-in datasets by canonical name. Adding a dataset is adding one :class:`DatasetSpec` here."""

DATASET_PREFIXES: dict[str, Callable[[str, Path], RealData]] = {"folder": _load_image_folder}
"""Parameterised datasets ``PREFIX:ARGUMENT``, mapped to ``loader(argument, data_root)``."""

DATASET_NAMES: tuple[str, ...] = tuple(DATASET_REGISTRY)
"""Built-in dataset names; ``folder:PATH`` is accepted besides these."""


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The data root: the explicit argument, else ``$INFODISTILL_DATA``, else ``~/.cache/infodistill/data``."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    from_environment = os.environ.get(DATA_ENV_VAR, "")
    if from_environment:
        return Path(from_environment).expanduser()
    return Path.home() / ".cache" / "infodistill" / "data"


def _lookup(name: str) -> tuple[DatasetSpec | None, Callable[[str, Path], RealData] | None, str]:
    """Resolve a dataset name to a built-in spec, or to a prefix loader and its argument."""
    if not isinstance(name, str):
        raise UserInputError(f"dataset name must be a string, got {name!r}")
    prefix, separator, argument = name.partition(":")
    if separator and prefix.strip().lower() in DATASET_PREFIXES:
        return None, DATASET_PREFIXES[prefix.strip().lower()], argument
    canonical = name.strip().lower().replace("_", "-")
    if canonical in DATASET_REGISTRY:
        return DATASET_REGISTRY[canonical], None, ""
    allowed = ", ".join([*DATASET_REGISTRY, *(f"{prefix}:PATH" for prefix in DATASET_PREFIXES)])
    raise UserInputError(f"unknown dataset {name!r}; choose one of: {allowed}")


def _to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor that owns writable memory (arrays parsed from bytes are read-only views)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(dtype)


def _check_split(info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor, split: str, root: Path) -> None:
    expected = (info.channels, *info.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise UserInputError(
            f"dataset '{info.name}' under {root}: {split} images are {list(images.shape)}; "
            f"expected N x {' x '.join(map(str, expected))}"
        )
    if len(labels) != len(images):
        raise UserInputError(
            f"dataset '{info.name}' under {root}: {len(labels)} {split} labels for {len(images)} images"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise UserInputError(
            f"dataset '{info.name}' under {root}: {split} labels span {int(labels.min())}..{int(labels.max())}; "
            f"expected 0..{info.num_classes - 1}"
        )


def _missing_message(spec: DatasetSpec, root: Path, missing: MissingFiles) -> str:
    hint = f", {spec.how_to_get}" if spec.how_to_get else ""
    return (
        f"dataset '{spec.info.name}' not found; looked for: {', '.join(missing.paths)}; "
        f"pass --download (download=True), or put the files there, or set {DATA_ENV_VAR} to the data root "
        f"(now {root}){hint}"
    )


def _download(spec: DatasetSpec, root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        spec.download(root)
    except UserInputError:
        raise
    except Exception as error:  # network, checksum, disk, archive errors all reach the user as one line
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserInputError(f"downloading dataset '{spec.info.name}' into {root} failed: {reason}") from error


def load_dataset(name: str, data_root: str | os.PathLike | None = None, download: bool = False) -> RealData:
    """Read a dataset's train and test splits into memory as uint8 tensors.

    Built-in datasets are looked for under the data root (see :func:`resolve_data_root`), in
    torchvision's layout; with ``download=True`` missing files are fetched there first.
    """
    spec, prefix_loader, argument = _lookup(name)
    root = resolve_data_root(data_root)
    if prefix_loader is not None:
        return prefix_loader(argument, root)
    assert spec is not None
    try:
        splits = spec.read(root)
    except MissingFiles as missing:
        if not download:
            raise UserInputError(_missing_message(spec, root, missing)) from None
        _download(spec, root)
        try:
            splits = spec.read(root)
        except MissingFiles as still_missing:
            raise UserInputError(_missing_message(spec, root, still_missing)) from None
    info = spec.info
    if splits.class_names is not None:
        if len(splits.class_names) != info.num_classes:
            raise UserInputError(
                f"dataset '{info.name}' under {root} names {len(splits.class_names)} classes; "
                f"expected {info.num_classes}"
            )
        info = dataclasses.replace(info, class_names=tuple(splits.class_names))
    data = RealData(
        info=info,
        train_images=_to_tensor(splits.train_images, torch.uint8),
        train_labels=_to_tensor(splits.train_labels, torch.int64),
        test_images=_to_tensor(splits.test_images, torch.uint8),
        test_labels=_to_tensor(splits.test_labels, torch.int64),
    )
    _check_split(info, data.train_images, data.train_labels, "train", root)
    _check_split(info, data.test_images, data.test_labels, "test", root)
    return data


def dataset_info(name: str, data_root: str | os.PathLike | None = None) -> DatasetInfo:
    """A dataset's description without loading its pixels.

    Built-in datasets need no files (Tiny-ImageNet reads ``wnids.txt``/``words.txt`` for its class
    names when present, else names them ``class_000`` ...); ``folder:PATH`` is scanned and decoded
    because its size, channels and statistics come from the images.
    """
    spec, prefix_loader, argument = _lookup(name)
    root = resolve_data_root(data_root)
    if prefix_loader is not None:
        return prefix_loader(argument, root).info
    assert spec is not None
    return spec.describe(root) if spec.describe is not None else spec.info
