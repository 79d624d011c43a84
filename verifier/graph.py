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

from .ops import Op, ReLU


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


@dataclass
class BoundGraph:
    nodes: list[Node]
    output: int
    consumers: list[list[int]] = field(default_factory=list)

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
        """Indices of ReLU nodes in topological order."""
        return [i for i, n in enumerate(self.nodes) if isinstance(n.op, ReLU)]

    def needs_bounds(self) -> list[int]:
        """Nodes whose bounds a relaxation needs: inputs of nonlinear ops, in order."""
        needed = sorted({n.inputs[0] for n in self.nodes if n.op is not None and n.op.nonlinear})
        return needed

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
