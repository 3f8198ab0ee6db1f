"""Gather the evaluations written by trajectory_accuracy.sh or seed_methods_accuracy.sh into one JSON summary.

    python benchmarks/collect_accuracy.py [OUT_DIR [BENCHMARK_NAME]]    (default runs/bench-trajectory)

Each distilled set is compared with the random real subset of the same storage (IPC 10 for MTT/DATM,
IPC 1 for IDC, whose stored images each hold 4 decoded ones, and for low-rank sets, whose storage is that
of IPC 1), and each +CMI or +MIM set with its base method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import emit_json  # benchmarks/report.py (scripts run from this folder)

BASELINE = {"mtt": "random-ipc10", "mtt+cmi": "random-ipc10", "datm": "random-ipc10", "datm+cmi": "random-ipc10",
            "idc": "random-ipc1", "idc+cmi": "random-ipc1", "dm-ipc1": "random-ipc1", "dm-lowrank": "random-ipc1",
            "dm-lowrank+cmi": "random-ipc1", "dm-ipc10": "random-ipc10", "dm+mim": "random-ipc10",
            "sre2l": "random-ipc10-kd", "sre2l+cmi": "random-ipc10-kd", "dwa": "random-ipc10-kd",
            "sre2l+cmi1": "random-ipc10-kd", "dwa+cmi1": "random-ipc10-kd"}
BASE_METHOD = {"dm+mim": "dm-ipc10", "sre2l+cmi1": "sre2l", "dwa+cmi1": "dwa"}
"""A regularised set's base run, where it is not the name without its ``+cmi``/``+mim`` suffix."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/bench-trajectory", help="the runs' folder")
    parser.add_argument("benchmark", nargs="?", default="trajectory_and_idc_accuracy",
                        help="the benchmark name the summary records")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for path in sorted(out.glob("eval-*.json")):
        evaluation = json.loads(path.read_text())
        name = path.stem[len("eval-"):]
        results[name] = {key: evaluation.get(key) for key in ("mean", "std", "accuracies", "labels", "lr", "train_size",
                                                              "epochs", "model", "augmentation", "recipe")}
        config = out / name / "config.yaml"
        if config.exists():
            metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
            results[name]["iterations"] = len(metrics)
            results[name]["first_loss"] = metrics[0].get("loss/total")
            results[name]["last_loss"] = metrics[-1].get("loss/total")
    comparisons = {}
    for name, baseline in BASELINE.items():
        if name in results and baseline in results:
            comparisons[name] = {"vs": baseline,
                                 "gain_points": round(results[name]["mean"] - results[baseline]["mean"], 2),
                                 "above_baseline": results[name]["mean"] > results[baseline]["mean"]}
        base = BASE_METHOD.get(name, name.removesuffix("+cmi").removesuffix("+mim"))
        if name != base and name in results and base in results:
            term = name.rsplit("+", 1)[1].rstrip("0123456789")
            comparisons[name][f"{term}_gain_points"] = round(results[name]["mean"] - results[base]["mean"], 2)
    benchmark = args.benchmark
    emit_json({"benchmark": benchmark, "results": results, "comparisons": comparisons}, str(out / "summary.json"))


if __name__ == "__main__":
    main()
