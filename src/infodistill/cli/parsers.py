"""Every parser of the ``infodistill`` command: :func:`build_parser` and one ``configure_<command>_parser``
per subcommand, with the flag helpers they share.

A subcommand is one :class:`Command` entry of :data:`COMMANDS` (name, one-line summary, its flags, its handler);
its ``--help`` description is the handler's docstring, with a command's own addendum. The handlers are in
:mod:`infodistill.cli.commands` and, for the experiments, in their modules under ``infodistill.experiments``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infodistill import __version__
from infodistill.cli.commands import (
    command_baseline,
    command_cmi,
    command_distill,
    command_evaluate,
    command_experts,
    command_proxies,
)
from infodistill.coresets import SELECT_CHOICES
from infodistill.data import DATASET_NAMES
from infodistill.experiments.continual import ContinualConfig, command_continual, supported_methods
from infodistill.experiments.report import command_report
from infodistill.experiments.sweep import command_sweep
from infodistill.experiments.theory import command_theory
from infodistill.experiments.theory_maths import TheoryConfig
from infodistill.loop import SETTINGS_GROUPS
from infodistill.models import model_names_help
from infodistill.parallel import DEFAULT_TIMEOUT_S
from infodistill.precision import PRECISIONS
from infodistill.settings import add_flags, title_of
from infodistill.training import AUGMENTATIONS, BATCHED_CHOICES, RECIPES, EvalConfig

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


def _add_process_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, metavar="N",
                        help=f"run in N processes on this machine (started with torchrun); {what}; on CUDA each "
                             "process uses its own GPU. Alternatively start the command with torchrun yourself "
                             "(docs/distributed.md)")
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="with several processes: seconds to wait for the others at start-up and at every "
                             f"exchange before failing (default: {DEFAULT_TIMEOUT_S:g})")


def _safetensors_path(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"'{value}' must end in .safetensors")
    return path


def _json_path(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".json":
        raise argparse.ArgumentTypeError(f"'{value}' must end in .json (a CSV is written beside it)")
    return path


def _png_path(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".png":
        raise argparse.ArgumentTypeError(f"'{value}' must end in .png")
    return path


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, its line in ``infodistill --help``, the function adding its flags, its handler,
    and what its ``--help`` description adds to the handler's docstring."""

    name: str
    summary: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    addendum: str = ""

    @property
    def description(self) -> str | None:
        if not self.addendum:
            return self.handler.__doc__
        return (self.handler.__doc__ or "") + self.addendum


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``infodistill`` command: one subcommand per entry of :data:`COMMANDS`, in that order;
    the parsed namespace carries the subcommand's handler as ``handler``."""
    parser = OneLineErrorParser(
        prog="infodistill",
        description="Dataset distillation with the class-aware CMI regularizer, and a fair evaluation protocol.",
    )
    parser.add_argument("--version", action="version", version=f"infodistill {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    commands.required = True
    for command in COMMANDS:
        subparser = commands.add_parser(command.name, help=command.summary, description=command.description)
        command.configure(subparser)
        subparser.set_defaults(handler=command.handler)
    return parser


def configure_baseline_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill baseline`` (:func:`~infodistill.cli.commands.command_baseline`)."""
    _add_data_flags(parser, DEFAULT_DATASET)
    parser.add_argument("--ipc", type=int, required=True, metavar="N", help="images per class")
    parser.add_argument("--out", type=_safetensors_path, required=True, metavar="SET.safetensors",
                        help="artefact to write (a PNG grid is written beside it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selection (default: 0)")
    parser.add_argument("--select", choices=SELECT_CHOICES, default="random",
                        help="how the real images are chosen per class: random (default, drawn with --seed), "
                             "herding or kcenter (greedy, in the feature space of --proxies; docs/coresets.md)")
    parser.add_argument("--proxies", metavar="DIR",
                        help="proxy pool whose first proxy's L2-normalised embedding is the feature space of "
                             "--select herding|kcenter")
    parser.add_argument("--teacher", metavar="DIR",
                        help="relabel the subset with the soft labels of this teacher (first network of a proxy "
                             "pool), as SRe2L/DWA sets are: their fair baseline")
    parser.add_argument("--relabel-temperature", type=float, metavar="T",
                        help="temperature of the teacher's soft labels (default: 30, SRe2L's)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def configure_evaluate_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill evaluate`` (:func:`~infodistill.cli.commands.command_evaluate`)."""
    parser.add_argument("set", metavar="SET.safetensors", help="artefact to evaluate")
    defaults = EvalConfig()
    architectures = parser.add_mutually_exclusive_group()
    architectures.add_argument("--model", metavar="NAME",
                               help=f"architecture (default: {defaults.model}); {model_names_help()}")
    architectures.add_argument("--models", metavar="A,B,...",
                               help="several architectures, comma-separated, e.g. ConvNet-3,AlexNet,VGG11,ResNet18: "
                                    "the set is scored with each in turn (cross-architecture evaluation) and a table "
                                    "is printed")
    parser.add_argument("--runs", type=int, metavar="N", help=f"runs with different seeds (default: {defaults.runs})")
    parser.add_argument("--epochs", type=int, metavar="E",
                        help=f"training epochs per run (default: {defaults.epochs})")
    parser.add_argument("--lr", type=float, help=f"learning rate (default: {defaults.lr}, or the set's learned lr)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help=f"training batch size (default: {defaults.batch_size})")
    parser.add_argument("--augment", choices=AUGMENTATIONS,
                        help=f"training augmentation (default: {defaults.augment})")
    parser.add_argument("--batched", choices=BATCHED_CHOICES,
                        help="train the runs together as one vectorised model (default: auto = on GPU only)")
    parser.add_argument("--hard-labels", action="store_true", help="ignore the set's soft labels")
    parser.add_argument("--ignore-learned-lr", action="store_true", help="ignore the set's learned learning rate")
    parser.add_argument("--recipe", choices=RECIPES,
                        help="training recipe: the protocol's SGD, or SRe2L's knowledge-distillation recipe on the "
                             "soft labels (default: auto = kd for sets relabelled by a teacher)")
    parser.add_argument("--seed", type=int, help=f"base seed of the runs (default: {defaults.seed})")
    parser.add_argument("--device", metavar="cpu|cuda", help=f"device (default: {defaults.device})")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="arithmetic of the training and test forward passes: bf16 runs them under autocast, "
                             "the weights and the optimiser stay float32; auto is bf16 for ConvNets (protocol "
                             "recipe) on CPUs with native bf16, else fp32 (docs/precision.md) "
                             f"(default: {defaults.precision})")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with evaluation settings (flags win)")
    parser.add_argument("--out", type=_json_path, metavar="FILE.json",
                        help="also write the results as FILE.json ({set, dataset, results: [...]}) and FILE.csv")
    parser.add_argument("--scores", action="store_true",
                        help="also train the random subset of the same size and the full real training set with "
                             "the same settings and seeds, and report DD-Ranking's HLR, IOR, LRS and ARS with "
                             "95%% intervals over runs (docs/scores.md)")
    parser.add_argument("--scores-cache", metavar="DIR",
                        help="with --scores: folder caching the full-data accuracies per dataset and recipe "
                             "(default: ~/.cache/infodistill)")
    parser.add_argument("--full-data-accuracy", type=float, metavar="FRACTION",
                        help="with --scores: the full-data accuracy (hard labels, a fraction in [0, 1]) to use "
                             "instead of training on the full set; recorded as given")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON (with --models: the FILE.json content)")
    _add_process_flags(parser, "the (model, run) jobs are spread over N processes, one run at a time each")
    _add_data_flags(parser, None)


def configure_distill_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill distill`` (:func:`~infodistill.cli.commands.command_distill`): one per
    declared setting (:data:`~infodistill.loop.SETTINGS_GROUPS`, :func:`~infodistill.settings.add_flags`), and the
    run's own."""
    for group in SETTINGS_GROUPS:  # one flag per declared setting, grouped by the part that owns it
        add_flags(parser.add_argument_group(title_of(group), group.__doc__), group)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these settings (flags win)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: runs/METHOD[-cmi]-DATASET-ipcN-seedS)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_process_flags(parser, "the work is split over N processes: by class (dm, dc, dsa, idc), by image (sre2l, "
                       "dwa) or by trajectory (mtt, datm, with --trajectories)")


def configure_proxies_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill proxies`` (:func:`~infodistill.cli.commands.command_proxies`)."""
    _add_data_flags(parser, DEFAULT_DATASET)
    parser.add_argument("--arch", default="ResNet18", metavar="NAME", help="proxy architecture (default: ResNet18)")
    parser.add_argument("--count", type=int, default=8, metavar="K", help="number of proxies (default: 8)")
    parser.add_argument("--epochs", type=int, default=40, metavar="E", help="training epochs per proxy (default: 40)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="batch size (default: 256)")
    parser.add_argument("--train-per-class", type=int, default=0, metavar="N",
                        help="train on a class-balanced random N images per class (default: 0, all; quicker proxies)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="arithmetic of the training forward passes (bf16: about 3x faster on CPUs with native "
                             "bf16, accuracy in docs/cmi.md); recorded in every proxy file (default: fp32)")
    parser.add_argument("--batched", choices=BATCHED_CHOICES, default="off",
                        help="train the proxies together as one vectorised model (auto: on GPUs) (default: off)")
    _add_build_flags(parser, "pool directory (proxies are added to it)")


def _add_build_flags(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The flags that close every command building networks on real data (proxies, experts)."""
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default: cpu)")
    parser.add_argument("--out", required=True, metavar="DIR", help=out_help)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def configure_experts_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill experts`` (:func:`~infodistill.cli.commands.command_experts`)."""
    _add_data_flags(parser, DEFAULT_DATASET)
    parser.add_argument("--model", default="ConvNet-3", metavar="NAME",
                        help=f"expert architecture, without batch norm (default: ConvNet-3); {model_names_help()}")
    parser.add_argument("--count", type=int, default=5, metavar="K", help="number of experts (default: 5)")
    parser.add_argument("--epochs", type=int, default=50, metavar="E",
                        help="training epochs per expert; the trajectory has E + 1 checkpoints (default: 50)")
    parser.add_argument("--lr", type=float, default=0.01, help="constant SGD learning rate (default: 0.01)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="batch size (default: 256)")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default="dsa", help="training augmentation (default: dsa)")
    parser.add_argument("--zca", type=float, default=0.0, metavar="EPS",
                        help="train on ZCA-whitened data with this regularisation, e.g. 0.1 as MTT on CIFAR "
                             "(default: 0, off); distil with the same --zca")
    parser.add_argument("--train-per-class", type=int, default=0, metavar="N",
                        help="train on a class-balanced random N images per class (default: 0, all; quicker experts)")
    _add_build_flags(parser, "expert directory (experts are added to it)")


def configure_cmi_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill cmi`` (:func:`~infodistill.cli.commands.command_cmi`)."""
    parser.add_argument("set", metavar="SET.safetensors", help="artefact to measure")
    parser.add_argument("--proxies", required=True, metavar="DIR", help="proxy pool directory (pooled proxies)")
    parser.add_argument("--held-out", metavar="DIR",
                        help="a second pool, disjoint from --proxies (no shared proxy file or seed), for the "
                             "held-out CMI")
    parser.add_argument("--data-root", metavar="DIR", help="data root (only needed for folder: datasets)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default: cpu)")
    parser.add_argument("--ordered-grid", type=_png_path, metavar="OUT.png",
                        help="also draw each class's samples ordered by their KL to the class centroid (averaged over "
                             "the proxies; low left, high right) and, with --json, report per_sample_kl")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def configure_theory_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill theory`` (:func:`~infodistill.experiments.theory.command_theory`)."""
    defaults = TheoryConfig()
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and theory.json")
    parser.add_argument("--d", type=int, help=f"input dimension (default: {defaults.d})")
    parser.add_argument("--r", type=int, help=f"number of relevant directions, 1 <= r <= d (default: {defaults.r})")
    parser.add_argument("--width", type=int, metavar="L", help=f"hidden width L (default: {defaults.width})")
    parser.add_argument("--n-train", type=int, metavar="N", help=f"real training points (default: {defaults.n_train})")
    parser.add_argument("--m-values", metavar="M1,M2,...",
                        help=f"distilled-set sizes (default: {','.join(map(str, defaults.m_values))})")
    parser.add_argument("--sweep-r", metavar="R1,R2,...",
                        help=f"values of r for the m-needed sweep, 'none' to skip (default: "
                             f"{','.join(map(str, defaults.sweep_r))})")
    parser.add_argument("--sweep-d", metavar="D1,D2,...",
                        help=f"values of d for the sweep (default: {','.join(map(str, defaults.sweep_d))})")
    parser.add_argument("--sweep-width", metavar="L1,L2,...",
                        help=f"values of L for the sweep (default: {','.join(map(str, defaults.sweep_width))})")
    parser.add_argument("--seeds", type=int, metavar="S", help=f"seeds averaged per point (default: {defaults.seeds})")
    parser.add_argument("--distill-steps", type=int, metavar="N",
                        help=f"Adam steps per distillation (default: {defaults.distill_steps})")
    parser.add_argument("--seed", type=int, help=f"base seed (default: {defaults.seed})")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny setting (d=8, r=2, L=32, 2000 points) that finishes in seconds; "
                             "other flags override it")
    parser.add_argument("--json", action="store_true", help="print the result (theory.json's content) as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def configure_report_parser(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``infodistill report`` (:func:`~infodistill.experiments.report.command_report`)."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories from `infodistill distill --out` (random-subset directories too)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and summary files")
    parser.add_argument("--baseline", metavar="DIR",
                        help="random real subset directory (set.safetensors from `infodistill baseline`, "
                             "evaluation.json beside it): the reference of the gain column")
    parser.add_argument("--json", action="store_true", help="print summary.json instead of the table")


def configure_sweep_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill sweep`` (:func:`~infodistill.experiments.sweep.command_sweep`)."""
    parser.add_argument("file", nargs="?", metavar="SWEEP.yaml",
                        help="sweep file with sections distill, grid, evaluate, baseline (see docs/sweep.md)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of the sweep (cells, baselines, sweep.json)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="vary a distillation setting over values (repeatable; adds to the file's grid)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a distillation setting shared by every cell (repeatable; wins over the file)")
    parser.add_argument("--epochs", type=int, metavar="E", help="evaluation epochs (wins over the file)")
    parser.add_argument("--runs", type=int, metavar="N", help="evaluation runs per model (wins over the file)")
    parser.add_argument("--models", metavar="A,B,...", help="evaluation models (wins over the file)")
    parser.add_argument("--no-baseline", action="store_true", help="do not score the random-subset baselines")
    parser.add_argument("--report", action="store_true", help="write `infodistill report` of the sweep into OUT/report")
    parser.add_argument("--json", action="store_true", help="print sweep.json's content")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def configure_continual_parser(parser: argparse.ArgumentParser) -> None:
    """The flags of ``infodistill continual`` (:func:`~infodistill.experiments.continual.command_continual`)."""
    defaults = ContinualConfig()
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the step sets and results "
                        "(a restart with the same settings continues it)")
    parser.add_argument("--dataset", default=defaults.dataset, metavar="NAME",
                        help=f"dataset name (default: {defaults.dataset})")
    parser.add_argument("--data-root", metavar="DIR", help="data root (default: $INFODISTILL_DATA or "
                        "~/.cache/infodistill/data)")
    parser.add_argument("--method", default=defaults.method,
                        help=f"distillation method: {', '.join(supported_methods())} (default: {defaults.method})")
    parser.add_argument("--ipc", type=int, default=defaults.ipc, help=f"images per class (default: {defaults.ipc})")
    parser.add_argument("--cmi-weight", metavar="FLOAT|auto",
                        help="weight of the CMI term; a proxy pool is trained on each step's classes (default: off)")
    parser.add_argument("--iterations", type=int, help="distillation iterations per step (default: the method's)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"training epochs of each evaluation network (default: {defaults.epochs})")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"class groups, must divide the number of classes (default: {defaults.steps})")
    parser.add_argument("--orders", type=int, default=defaults.orders,
                        help=f"class orders averaged over (default: {defaults.orders})")
    parser.add_argument("--model", default=defaults.model,
                        help=f"distillation (matching) network and proxy architecture (default: {defaults.model})")
    parser.add_argument("--eval-model", default=defaults.eval_model,
                        help=f"network trained on the memory (default: {defaults.eval_model})")
    parser.add_argument("--batch-real", type=int, help="real images per class per iteration (default: the method's)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"base seed (default: {defaults.seed})")
    parser.add_argument("--device", default=defaults.device, metavar="cpu|cuda",
                        help=f"device (default: {defaults.device})")
    parser.add_argument("--proxy-epochs", type=int, default=defaults.proxy_epochs,
                        help=f"training epochs of each proxy (default: {defaults.proxy_epochs})")
    parser.add_argument("--proxy-count", type=int, default=defaults.proxy_count,
                        help=f"proxies per step's pool (default: {defaults.proxy_count})")
    parser.add_argument("--proxy-arch", metavar="NAME",
                        help="architecture of each step's proxies, with a pooled embedding (default: --model's "
                             "pooled variant, e.g. ConvNetGAP-3 for ConvNet-3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print continual.json's content")


COMMANDS = (
    Command("baseline", "write a real subset (random, herding or k-center: the fair baselines) as an artefact",
            configure_baseline_parser, command_baseline),
    Command("evaluate", "train networks from scratch on a set and report test accuracy", configure_evaluate_parser,
            command_evaluate),
    Command("distill", "distil a dataset with a method and optional CMI regularizer", configure_distill_parser,
            command_distill,
            " Unset values take the method's published defaults; a --config YAML file may set any of them, and a "
            "setting given both in the file and as a flag takes the flag's value (flags win). A setting that none of "
            "the chosen method, parameterisation and regularizers reads is refused by name (a value equal to its "
            "default is accepted)."),
    Command("proxies", "train a pool of proxy networks for the CMI regularizer", configure_proxies_parser,
            command_proxies,
            " Recipe of the CMI paper: SGD lr 0.01, momentum 0.9, weight decay 1e-3, batch 256, no augmentation."),
    Command("experts", "train expert trajectories for trajectory matching (mtt, datm)", configure_experts_parser,
            command_experts,
            " Recipe of MTT: SGD without momentum or weight decay at a constant learning rate, DSA augmentation, "
            "optionally on ZCA-whitened data; the model must not use batch norm."),
    Command("cmi", "the class-aware CMI of a labelled set under a proxy pool", configure_cmi_parser, command_cmi),
    Command("theory", "the multi-index theory experiment on a synthetic Gaussian task", configure_theory_parser,
            command_theory),
    Command("report", "figures and a summary table from run directories", configure_report_parser, command_report),
    Command("sweep", "run a grid of distillations, each evaluated, resumably", configure_sweep_parser, command_sweep),
    Command("continual", "class-incremental learning with a distilled memory", configure_continual_parser,
            command_continual),
)
"""The subcommands, in the order ``infodistill --help`` lists them."""
