"""Readers of the published on-disk formats: IDX (MNIST, Fashion-MNIST), CIFAR's pickles (unpickled with an
allow-list, never arbitrary code), SVHN's MATLAB files and image files; each checks what it reads and turns
every problem into one readable :class:`~infodistill.errors.UserInputError`."""

from __future__ import annotations

import gzip
import importlib
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infodistill.data.types import MissingFiles, Splits
from infodistill.errors import UserInputError

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


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


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (plain name preferred, else ``.gz``), or None if any is absent."""
    found = {}
    for role, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            return None
    return found


def read_idx_images_and_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise UserInputError(f"IDX file {images_path} holds {images.ndim}-d data; expected N x H x W images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserInputError(
            f"IDX file {labels_path} holds {list(labels.shape)} labels; expected {len(images)} to match {images_path}"
        )
    return images[:, None, :, :], labels.astype(np.int64)


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


def read_cifar(
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


def read_svhn(root: Path) -> Splits:
    folder = root / "svhn"
    train_path, test_path = folder / "train_32x32.mat", folder / "test_32x32.mat"
    if not (train_path.is_file() and test_path.is_file()):
        raise MissingFiles([str(train_path), str(test_path)])
    return Splits(*_read_svhn_file(train_path), *_read_svhn_file(test_path))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
"""File suffixes (lower case) that a ``folder:PATH`` dataset treats as images."""


GRAYSCALE_MODES = ("1", "L", "LA")
"""PIL modes counted as grayscale when deciding whether a folder dataset has 1 or 3 channels."""


def decode_images(paths: Sequence[Path], mode: str, size: tuple[int, int]) -> np.ndarray:
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


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
