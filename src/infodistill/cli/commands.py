"""The handlers of ``infodistill baseline``, ``evaluate``, ``distill``, ``proxies``, ``experts`` and ``cmi``.

Each takes the parsed flags (:mod:`infodistill.cli.parsers`) and returns the exit status; a user error is a
:class:`~infodistill.errors.UserInputError`, which :func:`infodistill.cli.main` prints as one line. The
handlers of ``theory``, ``report``, ``sweep`` and ``continual`` live in their experiment modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

from infodistill.artefact import grid_path_for, load_set, save_set
from infodistill.config import build_config, load_yaml_mapping
from infodistill.data import dataset_info, load_dataset
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
from infodistill.files import check_output_path
from infodistill.loop import DistillConfig
from infodistill.parallel import (
    ProcessGroup,
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
from infodistill.settings import given_flags
from infodistill.training import EvalConfig, resolve_device


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
