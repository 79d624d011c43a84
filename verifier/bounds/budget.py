"""Memory budget of the CROWN passes that bound intermediate nodes.

A backward pass from node ``start`` for ``S`` of its neurons holds coefficient tensors
``(N, S, *shape_j)`` for the nodes j it crosses; on a large convolutional graph (TinyYOLO: 3x52x52
input, 16x52x52 first layer) all unstable rows at once need tens of GB. The rows are bounded in
chunks that fit the budget; where even one row would not fit, the node keeps its IBP bounds
(sound, looser) and the log says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor

from ..graph import BoundGraph

log = logging.getLogger("verifier.bounds")


@dataclass(frozen=True)
class CrownBudget:
    """``memory_bytes``: the most the coefficient tensors of one chunk of rows may take (counted
    as ``copies`` tensors of the largest node crossed)."""

    memory_bytes: int = 1 << 30
    copies: int = 4


def bytes_per_row(graph: BoundGraph, start: int, N: int, itemsize: int, budget: CrownBudget) -> int:
    """Bytes one row of a backward pass from ``start`` takes at its widest point."""
    widest = max(graph.nodes[j].numel for j in graph.ancestors(start))
    return N * widest * itemsize * budget.copies


def row_chunks(graph: BoundGraph, start: int, rows: Tensor, N: int, itemsize: int,
               budget: CrownBudget) -> list[slice]:
    """Slices of ``rows`` (S,) or (N, S) (last dim) whose passes fit the budget; [] where one row
    does not fit (then the caller keeps IBP and logs it)."""
    per_row = bytes_per_row(graph, start, N, itemsize, budget)
    S = rows.shape[-1]
    if per_row > budget.memory_bytes:
        log.warning("CROWN bounds of node %d (%s): one row needs %.0f MiB > the %.0f MiB budget; IBP bounds kept",
                    start, graph.nodes[start].name, per_row / 2**20, budget.memory_bytes / 2**20)
        return []
    step = max(1, budget.memory_bytes // per_row)
    if step < S:
        log.info("CROWN bounds of node %d (%s): %d rows in chunks of %d (memory budget %.0f MiB)",
                 start, graph.nodes[start].name, S, step, budget.memory_bytes / 2**20)
    return [slice(lo, min(lo + step, S)) for lo in range(0, S, step)]
