"""Running the multi-index theory experiment (``infodistill theory``): every setting, theory.json and the figures.

The task, the student and the distillation are defined in :mod:`infodistill.experiments.theory_maths` (its
docstring states the experiment); the figures are drawn by :mod:`infodistill.experiments.theory_figures`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from infodistill.errors import UserInputError
from infodistill.experiments.theory_figures import FIGURE_NAMES, write_figures
from infodistill.experiments.theory_maths import (
    DTYPE,
    SWEEP_FIELDS,
    StudentInit,
    Task,
    TheoryConfig,
    distill_points,
    init_student,
    make_task,
    normalised_error,
    quick_config,
    subspace_energy,
    tagged_generator,
    train_student,
)
from infodistill.files import atomic_path

JSON_NAME = "theory.json"


# --------------------------------------------------------------------------------------------------
# the experiment


def _stack_students(students: Sequence[StudentInit]) -> StudentInit:
    return StudentInit(torch.stack([s.W0 for s in students]), torch.stack([s.b for s in students]),
                       torch.stack([s.a0 for s in students]))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    tensor = torch.tensor(list(values), dtype=DTYPE)
    return float(tensor.mean()), float(tensor.std(unbiased=False))


def _clean(value):
    """JSON-safe copy: tensors to lists, non-finite floats to None."""
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def m_needed(m_values: Sequence[int], distilled_means: Sequence[float], full_mean: float,
             tolerance: float) -> int | None:
    """The smallest m whose mean distilled error is at most ``full_mean + tolerance`` (None if none)."""
    for m, error in zip(m_values, distilled_means):
        if error is not None and error <= full_mean + tolerance:
            return int(m)
    return None


def setting_task(config: TheoryConfig) -> Task:
    """The task of ``config``'s (d, r): the same for every width and seed count."""
    return make_task(config, tagged_generator(config.seed, "task", config.d, config.r, config.n_train, config.n_test))


def setting_students(config: TheoryConfig) -> list[StudentInit]:
    """The ``seeds`` student initialisations of ``config``'s (d, width): the same for every r."""
    return [init_student(config.d, config.width, tagged_generator(config.seed, "student", config.d, config.width, s))
            for s in range(config.seeds)]


def run_setting(config: TheoryConfig, bar=None) -> dict:
    """Full data, random subsets and distilled sets at every m of ``config`` (its d, r, width).

    Returns per-seed and mean/std normalised test errors, per-point subspace energies of the distilled
    and of the random real points, the final objective terms, and the m needed.
    """
    task = setting_task(config)
    students = setting_students(config)
    result = _full_data_result(config, task, students)
    for m in config.m_values:
        _add_size(result, config, task, students, m)
        if bar is not None:
            bar.set_postfix_str(f"d={config.d} r={config.r} L={config.width} m={m}")
            bar.update(1)
    result["m_needed"] = m_needed(config.m_values, result["distilled_error"]["mean"], result["full_error"]["mean"],
                                  config.tolerance)
    result["m_needed_floats"] = None if result["m_needed"] is None else result["m_needed"] * (config.d + 1)
    return result


def _full_data_result(config: TheoryConfig, task: Task, students: Sequence[StudentInit]) -> dict[str, Any]:
    """A setting's result before its sizes: the setting, the full-data students' errors, empty per-m lists."""
    eta = config.step_size
    full = [train_student(task.X_train, task.y_train, s.W0, s.b, s.a0, eta, config.ridge) for s in students]
    full_errors = [normalised_error(p, task.X_test, task.y_test) for p in full]
    first_layer_energy = [float(subspace_energy(p.W1, task.U).mean()) for p in full]
    return {
        "d": config.d, "r": config.r, "width": config.width, "step_size": eta,
        "expected_random_energy": config.r / config.d,
        "full_error": {"per_seed": full_errors, "mean": _mean_std(full_errors)[0], "std": _mean_std(full_errors)[1]},
        "full_first_layer_energy": first_layer_energy,
        "m_values": list(config.m_values),
        "distilled_error": {"per_seed": [], "mean": [], "std": []},
        "random_error": {"per_seed": [], "mean": [], "std": []},
        "distilled_energy": {"per_point": [], "mean": []},
        "random_energy": {"per_point": [], "mean": []},
        "final_match": [], "final_fit": [], "distill_seconds": [],
    }


def _add_size(result: dict[str, Any], config: TheoryConfig, task: Task, students: Sequence[StudentInit],
              m: int) -> None:
    """Append to ``result`` size ``m``'s random subsets and distilled sets (one per seed): errors, energies, terms."""
    d, r, width, seeds = config.d, config.r, config.width, config.seeds
    eta = config.step_size
    index = torch.stack([
        torch.randperm(config.n_train, generator=tagged_generator(config.seed, "subset", d, r, m, s))[:m]
        for s in range(seeds)])
    X_init, y_init = task.X_train[index], task.y_train[index]
    random_errors = [normalised_error(train_student(X_init[s], y_init[s], *_student_tuple(students[s]), eta,
                                                   config.ridge), task.X_test, task.y_test) for s in range(seeds)]
    started = time.perf_counter()
    distilled = distill_points(X_init, y_init, task.X_train, task.y_train, _stack_students(students), eta,
                               config.ridge, config.distill_steps, config.distill_lr, config.fit_weight,
                               config.fit_batch, tagged_generator(config.seed, "distill", d, r, width, m))
    result["distill_seconds"].append(time.perf_counter() - started)
    distilled_errors = [normalised_error(train_student(distilled.X[s], distilled.y[s], *_student_tuple(students[s]),
                                                       eta, config.ridge), task.X_test, task.y_test)
                        for s in range(seeds)]
    for key, errors in (("distilled_error", distilled_errors), ("random_error", random_errors)):
        mean, std = _mean_std(errors)
        result[key]["per_seed"].append(errors)
        result[key]["mean"].append(mean)
        result[key]["std"].append(std)
    for key, points in (("distilled_energy", distilled.X), ("random_energy", X_init)):
        energy = subspace_energy(points.reshape(-1, d), task.U)
        result[key]["per_point"].append(energy.tolist())
        result[key]["mean"].append(float(energy.mean()))
    result["final_match"].append(distilled.match_history[-1].tolist())
    result["final_fit"].append(distilled.fit_history[-1].tolist())


def _student_tuple(student: StudentInit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return student.W0, student.b, student.a0


def _sweep_settings(config: TheoryConfig) -> list[tuple[int, int, int]]:
    """The distinct (d, r, width) settings the run needs, the main one first."""
    keys = [(config.d, config.r, config.width)]
    for value in config.sweep_r:
        keys.append((config.d, value, config.width))
    for value in config.sweep_d:
        keys.append((value, config.r, config.width))
    for value in config.sweep_width:
        keys.append((config.d, config.r, value))
    return list(dict.fromkeys(keys))


def run_theory(config: TheoryConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the whole experiment, write the three figures and ``theory.json`` into ``out_dir``, return the payload.

    The payload (exactly what ``theory.json`` holds) has ``settings``, ``main`` (the result of
    :func:`run_setting` at the config's d, r, width), ``sweeps`` (per swept parameter: its values and,
    per value, the full-data error, the mean distilled and random errors per m and the m needed),
    ``figures`` (file names) and ``wall_seconds``. Keys ending in ``_seconds`` are timings; everything
    else is a deterministic function of the config.
    """
    config.validate()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out must be a folder, but '{out_dir}' is an existing file")
    settings = _sweep_settings(config)
    results = _run_settings(config, settings, progress)
    payload = {
        "experiment": "multi-index theory (Kinoshita, Nishikawa, Toyoizumi, arXiv 2603.14830)",
        "settings": {**dataclasses.asdict(config), "step_size": config.step_size,
                     "error": "test MSE / test variance of y",
                     "m_needed_rule": "smallest m of the grid with mean distilled error <= "
                                      "mean full-data error + tolerance"},
        "main": results[settings[0]],
        "sweeps": _sweep_summaries(config, results),
        "figures": dict(FIGURE_NAMES),
    }
    payload = _clean(payload)
    write_figures(payload, out_dir)
    payload["wall_seconds"] = time.perf_counter() - started
    with atomic_path(out_dir / JSON_NAME) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return payload


def _run_settings(config: TheoryConfig, settings: Sequence[tuple[int, int, int]],
                  progress: bool) -> dict[tuple[int, int, int], dict]:
    """:func:`run_setting` at every (d, r, width) of ``settings``, under one progress bar."""
    bar = tqdm(total=len(settings) * len(config.m_values), desc="theory", unit="set", disable=not progress)
    results = {}
    try:
        for d, r, width in settings:
            results[(d, r, width)] = run_setting(dataclasses.replace(config, d=d, r=r, width=width), bar)
    finally:
        bar.close()
    return results


def _sweep_summaries(config: TheoryConfig, results: dict[tuple[int, int, int], dict]) -> dict[str, dict]:
    """Per swept parameter with values: the values and, per value, the m needed and the mean errors and energies."""
    sweeps = {}
    for name, field_name in SWEEP_FIELDS.items():
        values = getattr(config, field_name)
        if not values:
            continue
        rows = []
        for value in values:
            key = {"r": (config.d, value, config.width), "d": (value, config.r, config.width),
                   "width": (config.d, config.r, value)}[name]
            rows.append(results[key])
        sweeps[name] = {
            "values": list(values),
            "m_needed": [row["m_needed"] for row in rows],
            "m_needed_floats": [row["m_needed_floats"] for row in rows],
            "full_error_mean": [row["full_error"]["mean"] for row in rows],
            "distilled_error_mean": [row["distilled_error"]["mean"] for row in rows],
            "random_error_mean": [row["random_error"]["mean"] for row in rows],
            "distilled_energy_mean": [row["distilled_energy"]["mean"] for row in rows],
            "expected_random_energy": [row["expected_random_energy"] for row in rows],
        }
    return sweeps


# --------------------------------------------------------------------------------------------------
# command line (``infodistill theory``; its flags are in infodistill/cli/parsers.py)


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)``; ``""`` or ``"none"`` -> ``()``; anything else raises UserInputError."""
    stripped = text.strip()
    if stripped.lower() in ("", "none"):
        return ()
    values = []
    for part in stripped.split(","):
        try:
            values.append(int(part.strip()))
        except ValueError:
            raise UserInputError(f"{flag} must be a comma-separated list of integers (e.g. 2,4,8), "
                                 f"got {text!r}") from None
    return tuple(values)


def theory_config_from_args(args: argparse.Namespace) -> TheoryConfig:
    """The validated :class:`TheoryConfig` the flags describe (``--quick`` as the base when given)."""
    config = quick_config() if getattr(args, "quick", False) else TheoryConfig()
    overrides = {}
    for name in ("d", "r", "width", "n_train", "seeds", "distill_steps", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    for name, flag in (("m_values", "--m-values"), ("sweep_r", "--sweep-r"), ("sweep_d", "--sweep-d"),
                       ("sweep_width", "--sweep-width")):
        text = getattr(args, name, None)
        if text is not None:
            overrides[name] = parse_int_list(text, flag)
    if "m_values" in overrides and not overrides["m_values"]:
        raise UserInputError(f"--m-values must list at least one size, got {args.m_values!r}")
    return dataclasses.replace(config, **overrides).validate()


def command_theory(args: argparse.Namespace) -> int:
    """Run the multi-index theory experiment: figures and theory.json in --out."""
    config = theory_config_from_args(args)
    payload = run_theory(config, args.out, progress=not args.quiet)
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    out = Path(args.out)
    main = payload["main"]
    print(f"theory: d={config.d} r={config.r} L={config.width}, full-data test error "
          f"{main['full_error']['mean']:.4f} (test MSE / Var(y)), {payload['wall_seconds']:.1f} s")
    for index, m in enumerate(main["m_values"]):
        distilled, random_subset = main["distilled_error"]["mean"][index], main["random_error"]["mean"][index]
        energy = (main["distilled_energy"]["mean"][index], main["random_energy"]["mean"][index])
        print(f"  m={m:<4d} distilled {_format(distilled)}  random {_format(random_subset)}  energy in span(U) "
              f"distilled {energy[0]:.3f} random {energy[1]:.3f}")
    for name, sweep in payload["sweeps"].items():
        needed = ", ".join(f"{name}={v}: {'>' + str(max(config.m_values)) if m is None else m}"
                           for v, m in zip(sweep["values"], sweep["m_needed"]))
        print(f"  m needed ({name} sweep): {needed}")
    print(f"figures: {', '.join(str(out / name) for name in payload['figures'].values())}")
    print(f"numbers: {out / JSON_NAME}")
    return 0


def _format(value) -> str:
    return "   n/a" if value is None else f"{value:.4f}"
