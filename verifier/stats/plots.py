"""PNG figures of the report tables, drawn with matplotlib's Agg canvas (no pyplot, no global
figure state). Runs are overlaid, each in its own colour, so two runs compare in one figure."""
from __future__ import annotations

import os

import numpy as np

from .tables import METHODS, Table

METHOD_NAMES = {"ibp": "IBP", "crown": "CROWN", "alpha": "alpha-CROWN"}
GAP_FLOOR = 1e-6          # gaps are drawn on a log scale; smaller ones (exact bounds) sit here
MAX_INSTANCE_LINES = 40   # per run, in the per-depth figure


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2 * ncols, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _colours(labels: list[str]) -> dict[str, str]:
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]
    return {label: cycle[k % len(cycle)] for k, label in enumerate(labels)}


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: str) -> str:
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:   # depths, layers and counts are integers
        if ax.get_xlabel() in ("depth", "ReLU layer", "instances, sorted"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_ylabel().startswith("instances"):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=130)
    return path


def _signed_scale(ax, values: list[float]) -> None:
    """Linear y scale, or symlog where the magnitudes span more than two decades (a loose root
    bound of -1e3 next to deep bounds of -1e-2)."""
    magnitudes = np.abs([v for v in values if v != 0])
    if magnitudes.size and magnitudes.max() > 100 * magnitudes.min():
        ax.set_yscale("symlog", linthresh=float(np.percentile(magnitudes, 10)))


def plot_instances(table: Table, labels: list[str], path: str) -> str:
    """Cactus plot (instances decided within a time) and subdomains per instance, sorted."""
    fig, (cactus, visited) = _figure(2)
    colour = _colours(labels)
    for label in labels:
        rows = [r for r in table.rows if r["run"] == label]
        times = np.sort([r["seconds"] for r in rows if r["verdict"] in ("sat", "unsat") and r["seconds"] is not None])
        cactus.step(times, np.arange(1, times.size + 1), where="post", color=colour[label], label=label, marker=".")
        counts = np.sort([r["subdomains"] for r in rows])
        visited.plot(np.arange(1, counts.size + 1), np.maximum(counts, 1), color=colour[label], marker=".",
                     label=label)
    cactus.set(xlabel="verification time (s)", ylabel="instances decided (sat or unsat)", title="time")
    visited.set(xlabel="instances, sorted", ylabel="subdomains bounded (0 shown as 1)", yscale="log",
                title="branch-and-bound subdomains")
    cactus.legend()
    return _save(fig, path)


def plot_depth(table: Table, labels: list[str], path: str) -> str:
    """Worst lower bound by depth (one line per instance and region-pooled), and the share of the
    subdomains at each depth that are closed (lower bound > 0), pooled over a run's instances."""
    fig, (worst, closed) = _figure(2)
    if not table.rows:
        _empty(worst, "no subdomain records")
        _empty(closed, "no subdomain records")
        return _save(fig, path)
    colour = _colours(labels)
    for label in labels:
        rows = [r for r in table.rows if r["run"] == label]
        instances = list(dict.fromkeys((r["model"], r["spec"]) for r in rows))[:MAX_INSTANCE_LINES]
        for k, inst in enumerate(instances):
            mine = [r for r in rows if (r["model"], r["spec"]) == inst]
            worst.plot([r["depth"] for r in mine], [r["worst_lower"] for r in mine], color=colour[label],
                       alpha=0.6, marker=".", label=label if k == 0 else None)
        depths = sorted({r["depth"] for r in rows})
        share = [sum(r["closed"] for r in rows if r["depth"] == d) / sum(r["subdomains"] for r in rows if r["depth"] == d)
                 for d in depths]
        closed.plot(depths, share, color=colour[label], marker=".", label=label)
    worst.axhline(0, color="black", lw=0.8)
    _signed_scale(worst, [r["worst_lower"] for r in table.rows])
    worst.set(xlabel="depth", ylabel="worst lower bound of the margin", title="worst lower bound by depth")
    closed.set(xlabel="depth", ylabel="share closed (lower bound > 0)", ylim=(-0.02, 1.02),
               title="subdomains closed by depth")
    worst.legend()
    return _save(fig, path)


def plot_layers(root_unstable: Table, layers: Table, labels: list[str], path: str) -> str:
    """Unstable ReLUs per layer at the root (mean over instances and regions; solid CROWN, dashed
    IBP), and mean unstable ReLUs (summed over layers) of the subdomains at each depth."""
    fig, (root, by_depth) = _figure(2)
    colour = _colours(labels)
    if root_unstable.rows:
        for label in labels:
            rows = [r for r in root_unstable.rows if r["run"] == label]
            for method, style in (("crown", "-"), ("ibp", "--")):
                layer_ids = sorted({r["layer"] for r in rows if r[method] is not None})
                means = [np.mean([r[method] for r in rows if r["layer"] == l and r[method] is not None])
                         for l in layer_ids]
                if layer_ids:
                    root.plot(layer_ids, means, style, color=colour[label], marker="o",
                              label=f"{label} ({METHOD_NAMES[method]})")
        root.set(xlabel="ReLU layer", ylabel="unstable ReLUs at the root", title="root, per layer")
        root.legend(fontsize="small")
    else:
        _empty(root, "no root records")
    if layers.rows:
        for label in labels:
            rows = [r for r in layers.rows if r["run"] == label]
            depths = sorted({r["depth"] for r in rows})
            # per instance and depth the layer means add up; then average over instances
            totals = [np.mean([sum(r["mean_unstable"] for r in rows if r["depth"] == d and
                                   (r["model"], r["spec"]) == inst)
                               for inst in {(r["model"], r["spec"]) for r in rows if r["depth"] == d}])
                      for d in depths]
            by_depth.plot(depths, totals, color=colour[label], marker="o", label=label)
        by_depth.set(xlabel="depth", ylabel="mean unstable ReLUs (all layers)", title="ReLU splitting, by depth")
        by_depth.legend()
    else:
        _empty(by_depth, "no ReLU-splitting records")
    return _save(fig, path)


def plot_root_gap(table: Table, labels: list[str], path: str) -> str:
    """Relaxation gap at the root (attack margin - certified lower bound) per method: one dot per
    instance region, a bar at each run's median; log scale, gaps below GAP_FLOOR drawn at it."""
    fig, (ax,) = _figure(1)
    colour = _colours(labels)
    width = 0.8 / max(len(labels), 1)
    drawn = False
    for k, label in enumerate(labels):
        rows = [r for r in table.rows if r["run"] == label]
        labelled = False
        for m, method in enumerate(METHODS):
            gaps = np.array([r[f"gap_{method}"] for r in rows if r[f"gap_{method}"] is not None], dtype=float)
            if not gaps.size:
                continue
            drawn = True
            x = m - 0.4 + width * (k + 0.5)
            gaps = np.maximum(gaps, GAP_FLOOR)
            ax.bar(x, np.median(gaps), width * 0.9, color=colour[label], alpha=0.35,
                   label=None if labelled else label)
            labelled = True
            jitter = (np.arange(gaps.size) % 7 - 3) * width * 0.08
            ax.scatter(x + jitter, gaps, s=10, color=colour[label])
    if not drawn:
        _empty(ax, "no root gaps recorded")
        return _save(fig, path)
    ax.set_xticks(range(len(METHODS)), [METHOD_NAMES[m] for m in METHODS])
    ax.set(yscale="log", ylabel="attack margin - certified lower bound", title="relaxation gap at the root")
    ax.legend()
    return _save(fig, path)


def write_plots(tables: dict[str, Table], labels: list[str], out_dir: str) -> list[str]:
    """All figures as PNG files in out_dir; returns their paths."""
    join = lambda name: os.path.join(out_dir, name)
    return [plot_instances(tables["instances"], labels, join("instances.png")),
            plot_depth(tables["depth"], labels, join("depth.png")),
            plot_layers(tables["root_unstable"], tables["layers"], labels, join("layers.png")),
            plot_root_gap(tables["root_gap"], labels, join("root_gap.png"))]
