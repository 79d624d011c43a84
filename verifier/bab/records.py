"""Per-subdomain records for tightness statistics.

Every bounded subdomain leaves one record: id, parent, depth, the split that created it
(ReLU: layer, neuron, sign; input: dimension), its lower bound (worst margin), the number of
unstable ReLUs per layer, and the time since the search started. Records are kept as batched
tensors and turned into JSON lines only when written, so leaving them on costs little.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class SubdomainRecords:
    start: float = field(default_factory=time.monotonic)
    batches: list[dict] = field(default_factory=list)
    next_id: int = 0

    def new_ids(self, n: int) -> Tensor:
        ids = torch.arange(self.next_id, self.next_id + n)
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

    def write(self, path: str, instance: dict) -> None:
        """Append JSON lines: one per subdomain, each carrying the instance's identification."""
        with open(path, "a") as f:
            for b in self.batches:
                n = len(b["id"])
                for k in range(n):
                    rec = dict(instance)
                    rec.update(id=int(b["id"][k]), parent=int(b["parent"][k]), depth=int(b["depth"][k]),
                               lower=float(b["lower"][k]), region=b["region"], time=round(b["time"], 4),
                               split=b["kind"])
                    if b["unstable"] is not None:
                        rec["unstable"] = b["unstable"][k].tolist()
                    if b["layer"] is not None:
                        rec["layer"] = int(b["layer"][k])
                    if b["index"] is not None:
                        rec["index"] = int(b["index"][k])
                    if b["sign"] is not None:
                        rec["sign"] = int(b["sign"][k])
                    f.write(json.dumps(rec) + "\n")
