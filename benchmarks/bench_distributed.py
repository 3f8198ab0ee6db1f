"""Distillation in one process against two (``--nproc 2``, gloo on CPU): seconds per iteration.

Runs the command ``infodistill distill`` (``--method`` M, IPC --ipc, ConvNet-3-32, ``--quiet``) as one process
and with ``--nproc 2``, each for --iterations and for --short-iterations iterations. Per method (each split its
own way, docs/distributed.md):

* ``dm`` (default): --batch-real real images per class, ``--cmi-weight 1 --proxies POOL`` (split by class);
* ``dsa``: the same with ``--outer-loop`` / ``--inner-loop`` (split by class; inner training repeated);
* ``idc``: the same with ``--outer-loop`` and ``--net-steps`` (split by class; real-data training repeated);
* ``sre2l``: recovery from a ConvNet-3-32-bn teacher (split by image position);
* ``mtt``: ``--trajectories 2``, ``--syn-steps``, experts trained here, ``--cmi-weight 1`` (split by trajectory).
 The seconds per iteration are the difference of the two wall times
divided by the difference of the iteration counts, so start-up (imports, loading the data and the pool,
torchrun's rendezvous) cancels out. Both setups get the same cores: one process with C threads against two
processes with C / 2 threads each (``OMP_NUM_THREADS``, C = --cores, default all this process may use).
The long runs' artefacts are then compared tensor by tensor. Their thread counts differ, and with them the
order of float sums inside the kernels, which methods that train networks (DSA) or unroll students (MTT)
amplify; so the short two-process run is also compared with a one-process run of the same length and the
same threads per process (``artefacts_same_threads``): that pair should be bit-identical (trajectory split:
equal up to the order of the gradient sum).

The pool (ConvNetGAP-3-32, --pool-count proxies, 1 epoch on --pool-train-per-class images per class) is
trained here unless --pool names one; so are the teacher (1 network like a pool's, with batch norm) and the
experts (2 x --expert-train-epochs epochs on the same subset). Prints one JSON object (and writes it with --out).

    python benchmarks/bench_distributed.py [--method dm|dsa|idc|sre2l|mtt] [--iterations 30] [--short-iterations 5]
        [--repeats 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from infodistill.data import load_dataset
from infodistill.experts import train_experts
from infodistill.proxies import train_proxy_pool
from report import emit_json  # benchmarks/report.py (scripts run from this folder)

PROCESSES = (1, 2)


MODEL = "ConvNet-3-32"
POOL_ARCH = "ConvNetGAP-3-32"  # the CMI needs proxies with a pooled embedding


def _dm(args: argparse.Namespace, inputs: dict[str, Path]) -> list[str]:
    return ["--batch-real", str(args.batch_real), "--cmi-weight", "1", "--proxies", str(inputs["pool"])]


def _dsa(args: argparse.Namespace, inputs: dict[str, Path]) -> list[str]:
    return [*_dm(args, inputs), "--outer-loop", str(args.outer_loop), "--inner-loop", str(args.inner_loop)]


def _idc(args: argparse.Namespace, inputs: dict[str, Path]) -> list[str]:
    return [*_dm(args, inputs), "--outer-loop", str(args.outer_loop), "--net-steps", str(args.inner_loop)]


def _sre2l(args: argparse.Namespace, inputs: dict[str, Path]) -> list[str]:
    return ["--teacher", str(inputs["teacher"])]


def _mtt(args: argparse.Namespace, inputs: dict[str, Path]) -> list[str]:
    return ["--experts", str(inputs["experts"]), "--trajectories", "2", "--syn-steps", str(args.syn_steps),
            "--expert-epochs", "1", "--max-start-epoch", str(args.expert_train_epochs - 1), "--cmi-weight", "1",
            "--proxies", str(inputs["pool"])]


METHODS = {"dm": (_dm, ("pool",)), "dsa": (_dsa, ("pool",)), "idc": (_idc, ("pool",)), "sre2l": (_sre2l, ("teacher",)),
           "mtt": (_mtt, ("pool", "experts"))}
"""Method -> (its command-line settings, the trained inputs it needs)."""


def train_inputs(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The pool, teacher and experts the method needs, trained on a small subset (a given --pool is used as is)."""
    needed = METHODS[args.method][1]
    real = load_dataset("fashion-mnist")
    subset = real.training_subset(args.pool_train_per_class, args.seed)
    inputs: dict[str, Path] = {}
    if "pool" in needed:
        inputs["pool"] = Path(args.pool) if args.pool else work / "pool"
        if args.pool is None:
            train_proxy_pool(subset, inputs["pool"], arch=POOL_ARCH, count=args.pool_count, epochs=1, seed=args.seed,
                             progress=False)
    if "teacher" in needed:
        inputs["teacher"] = work / "teacher"
        train_proxy_pool(subset, inputs["teacher"], arch=f"{MODEL}-bn", count=1, epochs=1, seed=args.seed,
                         progress=False)
    if "experts" in needed:
        inputs["experts"] = work / "experts"
        train_experts(subset, inputs["experts"], model=MODEL, count=2, epochs=args.expert_train_epochs,
                      seed=args.seed, progress=False)
    return inputs


def distill_command(args: argparse.Namespace, inputs: dict[str, Path], out: Path, iterations: int,
                    processes: int) -> list[str]:
    """The ``infodistill distill`` command line of one timed run."""
    command = [sys.executable, "-m", "infodistill", "distill", "--method", args.method, "--ipc", str(args.ipc),
               "--model", MODEL, "--iterations", str(iterations), *METHODS[args.method][0](args, inputs),
               "--seed", str(args.seed), "--quiet", "--out", str(out)]
    return command + (["--nproc", str(processes)] if processes > 1 else [])


def timed_run(command: list[str], threads: int) -> float:
    """Wall seconds of ``command`` run with ``OMP_NUM_THREADS=threads`` (in every process it starts)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"bench_distributed: {' '.join(command)} failed with status {finished.returncode}:\n"
                         f"{finished.stderr.strip()}")
    return seconds


def artefact_comparison(first: Path, second: Path) -> dict:
    """Whether two artefacts hold the same tensors bit for bit (and the same metadata), and the largest gap."""
    ours, theirs = load_file(str(first)), load_file(str(second))
    with safe_open(str(first), framework="pt") as a, safe_open(str(second), framework="pt") as b:
        same_metadata = a.metadata() == b.metadata()
    same_names = ours.keys() == theirs.keys()
    gaps = {name: float((tensor.double() - theirs[name].double()).abs().max()) if tensor.numel() else 0.0
            for name, tensor in ours.items() if name in theirs and tensor.shape == theirs[name].shape}
    identical = same_names and len(gaps) == len(ours) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    return {"bit_identical": identical, "same_metadata": same_metadata,
            "max_abs_difference": max(gaps.values(), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), default="dm")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--short-iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting and length; the median is used")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of the one process; each of the two processes gets half (default: all cores "
                             "this process may use)")
    parser.add_argument("--pool", help="an existing proxy pool to use (default: train one)")
    parser.add_argument("--pool-count", type=int, default=2)
    parser.add_argument("--pool-train-per-class", type=int, default=500)
    parser.add_argument("--outer-loop", type=int, default=10, help="dsa, idc: image updates per network")
    parser.add_argument("--inner-loop", type=int, default=10,
                        help="dsa: network epochs between them; idc: real-data network steps between them")
    parser.add_argument("--syn-steps", type=int, default=20, help="mtt: student steps per trajectory")
    parser.add_argument("--expert-train-epochs", type=int, default=3, help="mtt: epochs of each expert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not 1 <= args.short_iterations < args.iterations:
        parser.error(f"--short-iterations must be in 1..{args.iterations - 1} (below --iterations), "
                     f"got {args.short_iterations}")
    if args.cores < 2:
        parser.error(f"--cores must be at least 2 (one thread for each of two processes), got {args.cores}")
    threads = {1: args.cores, 2: args.cores // 2}

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as temporary:
        work = Path(temporary)
        inputs = train_inputs(args, work)
        wall: dict[tuple[int, int], list[float]] = {}
        for repeat in range(args.repeats):
            for iterations in (args.short_iterations, args.iterations):
                for processes in PROCESSES:  # in turn, so that drifts in machine load hit both alike
                    out = work / f"p{processes}-i{iterations}-r{repeat}"
                    command = distill_command(args, inputs, out, iterations, processes)
                    wall.setdefault((processes, iterations), []).append(timed_run(command, threads[processes]))
        comparison = artefact_comparison(work / f"p1-i{args.iterations}-r0" / "set.safetensors",
                                         work / f"p2-i{args.iterations}-r0" / "set.safetensors")
        same_threads = work / "p1-same-threads"
        timed_run(distill_command(args, inputs, same_threads, args.short_iterations, 1), threads[2])
        comparison_same_threads = artefact_comparison(same_threads / "set.safetensors",
                                                      work / f"p2-i{args.short_iterations}-r0" / "set.safetensors")

    median = {key: sorted(values)[len(values) // 2] for key, values in wall.items()}
    extra = args.iterations - args.short_iterations
    per_iteration = {processes: (median[processes, args.iterations] - median[processes, args.short_iterations]) / extra
                     for processes in PROCESSES}
    startup = {processes: median[processes, args.short_iterations] - args.short_iterations * per_iteration[processes]
               for processes in PROCESSES}
    report = {
        "benchmark": "distributed",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "cores_used": args.cores, "device": "cpu", "backend": "gloo"},
        "setting": {"dataset": "fashion-mnist", "method": args.method, "ipc": args.ipc, "model": MODEL,
                    "method_arguments": METHODS[args.method][0](args, {name: Path(name) for name in
                                                                       ("pool", "teacher", "experts")}),
                    "iterations": args.iterations, "short_iterations": args.short_iterations, "repeats": args.repeats,
                    "seed": args.seed},
        "omp_num_threads_per_process": {f"{processes}_process": threads[processes] for processes in PROCESSES},
        "wall_seconds": {f"{processes}_process_{iterations}_iterations": [round(value, 2) for value in values]
                         for (processes, iterations), values in sorted(wall.items())},
        "seconds_per_iteration": {f"{processes}_process": round(value, 4)
                                  for processes, value in per_iteration.items()},
        "startup_seconds": {f"{processes}_process": round(value, 2) for processes, value in startup.items()},
        "ratio_2_process_over_1_process": (round(per_iteration[2] / per_iteration[1], 3)
                                           if min(per_iteration.values()) > 0 else None),
        "artefacts": comparison,
        "artefacts_same_threads": comparison_same_threads,
        "warnings": [f"{processes} process(es): the longer runs were not slower than the shorter ones; raise "
                     "--iterations (or --repeats) so that the iterations outweigh the noise of start-up"
                     for processes, value in per_iteration.items() if value <= 0],
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
