"""Gather the evaluations written by trajectory_accuracy.sh into one JSON summary with same-run ratios.

    python benchmarks/collect_accuracy.py [OUT_DIR]      (default runs/bench-trajectory)

Each distilled set is compared with the random real subset of the same storage (IPC 10 for MTT/DATM,
IPC 1 for IDC, whose stored images each hold 4 decoded ones), and each +CMI set with its base method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from report import emit_json  # benchmarks/report.py (scripts run from this folder)

BASELINE = {"mtt": "random-ipc10", "mtt+cmi": "random-ipc10", "datm": "random-ipc10", "datm+cmi": "random-ipc10",
            "idc": "random-ipc1", "idc+cmi": "random-ipc1"}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-trajectory")
    results = {}
    for path in sorted(out.glob("eval-*.json")):
        evaluation = json.loads(path.read_text())
        name = path.stem[len("eval-"):]
        results[name] = {key: evaluation[key] for key in ("mean", "std", "accuracies", "labels", "lr", "train_size",
                                                          "epochs", "model", "augmentation")}
        config = out / name / "config.yaml"
        if config.exists():
            metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
            results[name]["iterations"] = len(metrics)
            results[name]["first_loss"] = metrics[0].get("loss/total")
            results[name]["last_loss"] = metrics[-1].get("loss/total")
    comparisons = {}
    for name, baseline in BASELINE.items():
        if name in results and baseline in results:
            comparisons[name] = {"vs": baseline, "gain_points": round(results[name]["mean"] - results[baseline]["mean"], 2),
                                 "above_baseline": results[name]["mean"] > results[baseline]["mean"]}
        base = name.removesuffix("+cmi")
        if name != base and name in results and base in results:
            comparisons[name]["cmi_gain_points"] = round(results[name]["mean"] - results[base]["mean"], 2)
    emit_json({"benchmark": "trajectory_and_idc_accuracy", "results": results, "comparisons": comparisons},
              str(out / "summary.json"))


if __name__ == "__main__":
    main()
