"""The tables of a tightness report, computed from runs with plain numpy.

instances      one row per verification: verdict, seconds, subdomains, maximum and mean depth
depth          per instance and depth: subdomains, how many are closed (lower bound > 0), the
               worst (lowest) and mean lower bound -- how the worst bound rises with depth
layers         per instance, ReLU layer and depth: mean and maximum unstable ReLUs over the
               subdomains (ReLU splitting records them; depth 0 is the branch-and-bound root)
root_gap       per instance and input region: the attack's best margin, the root lower bound of
               that margin under IBP, CROWN and alpha-CROWN, and the gap (attack - bound) of each
root_unstable  per instance, region and ReLU layer: unstable ReLUs at the root under each method

Lower bounds and margins are of the worst disjunct: the region is proven where they are > 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .load import InstanceRecords, Run

METHODS = ("ibp", "crown", "alpha")
KEY = ("run", "model", "spec")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    rows: tuple[dict, ...]


def _key(run: Run, inst: InstanceRecords) -> dict:
    return {"run": run.label, "model": inst.model, "spec": inst.spec}


def _num(value) -> Optional[float]:
    return None if value is None else float(value)


def instance_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for inst in run.instances:
            regions = len(inst.roots) if inst.roots else len(set(inst.region.tolist()))
            rows.append({**_key(run, inst), "verdict": inst.verdict, "seconds": inst.seconds, "regions": regions,
                         "subdomains": inst.subdomains,
                         "max_depth": int(inst.depth.max()) if inst.subdomains else None,
                         "mean_depth": float(inst.depth.mean()) if inst.subdomains else None,
                         "split": "+".join(s for s in inst.splits if s != "root") or "none"})
    return Table("instances", KEY + ("verdict", "seconds", "regions", "subdomains", "max_depth", "mean_depth",
                                     "split"), tuple(rows))


def depth_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for inst in run.instances:
            for d in np.unique(inst.depth):
                lower = inst.lower[inst.depth == d]
                rows.append({**_key(run, inst), "depth": int(d), "subdomains": int(lower.size),
                             "closed": int((lower > 0).sum()), "worst_lower": float(lower.min()),
                             "mean_lower": float(lower.mean())})
    return Table("depth", KEY + ("depth", "subdomains", "closed", "worst_lower", "mean_lower"), tuple(rows))


def layer_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for inst in run.instances:
            if inst.unstable is None:
                continue
            counted = ~np.isnan(inst.unstable).all(1)
            depth, unstable = inst.depth[counted], inst.unstable[counted]
            for layer in range(unstable.shape[1]):
                for d in np.unique(depth):
                    values = unstable[depth == d, layer]
                    rows.append({**_key(run, inst), "layer": layer, "depth": int(d), "subdomains": int(values.size),
                                 "mean_unstable": float(values.mean()), "max_unstable": int(values.max())})
    return Table("layers", KEY + ("layer", "depth", "subdomains", "mean_unstable", "max_unstable"), tuple(rows))


def root_gap_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for inst in run.instances:
            for root in inst.roots:
                attack = _num(root.get("attack"))
                row = {**_key(run, inst), "region": int(root.get("region", 0)), "attack": attack}
                row.update((m, _num(root.get(m))) for m in METHODS)
                row.update((f"gap_{m}", None if attack is None or row[m] is None else attack - row[m])
                           for m in METHODS)
                rows.append(row)
    return Table("root_gap", KEY + ("region", "attack") + METHODS + tuple(f"gap_{m}" for m in METHODS), tuple(rows))


def root_unstable_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for inst in run.instances:
            for root in inst.roots:
                counts = root.get("unstable") or {}
                n_layers = max((len(v) for v in counts.values()), default=0)
                for layer in range(n_layers):
                    row = {**_key(run, inst), "region": int(root.get("region", 0)), "layer": layer}
                    row.update((m, counts[m][layer] if layer < len(counts.get(m) or ()) else None) for m in METHODS)
                    rows.append(row)
    return Table("root_unstable", KEY + ("region", "layer") + METHODS, tuple(rows))


def build_tables(runs: list[Run]) -> dict[str, Table]:
    tables = (instance_table(runs), depth_table(runs), layer_table(runs), root_gap_table(runs),
              root_unstable_table(runs))
    return {t.name: t for t in tables}


def _stats(values: list) -> Optional[dict]:
    values = np.array([v for v in values if v is not None], dtype=np.float64)
    if not values.size:
        return None
    return {"n": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
            "min": float(values.min()), "max": float(values.max())}


def summarise(runs: list[Run], tables: dict[str, Table]) -> list[dict]:
    """Per run: instance count, verdicts, time, subdomains, depth, root gaps and root unstable
    ReLUs (summed over layers) per method -- each a {n, mean, median, min, max} or None."""
    out = []
    for run in runs:
        inst = [r for r in tables["instances"].rows if r["run"] == run.label]
        gaps = [r for r in tables["root_gap"].rows if r["run"] == run.label]
        verdicts: dict[str, int] = {}
        for r in inst:
            verdicts[str(r["verdict"])] = verdicts.get(str(r["verdict"]), 0) + 1
        unstable = {m: [sum(root["unstable"][m]) for i in run.instances for root in i.roots
                        if (root.get("unstable") or {}).get(m) is not None] for m in METHODS}
        out.append({"run": run.label, "files": list(run.files), "instances": len(inst), "verdicts": verdicts,
                    "seconds": _stats([r["seconds"] for r in inst]),
                    "subdomains": _stats([r["subdomains"] for r in inst]),
                    "max_depth": max((r["max_depth"] for r in inst if r["max_depth"] is not None), default=None),
                    "root_gap": {m: _stats([r[f"gap_{m}"] for r in gaps]) for m in METHODS},
                    "root_unstable": {m: _stats(unstable[m]) for m in METHODS}})
    return out
