"""Sweeps: a grid of distillations, each evaluated, run resumably in one process.

A sweep file (YAML) names the settings every cell shares, the grid to vary, and how cells are scored::

    distill:                 # any DistillConfig field: the settings shared by every cell
      method: dm
      ipc: 10
      iterations: 300
      proxies: pools/fmnist
    grid:                    # DistillConfig fields -> lists of values; the cells are their product
      cmi_weight: [0.0, 0.1, 1.0, 10.0]
    evaluate:                # any EvalConfig field, plus `models` (a list: cross-architecture)
      epochs: 300
      runs: 2
    baseline: true           # also score the random real subset of each (dataset, ipc, seed)

Each cell is a run directory ``OUT/cells/<name>`` (``config.yaml``, ``metrics.jsonl``, ``set.safetensors``)
with its ``evaluation.json``; a baseline is ``OUT/baseline-<dataset>-ipc<N>-seed<S>``. A cell is finished
when its ``evaluation.json`` exists: a restarted sweep skips it, resumes a cell whose distillation was
cut off from its checkpoint, and evaluates a cell whose set exists but was not scored yet. The loaded
datasets and the proxy pools, teachers and expert trajectories are read once and shared by all cells.
``OUT/sweep.json`` is rewritten after every cell with each cell's state and accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from infodistill.artefact import load_set, save_set
from infodistill.config import config_from_mapping, load_yaml_mapping
from infodistill.data import RealData, load_dataset
from infodistill.errors import UserInputError
from infodistill.evaluate import EVALUATION_NAME, evaluate_models, random_subset, write_evaluation
from infodistill.files import ARTEFACT_NAME, CHECKPOINT_NAME, atomic_path
from infodistill.loop import DistillConfig, LossDiverged, distill, distill_config_from
from infodistill.models import parse_model_name
from infodistill.trained import LoadCache
from infodistill.training import EvalConfig

SWEEP_SETTINGS_NAME = "sweep.yaml"
SWEEP_STATE_NAME = "sweep.json"
SECTIONS = ("distill", "grid", "evaluate", "baseline")
# Run-only settings a cell may not vary: they change where or how fast a cell runs, not what it computes.
NOT_GRIDDED = ("device", "data_root")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its name (its folder) and the full distillation settings."""

    name: str
    values: dict[str, Any]
    config: DistillConfig


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep: shared settings, the grid (in file order), evaluation settings, baseline flag."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    evaluation: EvalConfig
    models: tuple[str, ...]
    baseline: bool

    def cells(self) -> list[Cell]:
        """Every combination of the grid's values, in row-major order of the grid's keys."""
        keys = list(self.grid)
        cells = []
        for combination in itertools.product(*(self.grid[key] for key in keys)):
            values = dict(zip(keys, combination))
            config = distill_config_from({**self.base, **values}, source="sweep cell")
            config.validate()
            cells.append(Cell(cell_name(values), values, config))
        names = [cell.name for cell in cells]
        if len(set(names)) != len(names):
            raise UserInputError(
                f"the grid gives two cells the same name ({names}); give its values distinct spellings"
            )
        return cells

    def to_mapping(self) -> dict[str, Any]:
        evaluate = {name: value for name, value in dataclasses.asdict(self.evaluation).items()
                    if value != getattr(EvalConfig(), name)}
        return {"distill": dict(self.base), "grid": {key: list(values) for key, values in self.grid.items()},
                "evaluate": {**evaluate, "models": list(self.models)}, "baseline": self.baseline}


def _format_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "none"


def cell_name(values: dict[str, Any]) -> str:
    """A folder name that says which values the cell takes, e.g. ``method-dm_cmi_weight-0.1``."""
    return "_".join(f"{key}-{_format_value(value)}" for key, value in values.items()) or "single"


def parse_sweep(mapping: dict[str, Any], source: str = "sweep") -> SweepSpec:
    """Check a sweep mapping (from YAML and flags): refuse unknown sections, unknown or run-only grid keys,
    empty value lists and settings a cell could not run with, before anything runs."""
    unknown = sorted(set(mapping) - set(SECTIONS))
    if unknown:
        raise UserInputError(f"{source}: unknown section '{unknown[0]}'; allowed: {', '.join(SECTIONS)}")
    base = dict(mapping.get("distill") or {})
    grid = dict(mapping.get("grid") or {})
    fields = {field.name for field in dataclasses.fields(DistillConfig)}
    for key, values in grid.items():
        if key not in fields:
            raise UserInputError(f"{source}: unknown grid key '{key}'; allowed keys: {', '.join(sorted(fields))}")
        if key in NOT_GRIDDED:
            raise UserInputError(f"{source}: grid key '{key}' changes where a cell runs, not what it computes; set it "
                                 "under distill: instead")
        if not isinstance(values, list) or not values:
            raise UserInputError(f"{source}: grid key '{key}' must list at least one value, got {values!r}")
    distill_config_from(base, source=f"{source} distill")  # unknown keys and wrong types, named
    evaluate = dict(mapping.get("evaluate") or {})
    models = evaluate.pop("models", None)
    evaluation = config_from_mapping(EvalConfig, evaluate, source=f"{source} evaluate")
    evaluation.validate()
    if models is None:
        models = [evaluation.model]
    if isinstance(models, str):
        models = [name.strip() for name in models.split(",") if name.strip()]
    if not isinstance(models, list) or not models:
        raise UserInputError(f"{source}: evaluate models must be a list of model names, got {models!r}")
    for model in models:
        parse_model_name(str(model))
    baseline = mapping.get("baseline", True)
    if not isinstance(baseline, bool):
        raise UserInputError(f"{source}: baseline must be true or false, got {baseline!r}")
    spec = SweepSpec(base, grid, evaluation, tuple(str(model) for model in models), baseline)
    for cell in spec.cells():  # every cell's settings are valid and its inputs exist
        for name in ("proxies", "experts", "teacher"):
            folder = getattr(cell.config, name)
            if folder is not None and not Path(folder).is_dir():
                raise UserInputError(f"{source}: cell '{cell.name}': {name} folder '{folder}' does not exist")
    return spec


def _parse_flag_value(text: str) -> Any:
    """A flag value the way YAML reads it: ``0.1`` a number, ``true`` a boolean, ``dm`` a string."""
    return yaml.safe_load(text) if text.strip() else text


def apply_flags(mapping: dict[str, Any], grid_flags: list[str], set_flags: list[str]) -> dict[str, Any]:
    """Add ``--grid KEY=V1,V2`` and ``--set KEY=VALUE`` flags to a sweep mapping (flags win)."""
    mapping = {section: (dict(value) if isinstance(value, dict) else value) for section, value in mapping.items()}
    for flag, items, section in (("--grid", grid_flags, "grid"), ("--set", set_flags, "distill")):
        for item in items:
            key, separator, value = item.partition("=")
            if not separator or not key.strip():
                raise UserInputError(f"{flag} takes KEY=VALUE{',VALUE' if flag == '--grid' else ''}, got {item!r}")
            target = mapping.setdefault(section, {})
            if not isinstance(target, dict):
                raise UserInputError(f"sweep section '{section}' must be a mapping")
            if section == "grid":
                target[key.strip()] = [_parse_flag_value(part) for part in value.split(",")]
            else:
                target[key.strip()] = _parse_flag_value(value)
    return mapping


class Sweep:
    """Runs the cells of a :class:`SweepSpec` into ``out_dir``, sharing loaded data and pools."""

    def __init__(self, spec: SweepSpec, out_dir: str | Path, progress: bool = True) -> None:
        self.spec = spec
        self.out = Path(out_dir)
        self.progress = progress
        self.cache = LoadCache()
        self._datasets: dict[tuple[str, str | None], RealData] = {}
        self.state: dict[str, dict[str, Any]] = {}

    def real(self, config: DistillConfig) -> RealData:
        """The dataset of a cell, loaded once per (dataset, data root) for the whole sweep."""
        key = (config.dataset, config.data_root)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(config.dataset, data_root=config.data_root)
        return self._datasets[key]

    def _check_settings(self) -> None:
        """A restart must run the same sweep: refuse (naming the first difference) before touching any cell."""
        path = self.out / SWEEP_SETTINGS_NAME
        wanted = self.spec.to_mapping()
        if path.exists():
            found = yaml.safe_load(path.read_text()) or {}
            for section in SECTIONS:
                if found.get(section) != wanted.get(section):
                    raise UserInputError(
                        f"'{self.out}' holds a sweep with other '{section}' settings ({found.get(section)!r}, now "
                        f"{wanted.get(section)!r}); use another --out, or the same sweep file to resume")
        else:
            with atomic_path(path) as temporary:
                temporary.write_text(yaml.safe_dump(wanted, sort_keys=False))

    def _write_state(self) -> None:
        with atomic_path(self.out / SWEEP_STATE_NAME) as temporary:
            temporary.write_text(json.dumps({"cells": self.state, "sweep": self.spec.to_mapping()}, indent=2))

    def _evaluate(self, run_dir: Path, real: RealData) -> list[dict[str, Any]]:
        """Score a run directory's set with every model; write and return its evaluation.json results."""
        artefact = run_dir / ARTEFACT_NAME
        results = evaluate_models(load_set(artefact), real, self.spec.evaluation, self.spec.models, progress=False)
        write_evaluation(run_dir / EVALUATION_NAME, artefact, results)
        return [result.to_dict() for result in results]

    def _record(self, name: str, run_dir: Path, status: str, results: list[dict[str, Any]] | None = None,
                values: dict[str, Any] | None = None, seconds: float = 0.0, error: str | None = None) -> None:
        entry: dict[str, Any] = {"dir": str(run_dir.relative_to(self.out)), "status": status, "values": values or {}}
        if results:
            entry["accuracy"] = {result["model"]: {"mean": result["mean"], "std": result["std"]} for result in results}
        if seconds:
            entry["seconds"] = round(seconds, 2)
        if error:
            entry["error"] = error
        self.state[name] = entry
        self._write_state()

    def _finished(self, run_dir: Path) -> list[dict[str, Any]] | None:
        """The evaluation.json results of a finished run directory, None while it is not finished."""
        path = run_dir / EVALUATION_NAME
        return json.loads(path.read_text())["results"] if path.exists() else None

    def run_cell(self, cell: Cell) -> str:
        """Distil (or resume) and evaluate one cell; returns its status: done, skipped or failed."""
        run_dir = self.out / "cells" / cell.name
        finished = self._finished(run_dir)
        if finished is not None:
            self._record(cell.name, run_dir, "skipped", finished, cell.values)
            return "skipped"
        started = time.perf_counter()
        real = self.real(cell.config)
        try:
            if not (run_dir / ARTEFACT_NAME).exists():
                resume = (run_dir / CHECKPOINT_NAME).exists()
                distill(cell.config, run_dir, resume=resume, progress=False, real=real, cache=self.cache)
            results = self._evaluate(run_dir, real)
        except LossDiverged as diverged:
            self._record(cell.name, run_dir, "failed", values=cell.values, error=str(diverged))
            return "failed"
        self._record(cell.name, run_dir, "done", results, cell.values, time.perf_counter() - started)
        return "done"

    def run_baseline(self, config: DistillConfig) -> None:
        """Write and score the random real subset of the cell's (dataset, ipc, seed) once."""
        dataset = re.sub(r"[^A-Za-z0-9]+", "-", config.dataset).strip("-")
        name = f"baseline-{dataset}-ipc{config.ipc}-seed{config.seed}"
        run_dir = self.out / name
        finished = self._finished(run_dir)
        if finished is not None:
            self._record(name, run_dir, "skipped", finished)
            return
        started = time.perf_counter()
        real = self.real(config)
        if not (run_dir / ARTEFACT_NAME).exists():
            save_set(random_subset(real, config.ipc, config.seed), run_dir / ARTEFACT_NAME)
        self._record(name, run_dir, "done", self._evaluate(run_dir, real), seconds=time.perf_counter() - started)

    def run(self) -> dict[str, Any]:
        """Every cell (and baseline), skipping finished ones; returns the state written to sweep.json."""
        cells = self.spec.cells()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        def baseline_key(config: DistillConfig) -> tuple:
            return config.dataset, config.data_root, config.ipc, config.seed

        # one baseline per (dataset, ipc, seed), run just before the first cell that needs it
        pending = {baseline_key(cell.config): cell.config for cell in cells} if self.spec.baseline else {}
        bar = tqdm(total=len(cells) + len(pending), disable=not self.progress, desc="sweep", unit="cell")
        try:
            for cell in cells:
                baseline = pending.pop(baseline_key(cell.config), None)
                if baseline is not None:
                    self.run_baseline(baseline)
                    bar.update()
                bar.set_postfix_str(cell.name)
                self.run_cell(cell)
                bar.update()
        finally:
            bar.close()
        return {"cells": self.state, "sweep": self.spec.to_mapping()}

    def run_dirs(self) -> list[Path]:
        """The run directories of the sweep (baselines first), for ``infodistill report``."""
        return [self.out / entry["dir"] for entry in sorted(self.state.values(), key=lambda e: not e["dir"].startswith(
            "baseline")) if entry["status"] != "failed"]


def sweep_spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """The checked sweep the file and flags describe."""
    mapping = load_yaml_mapping(args.file) if args.file else {}
    mapping = apply_flags(mapping, args.grid, args.set)
    evaluate = dict(mapping.get("evaluate") or {})
    for name in ("epochs", "runs"):
        if getattr(args, name) is not None:
            evaluate[name] = getattr(args, name)
    if args.models is not None:
        evaluate["models"] = args.models
    mapping["evaluate"] = evaluate
    if args.no_baseline:
        mapping["baseline"] = False
    if not mapping.get("grid") and not mapping.get("distill"):
        raise UserInputError("a sweep needs a sweep file or --grid/--set flags (see `infodistill sweep --help`)")
    return parse_sweep(mapping, source=args.file or "flags")


def command_sweep(args: argparse.Namespace) -> int:
    """Run a grid of distillations, each evaluated, resumably (finished cells are skipped on restart)."""
    spec = sweep_spec_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file; a sweep needs a folder")
    sweep = Sweep(spec, out, progress=not args.quiet)
    state = sweep.run()
    tables = ""
    if args.report:
        from infodistill.experiments.arms import arms_markdown
        from infodistill.experiments.report import load_runs, write_report

        runs, baseline = load_runs(sweep.run_dirs())
        summary = write_report(runs, out / "report", baseline)
        tables = arms_markdown(summary["arms"], summary["paired"])
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        for name, entry in state["cells"].items():
            scores = ", ".join(f"{model} {value['mean']:.2f} +- {value['std']:.2f} %"
                               for model, value in entry.get("accuracy", {}).items())
            print(f"{name:<48} {entry['status']:<8} {scores or entry.get('error', '')}")
        if tables:
            print("\n" + tables + "\n")
        print(f"sweep: {out / SWEEP_STATE_NAME}" + (f"; report: {out / 'report'}" if args.report else ""))
    failed = [name for name, entry in state["cells"].items() if entry["status"] == "failed"]
    return 1 if failed else 0
