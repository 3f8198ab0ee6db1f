"""Robust scores of a set, with DD-Ranking's definitions (Li et al. 2025, "DD-Ranking: Rethinking the
Evaluation of Dataset Distillation", arXiv:2505.13300): how much a set beats the random real subset of the
same storage once the gains of soft labels and of augmentation are taken apart.

All accuracies are fractions in [0, 1] (an accuracy in percent is refused). With weight ``w`` (0.5):

- HLR (hard-label recovery) = acc(full real data, hard labels) - acc(set, hard labels);
- IOR (improvement over random) = acc(set) - acc(random subset of the same storage, same recipe);
- LRS (label-robust score) = (e^a - e^-1) / (e - e^-1) with a = w * IOR - (1 - w) * HLR;
- ARS (augmentation-robust score) = (e^a - e^-1) / (e - e^-1) with a = w * IOR_with_aug + (1 - w) * IOR_without_aug.

:func:`robust_scores` computes every score per evaluation run (the arms share their evaluation seeds, so run i
of every arm trains from the same initialisation and minibatch order) and gives each its 95 % Student-t
interval over runs. :func:`score_set` trains the arms; the full-data arm, the expensive one, is cached
(docs/scores.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from infodistill.artefact import DistilledSet, SetMetadata
from infodistill.data import RealData
from infodistill.errors import UserInputError
from infodistill.evaluate import EvalResult, evaluate_set, random_subset
from infodistill.files import atomic_path
from infodistill.intervals import Interval, t_interval
from infodistill.training import EvalConfig

WEIGHT = 0.5
"""DD-Ranking's default weight ``w`` of both scores."""
SCORE_NAMES = ("hlr", "ior", "ior_with_aug", "ior_without_aug", "lrs", "ars")


def check_fraction(value: float, what: str) -> float:
    """``value`` as a float when it is an accuracy fraction in [0, 1]; refuse a percentage in one line."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        hint = f" (an accuracy in percent? {value:g} % is {value / 100:g})" if 1.0 < value <= 100.0 else ""
        raise UserInputError(f"{what} accuracy {value:g} is not a fraction in [0, 1]{hint}; "
                             "scores take accuracies as fractions")
    return value


def hard_label_recovery(full_hard: float, set_hard: float) -> float:
    """HLR: what training on the whole real training set gains over the set, both with hard labels."""
    return check_fraction(full_hard, "full-data") - check_fraction(set_hard, "set (hard labels)")


def improvement_over_random(set_accuracy: float, random_accuracy: float) -> float:
    """IOR: what the set gains over the random real subset of the same storage, same recipe."""
    return check_fraction(set_accuracy, "set") - check_fraction(random_accuracy, "random-subset")


def robust_score(a: float) -> float:
    """DD-Ranking's squashing of a gain ``a`` in [-1, 1] into [0, 1]: (e^a - e^-1) / (e - e^-1)."""
    if not -1.0 <= a <= 1.0:
        raise UserInputError(f"a score exponent must lie in [-1, 1] (gains of fractions), got {a:g}")
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def label_robust_score(ior: float, hlr: float, weight: float = WEIGHT) -> float:
    """LRS: high when the set beats random (IOR) and leaves little to recover with hard labels (HLR)."""
    return robust_score(weight * ior - (1.0 - weight) * hlr)


def augmentation_robust_score(ior_with_aug: float, ior_without_aug: float, weight: float = WEIGHT) -> float:
    """ARS: the gain over random with augmentation and without, weighted, so augmentation cannot carry it."""
    return robust_score(weight * ior_with_aug + (1.0 - weight) * ior_without_aug)


@dataclass(frozen=True)
class ScoreArms:
    """Per-run test accuracies (fractions) of the arms; position i of every list is evaluation seed i.

    ``augment`` is the evaluation's augmentation: the IOR of LRS and both HLR arms are at it."""

    set_with_aug: Sequence[float]
    set_without_aug: Sequence[float]
    random_with_aug: Sequence[float]
    random_without_aug: Sequence[float]
    set_hard: Sequence[float]
    full_hard: Sequence[float]
    augment: str = "dsa"

    def lists(self) -> dict[str, list[float]]:
        """Every arm by name, each value checked to be a fraction, all of one length."""
        arms = {name: [check_fraction(value, name.replace("_", " ")) for value in getattr(self, name)]
                for name in ("set_with_aug", "set_without_aug", "random_with_aug", "random_without_aug",
                             "set_hard", "full_hard")}
        lengths = {len(values) for values in arms.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise UserInputError(f"the arms must hold the same evaluation runs, got lengths "
                                 f"{ {name: len(values) for name, values in arms.items()} }")
        return arms


def robust_scores(arms: ScoreArms, weight: float = WEIGHT) -> dict[str, Interval]:
    """Each score per evaluation run, then its mean with the 95 % t-interval over runs."""
    values = arms.lists()
    augmented = arms.augment != "none"
    per_run: dict[str, list[float]] = {name: [] for name in SCORE_NAMES}
    for run in range(len(values["set_hard"])):
        with_aug = improvement_over_random(values["set_with_aug"][run], values["random_with_aug"][run])
        without_aug = improvement_over_random(values["set_without_aug"][run], values["random_without_aug"][run])
        ior = with_aug if augmented else without_aug
        hlr = hard_label_recovery(values["full_hard"][run], values["set_hard"][run])
        per_run["hlr"].append(hlr)
        per_run["ior"].append(ior)
        per_run["ior_with_aug"].append(with_aug)
        per_run["ior_without_aug"].append(without_aug)
        per_run["lrs"].append(label_robust_score(ior, hlr, weight))
        per_run["ars"].append(augmentation_robust_score(with_aug, without_aug, weight))
    return {name: t_interval(scores, "evaluation run") for name, scores in per_run.items()}


# ----------------------------------------------------------------------------------------------
# Training the arms: the set, the random subset, the full real training set (cached)
# ----------------------------------------------------------------------------------------------

DEFAULT_CACHE = Path("~/.cache/infodistill")
"""Where ``--scores`` keeps the full-data accuracies unless ``--scores-cache`` says otherwise."""
KEY_FIELDS = ("model", "runs", "epochs", "seed", "lr", "momentum", "weight_decay", "batch_size", "augment",
              "lr_schedule", "optimizer", "recipe", "temperature", "precision")
"""The settings a full-data accuracy depends on (with the dataset): the cache key."""


def fractions(result: EvalResult) -> list[float]:
    """An evaluation's per-run accuracies (percent) as fractions."""
    return [accuracy / 100.0 for accuracy in result.accuracies]


def full_data_set(real: RealData) -> DistilledSet:
    """The whole real training set with hard labels, as a set to evaluate (HLR's reference arm)."""
    metadata = SetMetadata(dataset=real.info.name, mean=tuple(real.info.mean), std=tuple(real.info.std),
                           classes=tuple(real.info.class_names), method="full",
                           ipc=len(real.train_labels) // real.info.num_classes, seed=0)
    return DistilledSet(images=real.normalise(real.train_images).float().contiguous(),
                        labels=real.train_labels.long(), metadata=metadata)


def full_data_key(real: RealData, config: EvalConfig) -> dict[str, object]:
    """What a cached full-data accuracy is valid for: the dataset (name and sizes) and the recipe."""
    return {"dataset": real.info.name, "train_size": len(real.train_labels), "test_size": len(real.test_labels),
            **{name: getattr(config, name) for name in KEY_FIELDS}}


def full_data_accuracies(real: RealData, config: EvalConfig, cache_dir: str | Path,
                         progress: bool = True) -> tuple[list[float], dict[str, str]]:
    """Per-run accuracies (fractions) of the full real training set with hard labels under ``config``,
    read from ``cache_dir`` when an earlier call stored them for the same key, else trained and stored."""
    key = full_data_key(real, config)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"full-data-accuracy-{digest}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored["key"] == key:
                return [check_fraction(value, "cached full-data") for value in stored["accuracies"]], \
                    {"source": "cache", "cache_file": str(path)}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"the score cache file {path} is unreadable ({error}); delete it") from None
    result = evaluate_set(full_data_set(real), real, config, progress=progress)
    accuracies = fractions(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps({"key": key, "accuracies": accuracies, "seeds": result.seeds}, indent=2)
                                 + "\n")
    except OSError as error:
        raise UserInputError(f"cannot write the score cache {path}: {error.strerror or error}") from None
    return accuracies, {"source": "trained", "cache_file": str(path)}


def check_scorable(distilled: DistilledSet, full_accuracy: float | None) -> None:
    """Refuse what ``--scores`` cannot score fairly, before any training."""
    if "zca" in distilled.metadata.extra:
        raise UserInputError("--scores does not score ZCA-whitened sets: the random and full-data arms would "
                             "be trained in another input space")
    if full_accuracy is not None:
        check_fraction(full_accuracy, "--full-data-accuracy")


def score_set(distilled: DistilledSet, real: RealData, config: EvalConfig, cache_dir: str | Path = DEFAULT_CACHE,
              full_accuracy: float | None = None, progress: bool = True,
              main: EvalResult | None = None) -> dict:
    """Train every arm the scores need with ``config``'s recipe and evaluation seeds and return the
    ``scores`` payload: each score's interval, the arms' per-run accuracies and where HLR's reference came
    from. ``main`` is the set's evaluation under ``config`` when already trained."""
    check_scorable(distilled, full_accuracy)
    other = "none" if config.augment != "none" else "dsa"
    main = main if main is not None else evaluate_set(distilled, real, config, progress=progress)
    set_other = evaluate_set(distilled, real, replace(config, augment=other), progress=progress)
    baseline = random_subset(real, distilled.metadata.ipc, distilled.metadata.seed)
    random_main = evaluate_set(baseline, real, config, progress=progress)
    random_other = evaluate_set(baseline, real, replace(config, augment=other), progress=progress)
    hard = main if main.labels == "hard" else evaluate_set(distilled, real, replace(config, use_soft_labels=False),
                                                          progress=progress)
    hard_config = replace(config, use_soft_labels=False, use_learned_lr=False)
    if full_accuracy is not None:
        full, source = [float(full_accuracy)] * config.runs, {"source": "given"}
    else:
        full, source = full_data_accuracies(real, hard_config, cache_dir, progress)
    augmented = config.augment != "none"
    by_aug = {True: (main, random_main), False: (set_other, random_other)}
    arms = ScoreArms(set_with_aug=fractions(by_aug[augmented][0]), set_without_aug=fractions(by_aug[not augmented][0]),
                     random_with_aug=fractions(by_aug[augmented][1]),
                     random_without_aug=fractions(by_aug[not augmented][1]),
                     set_hard=fractions(hard), full_hard=full, augment=config.augment)
    scores = robust_scores(arms)
    return {"definition": "DD-Ranking (arXiv:2505.13300), accuracies as fractions, final epoch",
            "weight": WEIGHT, "augment": config.augment, "other_augment": other, "seeds": main.seeds,
            **{name: interval.to_dict() for name, interval in scores.items()},
            "arms": {name: values for name, values in arms.lists().items()},
            "random_subset": {"ipc": distilled.metadata.ipc, "seed": distilled.metadata.seed},
            "full_data": {**source, "accuracy": float(np.mean(full))}}


def format_scores(payload: dict) -> str:
    """The scores as lines: name, mean and 95 % interval over evaluation runs."""
    labels = {"hlr": "HLR (hard-label recovery)", "ior": "IOR (improvement over random)",
              "ior_with_aug": "IOR with augmentation", "ior_without_aug": "IOR without augmentation",
              "lrs": "LRS (label-robust score)", "ars": "ARS (augmentation-robust score)"}
    lines = [f"scores (fractions, mean [95 % interval over {payload['hlr']['n']} evaluation runs]):"]
    for name, label in labels.items():
        entry = payload[name]
        bounds = "n/a: 1 run" if entry["low"] is None else f"{entry['low']:+.4f}, {entry['high']:+.4f}"
        lines.append(f"  {label:<33} {entry['mean']:+.4f} [{bounds}]")
    lines.append(f"  full-data accuracy {payload['full_data']['accuracy']:.4f} ({payload['full_data']['source']})")
    return "\n".join(lines)
