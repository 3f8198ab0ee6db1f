"""Speed of the evaluation protocol: training throughput, and sequential vs batched (vectorised) runs.

Prints one JSON object. Every ratio compares two paths measured in this same process on this machine.

    python benchmarks/bench_evaluate.py [--epochs 20] [--runs 5] [--ipc 10] [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from infodistill.data import load_dataset
from infodistill.errors import UserInputError
from infodistill.evaluate import random_subset
from infodistill.models import build_model
from infodistill.seeds import run_seeds
from infodistill.training import EvalConfig, train_from_scratch
from report import emit_json  # benchmarks/report.py (scripts run from this folder)


def training_throughput(model_name: str, shape: tuple[int, int, int], batch: int, steps: int, device: str) -> float:
    """Images per second of plain SGD training steps (forward, backward, update) on random data."""
    model = build_model(model_name, channels=shape[0], num_classes=10, image_size=shape[1:], seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, *shape, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def time_training(images, labels, config: EvalConfig) -> float:
    started = time.perf_counter()
    train_from_scratch(images, labels, 10, config, run_seeds(config.seed, config.runs), progress=False)
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run in the timed evaluation")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--model", default="ConvNet-3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput-steps", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    try:
        real = load_dataset("fashion-mnist")
        subset = random_subset(real, args.ipc, seed=0)
        images, labels, data = subset.images, subset.labels, "fashion-mnist random subset"
    except UserInputError:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(10 * args.ipc, 1, 28, 28, generator=generator)
        labels = torch.arange(10).repeat_interleave(args.ipc)
        data = "random tensors shaped like fashion-mnist"

    throughput = {
        f"{args.model} 1x28x28 batch 256": training_throughput(args.model, (1, 28, 28), 256, args.throughput_steps,
                                                               args.device),
        f"{args.model} 3x32x32 batch 256": training_throughput(args.model, (3, 32, 32), 256, args.throughput_steps,
                                                               args.device),
    }
    base = EvalConfig(model=args.model, runs=args.runs, epochs=args.epochs, device=args.device)
    sequential = time_training(images, labels, replace(base, batched="off"))
    batched = time_training(images, labels, replace(base, batched="on"))
    per_epoch_sequential = sequential / args.epochs
    result = {
        "benchmark": "evaluate",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": args.device,
                    "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "training_images_per_second": {name: round(value, 1) for name, value in throughput.items()},
        "evaluation": {
            "data": data, "ipc": args.ipc, "runs": args.runs, "epochs": args.epochs, "augment": base.augment,
            "sequential_seconds": round(sequential, 2), "batched_seconds": round(batched, 2),
            "speedup_batched_over_sequential": round(sequential / batched, 3),
            "projected_sequential_seconds_300_epochs": round(per_epoch_sequential * 300, 1),
            "projected_sequential_seconds_1000_epochs": round(per_epoch_sequential * 1000, 1),
        },
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
