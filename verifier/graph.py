"""The bound graph: one node per operation on the perturbed input, in topological order.

Node 0 is the input. Every node has a per-sample shape; tensors flowing between nodes are
``(N, *shape)``. Constants are folded into the ops at load time, so every input of a node is
another node. IBP, CROWN and alpha/beta-CROWN are passes over this one structure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .ops import Op


@dataclass
class Node:
    name: str                      # name in the source model, for messages
    op: Optional[Op]               # None for the input node
    inputs: tuple[int, ...]
    shape: tuple[int, ...]         # per-sample shape of the node's value
    source: str = ""               # operator type in the source model, for messages

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class RemovedNeurons:
    """Neurons of a Linear layer that simplification dropped (constant or without effect on the
    output). Kept so that per-layer reports still speak of the source model's layer.

    kept: (n_kept,) and dropped: (n_dropped,) neuron indices in the source layer;
    weight: (n_dropped, n_in) and bias: (n_dropped,) their incoming weights.
    """

    size: int
    kept: Tensor
    dropped: Tensor
    weight: Tensor
    bias: Tensor

    def expand(self, lower: Tensor, upper: Tensor, in_lower: Tensor, in_upper: Tensor) -> tuple[Tensor, Tensor]:
        """Source-layer pre-activation bounds: lower, upper (B, n_kept) from the graph; the dropped
        neurons get interval bounds from the layer input's bounds in_lower, in_upper (B, n_in).
        Returns (B, size) each."""
        center, radius = (in_upper + in_lower) / 2, (in_upper - in_lower) / 2
        mid = center @ self.weight.t() + self.bias
        rad = radius @ self.weight.abs().t()
        full_lower = lower.new_empty(lower.shape[0], self.size)
        full_upper = upper.new_empty(upper.shape[0], self.size)
        full_lower[:, self.kept], full_upper[:, self.kept] = lower, upper
        full_lower[:, self.dropped], full_upper[:, self.dropped] = mid - rad, mid + rad
        return full_lower, full_upper


@dataclass
class BoundGraph:
    nodes: list[Node]
    output: int
    consumers: list[list[int]] = field(default_factory=list)
    # Linear node index -> its neurons removed by simplification (see RemovedNeurons).
    removed: dict[int, RemovedNeurons] = field(default_factory=dict)

    def __post_init__(self):
        self.consumers = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                self.consumers[j].append(i)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.nodes[self.output].shape

    def relu_nodes(self) -> list[int]:
        """Nodes whose input branch and bound may split at 0 (``Op.branchable``: ReLU), in order."""
        return [i for i, n in enumerate(self.nodes) if n.op is not None and n.op.branchable]

    def optimisable_nodes(self) -> list[int]:
        """Nodes whose relaxation has free parameters (``Op.optimisable``), in order."""
        return [i for i, n in enumerate(self.nodes) if n.op is not None and n.op.optimisable]

    def needs_bounds(self) -> list[int]:
        """Nodes whose bounds a relaxation needs: inputs of nonlinear ops (not the input node,
        whose bounds are the box), in order."""
        return sorted({j for n in self.nodes if n.op is not None and n.op.nonlinear for j in n.inputs if j != 0})

    def ancestors(self, target: int) -> list[int]:
        """Nodes ``target`` depends on (itself included), in topological order."""
        seen = {target}
        stack = [target]
        while stack:
            for j in self.nodes[stack.pop()].inputs:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return sorted(seen)

    def forward(self, x: Tensor, keep: bool = False) -> Tensor | list[Tensor]:
        """Concrete evaluation, x: (N, *input_shape) -> (N, *output_shape); with keep, all values."""
        values: list[Optional[Tensor]] = [None] * len(self.nodes)
        values[0] = x
        for i, node in enumerate(self.nodes[1:], start=1):
            values[i] = node.op.forward(*(values[j] for j in node.inputs))
        return values if keep else values[self.output]

    def cast(self, device: torch.device, dtype: torch.dtype) -> "BoundGraph":
        for node in self.nodes[1:]:
            node.op.cast(device, dtype)
        return self
