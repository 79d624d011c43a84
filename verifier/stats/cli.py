"""``certiprune stats RUN [RUN ...]``: the tightness report of one or more verification runs
(entry point ``certiprune.commands: stats = verifier.stats.cli:add_parser``)."""
from __future__ import annotations

import os

from ..errors import VerifierError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("stats", help="tightness report (JSON, CSVs, PNGs) of `verify --stats` records; "
                                            "several runs are compared side by side")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a --stats JSON-lines file, or a folder of *.jsonl files")
    p.add_argument("--labels", help="comma-separated run names, e.g. dense,pruned (default: file names)")
    p.add_argument("--out", default="stats_report", help="output folder (default: stats_report)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON and CSVs only")
    p.set_defaults(handler=run_stats)


def run_labels(paths: list[str], labels: str | None) -> list[str]:
    """The given labels, or file names (or the paths as given where file names collide)."""
    if labels is not None:
        names = [name.strip() for name in labels.split(",")]
        if len(names) != len(paths) or not all(names):
            raise VerifierError(f"--labels names {len(names)} run(s), {len(paths)} RUN(s) given")
        if len(set(names)) != len(names):
            raise VerifierError(f"--labels repeats a name: {labels}")
        return names
    stems = [os.path.basename(os.path.normpath(p)).removesuffix(".jsonl") for p in paths]
    return stems if len(set(stems)) == len(stems) else [os.path.normpath(p) for p in paths]


def run_stats(args) -> int:
    from .load import read_run
    from .report import write_report
    runs = [read_run(path, label) for path, label in zip(args.runs, run_labels(args.runs, args.labels))]
    summary = write_report(runs, args.out, plots=not args.no_plots)
    for run in summary["runs"]:
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(run["verdicts"].items()))
        sub = run["subdomains"]
        print(f"{run['run']}: {run['instances']} instance(s) ({verdicts}); subdomains mean {sub['mean']:.1f}, "
              f"max {sub['max']:.0f}; max depth {run['max_depth'] if run['max_depth'] is not None else '-'}")
        gaps = run["root_gap"]
        print("  root gap (median): " + ", ".join(
            f"{m} {gaps[m]['median']:.4g}" if gaps[m] else f"{m} -" for m in ("ibp", "crown", "alpha")))
    files = summary["files"]
    print(f"wrote {files['json']}, {len(files['csv'])} CSV(s), {len(files['png'])} PNG(s) in {args.out}")
    return 0
