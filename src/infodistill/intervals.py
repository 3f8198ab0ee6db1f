"""Comparisons that say whether a difference is real: each arm's mean accuracy with its 95 % confidence
interval, and the paired difference between two arms with its interval.

An *arm* is a set of runs that differ only in their distillation seed (e.g. DM with ``cmi_weight: auto``
over seeds 0, 1, 2); each run's set is scored by several evaluation runs whose seeds derive from the
evaluation's base seed, so two arms scored with the same evaluation settings share their evaluation seeds.
A *pair* is one (distillation seed, evaluation seed) scored in both arms: same initial set (the initial
images derive from the distillation seed), same network initialisation, minibatch order and augmentation
draws. Pairing removes the variance the arms share, so it resolves differences that two unpaired means
cannot.

Intervals (Student t, two-sided 95 %):

- with two or more distillation seeds, the unit is the distillation seed: each seed's mean over its
  evaluation runs (or of its paired differences), t-interval over seeds with ``seeds - 1`` degrees of
  freedom. Distillation seeds are the independent draws; evaluation runs of one set are not independent of
  each other in the set they share, so pooling them would overstate the resolution;
- with one distillation seed, the unit is the evaluation run: t-interval over runs with ``runs - 1``
  degrees of freedom. That interval is conditional on the one distilled set, and the table says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from infodistill.errors import UserInputError

CONFIDENCE = 0.95

Scores = Mapping[int, Mapping[int, float]]
"""Accuracy by distillation seed, then by evaluation seed."""


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval over ``n`` independent units."""

    mean: float
    low: float
    high: float
    n: int
    unit: str
    """``"distillation seed"`` or ``"evaluation run"``: what the ``n`` values are."""
    pairs: int = 0
    """Paired comparisons: how many (distillation seed, evaluation seed) pairs entered."""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of zero (a difference that is resolved)."""
        return self.low > 0 or self.high < 0

    def format(self, signed: bool = False) -> str:
        """``81.20 [80.90, 81.50]`` (``+0.30 [...]`` with ``signed``); ``n/a`` bounds with one unit."""
        value = f"{self.mean:+.2f}" if signed else f"{self.mean:.2f}"
        if not math.isfinite(self.low):
            return f"{value} [n/a: 1 {self.unit}]"
        if signed:
            return f"{value} [{self.low:+.2f}, {self.high:+.2f}]"
        return f"{value} [{self.low:.2f}, {self.high:.2f}]"

    def to_dict(self) -> dict[str, float | int | str | None]:
        finite = math.isfinite(self.low)
        return {"mean": self.mean, "low": self.low if finite else None, "high": self.high if finite else None,
                "n": self.n, "unit": self.unit, "pairs": self.pairs, "confidence": CONFIDENCE}


def t_interval(values: Sequence[float], unit: str, confidence: float = CONFIDENCE, pairs: int = 0) -> Interval:
    """Mean of ``values`` with the Student-t interval ``mean +- t_{n-1} * s / sqrt(n)`` (``s`` the sample
    standard deviation); with one value the bounds are infinite (no interval can be given)."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise UserInputError(f"no {unit} to compute an interval from")
    mean = float(data.mean())
    if data.size == 1:
        return Interval(mean, -math.inf, math.inf, 1, unit, pairs)
    half = float(stats.t.ppf(0.5 + confidence / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return Interval(mean, mean - half, mean + half, int(data.size), unit, pairs)


def _by_unit(scores: Scores) -> tuple[list[float], str]:
    """The values the interval runs over: per-seed means with >= 2 seeds, else the one seed's runs."""
    seeds = [seed for seed in sorted(scores) if scores[seed]]
    if len(seeds) >= 2:
        return [float(np.mean(list(scores[seed].values()))) for seed in seeds], "distillation seed"
    if not seeds:
        return [], "evaluation run"
    return [float(value) for _, value in sorted(scores[seeds[0]].items())], "evaluation run"


def arm_interval(scores: Scores, confidence: float = CONFIDENCE) -> Interval:
    """An arm's mean accuracy with its interval (the unit rule of the module docstring)."""
    values, unit = _by_unit(scores)
    return t_interval(values, unit, confidence, pairs=sum(len(runs) for runs in scores.values()))


def paired_difference(reference: Scores, other: Scores, confidence: float = CONFIDENCE) -> Interval:
    """``other - reference`` over the (distillation seed, evaluation seed) pairs both arms scored, with its
    interval; refuses arms that share no pair."""
    differences: dict[int, dict[int, float]] = {}
    for seed in sorted(set(reference) & set(other)):
        shared = sorted(set(reference[seed]) & set(other[seed]))
        if shared:
            differences[seed] = {run: float(other[seed][run]) - float(reference[seed][run]) for run in shared}
    if not differences:
        raise UserInputError("the two arms share no (distillation seed, evaluation seed) pair: score them with the "
                             "same seeds and evaluation settings to compare them paired")
    values, unit = _by_unit(differences)
    return t_interval(values, unit, confidence, pairs=sum(len(runs) for runs in differences.values()))
