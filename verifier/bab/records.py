"""Per-subdomain records for tightness statistics.

Every bounded subdomain leaves one record: id, parent, depth, the split that created it
(ReLU: layer, neuron, sign; input: dimension), its lower bound (worst margin), the number of
unstable ReLUs per layer, and the time since verification started. Records are kept as batched
tensors and turned into JSON lines only when written, so leaving them on costs little.

The records also keep the seconds spent in each phase of ``verify`` (``phases``: ibp, crown,
attack, alpha, search) and, where the run was cut short, why (``cut``: the deadline, or the
wall-clock safety net that interrupts a step overrunning it); a cut run's records are written all
the same, marked ``"cut": true`` with its ``cut_reason``.

Each input region also keeps a ``RootRecord``: the attack's best margin and the root lower bound
of the same margin under IBP, CROWN and alpha-CROWN (their difference is the relaxation gap).

The JSON-lines file (``certiprune verify --stats``; read back by ``verifier.stats``) holds, per
verification, one line ``{"record": "instance", ...}`` (verdict, seconds, roots) followed by one
line ``{"record": "subdomain", ...}`` per bounded subdomain. Lines without a ``record`` field
(files written before the instance line existed) are subdomains.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

ROOT_METHODS = ("ibp", "crown", "alpha")


@dataclass
class RootRecord:
    """The root of one input region. ``attack``: the lowest worst-disjunct margin the PGD attack
    evaluated (an upper bound on the true minimum over the box); ``ibp``, ``crown``, ``alpha``:
    certified lower bounds of that margin; ``unstable``: method -> unstable ReLUs per ReLU layer
    under that method's intermediate bounds. None where not computed."""

    region: int
    attack: Optional[float] = None
    ibp: Optional[float] = None
    crown: Optional[float] = None
    alpha: Optional[float] = None
    unstable: dict[str, list[int]] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"region": self.region, "attack": _finite(self.attack),
                **{m: _finite(getattr(self, m)) for m in ROOT_METHODS}, "unstable": self.unstable}


def _finite(value: Optional[float]) -> Optional[float]:
    """JSON has no infinities: a bound that is not a finite number is written as null."""
    return None if value is None or not math.isfinite(value) else float(value)

import torch
from torch import Tensor


@dataclass
class SubdomainRecords:
    start: float = field(default_factory=time.monotonic)
    batches: list[dict] = field(default_factory=list)
    next_id: int = 0
    roots: dict[int, RootRecord] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)   # phase name -> seconds spent in it
    cut: Optional[str] = None        # why the run ended before a verdict (None: it was not cut)

    def add_phase(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to the time of phase ``name`` (a phase may run once per region)."""
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def root(self, region: int) -> RootRecord:
        """The region's root record, created empty on first use."""
        if region not in self.roots:
            self.roots[region] = RootRecord(region)
        return self.roots[region]

    def new_ids(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """(n,) fresh subdomain ids, on ``device`` (the search's, so its masks can index them)."""
        ids = torch.arange(self.next_id, self.next_id + n, device=device)
        self.next_id += n
        return ids

    def add(self, ids: Tensor, parents: Tensor, depth: Tensor, lower: Tensor, unstable: Optional[Tensor],
            split_kind: str, split_layer: Optional[Tensor] = None, split_index: Optional[Tensor] = None,
            split_sign: Optional[Tensor] = None, region: int = 0) -> None:
        """All tensors (M,) except unstable (M, n_layers) (or None)."""
        self.batches.append({
            "id": ids.cpu(), "parent": parents.cpu(), "depth": depth.cpu(), "lower": lower.detach().float().cpu(),
            "unstable": None if unstable is None else unstable.cpu(), "kind": split_kind,
            "layer": None if split_layer is None else split_layer.cpu(),
            "index": None if split_index is None else split_index.cpu(),
            "sign": None if split_sign is None else split_sign.cpu(),
            "region": region, "time": time.monotonic() - self.start})

    @property
    def count(self) -> int:
        return sum(len(b["id"]) for b in self.batches)

    def max_depth(self) -> int:
        return max((int(b["depth"].max()) for b in self.batches if len(b["depth"])), default=0)

    def write(self, path: str, instance: dict, seconds: Optional[float] = None) -> None:
        """Append JSON lines: one instance summary (``instance`` fields, e.g. model, spec and the
        verdict as ``result``; total ``seconds``; root records; ``cut``/``cut_reason``; the
        ``phases``' seconds), then one per subdomain. Every line
        carries the instance's fields and an ``instance_id`` shared by the lines of this call."""
        instance = dict(instance, instance_id=uuid.uuid4().hex[:12])
        with open(path, "a") as f:
            f.write(json.dumps({"record": "instance", **instance,
                                "seconds": None if seconds is None else round(seconds, 4),
                                "subdomains": self.count, "cut": self.cut is not None,
                                "cut_reason": self.cut,
                                "phases": {k: round(v, 4) for k, v in self.phases.items()},
                                "roots": [self.roots[r].as_json() for r in sorted(self.roots)]}) + "\n")
            for b in self.batches:
                columns = {key: b[key].tolist() for key in ("id", "parent", "depth", "lower", "unstable",
                                                             "layer", "index", "sign") if b[key] is not None}
                for k in range(len(columns["id"])):
                    rec = {"record": "subdomain", **instance, "id": columns["id"][k],
                           "parent": columns["parent"][k], "depth": columns["depth"][k],
                           "lower": columns["lower"][k], "region": b["region"], "time": round(b["time"], 4),
                           "split": b["kind"]}
                    rec.update((key, columns[key][k]) for key in ("unstable", "layer", "index", "sign")
                               if key in columns)
                    f.write(json.dumps(rec) + "\n")
