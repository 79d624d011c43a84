"""The study's outputs: ``results.csv`` and ``results.md`` (one row per regime × method ×
sparsity), ``certified_vs_sparsity_<regime>.png``, and per regime the tightness report
(``verifier.stats``) of the dense model against the best pruned one.

Certified accuracy is over the first N test images (the paper's definition): images the model
misclassifies count as not certified without being verified, so
``certified_accuracy = verified / N`` with ``verified`` the number of ``unsat`` verdicts.
``n_correct`` says how many of the N were verified at all; falsified / timeout / unknown count
only those. Mean seconds and subdomains are over the verified-at-all images.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

COLUMNS = (
    "regime", "method", "target_sparsity", "sparsity", "schedule", "status",
    "clean_accuracy", "pgd_accuracy", "certified_accuracy", "n_images", "n_correct",
    "verified", "falsified", "timeout", "unknown",
    "unstable_ibp", "unstable_ratio_ibp", "unstable_crown", "unstable_ratio_crown",
    "mean_subdomains", "mean_seconds", "build_seconds", "verify_seconds",
)


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def row_of(study, job) -> dict:
    """One table row from the files of one model (missing stages leave blanks)."""
    folder = study.model_dir(job)
    row = {c: None for c in COLUMNS}
    row.update(regime=job.regime, method=job.method, target_sparsity=job.sparsity)
    error = _read(folder / "error.json")
    if error is not None:
        row["status"] = f"error: {error['error']}"
        return row
    built = _read(folder / ("train.json" if job.method == "dense" else "prune.json"))
    if built is None:
        row["status"] = "pending"
        return row
    row["build_seconds"] = built.get("seconds")
    if job.method == "dense":
        row["schedule"] = "-"
    else:
        schedule = built["schedule"]
        row["schedule"] = (f"iterative x{schedule['rounds']}" if schedule["kind"] == "iterative"
                           else "one-shot")
    metrics = _read(folder / "metrics.json") or {}
    row.update(sparsity=metrics.get("sparsity"), clean_accuracy=metrics.get("clean_accuracy"),
               pgd_accuracy=metrics.get("pgd_accuracy"),
               unstable_ibp=metrics.get("mean_unstable_relus_ibp"),
               unstable_ratio_ibp=metrics.get("unstable_ratio_ibp"),
               unstable_crown=metrics.get("mean_unstable_relus_crown"),
               unstable_ratio_crown=metrics.get("unstable_ratio_crown"))
    n = study.config.verify.images
    images = [r for r in (_read(folder / "verify" / f"img{i}.json") for i in range(n)) if r]
    counts = {v: sum(r["verdict"] == v for r in images)
              for v in ("unsat", "sat", "timeout", "unknown", "error", "misclassified")}
    attempted = [r for r in images if r["verdict"] != "misclassified"]
    timed = [r["seconds"] for r in attempted if r.get("seconds") is not None]
    row.update(n_images=n, n_correct=len(attempted),
               verified=counts["unsat"], falsified=counts["sat"], timeout=counts["timeout"],
               unknown=counts["unknown"] + counts["error"],
               mean_subdomains=(sum(r["subdomains"] for r in attempted) / len(attempted)
                                if attempted else None),
               mean_seconds=sum(timed) / len(timed) if timed else None,
               verify_seconds=sum(timed))
    if len(images) == n:
        row["certified_accuracy"] = counts["unsat"] / n
        row["status"] = "done"
    else:
        row["status"] = f"verifying {len(images)}/{n}"
    return row


def rows_of(study) -> list[dict]:
    return [row_of(study, job) for job in study.jobs()]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row[c] is None else row[c] for c in COLUMNS})
    _write_atomic(path, buffer.getvalue())
    return path


MD_COLUMNS = (
    ("regime", "regime"), ("method", "method"), ("target_sparsity", "target"),
    ("sparsity", "sparsity"), ("schedule", "schedule"), ("clean_accuracy", "clean acc"),
    ("pgd_accuracy", "PGD acc"), ("certified_accuracy", "certified acc"),
    ("verified", "verified"), ("falsified", "falsified"), ("timeout", "timeout"),
    ("unknown", "unknown"), ("n_correct", "correct of N"),
    ("unstable_ratio_ibp", "unstable IBP"), ("unstable_ratio_crown", "unstable CROWN"),
    ("mean_subdomains", "mean subdomains"), ("mean_seconds", "mean s"),
    ("build_seconds", "train/prune s"), ("status", "status"),
)


def markdown(rows: list[dict], config) -> str:
    lines = [
        f"# Study `{config.name}`",
        "",
        f"{config.model} on {config.dataset}; eps {config.verify_eps:g} (training eps "
        f"{config.train_eps:g}); the first {config.verify.images} test images verified with a "
        f"{config.verify.timeout:g} s timeout each. Certified accuracy = unsat verdicts / "
        f"{config.verify.images} (misclassified images count as not certified); clean and PGD "
        f"accuracy ({config.verify.pgd_steps} steps) on the first "
        f"{config.test_limit or 'all'} test images; unstable = mean ratio of ReLUs with "
        f"l < 0 < u over the eps-balls of the first {config.verify.images} test images "
        f"(IBP, CROWN pre-activation bounds); mean s and "
        f"subdomains over the correctly classified images.",
        "",
        "| " + " | ".join(title for _, title in MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key, _ in MD_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_certified(rows: list[dict], regime: str, path: Path) -> Path:
    """Certified accuracy against sparsity, one line per method, each starting at the dense
    model (sparsity 0); PGD accuracy dotted in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    mine = [r for r in rows if r["regime"] == regime]
    dense = [r for r in mine if r["method"] == "dense"]
    methods = sorted({r["method"] for r in mine} - {"dense"})
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]   # a colour per method
    for index, method in enumerate(methods or ["dense"]):
        points = sorted((r for r in dense + [r for r in mine if r["method"] == method]),
                        key=lambda r: r["target_sparsity"])
        colour = palette(index % palette.N)
        for key, style, label in (("certified_accuracy", "-o", method),
                                  ("pgd_accuracy", ":", None)):
            xy = [(r["target_sparsity"], r[key]) for r in points if r[key] is not None]
            if xy:
                axes.plot(*zip(*xy), style, color=colour, label=label, markersize=4)
    axes.set(xlabel="target sparsity (channel fraction for structured methods)",
             ylabel="accuracy", title=f"{regime}: certified (solid), PGD (dotted)", ylim=(0, 1))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def best_pruned(rows: list[dict], regime: str) -> dict | None:
    """The finished pruned row of ``regime`` with the highest certified accuracy (ties: the
    sparser, then the faster to verify)."""
    done = [r for r in rows if r["regime"] == regime and r["method"] != "dense"
            and r["certified_accuracy"] is not None]
    if not done:
        return None
    return max(done, key=lambda r: (r["certified_accuracy"], r["target_sparsity"],
                                    -(r["mean_seconds"] or 0)))


def tightness(study, rows: list[dict], regime: str) -> Path | None:
    """``verifier.stats`` report of the dense model against the best pruned one of ``regime``
    into ``tightness_<regime>/``; None when either has no verification records."""
    from pruning.study.pipeline import ModelJob
    from verifier.stats import read_run, write_report

    dense = next((r for r in rows if r["regime"] == regime and r["method"] == "dense"
                  and r["status"] == "done"), None)
    best = best_pruned(rows, regime)
    if dense is None or best is None:
        return None
    runs = []
    for row, label in ((dense, "dense"), (best, f"{best['method']}@{best['target_sparsity']:g}")):
        folder = study.model_dir(ModelJob(regime, row["method"], row["target_sparsity"])) / "verify"
        if not any(folder.glob("*.jsonl")):
            return None
        runs.append(read_run(str(folder), label))
    out = study.root / f"tightness_{regime}"
    write_report(runs, str(out))
    return out


def write_outputs(study, rows: list[dict], final: bool = True) -> dict:
    """results.csv and results.md always; the plots and tightness reports when ``final``."""
    written = {"csv": write_csv(rows, study.root / "results.csv")}
    written["md"] = study.root / "results.md"
    _write_atomic(written["md"], markdown(rows, study.config))
    if final:
        for regime in study.config.train.regimes:
            written[f"plot_{regime}"] = plot_certified(
                rows, regime, study.root / f"certified_vs_sparsity_{regime}.png")
            report = tightness(study, rows, regime)
            if report is not None:
                written[f"tightness_{regime}"] = report
    return written
