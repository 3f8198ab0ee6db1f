"""Command-line interface: a thin layer that parses flags into config objects and calls the library.

Every user error is one line on stderr and exit status 2; nothing is written before the inputs are
checked, and everything written goes through a temporary file that is renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from infodistill import __version__
from infodistill.artefact import grid_path_for, load_set, save_set
from infodistill.config import build_config, check_seed, load_yaml_mapping
from infodistill.coresets import SELECT_CHOICES
from infodistill.data import DATASET_NAMES, dataset_info, load_dataset
from infodistill.errors import UserInputError
from infodistill.evaluate import (
    EvalResult,
    check_evaluation_processes,
    check_model_names,
    check_set_fits,
    evaluate_models,
    evaluate_set,
    evaluate_spread,
    evaluation_payload,
    format_results_table,
    random_subset,
    write_evaluation,
)
from infodistill.experiments.continual import command_continual, configure_continual_parser
from infodistill.experiments.report import command_report, configure_report_parser
from infodistill.experiments.sweep import command_sweep, configure_sweep_parser
from infodistill.experiments.theory import command_theory, configure_theory_parser
from infodistill.files import check_output_path
from infodistill.loop import SETTINGS_GROUPS, DistillConfig
from infodistill.models import model_names_help
from infodistill.parallel import (
    DEFAULT_TIMEOUT_S,
    ProcessGroup,
    ProcessGroupError,
    check_cuda_processes,
    check_nproc,
    check_timeout,
    init_from_environment,
    is_main,
    launch,
    launched_by_torchrun,
    rank_device,
    shutdown,
)
from infodistill.precision import PRECISIONS
from infodistill.settings import add_flags, given_flags, title_of
from infodistill.training import AUGMENTATIONS, BATCHED_CHOICES, RECIPES, EvalConfig, resolve_device

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


def _model_list(value: str) -> list[str]:
    """``--models A,B,C`` as names; every name is checked before anything is loaded or trained."""
    return check_model_names([name.strip() for name in value.split(",")])


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2))


def command_baseline(args: argparse.Namespace) -> int:
    """Select a class-balanced real subset (at random, or by herding or k-center in a proxy pool's feature
    space) and write it as an artefact with its grid."""
    if args.ipc < 1:
        raise UserInputError(f"--ipc must be a positive integer, got {args.ipc}")
    if args.relabel_temperature is not None and not args.relabel_temperature > 0:
        raise UserInputError(f"--relabel-temperature must be positive, got {args.relabel_temperature}")
    if args.select != "random" and args.proxies is None:
        raise UserInputError(f"--select {args.select} chooses images in a proxy pool's feature space; "
                             "give the pool with --proxies DIR (built by 'infodistill proxies')")
    if args.select == "random" and args.proxies is not None:
        raise UserInputError("--proxies is only used by --select herding or kcenter; random selection uses no features")
    real = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    subset = random_subset(real, args.ipc, args.seed) if args.select == "random" else _coreset(args, real)
    if args.teacher is not None:
        subset = _relabelled(subset, real, args.teacher, args.relabel_temperature or 30.0)
    path = save_set(subset, args.out)
    grid = grid_path_for(path)
    if args.json:
        _print_json({"artefact": str(path), "grid": str(grid), "images": len(subset.labels),
                     "classes": subset.num_classes, "ipc": args.ipc, "dataset": real.info.name, "seed": args.seed,
                     "select": args.select})
    else:
        print(f"wrote {path} ({len(subset.labels)} images, {args.ipc} per class of {subset.num_classes}, "
              f"selected by {args.select}) and {grid}")
    return 0


def _coreset(args: argparse.Namespace, real):
    """The ``--select herding|kcenter`` subset in the feature space of the pool ``--proxies``
    (:func:`~infodistill.coresets.pool_features`); the class sizes are checked before the pool is read."""
    from infodistill.coresets import check_class_sizes, coreset_subset, pool_features
    from infodistill.proxies import ProxyPool

    check_class_sizes(real.train_labels, args.ipc, real.info.num_classes)
    pool = ProxyPool.load(args.proxies, real.info)
    features = pool_features(pool, real.normalise(real.train_images).float())
    space = {"feature_space": "L2-normalised embed of proxy 0 of the pool", "proxies": str(args.proxies),
             "proxy_arch": pool.arch}
    return coreset_subset(real, args.select, args.ipc, features, args.seed, space)


def _relabelled(subset, real, teacher: str, temperature: float):
    """The subset with SRe2L's soft labels from the first network of the pool ``teacher``: the fair baseline
    of a relabelled distilled set (same labels, same KD recipe at evaluation)."""
    from infodistill.methods.sre2l import teacher_soft_labels
    from infodistill.proxies import ProxyPool

    network = ProxyPool.load(teacher, real.info)[0]
    extra = {**subset.metadata.extra, "teacher": str(teacher), "relabel_temperature": repr(float(temperature))}
    return dataclasses.replace(subset, soft_labels=teacher_soft_labels(network, subset.images, temperature),
                               metadata=dataclasses.replace(subset.metadata, extra=extra))


def command_evaluate(args: argparse.Namespace) -> int:
    """Train fresh networks on a set with the published recipe and report test accuracy. With --models,
    score the set with several architectures in turn (cross-architecture generalisation) and print a table."""
    models = _model_list(args.models) if args.models is not None else None
    overrides = {
        "model": args.model, "runs": args.runs, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "augment": args.augment, "seed": args.seed,
        "batched": args.batched, "device": args.device,
        "use_soft_labels": False if args.hard_labels else None,
        "use_learned_lr": False if args.ignore_learned_lr else None,
        "recipe": args.recipe, "precision": args.precision,
    }
    if args.nproc is not None:
        check_nproc(args.nproc)
    timeout = check_timeout(args.dist_timeout)
    config = build_config(EvalConfig, args.config, overrides)
    config.validate()
    for name in models or ():
        dataclasses.replace(config, model=name).validate()
    distilled = load_set(args.set)
    _check_score_flags(args, models, distilled)
    dataset = args.dataset or distilled.metadata.dataset
    if args.nproc is not None and args.nproc > 1:
        check_set_fits(distilled, dataset_info(dataset, data_root=args.data_root))
        check_evaluation_processes(args.nproc, len(models or [config.model]), config.runs)
        _check_devices(args.nproc, config.device)
        return launch(args.argv, args.nproc)
    real = load_dataset(dataset, data_root=args.data_root, download=args.download)
    group = init_from_environment(timeout, resolve_device(config.device).type)
    try:
        if group.distributed:
            results = evaluate_spread(distilled, real, config, models or [config.model], group,
                                      progress=not args.json and is_main(group))
        elif models is None:
            results = [evaluate_set(distilled, real, config, progress=not args.json)]
        else:
            results = evaluate_models(distilled, real, config, models, progress=not args.json)
    finally:
        shutdown(group)
    if not is_main(group):
        return 0
    extra = _scores(args, distilled, real, config, results[0]) if args.scores else None
    written = write_evaluation(args.out, args.set, results, extra) if args.out is not None else None
    if args.json:
        # a single --model keeps the one-result shape that scripts (benchmarks/collect_accuracy.py) read
        _print_json({**results[0].to_dict(), **(extra or {})} if models is None
                    else evaluation_payload(args.set, results))
        return 0
    if models is None:
        print(results[0].summary())
        print("per run: " + ", ".join(f"{accuracy:.2f}" for accuracy in results[0].accuracies))
    else:
        print(format_results_table(results))
    if extra is not None:
        from infodistill.scores import format_scores

        print(format_scores(extra["scores"]))
    if written is not None:
        print(f"wrote {written[0]} and {written[1]}")
    return 0


def _check_score_flags(args: argparse.Namespace, models: list[str] | None, distilled) -> None:
    """Refuse score flags without ``--scores`` and ``--scores`` where its arms cannot be paired, before any work."""
    if not args.scores:
        for flag, value in (("--scores-cache", args.scores_cache), ("--full-data-accuracy", args.full_data_accuracy)):
            if value is not None:
                raise UserInputError(f"{flag} is only used with --scores")
        return
    if models is not None:
        raise UserInputError("--scores scores the set with one model; give --model, not --models")
    if (args.nproc or 1) > 1 or launched_by_torchrun():
        raise UserInputError("--scores runs in one process; drop --nproc")
    from infodistill.scores import check_scorable

    check_scorable(distilled, args.full_data_accuracy)


def _scores(args: argparse.Namespace, distilled, real, config: EvalConfig, main: EvalResult) -> dict:
    """The ``scores`` entry: the remaining arms trained with the set's settings and evaluation seeds."""
    from infodistill.scores import DEFAULT_CACHE, score_set

    cache = Path(args.scores_cache) if args.scores_cache is not None else DEFAULT_CACHE
    return {"scores": score_set(distilled, real, config, cache, args.full_data_accuracy, progress=not args.json,
                                main=main)}


def _default_run_dir(config) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9]+", "-", config.dataset).strip("-")
    suffix = "-cmi" if config.uses_cmi else ""
    return Path("runs") / f"{config.method}{suffix}-{dataset}-ipc{config.ipc}-seed{config.seed}"


def _check_devices(nproc: int, device_name: str) -> None:
    """Refuse a device that several processes cannot share out (more processes than GPUs, or one named GPU)."""
    device = resolve_device(device_name)
    check_cuda_processes(nproc, device)
    rank_device(ProcessGroup(world_size=nproc), device)


def command_distill(args: argparse.Namespace) -> int:
    """Distil a dataset into a few synthetic images per class with a method and optional CMI regularizer.
    With --nproc N (or under torchrun) the work is split over N processes: by class (DM, DC, DSA, IDC), by image
    (SRe2L, DWA) or by trajectory (MTT, DATM); see docs/distributed.md."""
    from infodistill.files import CONFIG_NAME, RunFiles
    from infodistill.loop import check_out_dir, distill, distill_config_from, plan_split

    if args.nproc is not None:
        check_nproc(args.nproc)
    timeout = check_timeout(args.dist_timeout)
    values: dict = {}
    if args.resume:
        if args.out is None:
            raise UserInputError("--resume needs --out DIR, the run directory to continue")
        stored = Path(args.out) / CONFIG_NAME
        if not stored.is_file():
            raise UserInputError(f"cannot resume: '{stored}' does not exist (run without --resume first)")
        values.update({k: v for k, v in load_yaml_mapping(stored).items()
                       if k not in ("resolved_weights", "cmi_calibration")})
    if args.config:
        values.update(load_yaml_mapping(args.config))
    values.update(given_flags(args, DistillConfig))
    config = distill_config_from(values, f"config file '{args.config}'" if args.config else "config")
    config.validate()
    out_dir = check_output_path(args.out if args.out else _default_run_dir(config), directory=True)
    if args.nproc is not None and args.nproc > 1:
        # Everything the processes would refuse at once is refused here, before any process starts.
        plan_split(config, args.nproc, dataset_info(config.dataset, data_root=config.data_root).num_classes)
        _check_devices(args.nproc, config.device)
        check_out_dir(RunFiles(out_dir), args.resume, config)
        return launch(args.argv, args.nproc)
    group = init_from_environment(timeout, resolve_device(config.device).type)
    try:
        result = distill(config, out_dir, resume=args.resume, progress=not args.quiet, group=group)
    finally:
        shutdown(group)
    if not is_main(group):
        return 0
    if args.json:
        _print_json({"out_dir": str(result.out_dir), "artefact": str(result.artefact),
                     "regularizer_weights": result.regularizer_weights, "iterations": result.iterations,
                     "seconds": round(result.seconds, 2), "config": dataclasses.asdict(result.config)})
    else:
        weights = ", ".join(f"{name} weight {value:.6g}" for name, value in result.regularizer_weights.items())
        print(f"wrote {result.artefact} and its grid after {result.iterations} iterations"
              + (f" ({weights})" if weights else "") + f"; metrics in {result.out_dir / 'metrics.jsonl'}")
    return 0


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")


def _report_trained(args: argparse.Namespace, kind: str, records: Sequence, suffix: str) -> None:
    """Print the networks in ``--out`` (proxies or experts): JSON with ``--json``, else a line each."""
    if args.json:
        _print_json({"out_dir": str(args.out), kind: [{"index": r.index, "seed": r.seed, "path": str(r.path),
                                                       "test_accuracy": r.test_accuracy} for r in records]})
    else:
        for record in records:
            print(f"{record.path}: test accuracy {record.test_accuracy:.2f} %{suffix}")


def command_proxies(args: argparse.Namespace) -> int:
    """Train a pool of proxy networks (the CMI regularizer's frozen feature extractors)."""
    from infodistill.proxies import train_proxy_pool

    _check_positive(args, "count", "epochs", "batch_size")
    config = EvalConfig(model=args.arch, device=args.device)
    config.validate()
    real = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    records = train_proxy_pool(real, args.out, arch=args.arch, count=args.count, epochs=args.epochs, seed=args.seed,
                               device=args.device, progress=not args.json, batch_size=args.batch_size,
                               train_per_class=args.train_per_class, precision=args.precision, batched=args.batched)
    _report_trained(args, "proxies", records, "")
    return 0


def command_experts(args: argparse.Namespace) -> int:
    """Train expert trajectories for trajectory matching (MTT, DATM). An expert is a network trained on
    the real data with MTT's recipe whose weights are recorded before training and after every epoch;
    its trajectory is those epochs + 1 flat weight vectors. Each expert is one file
    expert-NNNN.safetensors in --out; experts already there count toward --count."""
    from infodistill.experts import train_experts

    _check_positive(args, "count", "epochs", "batch_size")
    if not args.lr > 0 or args.lr == float("inf"):
        raise UserInputError(f"--lr must be a positive finite number, got {args.lr}")
    if not 0 <= args.zca < float("inf"):
        raise UserInputError(f"--zca must be >= 0 (the whitening epsilon; 0 turns whitening off), got {args.zca}")
    EvalConfig(model=args.model, device=args.device).validate()
    real = load_dataset(args.dataset, data_root=args.data_root, download=args.download)
    records = train_experts(real, args.out, model=args.model, count=args.count, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, augment=args.augment, zca=args.zca, seed=args.seed,
                            device=args.device, progress=not args.json, train_per_class=args.train_per_class)
    _report_trained(args, "experts", records, f" after {args.epochs} epochs")
    return 0


def command_cmi(args: argparse.Namespace) -> int:
    """Report the class-aware CMI of a labelled set under every proxy of a pool (mean and std). With
    --held-out, also under a second pool disjoint from the first: the CMI of a set distilled with the first
    pool is in-sample under it, and only the held-out value shows compactness for networks the term never saw."""
    from infodistill.loop import check_held_out
    from infodistill.proxies import ProxyPool
    from infodistill.regularizers.cmi import pool_cmi

    distilled = load_set(args.set)
    info = dataset_info(distilled.metadata.dataset, data_root=args.data_root)
    check_set_fits(distilled, info)
    pool = ProxyPool.load(args.proxies, info, device=args.device)
    pool.require_pooled()
    held_out = None
    if args.held_out is not None:
        held_out = ProxyPool.load(args.held_out, info, device=args.device)
        check_held_out(pool, held_out)
    values = pool_cmi(pool, distilled.images, distilled.labels, distilled.num_classes)
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    held_values = pool_cmi(held_out, distilled.images, distilled.labels, distilled.num_classes) if held_out else None
    kl = None
    if args.ordered_grid is not None:
        from infodistill.visualise import per_sample_cmi, save_ordered_grid

        kl = per_sample_cmi(pool, distilled.images, distilled.labels, distilled.num_classes)
        save_ordered_grid(distilled, kl, args.ordered_grid, class_names=info.class_names)
    if args.json:
        payload = {"set": str(args.set), "proxies": str(args.proxies), "pool_size": len(values), "mean": mean,
                   "std": std, "per_proxy": [float(v) for v in values]}
        if held_values is not None:
            payload["held_out"] = {"proxies": str(args.held_out), "pool_size": len(held_values),
                                   "mean": float(held_values.mean()), "std": float(held_values.std(unbiased=False)),
                                   "per_proxy": [float(v) for v in held_values]}
        if kl is not None:
            payload.update(ordered_grid=str(args.ordered_grid), per_sample_kl=[float(v) for v in kl])
        _print_json(payload)
    else:
        print(f"CMI of {args.set} under {len(values)} proxies: {mean:.6g} +- {std:.3g}")
        if held_values is not None:
            print(f"held out ({args.held_out}, {len(held_values)} proxies): {float(held_values.mean()):.6g} +- "
                  f"{float(held_values.std(unbiased=False)):.3g}")
        if kl is not None:
            print(f"wrote {args.ordered_grid}: each class's samples by KL to the class centroid (low left, high right)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="infodistill",
        description="Dataset distillation with the class-aware CMI regularizer, and a fair evaluation protocol.",
    )
    parser.add_argument("--version", action="version", version=f"infodistill {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    commands.required = True

    baseline = commands.add_parser("baseline", description=command_baseline.__doc__,
                                   help="write a real subset (random, herding or k-center: the fair baselines) "
                                        "as an artefact")
    _add_data_flags(baseline, DEFAULT_DATASET)
    baseline.add_argument("--ipc", type=int, required=True, metavar="N", help="images per class")
    baseline.add_argument("--out", type=_safetensors_path, required=True, metavar="SET.safetensors",
                          help="artefact to write (a PNG grid is written beside it)")
    baseline.add_argument("--seed", type=int, default=0, help="seed of the random selection (default: 0)")
    baseline.add_argument("--select", choices=SELECT_CHOICES, default="random",
                          help="how the real images are chosen per class: random (default, drawn with --seed), "
                               "herding or kcenter (greedy, in the feature space of --proxies; docs/coresets.md)")
    baseline.add_argument("--proxies", metavar="DIR",
                          help="proxy pool whose first proxy's L2-normalised embedding is the feature space of "
                               "--select herding|kcenter")
    baseline.add_argument("--teacher", metavar="DIR",
                          help="relabel the subset with the soft labels of this teacher (first network of a proxy "
                               "pool), as SRe2L/DWA sets are: their fair baseline")
    baseline.add_argument("--relabel-temperature", type=float, metavar="T",
                          help="temperature of the teacher's soft labels (default: 30, SRe2L's)")
    baseline.add_argument("--json", action="store_true", help="print the result as JSON")
    baseline.set_defaults(handler=command_baseline)

    evaluate = commands.add_parser("evaluate", help="train networks from scratch on a set and report test accuracy",
                                   description=command_evaluate.__doc__)
    evaluate.add_argument("set", metavar="SET.safetensors", help="artefact to evaluate")
    defaults = EvalConfig()
    architectures = evaluate.add_mutually_exclusive_group()
    architectures.add_argument("--model", metavar="NAME",
                               help=f"architecture (default: {defaults.model}); {model_names_help()}")
    architectures.add_argument("--models", metavar="A,B,...",
                               help="several architectures, comma-separated, e.g. ConvNet-3,AlexNet,VGG11,ResNet18: "
                                    "the set is scored with each in turn (cross-architecture evaluation) and a table "
                                    "is printed")
    evaluate.add_argument("--runs", type=int, metavar="N", help=f"runs with different seeds (default: {defaults.runs})")
    evaluate.add_argument("--epochs", type=int, metavar="E",
                          help=f"training epochs per run (default: {defaults.epochs})")
    evaluate.add_argument("--lr", type=float, help=f"learning rate (default: {defaults.lr}, or the set's learned lr)")
    evaluate.add_argument("--batch-size", type=int, metavar="N",
                          help=f"training batch size (default: {defaults.batch_size})")
    evaluate.add_argument("--augment", choices=AUGMENTATIONS,
                          help=f"training augmentation (default: {defaults.augment})")
    evaluate.add_argument("--batched", choices=BATCHED_CHOICES,
                          help="train the runs together as one vectorised model (default: auto = on GPU only)")
    evaluate.add_argument("--hard-labels", action="store_true", help="ignore the set's soft labels")
    evaluate.add_argument("--ignore-learned-lr", action="store_true", help="ignore the set's learned learning rate")
    evaluate.add_argument("--recipe", choices=RECIPES,
                          help="training recipe: the protocol's SGD, or SRe2L's knowledge-distillation recipe on the "
                               "soft labels (default: auto = kd for sets relabelled by a teacher)")
    evaluate.add_argument("--seed", type=int, help=f"base seed of the runs (default: {defaults.seed})")
    evaluate.add_argument("--device", metavar="cpu|cuda", help=f"device (default: {defaults.device})")
    evaluate.add_argument("--precision", choices=PRECISIONS,
                          help="arithmetic of the training and test forward passes: bf16 runs them under autocast, "
                               "the weights and the optimiser stay float32; auto is bf16 for ConvNets (protocol "
                               "recipe) on CPUs with native bf16, else fp32 (docs/precision.md) "
                               f"(default: {defaults.precision})")
    evaluate.add_argument("--config", metavar="FILE.yaml", help="YAML file with evaluation settings (flags win)")
    evaluate.add_argument("--out", type=_json_path, metavar="FILE.json",
                          help="also write the results as FILE.json ({set, dataset, results: [...]}) and FILE.csv")
    evaluate.add_argument("--scores", action="store_true",
                          help="also train the random subset of the same size and the full real training set with "
                               "the same settings and seeds, and report DD-Ranking's HLR, IOR, LRS and ARS with "
                               "95%% intervals over runs (docs/scores.md)")
    evaluate.add_argument("--scores-cache", metavar="DIR",
                          help="with --scores: folder caching the full-data accuracies per dataset and recipe "
                               "(default: ~/.cache/infodistill)")
    evaluate.add_argument("--full-data-accuracy", type=float, metavar="FRACTION",
                          help="with --scores: the full-data accuracy (hard labels, a fraction in [0, 1]) to use "
                               "instead of training on the full set; recorded as given")
    evaluate.add_argument("--json", action="store_true",
                          help="print the result as JSON (with --models: the FILE.json content)")
    _add_process_flags(evaluate, "the (model, run) jobs are spread over N processes, one run at a time each")
    _add_data_flags(evaluate, None)
    evaluate.set_defaults(handler=command_evaluate)

    distill = commands.add_parser("distill", help="distil a dataset with a method and optional CMI regularizer",
                                  description=(command_distill.__doc__ or "") + " Unset values take the method's "
                                  "published defaults; a --config YAML file may set any of them, and a setting given "
                                  "both in the file and as a flag takes the flag's value (flags win). A setting that "
                                  "none of the chosen method, parameterisation and regularizers reads is refused by "
                                  "name (a value equal to its default is accepted).")
    for group in SETTINGS_GROUPS:  # one flag per declared setting, grouped by the part that owns it
        add_flags(distill.add_argument_group(title_of(group), group.__doc__), group)
    distill.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these settings (flags win)")
    distill.add_argument("--out", metavar="DIR", help="run directory (default: runs/METHOD[-cmi]-DATASET-ipcN-seedS)")
    distill.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    distill.add_argument("--quiet", action="store_true", help="no progress bar")
    distill.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_process_flags(distill, "the work is split over N processes: by class (dm, dc, dsa, idc), by image (sre2l, "
                       "dwa) or by trajectory (mtt, datm, with --trajectories)")
    distill.set_defaults(handler=command_distill)

    proxies = commands.add_parser("proxies", help="train a pool of proxy networks for the CMI regularizer",
                                  description=(command_proxies.__doc__ or "") + " Recipe of the CMI paper: SGD lr "
                                  "0.01, momentum 0.9, weight decay 1e-3, batch 256, no augmentation.")
    _add_data_flags(proxies, DEFAULT_DATASET)
    proxies.add_argument("--arch", default="ResNet18", metavar="NAME", help="proxy architecture (default: ResNet18)")
    proxies.add_argument("--count", type=int, default=8, metavar="K", help="number of proxies (default: 8)")
    proxies.add_argument("--epochs", type=int, default=40, metavar="E", help="training epochs per proxy (default: 40)")
    proxies.add_argument("--batch-size", type=int, default=256, metavar="N", help="batch size (default: 256)")
    proxies.add_argument("--train-per-class", type=int, default=0, metavar="N",
                         help="train on a class-balanced random N images per class (default: 0, all; quicker proxies)")
    proxies.add_argument("--precision", choices=PRECISIONS, default="fp32",
                         help="arithmetic of the training forward passes (bf16: about 3x faster on CPUs with native "
                              "bf16, accuracy in docs/cmi.md); recorded in every proxy file (default: fp32)")
    proxies.add_argument("--batched", choices=BATCHED_CHOICES, default="off",
                         help="train the proxies together as one vectorised model (auto: on GPUs) (default: off)")
    proxies.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    proxies.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default: cpu)")
    proxies.add_argument("--out", required=True, metavar="DIR", help="pool directory (proxies are added to it)")
    proxies.add_argument("--json", action="store_true", help="print the result as JSON")
    proxies.set_defaults(handler=command_proxies)

    experts = commands.add_parser("experts", help="train expert trajectories for trajectory matching (mtt, datm)",
                                  description=(command_experts.__doc__ or "") + " Recipe of MTT: SGD without momentum "
                                  "or weight decay at a constant learning rate, DSA augmentation, optionally on "
                                  "ZCA-whitened data; the model must not use batch norm.")
    _add_data_flags(experts, DEFAULT_DATASET)
    experts.add_argument("--model", default="ConvNet-3", metavar="NAME",
                         help=f"expert architecture, without batch norm (default: ConvNet-3); {model_names_help()}")
    experts.add_argument("--count", type=int, default=5, metavar="K", help="number of experts (default: 5)")
    experts.add_argument("--epochs", type=int, default=50, metavar="E",
                         help="training epochs per expert; the trajectory has E + 1 checkpoints (default: 50)")
    experts.add_argument("--lr", type=float, default=0.01, help="constant SGD learning rate (default: 0.01)")
    experts.add_argument("--batch-size", type=int, default=256, metavar="N", help="batch size (default: 256)")
    experts.add_argument("--augment", choices=AUGMENTATIONS, default="dsa", help="training augmentation (default: dsa)")
    experts.add_argument("--zca", type=float, default=0.0, metavar="EPS",
                         help="train on ZCA-whitened data with this regularisation, e.g. 0.1 as MTT on CIFAR "
                              "(default: 0, off); distil with the same --zca")
    experts.add_argument("--train-per-class", type=int, default=0, metavar="N",
                         help="train on a class-balanced random N images per class (default: 0, all; quicker experts)")
    experts.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    experts.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default: cpu)")
    experts.add_argument("--out", required=True, metavar="DIR", help="expert directory (experts are added to it)")
    experts.add_argument("--json", action="store_true", help="print the result as JSON")
    experts.set_defaults(handler=command_experts)

    cmi = commands.add_parser("cmi", help="the class-aware CMI of a labelled set under a proxy pool",
                              description=command_cmi.__doc__)
    cmi.add_argument("set", metavar="SET.safetensors", help="artefact to measure")
    cmi.add_argument("--proxies", required=True, metavar="DIR", help="proxy pool directory (pooled proxies)")
    cmi.add_argument("--held-out", metavar="DIR",
                     help="a second pool, disjoint from --proxies (no shared proxy file or seed), for the held-out CMI")
    cmi.add_argument("--data-root", metavar="DIR", help="data root (only needed for folder: datasets)")
    cmi.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default: cpu)")
    cmi.add_argument("--ordered-grid", type=_png_path, metavar="OUT.png",
                     help="also draw each class's samples ordered by their KL to the class centroid (averaged over "
                          "the proxies; low left, high right) and, with --json, report per_sample_kl")
    cmi.add_argument("--json", action="store_true", help="print the result as JSON")
    cmi.set_defaults(handler=command_cmi)

    for name, summary, configure, handler in (
        ("theory", "the multi-index theory experiment on a synthetic Gaussian task", configure_theory_parser,
         command_theory),
        ("report", "figures and a summary table from run directories", configure_report_parser, command_report),
        ("sweep", "run a grid of distillations, each evaluated, resumably", configure_sweep_parser, command_sweep),
        ("continual", "class-incremental learning with a distilled memory", configure_continual_parser,
         command_continual),
    ):
        command = commands.add_parser(name, help=summary, description=handler.__doc__)
        configure(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infodistill`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --nproc re-runs the same command in each process
    handler: Callable[[argparse.Namespace], int] = args.handler
    logging.basicConfig(format="infodistill: %(levelname)s: %(message)s", level=logging.WARNING)
    from infodistill.loop import LossDiverged

    where = f"infodistill {args.command}"
    if launched_by_torchrun():
        where += f" (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})"
    try:
        _check_common_flags(args)
        return handler(args)
    except UserInputError as error:
        _error_line(f"{where}: error: {error}")
        return 2
    except (LossDiverged, ProcessGroupError) as error:
        _error_line(f"{where}: {error}")
        return 1
    except KeyboardInterrupt:
        _error_line(f"{where}: interrupted")
        return 130


FILE_OUTPUTS = {"baseline": "out", "evaluate": "out", "cmi": "ordered_grid"}
"""Per command, the flag (attribute) naming a file it writes; every other command's ``--out`` is a folder."""


def _check_common_flags(args: argparse.Namespace) -> None:
    """One boundary for what every command takes alike, checked before any work: a seed in 0..2**63-1, and an
    output (``--out``, ``--ordered-grid``) that can be written (:func:`~infodistill.files.check_output_path`)."""
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    file_flag = FILE_OUTPUTS.get(args.command)
    for name in ("out", "ordered_grid"):
        value = getattr(args, name, None)
        if value is not None:
            check_output_path(value, directory=name != file_flag, flag="--" + name.replace("_", "-"))


def _error_line(text: str) -> None:
    """``text`` as one line on stderr, in one write (lines of several processes do not interleave)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
