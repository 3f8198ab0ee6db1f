"""One run (or baseline) directory as the experiments read it: its artefact's metadata, its settings, its
logged metrics and its evaluation (``report.load_run`` reads and checks one)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infodistill.artefact import DistilledSet, SetMetadata

BASELINE_METHOD = "random"
"""The method name of a random real subset (``infodistill baseline``)."""


@dataclass
class RunRecord:
    """One run (or baseline) directory, read and checked."""

    path: Path
    name: str
    metadata: SetMetadata
    config: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    distilled: DistilledSet = field(repr=False)

    @property
    def is_baseline(self) -> bool:
        """True for a random real subset (method ``random``)."""
        return self.metadata.method == BASELINE_METHOD

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Iterations and values of one logged key, skipping lines that lack it."""
        xs, ys = [], []
        for line in self.metrics:
            value = line.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(int(line["iteration"]))
                ys.append(float(value))
        return xs, ys

    def first_result(self) -> dict[str, Any] | None:
        """The first result of ``evaluation.json`` (None when not evaluated)."""
        if not self.evaluation or not self.evaluation.get("results"):
            return None
        return self.evaluation["results"][0]

    def last_value(self, key: str) -> float | None:
        """The last finite value logged under ``key`` (None if none was)."""
        values = [value for value in self.series(key)[1] if math.isfinite(value)]
        return values[-1] if values else None

    def final_cmi(self) -> tuple[float | None, str | None]:
        """The last logged ``monitor/cmi``, else the last ``loss/cmi``; with the key it came from."""
        for key in ("monitor/cmi", "loss/cmi"):
            value = self.last_value(key)
            if value is not None:
                return value, key
        return None, None
