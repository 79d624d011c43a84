"""Interval bound propagation: one forward pass of ``Op.ibp`` over the graph."""
from __future__ import annotations

from ..graph import BoundGraph
from ..ops import Bounds
from .floating import widen_ibp


def ibp_bounds(graph: BoundGraph, box: Bounds, upto: int | None = None) -> list[Bounds]:
    """Bounds of every node (up to ``upto`` inclusive); box: (N, *input_shape) each."""
    last = graph.output if upto is None else upto
    bounds: list[Bounds] = [box]
    for node in graph.nodes[1:last + 1]:
        bounds.append(node.op.ibp(*(bounds[j] for j in node.inputs)))
        bounds[-1] = widen_ibp(graph, len(bounds) - 1, bounds[-1], bounds)   # float-soundness pass (issue 26)
    return bounds
