"""The three figures of the multi-index theory experiment, drawn from its payload (theory.json's content)."""

from __future__ import annotations

import math
from pathlib import Path

from infodistill.experiments.figures import new_figure, save_figure
from infodistill.experiments.theory_maths import SWEEP_FIELDS

FIGURE_NAMES = {
    "error_vs_m": "error_vs_m.png",
    "subspace_energy": "subspace_energy.png",
    "m_needed": "m_needed.png",
}


def write_figures(payload: dict, out_dir: Path) -> None:
    """Draw the three figures of ``payload`` into ``out_dir`` under the names of :data:`FIGURE_NAMES`."""
    _plot_error_vs_m(payload, out_dir / FIGURE_NAMES["error_vs_m"])
    _plot_energy(payload, out_dir / FIGURE_NAMES["subspace_energy"])
    _plot_m_needed(payload, out_dir / FIGURE_NAMES["m_needed"])


def _new_figure(columns: int = 1, width: float = 6.0):
    """A figure 4 inches high with one row of ``columns`` axes (returned with it)."""
    figure = new_figure(width, 4.0)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, axes


def _plot_error_vs_m(payload: dict, path: Path) -> None:
    main = payload["main"]
    figure, (axis,) = _new_figure()
    m_values = main["m_values"]
    for key, label, marker in (("distilled_error", "distilled", "o"), ("random_error", "random real subset", "s")):
        means = [math.nan if v is None else v for v in main[key]["mean"]]
        stds = [0.0 if v is None else v for v in main[key]["std"]]
        axis.errorbar(m_values, means, yerr=stds, marker=marker, capsize=3, label=label)
    full = main["full_error"]
    axis.axhline(full["mean"], color="black", linestyle="--", label=f"full data (n={payload['settings']['n_train']})")
    axis.axhspan(full["mean"] - full["std"], full["mean"] + full["std"], color="black", alpha=0.1)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("m (training points)")
    axis.set_ylabel("test MSE / Var(y)")
    axis.set_title(f"d={main['d']}, r={main['r']}, L={main['width']}, {payload['settings']['seeds']} seeds")
    axis.legend()
    save_figure(figure, path)


def _plot_energy(payload: dict, path: Path) -> None:
    main = payload["main"]
    figure, (axis,) = _new_figure(width=max(6.0, 1.2 * len(main["m_values"]) + 2))
    positions, data, colours = [], [], []
    for index in range(len(main["m_values"])):
        for offset, key, colour in ((-0.18, "distilled_energy", "tab:blue"), (0.18, "random_energy", "tab:orange")):
            positions.append(index + offset)
            data.append(main[key]["per_point"][index])
            colours.append(colour)
    boxes = axis.boxplot(data, positions=positions, widths=0.3, patch_artist=True, manage_ticks=False,
                         medianprops={"color": "black"})
    for patch, colour in zip(boxes["boxes"], colours):
        patch.set_facecolor(colour)
        patch.set_alpha(0.6)
    axis.axhline(main["expected_random_energy"], color="black", linestyle="--", label="r/d (random direction)")
    axis.set_xticks(range(len(main["m_values"])), [str(m) for m in main["m_values"]])
    axis.set_xlabel("m")
    axis.set_ylabel("||U x||^2 / ||x||^2")
    axis.set_ylim(0, 1.18)
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    from matplotlib.patches import Patch

    axis.legend(handles=[Patch(color="tab:blue", alpha=0.6, label="distilled points"),
                         Patch(color="tab:orange", alpha=0.6, label="random real points"),
                         axis.get_lines()[-1]], loc="upper center", ncols=3, fontsize="small")
    axis.set_title(f"energy in span(U): d={main['d']}, r={main['r']}")
    save_figure(figure, path)


def _plot_m_needed(payload: dict, path: Path) -> None:
    sweeps = payload["sweeps"]
    settings = payload["settings"]
    names = [name for name in SWEEP_FIELDS if name in sweeps]
    figure, axes = _new_figure(columns=max(1, len(names)), width=4.0 * max(1, len(names)))
    top = max(settings["m_values"])
    fixed = {"r": f"d={settings['d']}, L={settings['width']}", "d": f"r={settings['r']}, L={settings['width']}",
             "width": f"d={settings['d']}, r={settings['r']}"}
    for axis, name in zip(axes, names):
        values = sweeps[name]["values"]
        needed = sweeps[name]["m_needed"]
        found = [(v, m) for v, m in zip(values, needed) if m is not None]
        missing = [v for v, m in zip(values, needed) if m is None]
        if found:
            axis.plot([v for v, _ in found], [m for _, m in found], marker="o", label="m needed")
        if missing:
            axis.plot(missing, [2 * top] * len(missing), linestyle="none", marker="^", color="tab:red",
                      label=f"> {top} (not reached)")
        axis.set_xlabel({"width": "L (width)"}.get(name, name))
        axis.set_ylabel("m needed")
        axis.set_yscale("log", base=2)
        if name == "width":
            axis.set_xscale("log", base=2)
        axis.set_xticks(values, [str(v) for v in values])
        grid = list(settings["m_values"]) + ([2 * top] if missing else [])
        axis.set_yticks(grid, [str(m) for m in settings["m_values"]] + ([f">{top}"] if missing else []))
        axis.minorticks_off()
        axis.set_ylim(min(grid) / 1.5, max(grid) * 1.5)
        axis.set_title(f"{fixed[name]}, tol {settings['tolerance']}")
        axis.legend()
    if not names:
        axes[0].text(0.5, 0.5, "no sweeps requested", ha="center", va="center")
        axes[0].set_axis_off()
    save_figure(figure, path)
