"""The study's figures, per regime:

- ``certified_<regime>.png``: certified accuracy against the round's sparsity (left; weights in
  the layer scope for unstructured methods, channel fraction for structured ones) and against
  the round (right, with the dense controls dashed), one curve over every verified round per
  method, mean over seeds, the pooled Wilson 95 % interval as a band; one colour and one
  marker per method, the same in every figure;
- ``tightness_<regime>.png``: per image, the dense base against each method's last finished
  round (first seed): root relaxation gap (alpha-CROWN, attack margin − certified lower bound;
  log scale) and branch-and-bound subdomains, on the images both classify correctly; points
  above the diagonal are harder for the pruned model;
- ``unstable_<regime>.png``: unstable ReLUs per ReLU layer (absolute counts, CROWN bounds at
  the verifier's root, mean over the verified images) of the dense base and each method's last
  finished round. Compacted models lose dead units, so layers are those of the exported model.
"""
from __future__ import annotations

from pathlib import Path

from pruning.atomic import read_json
from pruning.study.jobs import ModelJob, base_of, is_base, is_control

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d", "8")


def styles(methods: list[str]) -> dict[str, tuple]:
    """method -> (colour, marker), distinct for up to 14 methods."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return {m: (palette((2 * i) % 20 + (i // 10)), MARKERS[i % len(MARKERS)])
            for i, m in enumerate(methods)}


def _figure(ncols: int, width: float = 6.0):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, 4.6))
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


def plot_certified(summary: list[dict], regime: str, methods: list[str], path: Path) -> Path:
    figure, (left, right) = _figure(2)
    style = styles(methods)
    mine = [r for r in summary if r["regime"] == regime]
    for method in methods:
        points = sorted((r for r in mine if r["method"] == method), key=lambda r: r["round"])
        base = [r for r in mine if r["method"] == base_of(method) and r["round"] == 0]
        points = base + points if not is_base(method) else points
        if not points:
            continue
        colour, marker = style[method]
        for axes, key in ((left, "target_sparsity"), (right, "round")):
            if axes is left and is_control(method):
                continue
            x = [r[key] for r in points]
            axes.plot(x, [r["certified_mean"] for r in points], marker=marker, color=colour,
                      label=method, markersize=5, linestyle="--" if is_control(method) else "-")
            axes.fill_between(x, [r["pooled_ci_low"] for r in points],
                              [r["pooled_ci_high"] for r in points], color=colour, alpha=0.12)
    left.set(xlabel="sparsity of the round (weights in scope; channels for structured)",
             ylabel="certified accuracy", title=f"{regime}: certified accuracy vs sparsity")
    right.set(xlabel="round (0 = dense)", ylabel="certified accuracy",
              title="per round, with the dense controls (dashed)")
    for axes in (left, right):
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, ncol=2)
    figure.suptitle("mean over seeds; bands: Wilson 95 % interval of the pooled images",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _last_done(rows: list[dict], regime: str, seed: int, method: str) -> dict | None:
    done = [r for r in rows if (r["regime"], r["seed"], r["method"]) == (regime, seed, method)
            and r["status"] == "done"]
    return max(done, key=lambda r: r["round"]) if done else None


def _per_image(study, row: dict) -> list[dict | None]:
    job = ModelJob(row["regime"], row["seed"], row["method"], row["round"])
    return [read_json(study.layout.verdict(job, i)) for i in range(study.config.verify.images)]


def plot_tightness(study, rows: list[dict], regime: str, methods: list[str],
                   path: Path) -> Path | None:
    seed = study.config.seeds[0]
    figure, (gap_axes, sub_axes) = _figure(2, 5.5)
    style = styles(methods)
    drawn = False
    for method in methods:
        if is_base(method) or is_control(method):
            continue
        pruned = _last_done(rows, regime, seed, method)
        dense = next((r for r in rows if (r["regime"], r["seed"], r["method"], r["round"])
                      == (regime, seed, base_of(method), 0) and r["status"] == "done"), None)
        if pruned is None or dense is None:
            continue
        pairs = [(d, p) for d, p in zip(_per_image(study, dense), _per_image(study, pruned))
                 if d and p and "misclassified" not in (d["verdict"], p["verdict"])]
        colour, marker = style[method]
        gaps = [((d.get("root_gap") or {}).get("alpha"), (p.get("root_gap") or {}).get("alpha"))
                for d, p in pairs]
        gaps = [(max(x, 1e-4), max(y, 1e-4)) for x, y in gaps if x is not None and y is not None]
        label = f"{method} r{pruned['round']}"
        if gaps:
            gap_axes.scatter(*zip(*gaps), s=12, color=colour, marker=marker, label=label)
        subs = [(d["subdomains"] + 1, p["subdomains"] + 1) for d, p in pairs]
        if subs:
            sub_axes.scatter(*zip(*subs), s=12, color=colour, marker=marker, label=label)
        drawn = drawn or bool(gaps or subs)
    if not drawn:
        return None
    for axes, what in ((gap_axes, "root gap, alpha-CROWN (floored at 1e-4)"),
                       (sub_axes, "BaB subdomains + 1")):
        axes.set(xscale="log", yscale="log", xlabel=f"dense: {what}", ylabel=f"pruned: {what}")
        low, high = axes.get_xlim()
        low, high = min(low, axes.get_ylim()[0]), max(high, axes.get_ylim()[1])
        axes.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(f"{regime}, seed {seed}: per image, dense base vs each method's last round",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def plot_unstable(study, rows: list[dict], regime: str, methods: list[str],
                  path: Path) -> Path | None:
    seed = study.config.seeds[0]
    figure, (axes,) = _figure(1, 7.5)
    style = styles(methods)
    drawn = False
    for method in methods:
        if is_control(method):
            continue
        row = _last_done(rows, regime, seed, method) if not is_base(method) else next(
            (r for r in rows if (r["regime"], r["seed"], r["method"], r["round"])
             == (regime, seed, method, 0)), None)
        if row is None:
            continue
        records = [r for r in _per_image(study, row)
                   if r and (r.get("root_unstable_per_layer") or {}).get("crown")]
        if not records:
            continue
        layers = len(records[0]["root_unstable_per_layer"]["crown"])
        counts = [sum(r["root_unstable_per_layer"]["crown"][k] for r in records) / len(records)
                  for k in range(layers)]
        colour, marker = style[method]
        axes.plot(range(1, len(counts) + 1), counts, marker=marker, color=colour,
                  label=f"{method} r{row['round']}")
        drawn = True
    if not drawn:
        return None
    axes.set(xlabel="ReLU layer", ylabel="unstable ReLUs (mean per image, CROWN)",
             yscale="symlog", title=f"{regime}, seed {seed}: unstable ReLUs per layer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_plots(study, rows: list[dict], summary: list[dict]) -> dict:
    methods = list(dict.fromkeys([*study.bases(), *(m for m, _ in study.tracks())]))
    written = {}
    for regime in study.config.train.regimes:
        written[f"certified_{regime}"] = plot_certified(
            summary, regime, methods, study.root / f"certified_{regime}.png")
        for name, plot in (("tightness", plot_tightness), ("unstable", plot_unstable)):
            out = plot(study, rows, regime, methods, study.root / f"{name}_{regime}.png")
            if out is not None:
                written[f"{name}_{regime}"] = out
    return written
