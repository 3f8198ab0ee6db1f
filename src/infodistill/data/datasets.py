"""Real image datasets read from their published on-disk formats into uint8 tensors in memory.

Every built-in dataset is one entry in :data:`DATASET_REGISTRY` (its fixed description, a reader
that turns a data root into arrays, and a downloader); ``folder:PATH`` datasets are handled by the
prefix registry :data:`DATASET_PREFIXES`. The format readers (:mod:`infodistill.data.formats`) are
written rather than borrowed from torchvision so that they never unpickle arbitrary code (CIFAR), check
the files they read (IDX headers, shapes, label ranges) and turn every problem into one readable
:class:`UserInputError`; the types are in :mod:`infodistill.data.types`. torchvision is used only to
download.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from infodistill.data.formats import (
    GRAYSCALE_MODES,
    IDX_FILES,
    IMAGE_EXTENSIONS,
    decode_images,
    find_idx_files,
    is_image_file,
    read_cifar,
    read_idx_images_and_labels,
    read_svhn,
)
from infodistill.data.types import DatasetInfo, DatasetSpec, MissingFiles, RealData, Splits
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


# ----------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------


def _idx_search_folders(folder_name: str, extra_folders: Callable[[], Sequence[Path]], root: Path) -> list[Path]:
    return [root / folder_name / "raw", *extra_folders()]


def _read_idx_dataset(folder_name: str, extra_folders: Callable[[], Sequence[Path]], root: Path) -> Splits:
    """Read the first folder that holds all four IDX files: ``<root>/<folder_name>/raw``, then extras."""
    folders = _idx_search_folders(folder_name, extra_folders, root)
    for folder in folders:
        files = find_idx_files(folder)
        if files is not None:
            train = read_idx_images_and_labels(files["train_images"], files["train_labels"])
            test = read_idx_images_and_labels(files["test_images"], files["test_labels"])
            return Splits(*train, *test)
    raise MissingFiles([f"{folder / stem}[.gz]" for folder in folders for stem in IDX_FILES.values()])


def _debian_fashion_mnist_folders() -> list[Path]:
    return [DEBIAN_FASHION_MNIST_DIR]


def _no_extra_folders() -> list[Path]:
    return []


# ----------------------------------------------------------------------------------------------
# Image files (Tiny-ImageNet, folder:PATH)
# ----------------------------------------------------------------------------------------------


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
        files = sorted(path for path in images_folder.iterdir() if is_image_file(path))
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
        "train_images": decode_images(train_paths, "RGB", (64, 64)),
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "test_images": decode_images(test_paths, "RGB", (64, 64)),
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
        files = sorted(path for path in class_folder.rglob("*") if is_image_file(path))
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
    train_images = torch.from_numpy(decode_images(train_paths, mode, height_width))
    test_images = torch.from_numpy(decode_images(test_paths, mode, height_width))
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
                read_cifar, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch", "batches.meta", "labels", "label_names",
            ),
            download=functools.partial(_download_with_torchvision, "CIFAR10", "", ({"train": True},)),
        ),
        DatasetSpec(
            info=DatasetInfo(
                "cifar100", 3, (32, 32), 100, _CIFAR100_CLASSES,
                (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
            ),
            read=functools.partial(read_cifar, "cifar-100-python", ("train",), "test", "meta", "fine_labels",
                                   "fine_label_names"),
            download=functools.partial(_download_with_torchvision, "CIFAR100", "", ({"train": True},)),
        ),
        DatasetSpec(
            info=DatasetInfo("svhn", 3, (32, 32), 10, _DIGITS, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
            read=read_svhn,
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
