"""Command-line interface: a thin layer that parses flags into config objects and calls the library.

Every user error is one line on stderr and exit status 2; nothing is written before the inputs are
checked, and everything written goes through a temporary file that is renamed into place.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from infodistill import __version__
from infodistill.artefact import grid_path_for, load_set, save_set
from infodistill.config import build_config
from infodistill.data import DATASET_NAMES, load_dataset
from infodistill.errors import UserInputError
from infodistill.evaluate import AUGMENTATIONS, BATCHED_CHOICES, EvalConfig, evaluate_set, random_subset
from infodistill.models import model_names_help

DEFAULT_DATASET = "fashion-mnist"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_flags(parser: argparse.ArgumentParser, dataset_default: str | None) -> None:
    names = ", ".join(DATASET_NAMES) + ", folder:PATH"
    parser.add_argument("--dataset", default=dataset_default, metavar="NAME",
                        help=f"dataset name: {names}" + (f" (default: {dataset_default})" if dataset_default else
                                                         " (default: the one recorded in the artefact)"))
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder holding datasets in torchvision layouts (default: $INFODISTILL_DATA, "
                             "else ~/.cache/infodistill/data; Fashion-MNIST is also found where Debian's "
                             "dataset-fashion-mnist package installs it)")
    parser.add_argument("--download", action="store_true", help="download a dataset that is not on disk")


def _safetensors_path(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"'{value}' must end in .safetensors")
    return path


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2))


def command_baseline(args: argparse.Namespace) -> int:
    """Draw a class-balanced random real subset and write it as an artefact with its grid."""
    if args.ipc < 1:
        raise UserInputError(f"--ipc must be a positive integer, got {args.ipc}")
    real = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    subset = random_subset(real, args.ipc, args.seed)
    path = save_set(subset, args.out)
    grid = grid_path_for(path)
    if args.json:
        _print_json({"artefact": str(path), "grid": str(grid), "images": len(subset.labels),
                     "classes": subset.num_classes, "ipc": args.ipc, "dataset": real.info.name, "seed": args.seed})
    else:
        print(f"wrote {path} ({len(subset.labels)} images, {args.ipc} per class of {subset.num_classes}) and {grid}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    """Train fresh networks on a set with the published recipe and report test accuracy."""
    overrides = {
        "model": args.model, "runs": args.runs, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "augment": args.augment, "seed": args.seed,
        "batched": args.batched, "device": args.device,
        "use_soft_labels": False if args.hard_labels else None,
        "use_learned_lr": False if args.ignore_learned_lr else None,
    }
    config = build_config(EvalConfig, args.config, overrides)
    config.validate()
    distilled = load_set(args.set)
    real = load_dataset(args.dataset or distilled.metadata.dataset, data_root=args.data_root, download=args.download)
    result = evaluate_set(distilled, real, config, progress=not args.json)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.summary())
        print("per run: " + ", ".join(f"{accuracy:.2f}" for accuracy in result.accuracies))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="infodistill",
        description="Dataset distillation with the class-aware CMI regularizer, and a fair evaluation protocol.",
    )
    parser.add_argument("--version", action="version", version=f"infodistill {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    commands.required = True

    baseline = commands.add_parser("baseline", help="write a random real subset (the fair baseline) as an artefact",
                                   description=command_baseline.__doc__)
    _add_data_flags(baseline, DEFAULT_DATASET)
    baseline.add_argument("--ipc", type=int, required=True, metavar="N", help="images per class")
    baseline.add_argument("--out", type=_safetensors_path, required=True, metavar="SET.safetensors",
                          help="artefact to write (a PNG grid is written beside it)")
    baseline.add_argument("--seed", type=int, default=0, help="seed of the random selection (default: 0)")
    baseline.add_argument("--json", action="store_true", help="print the result as JSON")
    baseline.set_defaults(handler=command_baseline)

    evaluate = commands.add_parser("evaluate", help="train networks from scratch on a set and report test accuracy",
                                   description=command_evaluate.__doc__)
    evaluate.add_argument("set", metavar="SET.safetensors", help="artefact to evaluate")
    defaults = EvalConfig()
    evaluate.add_argument("--model", metavar="NAME", help=f"architecture (default: {defaults.model}); {model_names_help()}")
    evaluate.add_argument("--runs", type=int, metavar="N", help=f"runs with different seeds (default: {defaults.runs})")
    evaluate.add_argument("--epochs", type=int, metavar="E", help=f"training epochs per run (default: {defaults.epochs})")
    evaluate.add_argument("--lr", type=float, help=f"learning rate (default: {defaults.lr}, or the set's learned lr)")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help=f"training batch size (default: {defaults.batch_size})")
    evaluate.add_argument("--augment", choices=AUGMENTATIONS, help=f"training augmentation (default: {defaults.augment})")
    evaluate.add_argument("--batched", choices=BATCHED_CHOICES,
                          help="train the runs together as one vectorised model (default: auto = on GPU only)")
    evaluate.add_argument("--hard-labels", action="store_true", help="ignore the set's soft labels")
    evaluate.add_argument("--ignore-learned-lr", action="store_true", help="ignore the set's learned learning rate")
    evaluate.add_argument("--seed", type=int, help=f"base seed of the runs (default: {defaults.seed})")
    evaluate.add_argument("--device", metavar="cpu|cuda", help=f"device (default: {defaults.device})")
    evaluate.add_argument("--config", metavar="FILE.yaml", help="YAML file with evaluation settings (flags win)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_data_flags(evaluate, None)
    evaluate.set_defaults(handler=command_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infodistill`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserInputError as error:
        print(f"infodistill {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"infodistill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
