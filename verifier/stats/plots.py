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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def _styles(labels: list[str]) -> dict[str, dict]:
    """Per run: colour, marker and line style, so that runs whose curves coincide (the same
    instances, the same root) stay distinguishable: the first run's filled markers under the
    later runs' smaller open ones and dashed lines."""
    colour = _colours(labels)
    return {label: {"color": colour[label], "marker": MARKERS[k % len(MARKERS)],
                     "linestyle": LINESTYLES[k % len(LINESTYLES)],
                     "markersize": max(3.0, 7.0 - 1.5 * k),
                     "markerfacecolor": colour[label] if k == 0 else "none"}
            for k, label in enumerate(labels)}


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _integer_axis(axis, low: float, high: float) -> None:
    """Integer ticks only, also over a range holding a single value (one instance, depth 0)."""
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    (axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim)(low, max(high, low + 1))


def _legend(ax, **kwargs) -> None:
    """A legend of the artists that carry data, none if there are none."""
    handles, names = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, names, **kwargs)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=130)
    return path


def _signed_scale(ax, values: list[float]) -> None:
    """Linear y scale, or symlog where the magnitudes span more than two decades (a loose root
    bound of -1e3 next to deep bounds of -1e-2)."""
    magnitudes = np.abs([v for v in values if v != 0])
    if magnitudes.size and magnitudes.max() > 100 * magnitudes.min():
        ax.set_yscale("symlog", linthresh=float(np.percentile(magnitudes, 10)))


def _instance_runs(rows: list[dict]) -> list[list[dict]]:
    """The rows of a per-depth table split into one list per verification: rows come instance by
    instance, depths ascending, so a depth that does not increase starts the next one (two
    verifications of the same model and spec stay apart)."""
    groups: list[list[dict]] = []
    for row in rows:
        if not groups or (row["model"], row["spec"]) != (groups[-1][-1]["model"], groups[-1][-1]["spec"]) \
                or row["depth"] <= groups[-1][-1]["depth"]:
            groups.append([])
        groups[-1].append(row)
    return groups


def plot_instances(table: Table, labels: list[str], path: str) -> str:
    """Cactus plot (instances decided within a time, from 0) and subdomains per instance, sorted.
    A run that decided nothing (only timeouts) has no curve and no legend entry; the panel says
    so when no run decided anything."""
    fig, (cactus, visited) = _figure(2)
    style = _styles(labels)
    most, longest, undecided = 0, 0.0, 0
    for label in labels:
        rows = [r for r in table.rows if r["run"] == label]
        times = np.sort([r["seconds"] for r in rows if r["verdict"] in ("sat", "unsat") and r["seconds"] is not None])
        undecided += len(rows) - times.size
        if times.size:
            cactus.step(np.concatenate([[0.0], times]), np.arange(times.size + 1), where="post", label=label,
                        markevery=list(range(1, times.size + 1)), **style[label])
            most, longest = max(most, times.size), max(longest, float(times[-1]))
        counts = np.sort([r["subdomains"] for r in rows])
        if counts.size:
            visited.plot(np.arange(1, counts.size + 1), counts, label=label, **style[label])
    if not most:   # only timeouts: the axes all the same, up to the longest run
        longest = max((r["seconds"] or 0.0 for r in table.rows), default=0.0)
        cactus.text(0.5, 0.5, f"no instance decided ({undecided} timeout or unknown)", ha="center", va="center",
                    transform=cactus.transAxes, color="grey")
    cactus.set(xlabel="verification time (s)", ylabel="instances decided (sat or unsat)", title="time",
               xlim=(0, longest * 1.05 or 1.0))
    _integer_axis(cactus.yaxis, 0, most + 0.5)
    _legend(cactus, loc="lower right")
    n = max((sum(r["run"] == label for r in table.rows) for label in labels), default=0)
    if n:
        # symlog: 0 subdomains (decided at the root) is drawn at 0, not hidden below a log axis
        visited.set_yscale("symlog", linthresh=1.0)
        visited.set_ylim(0, max(10.0, 3.0 * max(r["subdomains"] for r in table.rows)))
        visited.set(xlabel="instances, sorted", ylabel="subdomains bounded", title="branch-and-bound subdomains")
        _integer_axis(visited.xaxis, 0.5, n + 0.5)
        _legend(visited, loc="upper left")
    else:
        _empty(visited, "no instances")
    return _save(fig, path)


def plot_depth(table: Table, labels: list[str], path: str) -> str:
    """Worst lower bound by depth (one line per verification, at most MAX_INSTANCE_LINES a run),
    and the share of the subdomains at each depth that are closed (lower bound > 0), pooled over
    a run's instances."""
    fig, (worst, closed) = _figure(2)
    if not table.rows:
        _empty(worst, "no subdomain records: no branch and bound ran")
        _empty(closed, "no subdomain records")
        return _save(fig, path)
    style = _styles(labels)
    for label in labels:
        rows = [r for r in table.rows if r["run"] == label]
        if not rows:
            continue
        for k, mine in enumerate(_instance_runs(rows)[:MAX_INSTANCE_LINES]):
            worst.plot([r["depth"] for r in mine], [r["worst_lower"] for r in mine], alpha=0.7,
                       label=label if k == 0 else None, **style[label])
        depths = sorted({r["depth"] for r in rows})
        share = [sum(r["closed"] for r in rows if r["depth"] == d) / sum(r["subdomains"] for r in rows if r["depth"] == d)
                 for d in depths]
        closed.plot(depths, share, label=label, **style[label])
    deepest = max(r["depth"] for r in table.rows)
    worst.axhline(0, color="black", lw=0.8)
    _signed_scale(worst, [r["worst_lower"] for r in table.rows])
    worst.set(xlabel="depth", ylabel="worst lower bound of the margin", title="worst lower bound by depth")
    closed.set(xlabel="depth", ylabel="share closed (lower bound > 0)", ylim=(-0.02, 1.02),
               title="subdomains closed by depth")
    for ax in (worst, closed):
        _integer_axis(ax.xaxis, -0.5, deepest + 0.5)
    _legend(worst)
    _legend(closed)
    return _save(fig, path)


def plot_layers(root_unstable: Table, layers: Table, labels: list[str], path: str) -> str:
    """Unstable ReLUs per layer at the root (mean over instances and regions; solid CROWN, dotted
    IBP with larger open markers so that equal counts stay visible; the run's marker on both), and mean unstable ReLUs (summed over layers) of the
    subdomains at each depth."""
    fig, (root, by_depth) = _figure(2)
    style = _styles(labels)
    if root_unstable.rows:
        top = 0.0
        for label in labels:
            rows = [r for r in root_unstable.rows if r["run"] == label]
            for method, line, extra in (("crown", "-", {}),   # IBP: dotted, open markers drawn larger
                                        ("ibp", ":", {"markerfacecolor": "none", "markersize": 9.0})):
                layer_ids = sorted({r["layer"] for r in rows if r[method] is not None})
                means = [np.mean([r[method] for r in rows if r["layer"] == l and r[method] is not None])
                         for l in layer_ids]
                if layer_ids:
                    root.plot(layer_ids, means, label=f"{label} ({METHOD_NAMES[method]})",
                              **{**style[label], "linestyle": line, **extra})
                    top = max(top, max(means))
        root.set(xlabel="ReLU layer", ylabel="unstable ReLUs at the root", title="root, per layer")
        _integer_axis(root.xaxis, -0.5, max(r["layer"] for r in root_unstable.rows) + 0.5)
        _integer_axis(root.yaxis, 0, top * 1.05 + 0.5)
        _legend(root, fontsize="small")
    else:
        _empty(root, "no root records")
    if layers.rows:
        for label in labels:
            rows = [r for r in layers.rows if r["run"] == label]
            depths = sorted({r["depth"] for r in rows})
            if not depths:
                continue
            # per instance and depth the layer means add up; then average over instances
            totals = [np.mean([sum(r["mean_unstable"] for r in rows if r["depth"] == d and
                                   (r["model"], r["spec"]) == inst)
                               for inst in {(r["model"], r["spec"]) for r in rows if r["depth"] == d}])
                      for d in depths]
            by_depth.plot(depths, totals, label=label, **style[label])
        by_depth.set(xlabel="depth", ylabel="mean unstable ReLUs (all layers)", title="ReLU splitting, by depth")
        _integer_axis(by_depth.xaxis, -0.5, max(r["depth"] for r in layers.rows) + 0.5)
        _legend(by_depth)
    else:
        _empty(by_depth, "no ReLU-splitting records")
    return _save(fig, path)


def plot_root_gap(table: Table, labels: list[str], path: str) -> str:
    """Relaxation gap at the root (attack margin - certified lower bound) per method: one dot per
    instance region, a bar at each run's median; log scale, gaps below GAP_FLOOR (0: the bound is
    exact) drawn on a line at GAP_FLOOR labelled 0."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator
    fig, (ax,) = _figure(1)
    style = _styles(labels)
    width = 0.8 / max(len(labels), 1)
    drawn, floored, shown = False, 0, []
    for k, label in enumerate(labels):
        rows = [r for r in table.rows if r["run"] == label]
        labelled = False
        for m, method in enumerate(METHODS):
            gaps = np.array([r[f"gap_{method}"] for r in rows if r[f"gap_{method}"] is not None], dtype=float)
            if not gaps.size:
                continue
            drawn = True
            floored += int((gaps < GAP_FLOOR).sum())
            x = m - 0.4 + width * (k + 0.5)
            gaps = np.maximum(gaps, GAP_FLOOR)
            shown += gaps.tolist()
            ax.bar(x, np.median(gaps), width * 0.9, color=style[label]["color"], alpha=0.35,
                   label=None if labelled else label)
            labelled = True
            jitter = (np.arange(gaps.size) % 7 - 3) * width * 0.08
            ax.scatter(x + jitter, gaps, s=14, color=style[label]["color"], marker=style[label]["marker"])
    if not drawn:
        _empty(ax, "no root gaps recorded (no attack margin)")
        return _save(fig, path)
    ax.set_xticks(range(len(METHODS)), [METHOD_NAMES[m] for m in METHODS])
    ax.set(yscale="log", ylabel="attack margin - certified lower bound", title="relaxation gap at the root")
    ax.set_ylim(min(shown) / 10, max(shown) * 3)   # bars grow from the bottom: a decade below the least
    if floored:
        ax.axhline(GAP_FLOOR, color="grey", lw=0.8, ls="--")
        ax.set_ylim(bottom=GAP_FLOOR / 3)
        ticks = [t for t in LogLocator().tick_values(GAP_FLOOR, ax.get_ylim()[1]) if t > GAP_FLOOR * 5]
        ax.yaxis.set_major_locator(FixedLocator([GAP_FLOOR, *ticks]))
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda v, _: f"0 (< {GAP_FLOOR:g})" if np.isclose(v, GAP_FLOOR) else f"$10^{{{int(round(np.log10(v)))}}}$"))
    _legend(ax)
    return _save(fig, path)


def write_plots(tables: dict[str, Table], labels: list[str], out_dir: str) -> list[str]:
    """All figures as PNG files in out_dir; returns their paths."""
    join = lambda name: os.path.join(out_dir, name)
    return [plot_instances(tables["instances"], labels, join("instances.png")),
            plot_depth(tables["depth"], labels, join("depth.png")),
            plot_layers(tables["root_unstable"], tables["layers"], labels, join("layers.png")),
            plot_root_gap(tables["root_gap"], labels, join("root_gap.png"))]
