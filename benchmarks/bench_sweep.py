"""Time saved by running a grid as one sweep instead of one process per cell.

The same small grid (DM + CMI at several weights on Fashion-MNIST, each cell distilled and evaluated)
runs twice in one invocation: as ``infodistill sweep`` (one process: the dataset, the proxy pool and the
test set are read once and shared) and as separate ``infodistill distill`` + ``infodistill evaluate``
processes per cell (each reads everything again). Both produce the same sets (checked bit for bit) and
the same accuracies; the report gives both wall times and their ratio.

    OMP_NUM_THREADS=2 python benchmarks/bench_sweep.py [--cells 4] [--work runs/bench-sweep] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from infodistill.artefact import load_set
from report import emit_json  # benchmarks/report.py (scripts run from this folder)

DISTILL = {"method": "dm", "ipc": 10, "iterations": 20, "model": "ConvNet-3-32", "batch_real": 64, "seed": 0}
EVALUATE = ["--epochs", "20", "--runs", "1"]


def infodistill(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "infodistill", *argv], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=4, help="grid size (CMI weights 0, 1, 10, ...)")
    parser.add_argument("--work", default="runs/bench-sweep", help="scratch folder (emptied first)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    pool = work / "pool"
    infodistill("proxies", "--arch", "ConvNetGAP-3-32", "--count", "2", "--epochs", "1", "--out", str(pool), "--json")
    weights = [0.0] + [10.0 ** power for power in range(args.cells - 1)]

    started = time.perf_counter()
    infodistill("sweep", "--out", str(work / "sweep"), "--quiet", "--no-baseline", "--grid",
                "cmi_weight=" + ",".join(f"{weight:g}" for weight in weights), f"--set=proxies={pool}",
                *[f"--set={key}={value}" for key, value in DISTILL.items()], *EVALUATE)
    sweep_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for weight in weights:
        cell = work / "separate" / f"cmi_weight-{weight:g}"
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in DISTILL.items()]
        infodistill("distill", *flags, "--cmi-weight", f"{weight:g}", "--proxies", str(pool), "--quiet",
                    "--out", str(cell))
        infodistill("evaluate", str(cell / "set.safetensors"), *EVALUATE, "--out", str(cell / "evaluation.json"))
    separate_seconds = time.perf_counter() - started

    same_sets, same_accuracies = True, True
    for weight in weights:
        a, b = work / "sweep" / "cells" / f"cmi_weight-{weight:g}", work / "separate" / f"cmi_weight-{weight:g}"
        same_sets &= torch.equal(load_set(a / "set.safetensors").images, load_set(b / "set.safetensors").images)
        accuracies = [json.loads((run / "evaluation.json").read_text())["results"][0]["accuracies"] for run in (a, b)]
        same_accuracies &= accuracies[0] == accuracies[1]
    emit_json({
        "benchmark": "sweep_vs_separate_processes",
        "cells": len(weights),
        "cell": {**DISTILL, "proxies": "2 x ConvNetGAP-3-32", "evaluate": " ".join(EVALUATE)},
        "sweep_seconds": round(sweep_seconds, 2),
        "separate_processes_seconds": round(separate_seconds, 2),
        "separate_over_sweep": round(separate_seconds / sweep_seconds, 3),
        "saved_seconds_per_cell": round((separate_seconds - sweep_seconds) / len(weights), 2),
        "same_sets": bool(same_sets),
        "same_accuracies": bool(same_accuracies),
        "torch_threads": torch.get_num_threads(),
    }, args.out)


if __name__ == "__main__":
    main()
