"""Shared fixtures: a tiny, learnable Fashion-MNIST-shaped dataset in the real IDX format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataset_fixtures import FASHION_MNIST_FILES, write_idx


def striped_digits(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 noise images where class c has a bright horizontal band at rows 2c+2..2c+4: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 80, size=(len(labels), 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 * label + 2 : 2 * label + 5, :] = 230
    order = rng.permutation(len(labels))
    return images[order], labels[order].astype(np.uint8)


@pytest.fixture
def striped_root(tmp_path, monkeypatch) -> Path:
    """A data root holding a learnable 'fashion-mnist' (30 train / 10 test images per class); set as
    INFODISTILL_DATA."""
    root = tmp_path / "data"
    train_images, train_labels = striped_digits(30, seed=1)
    test_images, test_labels = striped_digits(10, seed=2)
    for name, array in zip(FASHION_MNIST_FILES, (train_images, train_labels, test_images, test_labels)):
        write_idx(root / "FashionMNIST" / "raw" / name, array)
    monkeypatch.setenv("INFODISTILL_DATA", str(root))
    return root


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_real_fashion_mnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist package is not installed"
)


@pytest.fixture
def real(striped_root):
    """The tiny dataset of ``striped_root``, loaded."""
    from infodistill.data import load_dataset

    return load_dataset("fashion-mnist")


def run_killed_after_iteration(index: int, config, out_dir, real, monkeypatch) -> None:
    """Run ``config`` into ``out_dir`` and interrupt it (KeyboardInterrupt) once iteration ``index`` is logged."""
    from infodistill.loop import MetricsLog, distill

    original_write = MetricsLog.write

    def killed(self, iteration, values):
        original_write(self, iteration, values)
        if iteration == index:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "write", killed)
        with pytest.raises(KeyboardInterrupt):
            distill(config, out_dir, progress=False, real=real)


def initial_pixel_images(config, real):
    """The real images a run of ``config`` starts from (its init stream drawing a pixel set)."""

    from infodistill.data import ClassSampler
    from infodistill.loop import INIT_STREAM
    from infodistill.seeds import stream_generator
    from infodistill.synthetic import PixelSet

    images, labels = real.train_tensors()
    generator = stream_generator(config.seed, INIT_STREAM)
    return PixelSet.initialise(ClassSampler(images, labels, real.info.num_classes), config.ipc, "real",
                               generator).images().detach()


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test in this process runs as on a CPU without native bf16 instructions, so that precision 'auto'
    resolves to fp32 on any machine and the fp32 references hold; tests of 'auto' patch it back."""
    monkeypatch.setattr("infodistill.precision.cpu_has_native_bf16", lambda cpuinfo=None: False)
