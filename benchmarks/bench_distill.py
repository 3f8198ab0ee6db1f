"""Speed and memory of one distillation iteration: DM vs DM + CMI, and DM vs a per-class reference loop.

Everything runs in this one process on the same data, so each ratio compares like with like:

- ``dm``: one iteration of the library's DM (IPC 10, 256 real images per class, ConvNet-3, DSA);
- ``dm+cmi``: the same plus the CMI term with one random proxy per step (the paper's rule), for a
  ResNet18 pool (the paper's proxy) and a ConvNetGAP-3-32 pool, computed every step and every 4th step;
- ``reference``: a straightforward per-class DM written here (one forward per class and side).

Proxy weights are random: the cost of the term does not depend on them. Prints one JSON object.

    python benchmarks/bench_distill.py [--repeats 5] [--batch-real 256] [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import platform
import resource
import time

import torch

from infodistill.augment import DSA
from infodistill.loop import DistillConfig, RegularizerTerm, build_method, make_context, run_iteration
from infodistill.models import build_model
from infodistill.proxies import ProxyPool
from infodistill.regularizers import CMIRegularizer
from infodistill.synthetic import PixelSet
from report import emit_json, fashion_mnist_sampler, speed_parser, timed_round_robin  # benchmarks/report.py


def reference_dm_iteration(context, batch_real: int, optimizer) -> None:
    """DM written the plain way: per class, embed the real batch and the synthetic images separately."""
    network = context.fresh_network()
    network.requires_grad_(False)
    loss = 0.0
    for label in range(context.synthetic.num_classes):
        real = context.sampler.sample(label, batch_real, context.generator)
        synthetic = context.synthetic.class_images(label)
        real, synthetic = context.augment.siamese([real, synthetic], context.generator)
        with torch.no_grad():
            real_mean = network.embed(real).mean(0)
        loss = loss + ((real_mean - network.embed(synthetic).mean(0)) ** 2).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = speed_parser(__doc__)
    args = parser.parse_args()
    device = torch.device(args.device)

    real, sampler = fashion_mnist_sampler(device)
    config = DistillConfig(method="dm", ipc=args.ipc, batch_real=args.batch_real,
                           device=args.device).with_method_defaults()
    synthetic = PixelSet.initialise(sampler, args.ipc, "real", torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.SGD(synthetic.parameters(), lr=config.lr_images, momentum=config.momentum_images)
    method = build_method(config)
    augment = DSA()

    def library_step(terms):
        def step(index):
            context = make_context(config, index + 1, synthetic, sampler, real, augment, device)
            run_iteration(method, terms, context, optimizer)
        return step

    def reference_step(index):
        context = make_context(config, index + 1, synthetic, sampler, real, augment, device)
        reference_dm_iteration(context, args.batch_real, optimizer)

    info = real.info
    pools = {}
    for arch in ("ResNet18", "ConvNetGAP-3-32"):
        models = [build_model(arch, info.channels, info.num_classes, info.image_size, seed=k) for k in range(2)]
        pools[arch] = ProxyPool(models, arch, info)

    steps = {"dm": library_step([]), "reference": reference_step}
    for arch, pool in pools.items():
        steps[f"dm+cmi[{arch}]"] = library_step([RegularizerTerm("cmi", CMIRegularizer(pool), 1000.0, 1)])
    seconds = timed_round_robin(steps, args.repeats)
    for arch, pool in pools.items():
        # a median would hide the 1-in-4 cost: the mean over 8 iterations, 2 of which compute the term
        step = library_step([RegularizerTerm("cmi", CMIRegularizer(pool), 1000.0, 4)])
        started = time.perf_counter()
        for index in range(8):
            step(index)
        seconds[f"dm+cmi[{arch}, every 4]"] = (time.perf_counter() - started) / 8

    dm = seconds["dm"]
    report = {
        "benchmark": "distill_iteration",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device)},
        "setting": {"dataset": "fashion-mnist", "ipc": args.ipc, "batch_real": args.batch_real, "model": config.model,
                    "augment": "dsa", "repeats": args.repeats},
        "seconds_per_iteration": {name: round(value, 4) for name, value in seconds.items()},
        "ratio_vs_dm": {name: round(value / dm, 3) for name, value in seconds.items()},
        "dm_speedup_over_reference": round(seconds["reference"] / dm, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
