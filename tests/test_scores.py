"""Robust scores (DD-Ranking's HLR, IOR, LRS, ARS): each formula against a hand computation, the refusal of
percentages, the intervals over runs, and ``infodistill evaluate --scores`` end to end with its cache."""

from __future__ import annotations

import json
import math

import pytest

from infodistill import scores as scores_module
from infodistill.cli import main
from infodistill.errors import UserInputError
from infodistill.scores import (
    ScoreArms,
    augmentation_robust_score,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    robust_score,
    robust_scores,
)

T_2_975 = 4.302652729749464  # Student t quantile, 2 degrees of freedom, 0.975 (standard tables)


def squash(a: float) -> float:
    """(e^a - e^-1) / (e - e^-1), written from DD-Ranking's definition."""
    return (math.exp(a) - 1 / math.e) / (math.e - 1 / math.e)


def test_robust_score_at_the_ends_and_the_middle():
    # a = 0: (1 - 0.367879) / (2.718282 - 0.367879) = 0.632121 / 2.350402 = 0.268941
    assert robust_score(0.0) == pytest.approx(0.268941, abs=1e-6)
    assert robust_score(1.0) == pytest.approx(1.0, abs=1e-12)
    assert robust_score(-1.0) == pytest.approx(0.0, abs=1e-12)


def test_hlr_and_ior_are_differences_of_fractions():
    assert hard_label_recovery(0.9, 0.6) == pytest.approx(0.3)
    assert improvement_over_random(0.6, 0.45) == pytest.approx(0.15)
    assert improvement_over_random(0.4, 0.45) == pytest.approx(-0.05)


def test_lrs_and_ars_weigh_their_gains_as_defined():
    # LRS: a = 0.5 * 0.2 - 0.5 * 0.1 = 0.05; ARS: a = 0.5 * 0.3 + 0.5 * 0.1 = 0.2
    assert label_robust_score(0.2, 0.1) == pytest.approx((math.exp(0.05) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert augmentation_robust_score(0.3, 0.1) == pytest.approx(
        (math.exp(0.2) - math.exp(-1)) / (math.e - math.exp(-1)))
    # w = 1 ignores HLR; w = 0 ignores IOR
    assert label_robust_score(0.4, 0.9, weight=1.0) == pytest.approx(squash(0.4))
    assert label_robust_score(0.4, 0.3, weight=0.0) == pytest.approx(squash(-0.3))


@pytest.mark.parametrize("call", [
    lambda: hard_label_recovery(85.0, 60.0),
    lambda: improvement_over_random(0.6, 45.0),
    lambda: improvement_over_random(-0.1, 0.2),
    lambda: robust_scores(ScoreArms([72.5], [0.5], [0.5], [0.5], [0.5], [0.9])),
])
def test_percentages_are_refused(call):
    with pytest.raises(UserInputError, match=r"is not a fraction in \[0, 1\]"):
        call()


def test_an_exponent_outside_minus_one_to_one_is_refused():
    with pytest.raises(UserInputError, match="must lie in"):
        robust_score(1.5)


def test_scores_are_computed_per_run_and_given_t_intervals_over_runs():
    arms = ScoreArms(set_with_aug=[0.6, 0.7, 0.65], set_without_aug=[0.5, 0.55, 0.6],
                     random_with_aug=[0.5, 0.5, 0.55], random_without_aug=[0.45, 0.5, 0.5],
                     set_hard=[0.6, 0.62, 0.64], full_hard=[0.9, 0.92, 0.88], augment="dsa")
    result = robust_scores(arms)
    # HLR per run 0.30, 0.30, 0.24: mean 0.28, s = sqrt((0.02^2 + 0.02^2 + 0.04^2) / 2) = 0.034641, s / sqrt(3) = 0.02
    assert result["hlr"].mean == pytest.approx(0.28)
    assert result["hlr"].half_width == pytest.approx(T_2_975 * 0.02)
    assert result["hlr"].n == 3 and result["hlr"].unit == "evaluation run"
    # IOR with augmentation 0.10, 0.20, 0.10 (the evaluation's, so LRS's); without 0.05, 0.05, 0.10
    assert result["ior"].mean == pytest.approx(0.4 / 3)
    assert result["ior_without_aug"].mean == pytest.approx(0.2 / 3)
    lrs_runs = [squash(0.5 * 0.10 - 0.5 * 0.30), squash(0.5 * 0.20 - 0.5 * 0.30), squash(0.5 * 0.10 - 0.5 * 0.24)]
    ars_runs = [squash(0.5 * 0.10 + 0.5 * 0.05), squash(0.5 * 0.20 + 0.5 * 0.05), squash(0.5 * 0.10 + 0.5 * 0.10)]
    assert result["lrs"].mean == pytest.approx(sum(lrs_runs) / 3)
    assert result["ars"].mean == pytest.approx(sum(ars_runs) / 3)
    # an evaluation without augmentation takes LRS's IOR from the runs without it
    plain = robust_scores(ScoreArms(**{**arms.__dict__, "augment": "none"}))
    assert plain["ior"].mean == pytest.approx(0.2 / 3)


def test_arms_of_different_lengths_are_refused():
    with pytest.raises(UserInputError, match="same evaluation runs"):
        robust_scores(ScoreArms([0.5, 0.6], [0.5], [0.5], [0.5], [0.5], [0.9]))


EVALUATE = ["--model", "ConvNet-1-8", "--runs", "2", "--epochs", "2", "--batched", "off", "--scores"]


@pytest.fixture
def random_set(striped_root, tmp_path, capsys):
    """A random baseline (ipc 2, seed 0): its own random arm, so its IOR is exactly 0 in every run."""
    path = tmp_path / "random.safetensors"
    assert main(["baseline", "--ipc", "2", "--seed", "0", "--out", str(path)]) == 0
    capsys.readouterr()
    return path


def test_evaluate_scores_end_to_end_and_the_full_data_arm_is_trained_once(random_set, tmp_path, capsys, monkeypatch):
    trained_sizes: list[int] = []
    original = scores_module.evaluate_set

    def spy(distilled, real, config, **kwargs):
        trained_sizes.append(len(distilled.images))
        return original(distilled, real, config, **kwargs)

    monkeypatch.setattr(scores_module, "evaluate_set", spy)
    cache, out = tmp_path / "cache", tmp_path / "eval.json"
    assert main(["evaluate", str(random_set), *EVALUATE, "--scores-cache", str(cache), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LRS (label-robust score)" in printed and "ARS (augmentation-robust score)" in printed
    assert 300 in trained_sizes  # the full training set (30 images x 10 classes) was trained
    payload = json.loads(out.read_text())["scores"]
    for name in ("hlr", "ior", "ior_with_aug", "ior_without_aug", "lrs", "ars"):
        assert payload[name]["n"] == 2 and payload[name]["low"] <= payload[name]["mean"] <= payload[name]["high"]
    arms = payload["arms"]
    assert all(0.0 <= value <= 1.0 for values in arms.values() for value in values)
    assert arms["set_with_aug"] == arms["random_with_aug"]  # the set is its own random arm
    assert payload["ars"]["mean"] == pytest.approx(squash(0.0))
    hlr_runs = [full - hard for full, hard in zip(arms["full_hard"], arms["set_hard"])]
    assert payload["hlr"]["mean"] == pytest.approx(sum(hlr_runs) / 2)
    assert payload["lrs"]["mean"] == pytest.approx(sum(squash(-0.5 * hlr) for hlr in hlr_runs) / 2)
    assert payload["full_data"]["source"] == "trained"
    cache_file = next(cache.iterdir())
    stamp, content = cache_file.stat().st_mtime_ns, cache_file.read_text()

    trained_sizes.clear()
    again = tmp_path / "again.json"
    assert main(["evaluate", str(random_set), *EVALUATE, "--scores-cache", str(cache), "--out", str(again)]) == 0
    assert 300 not in trained_sizes and trained_sizes  # the other arms trained again, the full data did not
    assert cache_file.stat().st_mtime_ns == stamp and cache_file.read_text() == content
    second = json.loads(again.read_text())["scores"]
    assert second["full_data"]["source"] == "cache"
    assert second["arms"]["full_hard"] == arms["full_hard"]


def test_a_given_full_data_accuracy_is_used_and_recorded(random_set, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(random_set), *EVALUATE, "--full-data-accuracy", "0.95",
                 "--scores-cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())["scores"]
    assert payload["full_data"] == {"source": "given", "accuracy": 0.95}
    assert payload["arms"]["full_hard"] == [0.95, 0.95]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--scores", "--full-data-accuracy", "95"], "--full-data-accuracy accuracy 95 is not a fraction"),
    (["--scores-cache", "somewhere"], "--scores-cache is only used with --scores"),
    (["--scores", "--models", "ConvNet-1-8,ConvNet-2-8"], "give --model, not --models"),
])
def test_bad_score_flags_are_refused_in_one_line_writing_nothing(random_set, tmp_path, capsys, flags, message):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(random_set), "--runs", "2", "--epochs", "1", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".csv").exists()
