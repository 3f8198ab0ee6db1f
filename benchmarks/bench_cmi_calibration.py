"""How strong is the CMI term? On the initial set S_0 of a run: the set's CMI under a pool, the matching
loss, and the norms of both terms' gradients, with the gradient ratio ||lambda grad CMI|| / ||grad L||
at the paper's lambda, at the old loss-fraction rule and at today's 'auto'.

    python benchmarks/bench_cmi_calibration.py --pool pools/resnet18 --method dm --ipc 10 --out calib.json

Prints one JSON object. The paper's lambda defaults to its published value for the method at IPC 10 on
CIFAR-10 (``PUBLISHED_CMI_WEIGHTS``); the ratio it gives under a pool of the paper's proxies is the target
'auto' uses (``CMI_TARGET_RATIOS``, docs/cmi.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from infodistill.data import ClassSampler, load_dataset
from infodistill.loop import (
    CALIBRATION_DRAWS,
    CALIBRATION_STREAM,
    PUBLISHED_CMI_WEIGHTS,
    DistillConfig,
    build_run_parts,
    cmi_target_ratio,
    initial_gradients,
    make_context,
    run_precision,
)
from infodistill.proxies import ProxyPool
from infodistill.regularizers import CMIRegularizer, pool_cmi

OLD_AUTO_FRACTION = 0.1
"""The former 'auto' rule: lambda * CMI(S_0) = 0.1 * L(S_0)."""


def measure(args: argparse.Namespace) -> dict:
    real = load_dataset(args.dataset)
    config = DistillConfig(dataset=args.dataset, method=args.method, ipc=args.ipc, model=args.model, seed=args.seed,
                           batch_real=args.batch_real, proxies=str(args.pool), cmi_weight="auto",
                           precision=args.precision).with_method_defaults()
    config.validate()
    device = torch.device("cpu")
    precision = run_precision(config, device)
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    parts = build_run_parts(config, real, sampler, device)
    pool = ProxyPool.load(args.pool, real.info)
    regularizer = CMIRegularizer(pool)
    contexts = [make_context(config, draw, parts.synthetic, sampler, real, parts.augment, device, CALIBRATION_STREAM)
                for draw in range(args.draws)]
    started = time.perf_counter()
    loss, method_norm, cmi, cmi_norm = initial_gradients(parts.method, regularizer, contexts, precision)
    seconds = time.perf_counter() - started
    paper = args.paper_weight if args.paper_weight is not None else PUBLISHED_CMI_WEIGHTS.get(args.method)
    old_auto = OLD_AUTO_FRACTION * loss / cmi
    target = cmi_target_ratio(args.method, args.ipc)
    new_auto = target * method_norm / cmi_norm

    def strength(weight: float | None) -> dict | None:
        if weight is None:
            return None
        return {"lambda": weight, "gradient_ratio": weight * cmi_norm / method_norm,
                "loss_fraction": weight * cmi / loss}

    with torch.no_grad():
        per_proxy = pool_cmi(pool, parts.synthetic.images(), parts.synthetic.labels, real.info.num_classes)
    return {
        "benchmark": "cmi_calibration", "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "pool": {"dir": str(args.pool), "arch": pool.arch, "size": len(pool),
                 "test_accuracy": [record.test_accuracy for record in pool.records]},
        "run": {"dataset": args.dataset, "method": args.method, "ipc": args.ipc, "model": args.model,
                "batch_real": config.batch_real, "seed": args.seed, "precision": precision, "draws": args.draws},
        "initial_cmi": cmi, "initial_cmi_per_proxy": [float(value) for value in per_proxy],
        "initial_loss": loss, "method_grad_norm": method_norm, "cmi_grad_norm": cmi_norm,
        "paper": strength(paper), "old_auto": strength(old_auto),
        "auto": {**strength(new_auto), "target_ratio": target},  # type: ignore[dict-item]
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, required=True, help="proxy pool directory (pooled proxies)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--method", default="dm", help="distillation method (default: dm)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--model", default="ConvNet-3", help="matching network (default: ConvNet-3)")
    parser.add_argument("--batch-real", type=int, default=None, help="real images per class (default: the method's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=CALIBRATION_DRAWS, help="matching-loss draws averaged")
    parser.add_argument("--paper-weight", type=float, default=None,
                        help="lambda to compare (default: the paper's for the method at IPC 10)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
