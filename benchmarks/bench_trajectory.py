"""Speed and memory of MTT, DATM and IDC iterations, and the overhead of the CMI term on each.

All in one process on the same data, so every ratio compares like with like:

- MTT at ``--syn-steps`` (default 10, 20, 50) with the whole unrolled graph kept (``memory=full``) and
  with each step recomputed in the backward pass (``memory=checkpoint``): seconds per iteration, and
  the peak resident memory one iteration adds, measured in a fresh process per setting (the peak after
  the iteration minus the resident size before it; a process that already ran iterations keeps freed
  memory and would hide the growth);
- DATM, IDC: seconds per iteration;
- each method with and without the CMI term (one random proxy per step, a ResNet18 pool as in the
  paper, computed every step): the ratio is the CMI overhead (goal <= 1.15x).

Experts are trained here for a few epochs on a small class-balanced subset: the cost of an
iteration does not depend on how good they are. Proxy weights are random for the same reason.

    python benchmarks/bench_trajectory.py [--ipc 10] [--model ConvNet-3-32] [--repeats 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from infodistill.experts import train_experts
from infodistill.loop import DistillConfig, RegularizerTerm, build_run_parts, make_context, run_iteration
from infodistill.models import build_model
from infodistill.proxies import ProxyPool
from infodistill.regularizers import CMIRegularizer
from report import emit_json, fashion_mnist_sampler  # benchmarks/report.py (scripts run from this folder)


def reset_peak_memory() -> int:
    """Reset the kernel's peak-RSS counter of this process; return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Runner:
    """One method's iteration on a fixed synthetic set, as the loop runs it."""

    def __init__(self, config: DistillConfig, real, sampler, device: torch.device, terms=()) -> None:
        self.config = config.with_method_defaults()
        self.real, self.sampler, self.device = real, sampler, device
        self.parts = build_run_parts(self.config, real, sampler, device)
        self.terms = list(terms)

    def __call__(self, index: int) -> None:
        parts = self.parts
        context = make_context(self.config, index + 1, parts.synthetic, self.sampler, self.real, parts.augment,
                               self.device)
        run_iteration(parts.method, self.terms, context, parts.optimizer, parts.average)


def probe_memory(experts_dir: str, mode: str, steps: int, ipc: int, model: str) -> None:
    """In this (fresh) process: one MTT iteration; print the peak memory it added, in MiB, as JSON."""
    device = torch.device("cpu")
    real, sampler = fashion_mnist_sampler(device)
    runner = Runner(DistillConfig(method="mtt", ipc=ipc, model=model, experts=experts_dir, expert_epochs=2,
                                  max_start_epoch=2, syn_steps=steps, memory=mode, lr_images=100.0,
                                  lr_lr=1e-7),
                    real, sampler, device)
    before = reset_peak_memory()
    runner(0)
    print(json.dumps({"added_peak_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}))


def measured_memory(experts_dir: str, mode: str, steps: int, ipc: int, model: str) -> dict:
    command = [sys.executable, __file__, "--probe", experts_dir, mode, str(steps), "--ipc", str(ipc), "--model", model]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def mean_seconds(step, repeats: int) -> float:
    step(-1)
    started = time.perf_counter()
    for index in range(repeats):
        step(index)
    return (time.perf_counter() - started) / repeats


def median_seconds(step, repeats: int) -> float:
    step(-1)
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--model", default="ConvNet-3-32")
    parser.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--idc-outer-loop", type=int, default=10,
                        help="IDC outer steps per iteration here (published: 100 for CIFAR-10; time scales linearly)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cmi-proxy", default="ResNet18", help="proxy architecture of the CMI term")
    parser.add_argument("--cmi-every", type=int, default=1, help="compute the CMI term every K iterations")
    parser.add_argument("--skip-memory", action="store_true", help="time the method pairs only")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--probe", nargs=3, metavar=("EXPERTS", "MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_memory(args.probe[0], args.probe[1], int(args.probe[2]), args.ipc, args.model)
        return
    device = torch.device(args.device)

    real, sampler = fashion_mnist_sampler(device)
    info = real.info
    proxies = [build_model(args.cmi_proxy, info.channels, info.num_classes, info.image_size, seed=k) for k in range(2)]
    pool = ProxyPool([proxy.to(device) for proxy in proxies], args.cmi_proxy, info)

    with tempfile.TemporaryDirectory() as experts_dir:
        train_experts(real.training_subset(100, seed=0), experts_dir, model=args.model, count=2, epochs=4,
                      progress=False, device=args.device)
        common = dict(dataset="fashion-mnist", ipc=args.ipc, model=args.model, device=args.device)
        # lr_images below MTT's 1000: these quick experts move fast in their first epochs, and at 1000 the
        # images diverged (NaN) within 3 iterations (and lr_lr 1e-5 made the step size negative at 50 steps);
        # the time of an iteration does not depend on the rate
        trajectory = dict(experts=experts_dir, expert_epochs=2, max_start_epoch=2, lr_images=100.0, lr_lr=1e-7)

        memory: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        for steps in [] if args.skip_memory else args.syn_steps:
            for mode in ("full", "checkpoint"):
                name = f"mtt[syn_steps={steps}, {mode}]"
                runner = Runner(DistillConfig(method="mtt", syn_steps=steps, memory=mode, **trajectory, **common),
                                real, sampler, device)
                seconds[name] = median_seconds(runner, args.repeats)
                memory[name] = measured_memory(experts_dir, mode, steps, args.ipc, args.model)
        cmi = [RegularizerTerm("cmi", CMIRegularizer(pool), 1.0, args.cmi_every)]
        pairs = {
            "mtt": DistillConfig(method="mtt", syn_steps=args.syn_steps[0], **trajectory, **common),
            "datm": DistillConfig(method="datm", syn_steps=args.syn_steps[0], window_start_max=1, **trajectory,
                                  **common),
            "idc": DistillConfig(method="idc", outer_loop=args.idc_outer_loop, **common),
        }
        overhead = {}
        for name, config in pairs.items():
            plain = mean_seconds(Runner(config, real, sampler, device), max(args.repeats, args.cmi_every))
            # every K-th iteration computes the term: time K of them in a row and take the mean
            with_cmi = mean_seconds(Runner(config, real, sampler, device, cmi), max(args.repeats, args.cmi_every))
            seconds[name], seconds[f"{name}+cmi"] = plain, with_cmi
            overhead[name] = round(with_cmi / plain, 3)

    report = {
        "benchmark": "trajectory_and_idc_iteration",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device)},
        "setting": {"dataset": "fashion-mnist", "ipc": args.ipc, "model": args.model, "augment": "dsa",
                    "repeats": args.repeats, "batch_syn": "all", "idc_outer_loop": args.idc_outer_loop,
                    "cmi_proxy": args.cmi_proxy, "cmi_every": args.cmi_every},
        "seconds_per_iteration": {name: round(value, 4) for name, value in seconds.items()},
        "mtt_memory": memory,
        "checkpoint_vs_full": {} if args.skip_memory else {
            str(steps): {
                "time_ratio": round(seconds[f"mtt[syn_steps={steps}, checkpoint]"]
                                    / seconds[f"mtt[syn_steps={steps}, full]"], 3),
                "memory_ratio": round(memory[f"mtt[syn_steps={steps}, checkpoint]"]["added_peak_mib"]
                                      / max(memory[f"mtt[syn_steps={steps}, full]"]["added_peak_mib"], 0.1), 3),
            }
            for steps in args.syn_steps
        },
        "cmi_overhead_ratio": overhead,
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
