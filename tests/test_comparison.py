"""Arms and paired comparisons: intervals against hand computations with published t quantiles, and the
arm tables of ``report`` built from run directories with known accuracies."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from infodistill.errors import UserInputError
from infodistill.experiments.arms import arm_rows, group_arms, paired_rows
from infodistill.experiments.report import load_runs, write_report
from infodistill.intervals import arm_interval, paired_difference, t_interval
from test_report import write_evaluation, write_run

# Two-sided 95 % quantiles of Student's t (any t table, e.g. NIST/SEMATECH e-Handbook of Statistical Methods,
# section 1.3.6.7.2, upper 0.025 critical values): 1 df 12.706, 2 df 4.303, 3 df 3.182, 4 df 2.776.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def test_t_interval_matches_a_hand_computation():
    # 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3) = 1.29099; half width 3.182 * 1.29099 / 2 = 2.0540
    interval = t_interval([1.0, 2.0, 3.0, 4.0], "evaluation run")
    assert interval.mean == 2.5 and interval.n == 4
    assert interval.high - 2.5 == pytest.approx(T_975[3] * math.sqrt(5 / 3) / 2, rel=1e-3)
    assert interval.low == pytest.approx(2.5 - (interval.high - 2.5))


def test_one_value_has_no_interval():
    interval = t_interval([3.0], "distillation seed")
    assert interval.mean == 3.0 and math.isinf(interval.low) and math.isinf(interval.high)
    assert "n/a" in interval.format()


def test_arm_interval_runs_over_seed_means_with_two_seeds_and_over_runs_with_one():
    two_seeds = {0: {10: 80.0, 11: 82.0}, 1: {10: 84.0, 11: 86.0}}  # seed means 81 and 85
    interval = arm_interval(two_seeds)
    assert interval.unit == "distillation seed" and interval.n == 2 and interval.mean == 83.0
    # sd of (81, 85) = 2.828427; half = 12.706 * 2.828427 / sqrt(2) = 25.412
    assert interval.high - 83.0 == pytest.approx(T_975[1] * 2.828427 / math.sqrt(2), rel=1e-3)
    one_seed = arm_interval({0: {10: 80.0, 11: 82.0, 12: 84.0}})
    assert one_seed.unit == "evaluation run" and one_seed.n == 3
    assert one_seed.high - 82.0 == pytest.approx(T_975[2] * 2.0 / math.sqrt(3), rel=1e-3)


def test_paired_difference_uses_only_shared_pairs_and_resolves_what_unpaired_means_cannot():
    # the arms vary together from run to run (shared initial set and evaluation seed); the other arm is
    # always 0.5 +- 0.1 points above
    reference = {0: {1: 80.0, 2: 83.0, 3: 78.0, 4: 81.0, 5: 99.0}}
    other = {0: {1: 80.5, 2: 83.6, 3: 78.4, 4: 81.5}, 7: {1: 50.0}}  # seed 7 and eval seed 5 have no partner
    difference = paired_difference(reference, other)
    assert difference.pairs == 4 and difference.n == 4 and difference.unit == "evaluation run"
    values = [0.5, 0.6, 0.4, 0.5]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert difference.mean == pytest.approx(0.5)
    assert difference.high - mean == pytest.approx(T_975[3] * sd / 2, rel=1e-3)
    assert difference.excludes_zero()
    # unpaired, the two means' intervals overlap widely
    assert not t_interval([80.5, 83.6, 78.4, 81.5], "run").low > t_interval([80.0, 83.0, 78.0, 81.0], "run").high
    with pytest.raises(UserInputError, match="share no"):
        paired_difference({0: {1: 80.0}}, {1: {1: 80.0}})


def _cell(tmp_path, name, weight, seed, accuracies, periodic):
    lines = [{"loss/dm": 1.0, "monitor/cmi": 0.5 - weight / 10, "monitor/cmi_heldout": 0.6},
             {"loss/dm": 0.9, "eval/accuracy": sum(periodic) / 2, "eval/accuracies": periodic,
              "monitor/cmi": 0.4 - weight / 10, "monitor/cmi_heldout": 0.55}]
    directory = write_run(tmp_path / name, lines, regularizers={"cmi": weight} if weight else None)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config.update(seed=seed, cmi_weight="auto" if weight else 0.0)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    write_evaluation(directory, accuracies, mean=sum(accuracies) / len(accuracies), std=0.0)
    result = json.loads((directory / "evaluation.json").read_text())
    result["results"][0]["seeds"] = [100, 101, 102]
    (directory / "evaluation.json").write_text(json.dumps(result))
    return directory


def test_report_groups_arms_by_setting_and_pairs_them_by_seed(tmp_path):
    dirs = [_cell(tmp_path, "plain-0", 0.0, 0, [80.0, 81.0, 82.0], [70.0, 72.0]),
            _cell(tmp_path, "cmi-0", 1.0, 0, [80.5, 81.5, 82.5], [71.0, 73.0]),
            _cell(tmp_path, "plain-1", 0.0, 1, [84.0, 85.0, 86.0], [74.0, 76.0]),
            _cell(tmp_path, "cmi-1", 1.0, 1, [85.0, 86.0, 87.0], [75.0, 77.0])]
    runs, _ = load_runs(dirs)
    arms = group_arms(runs)
    assert [arm.name for arm in arms] == ["cmi_weight=0.0", "cmi_weight=auto"]
    assert [len(arm.runs) for arm in arms] == [2, 2] and arms[0].seeds == [0, 1]
    rows = arm_rows(arms)
    assert rows[0]["accuracy"]["mean"] == pytest.approx(83.0) and rows[0]["accuracy"]["unit"] == "distillation seed"
    assert rows[1]["cmi"] == pytest.approx(0.3) and rows[1]["cmi_heldout"] == pytest.approx(0.55)
    paired = paired_rows(arms)
    # per-seed mean differences: seed 0 +0.5, seed 1 +1.0 -> mean 0.75, sd 0.353553, half 12.706 * 0.25
    assert len(paired) == 1 and paired[0]["difference"]["mean"] == pytest.approx(0.75)
    assert paired[0]["difference"]["high"] - 0.75 == pytest.approx(T_975[1] * 0.353553 / math.sqrt(2), rel=1e-3)
    assert paired[0]["difference"]["pairs"] == 6 and not paired[0]["resolved"]
    curve = arms[1].curve()
    assert [iteration for iteration, _ in curve] == [1] and curve[0][1].mean == pytest.approx(74.0)  # (72 + 76) / 2

    summary = write_report(runs, tmp_path / "report")
    assert summary["paired"][0]["arm"] == "cmi_weight=auto" and summary["paired"][0]["reference"] == "cmi_weight=0.0"
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert "| cmi_weight=auto | cmi_weight=0.0 | +0.75 [" in markdown
    assert (tmp_path / "report" / "convergence.png").is_file()
