"""Seed derivation: every random stream of a run is fixed by a tuple of integers and independent of the others.

A run never shares one generator between units of work that different processes may compute (a class, an
image position, a trajectory, an image update's regularizers): each unit draws from a stream of its own,
fixed by (run seed, stream, iteration, unit), so that a process computes its units without replaying the
draws of the units it leaves to others, and a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(seed: int, stream: int, index: int = 0, *more: int) -> int:
    """Seed of one random stream, fixed by (run seed, stream, index, *more) and independent of every other."""
    return int(np.random.SeedSequence([seed, stream, index, *more]).generate_state(1, np.uint64)[0] >> 1)


def stream_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator seeded with :func:`stream_seed` of ``(seed, *indices)``."""
    return torch.Generator().manual_seed(stream_seed(seed, *indices))


def run_seeds(seed: int, runs: int) -> list[int]:
    """Independent, reproducible seeds for ``runs`` runs (evaluation runs, proxies, experts), derived from one
    base seed: numpy's ``SeedSequence(seed).spawn(runs)``."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(runs)]
