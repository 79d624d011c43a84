"""Write a tightness report into a folder: summary.json (per-run summary and every table),
one CSV per table, and the PNG figures."""
from __future__ import annotations

import csv
import json
import os

from ..errors import InputFileError
from .load import Run
from .plots import write_plots
from .tables import Table, build_tables, summarise


def write_csv(table: Table, path: str) -> str:
    """One row per table row; missing values (None) as empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table.columns))
        writer.writeheader()
        for row in table.rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in table.columns})
    return path


def write_report(runs: list[Run], out_dir: str, plots: bool = True) -> dict:
    """Writes the report; returns the summary (also in summary.json) with the written file paths."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise InputFileError(f"{out_dir}: cannot create the output folder: {exc}") from None
    tables = build_tables(runs)
    csvs = [write_csv(t, os.path.join(out_dir, f"{name}.csv")) for name, t in tables.items()]
    pngs = write_plots(tables, [r.label for r in runs], out_dir) if plots else []
    summary = {"runs": summarise(runs, tables),
               "tables": {name: {"columns": list(t.columns), "rows": list(t.rows)} for name, t in tables.items()},
               "files": {"csv": csvs, "png": pngs}}
    path = os.path.join(out_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    summary["files"]["json"] = path
    return summary
