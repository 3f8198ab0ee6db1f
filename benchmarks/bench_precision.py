"""Mixed precision: bf16 against fp32 on real Fashion-MNIST, speed and accuracy, all in this one process.

- (a) distillation speed: median seconds of one DM + CMI iteration (IPC --ipc, ConvNet-3, --batch-real real
  images per class, DSA, one proxy per step from a ConvNetGAP-3-32 pool of --pool-count proxies trained
  --pool-epochs epoch(s) on --pool-train-per-class images per class), fp32 and bf16 called in turn
  (``timed_round_robin``), each on its own copy of the same initial set;
- (b) evaluation: a random IPC --ipc subset trained --eval-epochs x --eval-runs (ConvNet-3, the protocol,
  same seeds) in fp32 and in bf16: seconds and mean test accuracy of each;
- (c) distillation accuracy: DM + CMI ('auto' weight) for --distill-iterations in fp32 and in bf16 (same seed,
  same initial set), each set evaluated in fp32 with the same seeds as in (b).

``recommendation`` is "bf16" only if bf16 is faster in (a) and in (b) and both accuracy differences, (b) and
(c), are within 0.5 points either way; else "fp32". Prints one JSON object (and writes it with --out).

    python benchmarks/bench_precision.py [--repeats 5] [--eval-epochs 100] [--eval-runs 2] \
        [--distill-iterations 100] [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import torch

from infodistill.artefact import load_set
from infodistill.augment import DSA
from infodistill.evaluate import evaluate_set, random_subset
from infodistill.loop import DistillConfig, RegularizerTerm, build_method, distill, make_context, run_iteration
from infodistill.precision import COMPUTE_PRECISIONS as PRECISIONS
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import CMIRegularizer
from infodistill.synthetic import PixelSet
from infodistill.training import EvalConfig
from report import emit_json, fashion_mnist_sampler, speed_parser, timed_round_robin  # benchmarks/report.py

ACCURACY_TOLERANCE_POINTS = 0.5
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""CPU features that decide how fast bf16 runs on CPU (native bf16 dot products need avx512_bf16 or AMX)."""


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this machine's CPU reports (empty where /proc/cpuinfo is unreadable)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in words]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def iteration_seconds(args, real, sampler, pool: ProxyPool, device: torch.device) -> dict[str, float]:
    """(a): median seconds per DM + CMI iteration in each precision, called in turn."""
    config = DistillConfig(method="dm", ipc=args.ipc, batch_real=args.batch_real, device=str(device),
                           seed=args.seed).with_method_defaults()
    terms = [RegularizerTerm("cmi", CMIRegularizer(pool), 1000.0, 1)]  # the weight does not change the cost
    augment = DSA()

    def step_for(precision: str):
        synthetic = PixelSet.initialise(sampler, args.ipc, "real", torch.Generator().manual_seed(args.seed)).to(device)
        optimizer = torch.optim.SGD(synthetic.parameters(), lr=config.lr_images, momentum=config.momentum_images)
        method = build_method(config)

        def step(index: int) -> None:
            context = make_context(config, index + 1, synthetic, sampler, real, augment, device)
            run_iteration(method, terms, context, optimizer, precision=precision)
            synchronise(device)
        return step

    return timed_round_robin({precision: step_for(precision) for precision in PRECISIONS}, args.repeats)


def evaluation_rows(args, real, device: torch.device) -> dict[str, dict]:
    """(b): a random subset trained and tested in each precision, same seeds."""
    subset = random_subset(real, args.ipc, args.seed)
    rows = {}
    for precision in PRECISIONS:
        config = EvalConfig(runs=args.eval_runs, epochs=args.eval_epochs, seed=args.seed, device=str(device),
                            precision=precision)
        result = evaluate_set(subset, real, config, progress=False)
        rows[precision] = {"seconds": round(result.seconds, 2), "mean": round(result.mean, 2),
                           "accuracies": result.accuracies, "batched": result.batched}
    return rows


def distillation_rows(args, real, pool_dir: Path, work: Path, device: torch.device) -> dict[str, dict]:
    """(c): DM + CMI distilled in each precision, every set evaluated in fp32 with the same seeds."""
    base = DistillConfig(method="dm", ipc=args.ipc, iterations=args.distill_iterations, batch_real=args.batch_real,
                         cmi_weight="auto", proxies=str(pool_dir), seed=args.seed, device=str(device),
                         checkpoint_every=args.distill_iterations)
    evaluation = EvalConfig(runs=args.eval_runs, epochs=args.eval_epochs, seed=args.seed, device=str(device),
                            precision="fp32")  # every set scored alike, in fp32
    rows = {}
    for precision in PRECISIONS:
        result = distill(dataclasses.replace(base, precision=precision), work / f"dm-cmi-{precision}", progress=False,
                         real=real)
        scored = evaluate_set(load_set(result.artefact), real, evaluation, progress=False)
        rows[precision] = {"distill_seconds": round(result.seconds, 1), "cmi_weight": result.regularizer_weights["cmi"],
                           "mean": round(scored.mean, 2), "accuracies": scored.accuracies,
                           "eval_seconds": round(scored.seconds, 1)}
    return rows


def main() -> None:
    parser = speed_parser(__doc__)
    parser.add_argument("--eval-epochs", type=int, default=100)
    parser.add_argument("--eval-runs", type=int, default=2)
    parser.add_argument("--distill-iterations", type=int, default=100)
    parser.add_argument("--pool-count", type=int, default=2)
    parser.add_argument("--pool-epochs", type=int, default=1)
    parser.add_argument("--pool-train-per-class", type=int, default=500,
                        help="training images per class of the proxies (a small subset keeps the benchmark short)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the pool and the runs, which must not hold runs yet "
                                       "(default: a temporary folder, removed at the end)")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench-precision-") as temporary:
        work = Path(args.work or temporary)
        real, sampler = fashion_mnist_sampler(device)
        started = time.perf_counter()
        pool_dir = work / "pool"
        records = train_proxy_pool(real.training_subset(args.pool_train_per_class, args.seed), pool_dir,
                                   arch="ConvNetGAP-3-32", count=args.pool_count, epochs=args.pool_epochs,
                                   seed=args.seed, device=str(device), progress=False)
        pool_seconds = time.perf_counter() - started
        pool = ProxyPool.load(pool_dir, real.info, device=str(device))

        seconds = iteration_seconds(args, real, sampler, pool, device)
        evaluation = evaluation_rows(args, real, device)
        distillation = distillation_rows(args, real, pool_dir, work, device)

    iteration_ratio = seconds["bf16"] / seconds["fp32"]
    evaluation_ratio = evaluation["bf16"]["seconds"] / evaluation["fp32"]["seconds"]
    evaluation_difference = evaluation["bf16"]["mean"] - evaluation["fp32"]["mean"]
    distillation_difference = distillation["bf16"]["mean"] - distillation["fp32"]["mean"]
    accurate = {"distill": abs(distillation_difference) <= ACCURACY_TOLERANCE_POINTS,
                "evaluate": abs(evaluation_difference) <= ACCURACY_TOLERANCE_POINTS}
    faster = {"distill": iteration_ratio < 1.0, "evaluate": evaluation_ratio < 1.0}
    by_command = {command: "bf16" if faster[command] and accurate[command] else "fp32" for command in faster}
    report = {
        "benchmark": "precision",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device), "cpu_bf16_flags": cpu_flags(),
                    "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "setting": {"dataset": "fashion-mnist", "ipc": args.ipc, "batch_real": args.batch_real, "model": "ConvNet-3",
                    "augment": "dsa", "repeats": args.repeats, "seed": args.seed,
                    "pool": {"arch": "ConvNetGAP-3-32", "count": args.pool_count, "epochs": args.pool_epochs,
                             "train_per_class": args.pool_train_per_class, "build_seconds": round(pool_seconds, 1),
                             "test_accuracy": [round(record.test_accuracy, 2) for record in records]},
                    "eval": {"model": "ConvNet-3", "epochs": args.eval_epochs, "runs": args.eval_runs},
                    "distill_iterations": args.distill_iterations},
        "distill_iteration_seconds": {name: round(value, 4) for name, value in seconds.items()},
        "distill_iteration_ratio_bf16_over_fp32": round(iteration_ratio, 3),
        "evaluation": evaluation,
        "evaluation_seconds_ratio_bf16_over_fp32": round(evaluation_ratio, 3),
        "evaluation_accuracy_bf16_minus_fp32_points": round(evaluation_difference, 2),
        "distillation": distillation,
        "distillation_accuracy_bf16_minus_fp32_points": round(distillation_difference, 2),
        "rule": f"bf16 only if faster in distillation and evaluation and both accuracy differences are within "
                f"{ACCURACY_TOLERANCE_POINTS} points either way",
        "recommendation": "bf16" if all(faster.values()) and all(accurate.values()) else "fp32",
        "recommendation_by_command": by_command,
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
