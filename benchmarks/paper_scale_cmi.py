"""The CMI paper's claim at its own scale, on one GPU: a pool of instance-norm ResNet18 proxies trained 40
epochs on Fashion-MNIST, DM at IPC 10 for the published 20000 iterations (256 real images per class) with
and without the CMI term (``auto`` weight), from the same seed, each set scored by 5 runs x 1000 epochs with
the same evaluation seeds (a paired comparison), and each set's CMI under the optimised pool and under a
held-out pool of other seeds. Prints one JSON object (and writes it with --out).

    python benchmarks/paper_scale_cmi.py --device cuda --work runs/paper-scale --out paper-scale.json
    python benchmarks/paper_scale_cmi.py --tiny --work runs/paper-scale-tiny  # every step, tiny, on a CPU

Every step is resumable: the pools are topped up, a finished distillation is reused (an interrupted one
resumes from its checkpoint), so the script can be run again after an interruption. ``--budget-seconds``
stops before a step that would not fit (the JSON says what was skipped).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from infodistill.artefact import load_set
from infodistill.data import load_dataset
from infodistill.evaluate import evaluate_set
from infodistill.intervals import paired_difference, t_interval
from infodistill.loop import DistillConfig, distill
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import pool_cmi
from infodistill.training import EvalConfig


@dataclass(frozen=True)
class Scale:
    """The sizes of one run of the script."""

    proxy_arch: str = "ResNet18"
    proxy_count: int = 8
    held_out_count: int = 2
    proxy_epochs: int = 40
    proxy_per_class: int = 0
    iterations: int = 20000
    batch_real: int = 256
    ipc: int = 10
    model: str = "ConvNet-3"
    eval_runs: int = 5
    eval_epochs: int = 1000


PAPER = Scale()
TINY = Scale(proxy_arch="ConvNetGAP-1-8", proxy_count=2, held_out_count=1, proxy_epochs=1, proxy_per_class=20,
             iterations=2, batch_real=8, ipc=2, model="ConvNet-1-8", eval_runs=2, eval_epochs=2)
HELD_OUT_SEED = 1000


def _timed(steps: dict[str, float], name: str, started: float) -> None:
    steps[name] = round(time.perf_counter() - started, 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    scale = TINY if args.tiny else PAPER
    if args.iterations is not None:
        scale = replace(scale, iterations=args.iterations)
    work = Path(args.work)
    device = args.device
    real = load_dataset(args.dataset)
    deadline = time.perf_counter() + args.budget_seconds
    steps: dict[str, float] = {}
    skipped: list[str] = []

    started = time.perf_counter()
    pools = {"optimised": (work / "pool", scale.proxy_count, 0), "held_out": (work / "pool-heldout",
                                                                               scale.held_out_count, HELD_OUT_SEED)}
    for directory, count, seed in pools.values():
        train_proxy_pool(real, directory, arch=scale.proxy_arch, count=count, epochs=scale.proxy_epochs, seed=seed,
                         device=device, progress=not args.quiet, train_per_class=scale.proxy_per_class,
                         precision=args.precision)
    _timed(steps, "proxies", started)
    pool = ProxyPool.load(work / "pool", real.info, device=device)
    held_out = ProxyPool.load(work / "pool-heldout", real.info, device=device)

    base = DistillConfig(dataset=args.dataset, method="dm", ipc=scale.ipc, iterations=scale.iterations,
                         batch_real=scale.batch_real, model=scale.model, seed=args.seed, device=device,
                         proxies=str(work / "pool"), held_out_proxies=str(work / "pool-heldout"),
                         monitor_every=max(1, scale.iterations // 20), checkpoint_every=max(1, scale.iterations // 20),
                         precision=args.precision)
    arms = {"dm": replace(base, cmi_weight=0.0), "dm+cmi": replace(base, cmi_weight="auto")}
    evaluation = EvalConfig(model="ConvNet-3" if not args.tiny else scale.model, runs=scale.eval_runs,
                            epochs=scale.eval_epochs, seed=args.seed, device=device, precision=args.precision)
    results: dict[str, Any] = {}
    scores: dict[str, dict[int, dict[int, float]]] = {}
    for name, config in arms.items():
        if time.perf_counter() > deadline:
            skipped.append(name)
            continue
        started = time.perf_counter()
        run_dir = work / name
        artefact = run_dir / "set.safetensors"
        if not artefact.is_file():
            resume = (run_dir / "checkpoint.safetensors").is_file()
            distill(config, run_dir, resume=resume, progress=not args.quiet, real=real)
        _timed(steps, f"distill {name}", started)
        distilled = load_set(artefact)
        started = time.perf_counter()
        result = evaluate_set(distilled, real, evaluation, progress=not args.quiet)
        _timed(steps, f"evaluate {name}", started)
        in_sample = pool_cmi(pool, distilled.images.to(device), distilled.labels.to(device), real.info.num_classes)
        unseen = pool_cmi(held_out, distilled.images.to(device), distilled.labels.to(device), real.info.num_classes)
        scores[name] = {args.seed: dict(zip(result.seeds, result.accuracies))}
        results[name] = {"accuracy": t_interval(result.accuracies, "evaluation run").to_dict(),
                         "accuracies": result.accuracies, "cmi": float(in_sample.mean()),
                         "cmi_heldout": float(unseen.mean()), "regularizers": dict(distilled.metadata.regularizers),
                         "cmi_calibration": json.loads(distilled.metadata.extra.get("cmi_calibration", "null"))}
    difference = (paired_difference(scores["dm"], scores["dm+cmi"]).to_dict()
                  if {"dm", "dm+cmi"} <= scores.keys() else None)
    return {
        "benchmark": "paper_scale_cmi", "tiny": args.tiny, "dataset": args.dataset, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "precision": args.precision, "scale": scale.__dict__,
        "pools": {name: {"arch": loaded.arch, "size": len(loaded),
                         "test_accuracy": [round(record.test_accuracy, 2) for record in loaded.records]}
                  for name, loaded in (("optimised", pool), ("held_out", held_out))},
        "results": results, "dm+cmi_minus_dm_points": difference, "seconds": steps, "skipped": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the pools, runs and checkpoints (resumable)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="arithmetic of the forward passes (default: fp32, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="distillation and evaluation seed (default: 0)")
    parser.add_argument("--iterations", type=int, help="DM iterations (default: 20000; tiny: 2)")
    parser.add_argument("--budget-seconds", type=float, default=690.0,
                        help="skip an arm that would start after this many seconds (default: 690, under 12 minutes)")
    parser.add_argument("--tiny", action="store_true", help="every step with tiny sizes (a CPU check of the script)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
