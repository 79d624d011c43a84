"""Read the JSON-lines files of ``certiprune verify --stats`` into runs of instances.

A file holds, per verification, one ``{"record": "instance"}`` summary line and one
``{"record": "subdomain"}`` line per bounded subdomain (lines without ``record`` are subdomains,
as written before summaries existed). Lines are grouped into instances by ``instance_id`` (or by
model and spec in old files). A run is one file, or every ``*.jsonl`` file of a folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputFileError


@dataclass(frozen=True)
class InstanceRecords:
    """One verification of one instance.

    verdict: sat | unsat | timeout | unknown (None if unrecorded); seconds: verification time
    (None in files without summary lines); roots: one dict per input region (``region``,
    ``attack``, ``ibp``, ``crown``, ``alpha``, ``unstable``: method -> count per layer).
    depth, lower, region: (N,) per bounded subdomain; unstable: (N, L) unstable ReLUs per layer,
    NaN rows for subdomains recorded without counts (input splitting), or None when none has them.
    """

    model: str
    spec: str
    verdict: Optional[str]
    seconds: Optional[float]
    roots: tuple[dict, ...]
    depth: np.ndarray
    lower: np.ndarray
    region: np.ndarray
    unstable: Optional[np.ndarray]
    splits: tuple[str, ...]           # the split kinds seen: "root", "relu", "input"

    @property
    def subdomains(self) -> int:
        return int(self.depth.shape[0])


@dataclass(frozen=True)
class Run:
    label: str
    files: tuple[str, ...]
    instances: tuple[InstanceRecords, ...]


def record_files(path: str) -> list[str]:
    """The record files of a run: the file itself, or the sorted ``*.jsonl`` files of a folder."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
        if not files:
            raise InputFileError(f"{path}: folder holds no .jsonl record files")
        return files
    if not os.path.exists(path):
        raise InputFileError(f"{path}: no such file or folder")
    return [path]


def read_lines(path: str) -> list[dict]:
    """Every non-blank line of a file as a JSON object; raises InputFileError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputFileError(f"{path}:{number}: a record must be a JSON object")
        record["_where"] = f"{path}:{number}"
        records.append(record)
    return records


def group_instances(records: list[dict]) -> list[InstanceRecords]:
    """Records (in file order) -> one InstanceRecords per verification, in order of appearance."""
    groups: dict[tuple, dict] = {}
    for rec in records:
        key = ("id", rec["instance_id"]) if "instance_id" in rec else ("path", rec.get("model"), rec.get("spec"))
        group = groups.setdefault(key, {"summary": None, "subdomains": [], "first": rec})
        kind = rec.get("record", "subdomain")
        if kind == "instance":
            group["summary"] = rec
        elif kind == "subdomain":
            for name in ("depth", "lower"):
                if not isinstance(rec.get(name), (int, float)):
                    raise InputFileError(f"{rec['_where']}: subdomain record without a numeric {name!r}")
            group["subdomains"].append(rec)
        else:
            raise InputFileError(f"{rec['_where']}: unknown record kind {kind!r}")
    return [_instance(g["summary"], g["subdomains"], g["first"]) for g in groups.values()]


def _instance(summary: Optional[dict], subdomains: list[dict], first: dict) -> InstanceRecords:
    head = summary or first
    depth = np.array([r["depth"] for r in subdomains], dtype=np.int64)
    lower = np.array([r["lower"] for r in subdomains], dtype=np.float64)
    region = np.array([r.get("region", 0) for r in subdomains], dtype=np.int64)
    width = max((len(r["unstable"]) for r in subdomains if r.get("unstable") is not None), default=0)
    unstable = None
    if width:
        unstable = np.full((len(subdomains), width), np.nan)
        for k, r in enumerate(subdomains):
            if r.get("unstable") is not None:
                unstable[k, :len(r["unstable"])] = r["unstable"]
    seconds = summary.get("seconds") if summary else None
    return InstanceRecords(model=str(head.get("model", "")), spec=str(head.get("spec", "")),
                           verdict=head.get("result"), seconds=None if seconds is None else float(seconds),
                           roots=tuple(summary.get("roots") or ()) if summary else (),
                           depth=depth, lower=lower, region=region, unstable=unstable,
                           splits=tuple(sorted({str(r.get("split", "")) for r in subdomains})))


def read_run(path: str, label: Optional[str] = None) -> Run:
    """A run from a record file or a folder of them; label defaults to the file or folder name."""
    files = record_files(path)
    records = [rec for f in files for rec in read_lines(f)]
    if not records:
        raise InputFileError(f"{path}: no records (is it the --stats file of `certiprune verify`?)")
    if label is None:
        base = os.path.basename(os.path.normpath(path))
        label = base[:-len(".jsonl")] if base.endswith(".jsonl") else base
    return Run(label, tuple(files), tuple(group_instances(records)))
