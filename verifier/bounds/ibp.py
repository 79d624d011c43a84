"""Interval bound propagation: one forward pass of ``Op.ibp`` over the graph."""
from __future__ import annotations

from ..graph import BoundGraph
from ..ops import Bounds


def ibp_bounds(graph: BoundGraph, box: Bounds, upto: int | None = None) -> list[Bounds]:
    """Bounds of every node (up to ``upto`` inclusive); box: (N, *input_shape) each."""
    last = graph.output if upto is None else upto
    bounds: list[Bounds] = [box]
    for node in graph.nodes[1:last + 1]:
        bounds.append(node.op.ibp(*(bounds[j] for j in node.inputs)))
    return bounds
