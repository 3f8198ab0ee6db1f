"""``infodistill report``: figures and a summary table comparing finished distillation runs.

A *run directory* (written by ``infodistill distill --out DIR``) holds ``set.safetensors``,
``config.yaml`` and ``metrics.jsonl`` (one JSON object per iteration), and optionally
``evaluation.json`` (``infodistill evaluate SET --out DIR/evaluation.json``). A *baseline directory*
holds a random real subset (``set.safetensors`` with method ``random``) and usually ``evaluation.json``;
it needs no config or metrics.

:func:`load_runs` reads and checks every directory before anything is written; :func:`write_report`
then writes into the output folder, each file through a temporary file renamed into place:

- ``losses.png``: every ``loss/*`` term against the iteration, one panel per term, one line per run;
- ``cmi.png``: the set's CMI against the iteration (``monitor/cmi`` where logged, else ``loss/cmi``);
- ``accuracy.png``: the periodic ``eval/accuracy`` of every run, with each evaluated baseline's mean
  accuracy as a dashed horizontal line;
- ``grids.png``: up to ten images per class (one row per class) of every set, side by side;
- ``convergence.png``: the periodic accuracy of every arm (runs that differ only in their seed) with its
  95 % confidence band (:mod:`infodistill.experiments.arms`);
- ``summary.md`` and ``summary.json``: one row per run and per baseline, with the gain in accuracy
  points over the baseline; then one row per arm with its accuracy and 95 % interval, its final in-sample
  and held-out CMI, and the paired difference of every arm against the first arm given (and against the
  random subset) with its interval (:mod:`infodistill.intervals`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infodistill.artefact import DistilledSet, load_set
from infodistill.config import load_yaml_mapping
from infodistill.errors import UserInputError
from infodistill.evaluate import EVALUATION_NAME
from infodistill.experiments.arms import Arm, arm_rows, arms_markdown, group_arms, paired_rows
from infodistill.experiments.figures import new_figure, save_figure
from infodistill.experiments.runs import BASELINE_METHOD, RunRecord
from infodistill.files import ARTEFACT_NAME as SET_NAME
from infodistill.files import CONFIG_NAME, METRICS_NAME, atomic_path

FIGURES = {
    "losses": "losses.png",
    "cmi": "cmi.png",
    "accuracy": "accuracy.png",
    "grids": "grids.png",
    "convergence": "convergence.png",
}
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
GRID_PER_CLASS = 10
COLUMNS = ("run", "method", "IPC", "images", "regularizers", "iterations", "accuracy", "final CMI",
           "gain vs baseline")
NO_CMI_NOTE = "no CMI logged (pass --proxies ... --cmi-weight 0 to monitor it)"
NO_ACCURACY_NOTE = "no eval/accuracy logged (distil with --eval-every N to log it)"
NO_LOSS_NOTE = "no loss terms logged"


# --------------------------------------------------------------------------------------------------
# reading


def _refuse_constant(name: str) -> float:
    """``json.loads``' hook for the non-standard constants NaN, Infinity and -Infinity: refused, since the
    library never writes them (a diverged run stops before logging) and no other JSON reader takes them."""
    raise ValueError(f"holds the non-standard JSON constant {name}; only finite numbers are allowed")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    lines = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read '{path}': {getattr(error, 'strerror', None) or error}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as error:
            if not isinstance(error, json.JSONDecodeError):
                raise UserInputError(f"'{path}' line {number}: {error}") from None
            raise UserInputError(f"'{path}' line {number} is not valid JSON ({error.msg}); "
                                 "each line must be one JSON object") from None
        if not isinstance(parsed, dict):
            raise UserInputError(f"'{path}' line {number} is not a JSON object; each line must be one object")
        iteration = parsed.get("iteration")
        if not isinstance(iteration, int) or isinstance(iteration, bool):
            raise UserInputError(f"'{path}' line {number} lacks an integer 'iteration'")
        lines.append(parsed)
    return lines


def _read_evaluation(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read '{path}': {getattr(error, 'strerror', None) or error}") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"'{path}' is not valid JSON (line {error.lineno}: {error.msg})") from None
    except ValueError as error:  # a non-standard constant
        raise UserInputError(f"'{path}' {error}") from None
    results = loaded.get("results") if isinstance(loaded, dict) else None
    if not isinstance(results, list):
        raise UserInputError(f"'{path}' must be an object with a 'results' list (from `infodistill evaluate --out`)")
    for index, result in enumerate(results):
        if not isinstance(result, dict) or not all(
                isinstance(result.get(key), (int, float)) for key in ("mean", "std")):
            raise UserInputError(f"'{path}': result {index} lacks numeric 'mean' and 'std'")
    return loaded


def load_run(path: str | Path) -> RunRecord:
    """Read one run or baseline directory; refuse a missing, unfinished or malformed one in one line."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"run directory '{path}' does not exist")
    if not path.is_dir():
        raise UserInputError(f"'{path}' is not a directory (expected a run directory from `infodistill distill --out`)")
    set_path = path / SET_NAME
    if not set_path.is_file():
        unfinished = (path / CONFIG_NAME).is_file() or (path / METRICS_NAME).is_file()
        hint = ("incomplete: the run has not written its set (did the run finish? resume it with --resume)"
                if unfinished else "expected a run directory from `infodistill distill --out` or a baseline directory")
        raise UserInputError(f"'{path}' holds no {SET_NAME}; {hint}")
    distilled = load_set(set_path)
    metadata = distilled.metadata
    config_path, metrics_path = path / CONFIG_NAME, path / METRICS_NAME
    if metadata.method != BASELINE_METHOD:
        missing = [name for name, item in ((METRICS_NAME, metrics_path), (CONFIG_NAME, config_path))
                   if not item.is_file()]
        if missing:
            raise UserInputError(f"run '{path}' is incomplete: no {' and no '.join(missing)} "
                                 "(did the run finish? resume it with --resume)")
    config = load_yaml_mapping(config_path) if config_path.is_file() else None
    metrics = _read_metrics(metrics_path) if metrics_path.is_file() else []
    evaluation_path = path / EVALUATION_NAME
    evaluation = _read_evaluation(evaluation_path) if evaluation_path.is_file() else None
    return RunRecord(path=path, name=path.resolve().name or str(path), metadata=metadata, config=config,
                     metrics=metrics, evaluation=evaluation, distilled=distilled)


def _disambiguate(records: list[RunRecord]) -> None:
    """Rename runs whose directory names collide: ``parent/name``, else the path as given."""
    for naming in (lambda r: f"{r.path.resolve().parent.name}/{r.path.resolve().name}", lambda r: str(r.path)):
        counts: dict[str, int] = {}
        for record in records:
            counts[record.name] = counts.get(record.name, 0) + 1
        for record in records:
            if counts[record.name] > 1:
                record.name = naming(record)


def _check_one_dataset(runs: Sequence[RunRecord], baseline: RunRecord | None) -> None:
    everything = list(runs) + ([baseline] if baseline is not None else [])
    datasets = {record.metadata.dataset for record in everything}
    if len(datasets) > 1:
        listing = ", ".join(f"{'baseline ' if record is baseline else ''}'{record.path}' ({record.metadata.dataset})"
                            for record in everything)
        raise UserInputError(f"the runs mix datasets: {listing}; report runs of one dataset at a time")


def load_runs(paths: Sequence[str | Path], baseline: str | Path | None = None
              ) -> tuple[list[RunRecord], RunRecord | None]:
    """Read every run and the optional baseline, check they share one dataset; returns ``(runs, baseline)``."""
    if not paths:
        raise UserInputError("give at least one run directory")
    runs = [load_run(path) for path in paths]
    base = load_run(baseline) if baseline is not None else None
    if base is not None and not base.is_baseline:
        raise UserInputError(f"--baseline '{base.path}' holds a '{base.metadata.method}' set, not a random real "
                             f"subset (method '{BASELINE_METHOD}', from `infodistill baseline`); pass it as a run")
    seen: dict[Path, Path] = {}
    for record in runs + ([base] if base is not None else []):
        resolved = record.path.resolve()
        if resolved in seen:
            raise UserInputError(f"'{record.path}' is given twice (also as '{seen[resolved]}')")
        seen[resolved] = record.path
    _check_one_dataset(runs, base)
    _disambiguate(runs + ([base] if base is not None else []))
    return runs, base


# --------------------------------------------------------------------------------------------------
# the summary table


def _format_regularizers(weights: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in sorted(weights.items())) or "-"


def _format_accuracy(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not evaluated"
    runs = result.get("runs", len(result.get("accuracies", [])))
    return f"{result['mean']:.2f} +- {result['std']:.2f} % ({result.get('model', '?')}, {runs} runs)"


def _reference(runs: Sequence[RunRecord], baseline: RunRecord | None) -> RunRecord | None:
    """The baseline gains are measured against: ``--baseline``, else the first random run."""
    if baseline is not None:
        return baseline
    return next((record for record in runs if record.is_baseline), None)


def _gain(record: RunRecord, reference: RunRecord | None) -> float | None:
    """Accuracy points over the reference's result for the same model (None if either is not evaluated)."""
    result = record.first_result()
    if reference is None or record is reference or result is None or not reference.evaluation:
        return None
    for candidate in reference.evaluation.get("results", []):
        if candidate.get("model") == result.get("model"):
            return float(result["mean"]) - float(candidate["mean"])
    return None


def summary_rows(runs: Sequence[RunRecord], baseline: RunRecord | None = None) -> list[dict[str, Any]]:
    """One row per run, then the ``--baseline``: raw values (``cells`` holds the formatted table cells)."""
    reference = _reference(runs, baseline)
    rows = []
    for record in list(runs) + ([baseline] if baseline is not None else []):
        metadata = record.metadata
        result = record.first_result()
        cmi, cmi_source = record.final_cmi()
        gain = _gain(record, reference)
        gain = gain if gain is not None and math.isfinite(gain) else None
        accuracy = None if result is None else {
            "mean": float(result["mean"]), "std": float(result["std"]), "model": result.get("model"),
            "runs": result.get("runs", len(result.get("accuracies", []))),
            "labels": result.get("labels"), "epochs": result.get("epochs")}
        cells = [record.name, metadata.method, str(metadata.ipc), str(len(record.distilled.labels)),
                 _format_regularizers(metadata.regularizers), str(metadata.iterations), _format_accuracy(result),
                 "-" if cmi is None else f"{cmi:.4g}", "-" if gain is None else f"{gain:+.2f}"]
        rows.append({
            "run": record.name, "path": str(record.path), "baseline": record.is_baseline,
            "reference": record is reference, "method": metadata.method, "ipc": metadata.ipc,
            "images": len(record.distilled.labels), "regularizers": dict(metadata.regularizers),
            "iterations": metadata.iterations, "accuracy": accuracy, "final_cmi": cmi, "final_cmi_source": cmi_source,
            "gain": gain, "cells": cells,
        })
    return rows


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(text) for text in row["cells"]) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(summary: dict[str, Any]) -> str:
    reference = summary["reference"]
    parts = [f"# Distillation report ({summary['dataset']})", "", _markdown_table(summary["rows"]), ""]
    parts.append(f"Gain vs baseline: accuracy points over `{reference}` (same evaluation model)."
                 if reference else "Gain vs baseline: no random-subset baseline given (`--baseline DIR`).")
    parts.append("Final CMI: the last `monitor/cmi` (the set's CMI under the proxy pool), else the last `loss/cmi`.")
    tables = arms_markdown(summary.get("arms", []), summary.get("paired", []))
    if tables:
        parts += ["", tables]
    parts += ["", "## Figures", ""]
    parts += [f"![{name}]({file})" for name, file in summary["figures"].items()]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# figures (Agg canvas; figures are not registered with pyplot, so nothing stays open)


def _note(axis, text: str, keep_ticks: bool = False) -> None:
    """A centred grey note on an axes that has nothing to plot."""
    axis.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=axis.transAxes, color="0.35")
    if not keep_ticks:
        axis.set_xticks([])
        axis.set_yticks([])


def _finish_iteration_axes(figure, axis, path: Path, drawn: bool, ylabel: str, note: str, title: str) -> None:
    """Label an against-the-iteration plot (or put ``note`` on it when nothing was drawn), title it, save it."""
    if drawn:
        axis.set_xlabel("iteration")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize="small")
    else:
        _note(axis, note)
    axis.set_title(title)
    save_figure(figure, path)


def _colours(records: Sequence[RunRecord]) -> dict[int, str]:
    """One colour per record (keyed by ``id``), the same in every figure."""
    return {id(record): f"C{index % 10}" for index, record in enumerate(records)}


def _loss_terms(runs: Sequence[RunRecord]) -> list[str]:
    terms = {key for record in runs for line in record.metrics for key in line if key.startswith("loss/")}
    return sorted(terms, key=lambda key: (key == "loss/total", key))


def _plot_losses(runs: Sequence[RunRecord], colours: dict[int, str], path: Path) -> None:
    terms = _loss_terms(runs)
    columns = min(3, max(1, len(terms)))
    rows = max(1, math.ceil(len(terms) / columns))
    figure = new_figure(4.5 * columns, 3.2 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    if not terms:
        _note(axes[0], NO_LOSS_NOTE)
    for axis, term in zip(axes, terms):
        values_all = []
        for record in runs:
            xs, ys = record.series(term)
            if xs:
                axis.plot(xs, ys, color=colours[id(record)], label=record.name, linewidth=1)
                values_all += ys
        if values_all and min(values_all) > 0 and max(values_all) / min(values_all) > 100:
            axis.set_yscale("log")
        axis.set_title(term)
        axis.set_xlabel("iteration")
        axis.legend(fontsize="small")
    for axis in axes[len(terms) or 1:]:
        axis.set_visible(False)
    save_figure(figure, path)


def _plot_cmi(runs: Sequence[RunRecord], colours: dict[int, str], path: Path) -> None:
    figure = new_figure(6.5, 4.2)
    axis = figure.subplots()
    drawn = False
    for record in runs:
        xs, ys = record.series("monitor/cmi")
        if xs:
            axis.plot(xs, ys, marker="o", markersize=3, color=colours[id(record)], label=f"{record.name} (monitor)")
        else:
            xs, ys = record.series("loss/cmi")
            if xs:
                axis.plot(xs, ys, color=colours[id(record)], linewidth=1, label=f"{record.name} (loss/cmi)")
        drawn = drawn or bool(xs)
        held_xs, held_ys = record.series("monitor/cmi_heldout")
        if held_xs:
            axis.plot(held_xs, held_ys, linestyle="--", color=colours[id(record)], label=f"{record.name} (held out)")
    _finish_iteration_axes(figure, axis, path, drawn, "CMI", NO_CMI_NOTE, "class-aware CMI of the set")


def _plot_accuracy(runs: Sequence[RunRecord], baselines: Sequence[RunRecord], colours: dict[int, str],
                   path: Path) -> None:
    figure = new_figure(6.5, 4.2)
    axis = figure.subplots()
    drawn = False
    for record in runs:
        xs, ys = record.series("eval/accuracy")
        if xs:
            axis.plot(xs, ys, marker="o", markersize=3, color=colours[id(record)], label=record.name)
            drawn = True
    lines = False
    for record in baselines:
        result = record.first_result()
        if result is not None:
            axis.axhline(float(result["mean"]), linestyle="--", color=colours[id(record)],
                         label=f"{record.name} ({result['mean']:.2f} %)")
            lines = True
    if not drawn:
        _note(axis, NO_ACCURACY_NOTE, keep_ticks=lines)
    if drawn or lines:
        axis.set_xlabel("iteration")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(fontsize="small")
    axis.set_title("accuracy during distillation")
    save_figure(figure, path)


def _plot_convergence(arms: Sequence[Arm], path: Path) -> None:
    """Each arm's periodic accuracy (mean over its seeds and periodic runs) with its 95 % confidence band."""
    figure = new_figure(6.5, 4.2)
    axis = figure.subplots()
    drawn = False
    for index, arm in enumerate(arms):
        curve = arm.curve()
        if not curve:
            continue
        xs = [iteration for iteration, _ in curve]
        means = [interval.mean for _, interval in curve]
        lows = [interval.low if math.isfinite(interval.low) else interval.mean for _, interval in curve]
        highs = [interval.high if math.isfinite(interval.high) else interval.mean for _, interval in curve]
        colour = f"C{index % 10}"
        axis.plot(xs, means, marker="o", markersize=3, color=colour, label=f"{arm.name} ({len(arm.seeds)} seeds)")
        axis.fill_between(xs, lows, highs, color=colour, alpha=0.2, linewidth=0)
        drawn = True
    _finish_iteration_axes(figure, axis, path, drawn, "test accuracy (%), 95 % band", NO_ACCURACY_NOTE,
                           "accuracy during distillation, by arm")


def class_grid(distilled: DistilledSet, per_class: int = GRID_PER_CLASS):
    """An image grid (3 x H x W in [0, 1]) of up to ``per_class`` images of each class, one row per class."""
    import torch
    from torchvision.utils import make_grid

    images, labels = distilled.denormalised(), distilled.labels
    counts = torch.bincount(labels, minlength=distilled.num_classes)
    width = max(1, min(per_class, int(counts.max())))
    rows = []
    for label in range(distilled.num_classes):
        members = images[labels == label][:width]
        rows.append(torch.cat([members, torch.ones(width - len(members), *images.shape[1:])]))
    return make_grid(torch.cat(rows), nrow=width, padding=1, pad_value=1.0)


def _plot_grids(records: Sequence[RunRecord], path: Path) -> None:
    grids = [class_grid(record.distilled) for record in records]
    aspect = max(grid.shape[1] / grid.shape[2] for grid in grids)
    figure = new_figure(3.2 * len(grids), min(3.2 * aspect + 0.5, 40.0))
    axes = figure.subplots(1, len(grids), squeeze=False)[0]
    for axis, record, grid in zip(axes, records, grids):
        axis.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(record.name, fontsize="small")
        axis.axis("off")
    save_figure(figure, path)


# --------------------------------------------------------------------------------------------------
# the report


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, baseline: RunRecord | None = None) -> dict[str, Any]:
    """Write the figures, ``summary.md`` and ``summary.json`` into ``out_dir``; return the summary."""
    if not runs:
        raise UserInputError("give at least one run directory")
    _check_one_dataset(runs, baseline)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out '{out_dir}' exists and is not a directory")
    everything = list(runs) + ([baseline] if baseline is not None else [])
    rows = summary_rows(runs, baseline)
    reference = _reference(runs, baseline)
    arms = group_arms(everything)
    summary = {
        "dataset": runs[0].metadata.dataset,
        "reference": reference.name if reference is not None else None,
        "columns": list(COLUMNS),
        "rows": rows,
        "arms": arm_rows(arms),
        "paired": paired_rows(arms),
        "figures": dict(FIGURES),
    }
    colours = _colours(everything)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_losses(everything, colours, out_dir / FIGURES["losses"])
    _plot_cmi(everything, colours, out_dir / FIGURES["cmi"])
    _plot_accuracy([r for r in everything if not r.is_baseline], [r for r in everything if r.is_baseline], colours,
                   out_dir / FIGURES["accuracy"])
    _plot_grids(everything, out_dir / FIGURES["grids"])
    _plot_convergence(arms, out_dir / FIGURES["convergence"])
    with atomic_path(out_dir / SUMMARY_MD) as temporary:
        temporary.write_text(_markdown(summary))
    with atomic_path(out_dir / SUMMARY_JSON) as temporary:
        temporary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------
# command line


def command_report(args: argparse.Namespace) -> int:
    """Compare finished runs: loss, CMI and accuracy figures, image grids and a summary table in --out."""
    runs, baseline = load_runs(args.runs, args.baseline)
    summary = write_report(runs, args.out, baseline)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(_markdown_table(summary["rows"]))
    tables = arms_markdown(summary["arms"], summary["paired"])
    if tables:
        print("\n" + tables)
    files = list(FIGURES.values()) + [SUMMARY_MD, SUMMARY_JSON]
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0
