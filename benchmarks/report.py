"""Shared output of the benchmark scripts: one JSON object on stdout, and optionally in a file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from infodistill.data import ClassSampler, RealData, load_dataset


def emit_json(report: dict, out: str | None) -> None:
    """Print ``report`` as indented JSON; also write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def fashion_mnist_sampler(device: torch.device) -> tuple[RealData, ClassSampler]:
    """Real Fashion-MNIST and a class-wise sampler over its normalised training images on ``device``."""
    real = load_dataset("fashion-mnist")
    images, labels = real.train_tensors()
    return real, ClassSampler(images.to(device), labels.to(device), real.info.num_classes)


def timed_round_robin(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each step, calling the steps in turn so that drifts in machine
    load hit all of them alike; one warm-up call each first."""
    for step in steps.values():
        step(-1)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step(index)
            times[name].append(time.perf_counter() - started)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def speed_parser(description: str) -> argparse.ArgumentParser:
    """The flags every iteration-speed benchmark takes: --repeats, --ipc, --batch-real, --device, --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the JSON here")
    return parser
