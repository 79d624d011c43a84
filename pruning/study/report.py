"""The study's tables: one row per evaluated model (``results.csv``, ``results.md``), the
seed summary (``summary.csv``; mean ± sd over seeds, pooled Wilson interval), and the plots
(``pruning.study.plots``).

Certified accuracy is over the first N test images (the paper's definition): a misclassified
image counts as not certified without being verified, so ``certified_accuracy = verified / N``.
Every certified accuracy carries its Wilson 95 % interval (``ci_low``, ``ci_high``). Timeouts
of the first pass (``first_timeouts``, their share of the correctly classified images in
``timeout_share``) are verified again with ``verify.retry_timeout`` before anything is
compared; ``timeout`` is what is left after that second pass. Each pruned model is compared on
the same images with its dense *control* (the same base fine-tuned for the same extra epochs,
same round) by an exact McNemar test (``b``: certified by the pruned model only, ``c``: by the
control only, ``p_control``) and with its dense base (``p_dense``); ``p_holm`` is
``p_control`` Holm-adjusted over every pruned-vs-control comparison of the same regime and
seed, the correction any "best of the methods" reading must carry.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from pruning.atomic import read_json, write_text_atomic
from pruning.study.jobs import CONTROLS, ModelJob, base_of, is_base, is_control
from pruning.study.statistics import discordant, holm, mcnemar_exact, mean_sd, wilson_interval

COLUMNS = (
    "regime", "seed", "method", "round", "target_sparsity", "sparsity", "weight_sparsity",
    "channel_sparsity", "status", "clean_accuracy", "pgd_accuracy", "certified_accuracy",
    "ci_low", "ci_high", "n_images", "n_correct", "verified", "falsified", "timeout",
    "first_timeouts", "timeout_share", "unknown", "mean_subdomains", "mean_seconds",
    "root_gap_crown", "root_gap_alpha", "unstable_ibp", "unstable_crown", "control", "b", "c",
    "p_control", "p_holm", "p_dense", "build_seconds", "verify_seconds",
)


def target_of(study, job: ModelJob) -> float:
    """The ladder's sparsity after ``job.round`` (0 for bases and controls)."""
    if job.round == 0 or is_control(job.method):
        return 0.0
    from pruning.methods import get_method

    return study.config.prune.ladder(get_method(job.method).structured).targets()[job.round - 1]


def verdicts(study, job: ModelJob) -> list[dict | None]:
    return [read_json(study.layout.verdict(job, i)) for i in range(study.config.verify.images)]


def certified_vector(records: list[dict | None]) -> list[bool] | None:
    """Per image: certified (unsat) or not; None until every image has a final verdict."""
    if any(r is None for r in records):
        return None
    return [r["verdict"] == "unsat" for r in records]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def row_of(study, job: ModelJob) -> dict:
    """One row from the files of one model (missing stages leave blanks)."""
    layout, verify = study.layout, study.config.verify
    row = dict.fromkeys(COLUMNS)
    row.update(regime=job.regime, seed=job.seed, method=job.method, round=job.round,
               target_sparsity=target_of(study, job))
    error = read_json((layout.rounds_dir(job) if job.round else
                       layout.base_dir(job.regime, job.seed, job.method)) / "error.json")
    if error is not None:
        row["status"] = f"error: {error['error']}"
        return row
    built = (read_json(layout.base_dir(job.regime, job.seed, job.method) / "train.json")
             if job.round == 0 else read_json(layout.rounds_dir(job) / f"round_{job.round}.json"))
    if built is None:
        row["status"] = "pending"
        return row
    row["build_seconds"] = built.get("seconds")
    metrics = read_json(layout.eval_dir(job) / "metrics.json") or {}
    row.update(sparsity=metrics.get("scoped_sparsity"), weight_sparsity=metrics.get("sparsity"),
               channel_sparsity=metrics.get("channel_sparsity"),
               clean_accuracy=metrics.get("clean_accuracy"),
               pgd_accuracy=metrics.get("pgd_accuracy"),
               unstable_ibp=metrics.get("mean_unstable_relus_ibp"),
               unstable_crown=metrics.get("mean_unstable_relus_crown"))
    records = verdicts(study, job)
    done = [r for r in records if r is not None]
    attempted = [r for r in done if r["verdict"] != "misclassified"]
    count = {v: sum(r["verdict"] == v for r in done)
             for v in ("unsat", "sat", "timeout", "unknown", "error")}
    first = sum(r.get("first_verdict", r["verdict"]) == "timeout" for r in done)
    timed = [r["seconds"] for r in attempted if r.get("seconds") is not None]
    gaps = {m: _mean([(r.get("root_gap") or {}).get(m) for r in attempted])
            for m in ("crown", "alpha")}
    # CROWN's unstable ReLUs at the verifier's root, over the verified images
    crown = [(r.get("root_unstable") or {}).get("crown") for r in attempted]
    row["unstable_crown"] = _mean(crown)
    row.update(n_images=verify.images, n_correct=len(attempted), verified=count["unsat"],
               falsified=count["sat"], timeout=count["timeout"], first_timeouts=first,
               timeout_share=first / len(attempted) if attempted else None,
               unknown=count["unknown"] + count["error"],
               mean_subdomains=_mean([r["subdomains"] for r in attempted]),
               mean_seconds=_mean(timed), verify_seconds=sum(timed),
               root_gap_crown=gaps["crown"], root_gap_alpha=gaps["alpha"])
    retry_left = sum(1 for r in done if r["verdict"] == "timeout"
                     and r["timeout"] < verify.retry_timeout)
    if len(done) < verify.images:
        row["status"] = f"verifying {len(done)}/{verify.images}"
    elif retry_left:
        row["status"] = f"retrying {retry_left} timeouts"
    else:
        row["status"] = "done"
        row["certified_accuracy"] = count["unsat"] / verify.images
        row["ci_low"], row["ci_high"] = wilson_interval(count["unsat"], verify.images)
    return row


def _paired_p(study, job: ModelJob, other: ModelJob, cache: dict) -> tuple[int, int, float] | None:
    """(b, c, exact McNemar p) of ``job`` against ``other`` on the same images."""
    vectors = []
    for j in (job, other):
        if j not in cache:
            cache[j] = certified_vector(verdicts(study, j))
        vectors.append(cache[j])
    if vectors[0] is None or vectors[1] is None:
        return None
    b, c = discordant(*vectors)
    return b, c, mcnemar_exact(b, c)


def rows_of(study) -> list[dict]:
    """Every evaluated model's row with its paired tests (see the module docstring)."""
    jobs = study.jobs()
    rows = {job: row_of(study, job) for job in jobs}
    cache: dict = {}
    for job, row in rows.items():
        if is_base(job.method) or row["status"] != "done":
            continue
        base = ModelJob(job.regime, job.seed, base_of(job.method))
        if rows.get(base, {}).get("status") == "done":
            paired = _paired_p(study, job, base, cache)
            row["p_dense"] = paired[2] if paired else None
        if is_control(job.method):
            continue
        control = ModelJob(job.regime, job.seed, CONTROLS[base.method], job.round)
        if rows.get(control, {}).get("status") == "done":
            paired = _paired_p(study, job, control, cache)
            if paired:
                row.update(control=control.method, b=paired[0], c=paired[1], p_control=paired[2])
    for regime in study.config.train.regimes:
        for seed in study.config.seeds:
            family = [r for j, r in rows.items() if (j.regime, j.seed) == (regime, seed)
                      and r["p_control"] is not None]
            for r, adjusted in zip(family, holm([r["p_control"] for r in family])):
                r["p_holm"] = adjusted
    return [rows[job] for job in jobs]


SUMMARY_COLUMNS = ("regime", "method", "round", "target_sparsity", "n_seeds", "certified_mean",
                   "certified_sd", "pooled_ci_low", "pooled_ci_high", "clean_mean",
                   "timeout_share", "min_p_holm")


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per (regime, method, round): mean ± sd of the certified accuracy over the seeds that
    finished, the Wilson interval of the pooled counts, the pooled first-pass timeout share."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault((row["regime"], row["method"], row["round"]), []).append(row)
    out = []
    for (regime, method, round_), members in groups.items():
        mean, sd = mean_sd([r["certified_accuracy"] for r in members])
        k, n = sum(r["verified"] for r in members), sum(r["n_images"] for r in members)
        low, high = wilson_interval(k, n)
        correct = sum(r["n_correct"] for r in members)
        p_values = [r["p_holm"] for r in members if r["p_holm"] is not None]
        out.append({"regime": regime, "method": method, "round": round_,
                    "target_sparsity": members[0]["target_sparsity"], "n_seeds": len(members),
                    "certified_mean": mean, "certified_sd": sd, "pooled_ci_low": low,
                    "pooled_ci_high": high,
                    "clean_mean": mean_sd([r["clean_accuracy"] for r in members])[0]
                    if all(r["clean_accuracy"] is not None for r in members) else None,
                    "timeout_share": sum(r["first_timeouts"] for r in members) / correct
                    if correct else None,
                    "min_p_holm": min(p_values) if p_values else None})
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_csv(rows: list[dict], columns, path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return write_text_atomic(path, buffer.getvalue())


def markdown_table(rows: list[dict], columns) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


MD_COLUMNS = ("regime", "seed", "method", "round", "target_sparsity", "sparsity", "clean_accuracy",
              "certified_accuracy", "ci_low", "ci_high", "verified", "falsified", "timeout",
              "first_timeouts", "n_correct", "root_gap_alpha", "mean_subdomains", "b", "c",
              "p_control", "p_holm", "p_dense", "status")


def markdown(rows: list[dict], summary: list[dict], config) -> str:
    head = [
        f"# Study `{config.name}`", "",
        f"{config.model} on {config.dataset}; eps {config.verify_eps:g}; the first "
        f"{config.verify.images} test images verified at {config.verify.timeout:g} s, first-pass "
        f"timeouts again at {config.verify.retry_timeout:g} s. Certified accuracy = unsat / "
        f"{config.verify.images} with its Wilson 95 % interval; b / c: images certified only by "
        "the pruned model / only by its control (same base, same extra epochs, same round); "
        "p: exact McNemar (p_holm: Holm over the regime's and seed's comparisons); sparsity in "
        f"the layer scope `{config.prune.layers}` (channel fraction for structured methods in "
        "target_sparsity).", "", "## Over seeds", ""]
    body = markdown_table(summary, SUMMARY_COLUMNS) + ["", "## Every model", ""]
    return "\n".join(head + body + markdown_table(rows, MD_COLUMNS)) + "\n"


def write_outputs(study, rows: list[dict], final: bool = True) -> dict:
    """results.csv / results.md / summary.csv always; the plots when ``final``."""
    summary = summary_rows(rows)
    written = {"csv": write_csv(rows, COLUMNS, study.root / "results.csv"),
               "summary": write_csv(summary, SUMMARY_COLUMNS, study.root / "summary.csv"),
               "md": write_text_atomic(study.root / "results.md",
                                       markdown(rows, summary, study.config))}
    if final:
        from pruning.study.plots import write_plots

        written.update(write_plots(study, rows, summary))
    return written
