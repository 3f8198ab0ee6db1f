"""Arms of a report: runs grouped by their settings (all but the distillation seed), each arm's accuracy
with its 95 % interval, the paired difference of every arm against a reference arm, and the accuracy
against the iteration with its interval (the convergence curve). The statistics are in
:mod:`infodistill.intervals`; this module only gathers the scores from run directories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from infodistill.errors import UserInputError
from infodistill.experiments.runs import RunRecord
from infodistill.intervals import Interval, arm_interval, paired_difference

NOT_SETTINGS = frozenset({"seed", "resolved_weights", "cmi_calibration", "device", "data_root", "checkpoint_every",
                          "monitor_every", "eval_every", "eval_runs", "eval_epochs", "eval_model"})
"""config.yaml keys that do not make two runs different arms: the seed (what an arm varies over), what a run
computes on, and what it only logs."""

BASELINE_ARM = "random"


def run_seed(record: RunRecord) -> int:
    """The run's distillation seed (config.yaml's, else the set's metadata)."""
    seed = (record.config or {}).get("seed")
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else int(record.metadata.seed)


@dataclass
class Arm:
    """Runs that differ only in their distillation seed."""

    name: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted({run_seed(record) for record in self.runs})

    def scores(self) -> dict[int, dict[int, float]]:
        """Final accuracy by distillation seed, then evaluation seed (from each run's evaluation.json)."""
        scores: dict[int, dict[int, float]] = {}
        for record in self.runs:
            result = record.first_result()
            if result is None or not result.get("accuracies"):
                continue
            seeds = result.get("seeds") or list(range(len(result["accuracies"])))
            scores.setdefault(run_seed(record), {}).update(
                {int(seed): float(value) for seed, value in zip(seeds, result["accuracies"])})
        return scores

    def curve(self) -> list[tuple[int, Interval]]:
        """Periodic accuracy against the iteration (``eval/accuracies``, each periodic run's accuracy) with its
        interval; runs of one seed share their periodic evaluation seeds across arms."""
        by_iteration: dict[int, dict[int, dict[int, float]]] = {}
        for record in self.runs:
            for line in record.metrics:
                values = line.get("eval/accuracies")
                if isinstance(values, list) and values:
                    by_iteration.setdefault(int(line["iteration"]), {})[run_seed(record)] = {
                        index: float(value) for index, value in enumerate(values)}
        return [(iteration, arm_interval(scores)) for iteration, scores in sorted(by_iteration.items())]

    def final_value(self, key: str) -> float | None:
        """The mean over the arm's runs of the last finite value logged under ``key`` (None if none logged)."""
        finals = [value for value in (record.last_value(key) for record in self.runs) if value is not None]
        return sum(finals) / len(finals) if finals else None


def _settings(record: RunRecord) -> dict[str, Any]:
    if record.is_baseline or record.config is None:
        return {"method": BASELINE_ARM}
    return {key: value for key, value in record.config.items() if key not in NOT_SETTINGS}


def group_arms(records: Sequence[RunRecord]) -> list[Arm]:
    """Group runs into arms, in the order their first run was given. An arm is named by the settings that
    differ between the arms (``cmi_weight=auto``), by its method when none do; random subsets form one arm."""
    settings = [_settings(record) for record in records]
    keys = sorted({key for entry in settings for key in entry})
    varying = [key for key in keys if len({repr(entry.get(key)) for entry in settings if "method" in entry
                                           and entry.get("method") != BASELINE_ARM}) > 1]
    arms: dict[str, Arm] = {}
    for record, entry in zip(records, settings):
        if entry.get("method") == BASELINE_ARM:
            name = BASELINE_ARM
        else:
            name = ", ".join(f"{key}={entry.get(key)}" for key in varying) or str(entry.get("method"))
        arms.setdefault(name, Arm(name)).runs.append(record)
    return list(arms.values())


def arm_rows(arms: Sequence[Arm]) -> list[dict[str, Any]]:
    """One row per scored arm: seeds, accuracy with interval, final in-sample and held-out CMI."""
    rows = []
    for arm in arms:
        scores = arm.scores()
        if not scores:
            continue
        rows.append({"arm": arm.name, "seeds": sorted(scores), "accuracy": arm_interval(scores).to_dict(),
                     "cmi": arm.final_value("monitor/cmi"), "cmi_heldout": arm.final_value("monitor/cmi_heldout")})
    return rows


def paired_rows(arms: Sequence[Arm]) -> list[dict[str, Any]]:
    """Every scored arm against the reference arm (the first non-random arm given) and against the random
    subset when one was given: the paired difference in accuracy points with its interval."""
    scored = [arm for arm in arms if arm.scores()]
    reference = next((arm for arm in scored if arm.name != BASELINE_ARM), None)
    baseline = next((arm for arm in scored if arm.name == BASELINE_ARM), None)
    rows = []
    for against in (reference, baseline):
        if against is None:
            continue
        for arm in scored:
            if arm is against or arm is baseline:
                continue
            try:
                difference = paired_difference(against.scores(), arm.scores())
            except UserInputError:  # arms that share no pair are left out of the paired table
                continue
            rows.append({"arm": arm.name, "reference": against.name, "difference": difference.to_dict(),
                         "resolved": difference.excludes_zero()})
    return rows


def _interval(entry: dict[str, Any], signed: bool = False) -> str:
    interval = Interval(entry["mean"], entry["low"] if entry["low"] is not None else -math.inf,
                        entry["high"] if entry["high"] is not None else math.inf, entry["n"], entry["unit"])
    return f"{interval.format(signed)} ({entry['n']} {entry['unit']}{'s' if entry['n'] != 1 else ''})"


def arms_markdown(arms: list[dict[str, Any]], paired: list[dict[str, Any]]) -> str:
    """The arm and paired tables as Markdown (empty when no arm was scored)."""
    if not arms:
        return ""
    lines = ["## Arms (95 % confidence intervals)", "",
             "| arm | seeds | accuracy (%) | final CMI | held-out CMI |", "|---|---|---|---|---|"]
    for row in arms:
        cmi = "-" if row["cmi"] is None else f"{row['cmi']:.4g}"
        held = "-" if row["cmi_heldout"] is None else f"{row['cmi_heldout']:.4g}"
        lines.append(f"| {row['arm']} | {','.join(map(str, row['seeds']))} | {_interval(row['accuracy'])} | "
                     f"{cmi} | {held} |")
    if paired:
        lines += ["", "| arm | minus | paired difference (points) | pairs | resolved |", "|---|---|---|---|---|"]
        for row in paired:
            lines.append(f"| {row['arm']} | {row['reference']} | {_interval(row['difference'], signed=True)} | "
                         f"{row['difference']['pairs']} | {'yes' if row['resolved'] else 'no'} |")
    lines += ["", "Intervals: Student t over distillation seeds (each seed's mean over its evaluation runs) when an "
              "arm has two or more seeds, else over the one set's evaluation runs (conditional on that set). "
              "Pairs share the distillation seed and the evaluation seed. Resolved: the interval excludes 0."]
    return "\n".join(lines)
