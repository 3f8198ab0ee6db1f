"""Random streams per unit of work: a process draws for its own classes, positions and updates exactly what a
one-process run draws for them, without replaying anyone else's draws; checkpoints from before are refused."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infodistill.augment import DSA
from infodistill.cli import main
from infodistill.data import ClassSampler
from infodistill.methods import DistillContext
from infodistill.methods.base import CLASS_DRAWS
from infodistill.seeds import stream_generator, stream_seed
from infodistill.synthetic import PixelSet


def _context(real, classes=None, seed: int = 5) -> DistillContext:
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    synthetic = PixelSet.initialise(sampler, 2, "real", torch.Generator().manual_seed(0))
    return DistillContext(iteration=3, generator=torch.Generator().manual_seed(seed), synthetic=synthetic,
                          sampler=sampler, info=real.info, augment=DSA(), device=torch.device("cpu"),
                          model_name="ConvNet-1-8", classes=classes)


def test_a_class_draws_the_same_batch_whichever_classes_a_process_owns(real):
    every_real, every_syn = _context(real).paired_class_batches(4, update=1)
    some_real, some_syn = _context(real, classes=(3, 7)).paired_class_batches(4, update=1)
    assert len(some_real) == 2
    for mine, label in zip(range(2), (3, 7)):
        assert torch.equal(some_real[mine], every_real[label])
        assert torch.equal(some_syn[mine], every_syn[label])


def test_a_class_batch_comes_from_the_documented_stream(real):
    """Class 3's real batch of round 1 is the sampler's draw from stream (seed, CLASS_DRAWS, round, class)."""
    context = _context(real)
    context.augment = None
    real_by_class, _ = context.paired_class_batches(4, update=1)
    expected = context.sampler.sample(3, 4, stream_generator(5, CLASS_DRAWS, 1, 3))
    assert torch.equal(real_by_class[3], expected)
    other_round, _ = context.paired_class_batches(4, update=2)
    assert not torch.equal(other_round[3], real_by_class[3])


def test_stream_seeds_differ_by_every_index_and_by_length():
    seeds = {stream_seed(0, 0, 5, *more) for more in [(), (1,), (1, 0), (1, 0, 0), (0, 1), (2,)]}
    assert len(seeds) == 6


def test_a_checkpoint_from_before_per_unit_streams_is_refused_on_resume(striped_root, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["distill", "--method", "dm", "--ipc", "1", "--batch-real", "4", "--model", "ConvNet-1-8", "--quiet",
              "--out", str(out), "--checkpoint-every", "1", "--monitor-every", "0"]
    assert main([*common, "--iterations", "1"]) == 0
    checkpoint = out / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
    assert metadata.pop("random_streams") == "per-unit"
    save_file(load_file(str(checkpoint)), str(checkpoint), metadata=metadata)  # as an earlier release wrote it
    before = checkpoint.read_bytes()
    capsys.readouterr()
    assert main([*common, "--iterations", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one stream per iteration" in err[0] and "start it afresh" in err[0]
    assert checkpoint.read_bytes() == before
