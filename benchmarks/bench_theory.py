"""Wall time of the multi-index theory experiment: the quick run, the default run (once), and two ratios.

Runs ``run_theory`` with ``--quick``'s config and with the default config (the figures and theory.json
land in --work), then times training one student on the full real data of the default setting, and
reports, from the same default run, the mean time of one distillation (all seeds of one m at the main
setting) over that training time, and the default run's wall time over the quick run's. Prints one JSON
object (and writes it with --out).

    OMP_NUM_THREADS=1 python benchmarks/bench_theory.py [--work runs/bench-theory] [--skip-default]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from infodistill.experiments.theory import run_theory, setting_students, setting_task
from infodistill.experiments.theory_maths import TheoryConfig, quick_config, train_student
from report import emit_json  # benchmarks/report.py (scripts run from this folder)


def full_training_seconds(config: TheoryConfig, repeats: int = 5) -> float:
    """Median seconds to train one student (step + ridge) on all n_train points of ``config``'s main setting."""
    task = setting_task(config)
    student = setting_students(config)[0]
    times = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        train_student(task.X_train, task.y_train, student.W0, student.b, student.a0, config.step_size, config.ridge)
        if index:  # the first call is a warm-up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def summary(payload: dict) -> dict:
    main = payload["main"]
    return {
        "wall_seconds": round(payload["wall_seconds"], 2),
        "full_error": round(main["full_error"]["mean"], 4),
        "m_values": main["m_values"],
        "distilled_error": [round(v, 4) for v in main["distilled_error"]["mean"]],
        "random_error": [round(v, 4) for v in main["random_error"]["mean"]],
        "distilled_energy": [round(v, 3) for v in main["distilled_energy"]["mean"]],
        "random_energy": [round(v, 3) for v in main["random_energy"]["mean"]],
        "expected_random_energy": main["expected_random_energy"],
        "m_needed": {name: dict(zip(map(str, sweep["values"]), sweep["m_needed"]))
                     for name, sweep in payload["sweeps"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-theory", help="folder for the runs' figures and JSON")
    parser.add_argument("--skip-default", action="store_true", help="time the quick run only")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    work = Path(args.work)
    report = {"benchmark": "theory", "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    started = time.perf_counter()
    quick = run_theory(quick_config(), work / "quick", progress=False)
    report["quick"] = {"seconds": round(time.perf_counter() - started, 2), **summary(quick)}
    if not args.skip_default:
        config = TheoryConfig()
        started = time.perf_counter()
        default = run_theory(config, work / "default", progress=True)
        default_seconds = time.perf_counter() - started
        train_seconds = full_training_seconds(config)
        distill_seconds = statistics.mean(default["main"]["distill_seconds"])
        report["default"] = {"seconds": round(default_seconds, 2), **summary(default),
                             "json": str(work / "default" / "theory.json")}
        report["ratios"] = {
            "default_over_quick": round(default_seconds / report["quick"]["seconds"], 1),
            "distillation_over_full_training": round(distill_seconds / train_seconds, 1),
            "distillation_seconds": round(distill_seconds, 3),
            "full_training_seconds": round(train_seconds, 4),
            "note": "distillation = mean time of one m at the main setting (all seeds at once, "
                    f"{config.distill_steps} Adam steps); full training = one student on n={config.n_train}",
        }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
