"""Speed of the seed add-ons, each against its baseline measured in this same process:

- ``lowrank``: one DM iteration on a low-rank set (rank 2, 7 images per class per stored image on
  28x28) vs one on the pixel set of the same storage (IPC 10), through the library's loop;
- ``mim``: one DM iteration with the MIM4DD term vs plain DM (IPC 10);
- ``dwa``: the cost of DWA's directed weight perturbation of one batch (K ascent steps on the batch's real
  images) vs one recovery iteration of the whole set (every batch's loss and image update).

    python benchmarks/bench_seed_methods.py [--repeats 5] [--batch-real 256] [--model ConvNet-3] [--out FILE.json]
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time

import torch

from infodistill.loop import (
    DistillConfig,
    RegularizerTerm,
    build_run_parts,
    make_context,
    run_iteration,
)
from infodistill.proxies import train_proxy_pool
from infodistill.regularizers.base import RegularizerSetup
from infodistill.regularizers.mim import MIMRegularizer
from report import emit_json, fashion_mnist_sampler, speed_parser, timed_round_robin


def loop_step(config: DistillConfig, real, sampler, device, with_mim: bool = False):
    """A callable running one iteration of ``config`` through the library's loop (set-up done once)."""
    config = config.with_method_defaults()
    parts = build_run_parts(config, real, sampler, device)
    terms = []
    if with_mim:
        setup = RegularizerSetup(config=config, sampler=sampler, info=real.info, device=device, pool=None,
                                 generator=torch.Generator().manual_seed(0), optimizer=parts.optimizer)
        terms = [RegularizerTerm("mim", MIMRegularizer.build(setup), config.mim_weight)]

    def step(index: int) -> None:
        context = make_context(config, index + 1, parts.synthetic, sampler, real, parts.augment, device)
        run_iteration(parts.method, terms, context, parts.optimizer, parts.average)

    return step, parts


def dwa_steps(real, sampler, device, args) -> dict:
    """Seconds of one batch's perturbation and of one recovery iteration of the whole set."""
    from infodistill.methods.sre2l import DWA, perturb_parameters

    with tempfile.TemporaryDirectory() as teacher:
        train_proxy_pool(real, teacher, arch=args.teacher_arch, count=1, epochs=1, progress=False)
        config = DistillConfig(method="dwa", ipc=args.ipc, teacher=teacher, model=args.model, device=str(device))
        step, parts = loop_step(config, real, sampler, device)
        method: DWA = parts.method  # type: ignore[assignment]
        batch = parts.synthetic.images_by_class()[:, 0].detach()
        labels = torch.arange(parts.synthetic.num_classes, device=device)

        def perturbation(index: int) -> None:
            perturb_parameters(method.network, batch, labels, method.dwa_rho, method.dwa_steps)

        seconds = timed_round_robin({"recovery iteration (all batches)": step,
                                     "perturbation of one batch": perturbation}, args.repeats)
    return seconds


def main() -> None:
    parser = speed_parser(__doc__)
    parser.add_argument("--model", default="ConvNet-3")
    parser.add_argument("--teacher-arch", default="ConvNet-3-bn")
    args = parser.parse_args()
    device = torch.device(args.device)
    real, sampler = fashion_mnist_sampler(device)
    started = time.perf_counter()

    pixels = DistillConfig(method="dm", ipc=args.ipc, batch_real=args.batch_real, model=args.model, device=args.device)
    lowrank = dataclasses.replace(pixels, param="lowrank", rank=2)
    steps = {"dm pixels": loop_step(pixels, real, sampler, device)[0],
             "dm lowrank rank 2": loop_step(lowrank, real, sampler, device)[0],
             "dm + mim": loop_step(pixels, real, sampler, device, with_mim=True)[0]}
    seconds = timed_round_robin(steps, args.repeats)
    dwa = dwa_steps(real, sampler, device, args)
    base = seconds["dm pixels"]
    report = {
        "benchmark": "seed_methods_speed",
        "device": str(device), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "ipc": args.ipc, "batch_real": args.batch_real,
        "model": args.model,
        "seconds": {**seconds, **{f"dwa: {name}": value for name, value in dwa.items()}},
        "ratios": {
            "lowrank vs pixels (same storage)": seconds["dm lowrank rank 2"] / base,
            "mim vs dm": seconds["dm + mim"] / base,
            "dwa perturbation of one batch vs one recovery iteration":
                dwa["perturbation of one batch"] / dwa["recovery iteration (all batches)"],
        },
        "images_per_class": {"pixels": args.ipc, "lowrank rank 2": args.ipc * 7},
        "total_seconds": time.perf_counter() - started,
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
