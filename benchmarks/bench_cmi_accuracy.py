"""Accuracy study: random real subset vs DM vs DM + CMI on Fashion-MNIST, same budget, same protocol.

Trains (or reuses) a proxy pool, distils with DM and with DM + CMI from the same seed and initial
images, evaluates every set with the same protocol, and measures each set's CMI under the pool.
Prints one JSON object (and writes it with --out).

    python benchmarks/bench_cmi_accuracy.py [--iterations 300] [--batch-real 64] [--eval-runs 3] [--eval-epochs 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from infodistill.artefact import load_set, save_set
from infodistill.data import ClassSampler, load_dataset
from infodistill.evaluate import evaluate_set, random_subset
from infodistill.loop import CALIBRATION_STREAM, DistillConfig, build_method, distill, make_context
from infodistill.proxies import PROXY_FILES, ProxyPool, train_proxy_pool
from infodistill.regularizers import pool_cmi
from infodistill.synthetic import PixelSet
from infodistill.training import EvalConfig
from report import emit_json  # benchmarks/report.py (scripts run from this folder)

PAPER_DM_LAMBDAS = {"cifar10-ipc10": 8000.0, "cifar100-ipc10": 2000.0, "svhn-ipc10": 18000.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--cmi-scale", type=float, default=1.0,
                        help="the 'auto' rule's scale of the target gradient ratio")
    parser.add_argument("--proxy-arch", default="ConvNetGAP-3-32")
    parser.add_argument("--proxy-count", type=int, default=4)
    parser.add_argument("--proxy-epochs", type=int, default=2)
    parser.add_argument("--eval-runs", type=int, default=3)
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-cmi-accuracy", help="folder for the pool and the runs")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    work = Path(args.work)
    real = load_dataset("fashion-mnist")
    started = time.perf_counter()
    pool_dir = work / "pool"
    if len(PROXY_FILES.listed(pool_dir) if pool_dir.exists() else []) < args.proxy_count:
        train_proxy_pool(real, pool_dir, arch=args.proxy_arch, count=args.proxy_count, epochs=args.proxy_epochs,
                         seed=args.seed, progress=True)
    pool_seconds = time.perf_counter() - started
    pool = ProxyPool.load(pool_dir, real.info)

    base = DistillConfig(method="dm", ipc=args.ipc, iterations=args.iterations, batch_real=args.batch_real,
                         seed=args.seed, checkpoint_every=max(1, args.iterations // 4))
    with_cmi = dataclasses.replace(base, cmi_weight="auto", cmi_auto_scale=args.cmi_scale, proxies=str(pool_dir))
    sets, seconds = {}, {}
    subset_path = work / "random.safetensors"
    save_set(random_subset(real, args.ipc, args.seed), subset_path)
    sets["random"] = subset_path
    for name, config in (("dm", base), ("dm+cmi", with_cmi)):
        run_dir = work / name
        begun = time.perf_counter()
        if (run_dir / "set.safetensors").exists():
            result_path = run_dir / "set.safetensors"
        else:
            resume = (run_dir / "checkpoint.safetensors").exists()
            result_path = distill(config, run_dir, resume=resume, real=real).artefact
        seconds[name] = time.perf_counter() - begun
        sets[name] = result_path

    # what the paper's fixed DM lambdas would amount to here, as a fraction of the initial DM loss
    filled = base.with_method_defaults()
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    initial = PixelSet.initialise(sampler, args.ipc, "real", torch.Generator().manual_seed(0))
    context = make_context(filled, 0, initial, sampler, real, None, torch.device("cpu"), CALIBRATION_STREAM)
    first_loss = float(next(build_method(filled).iteration(context)).detach())
    initial_cmi = float(pool_cmi(pool, initial.images().detach(), initial.labels, real.info.num_classes).mean())

    evaluation = EvalConfig(runs=args.eval_runs, epochs=args.eval_epochs, seed=args.seed)
    rows = {}
    for name, path in sets.items():
        distilled = load_set(path)
        result = evaluate_set(distilled, real, evaluation)
        cmi = pool_cmi(pool, distilled.images, distilled.labels, real.info.num_classes)
        rows[name] = {"mean": round(result.mean, 2), "std": round(result.std, 2), "accuracies": result.accuracies,
                      "cmi_mean": float(cmi.mean()), "cmi_std": float(cmi.std(unbiased=False)),
                      "cmi_weight": distilled.metadata.regularizers.get("cmi"),
                      "distill_seconds": round(seconds.get(name, 0.0), 1)}
    report = {
        "benchmark": "cmi_accuracy", "dataset": "fashion-mnist", "ipc": args.ipc, "iterations": args.iterations,
        "batch_real": args.batch_real, "labels": "hard", "eval_augmentation": "dsa",
        "evaluation": {"model": evaluation.model, "runs": args.eval_runs, "epochs": args.eval_epochs},
        "pool": {"arch": pool.arch, "size": len(pool), "epochs": args.proxy_epochs,
                 "test_accuracy": [round(r.test_accuracy, 2) for r in pool.records],
                 "build_seconds": round(pool_seconds, 1)},
        "auto_rule": {"scale": args.cmi_scale, "initial_dm_loss": first_loss, "initial_cmi": initial_cmi,
                      "paper_lambda_as_fraction_here": {k: v * initial_cmi / first_loss
                                                        for k, v in PAPER_DM_LAMBDAS.items()}},
        "results": rows,
        "dm+cmi_minus_dm_points": round(rows["dm+cmi"]["mean"] - rows["dm"]["mean"], 2),
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
