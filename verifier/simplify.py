"""Graph rewrites that keep the function and cut the work of every bound pass.

- An elementwise affine map right after a Linear/Conv2d (an ONNX MatMul's Add, an eval-mode
  BatchNormalization) is folded into its weights and bias.
- Pruned networks: a hidden neuron of a Linear -> ReLU -> Linear chain whose incoming weights
  are all zero is a constant; its value moves into the next layer's bias and the neuron is
  removed. A neuron whose outgoing weights are all zero is removed too. The bound passes then
  never spend dense work on them; ``BoundGraph.removed`` remembers them for per-layer reports.
Only constant weights are rewritten (ONNX models); live module parameters are left alone.
"""
from __future__ import annotations

import torch

from .graph import BoundGraph, Node, RemovedNeurons
from .ops import Conv2d, ElementwiseAffine, Linear, ReLU


def _const(t: torch.Tensor):
    return lambda: t


def _fold_affine(producer, affine: ElementwiseAffine, shape) -> bool:
    scale, shift = affine.scale(), affine.shift()
    if isinstance(producer, Linear):
        out = producer.weight().shape[0]
        ok = lambda t: t.numel() == 1 or (t.dim() >= 1 and t.shape[-1] == out and t.numel() == out)
        view = (-1,)
        W = producer.weight()
    elif isinstance(producer, Conv2d):
        out = producer.weight().shape[0]
        ok = lambda t: t.numel() == 1 or (t.numel() == out and t.dim() == 3 and t.shape[0] == out)
        view = (-1,)
        W = producer.weight()
    else:
        return False
    if not (ok(scale) and ok(shift)):
        return False
    s = scale.reshape(view).expand(out) if scale.numel() > 1 else scale.reshape(1).expand(out)
    b = shift.reshape(view).expand(out) if shift.numel() > 1 else shift.reshape(1).expand(out)
    bias = producer.bias() if producer.bias is not None else torch.zeros(out, dtype=W.dtype, device=W.device)
    new_W = W * s.view(-1, *([1] * (W.dim() - 1)))
    producer.weight, producer.bias = _const(new_W), _const(bias * s + b)
    return True


def simplify(graph: BoundGraph) -> BoundGraph:
    nodes = list(graph.nodes)
    output = graph.output
    remap = list(range(len(nodes)))
    keep = [True] * len(nodes)
    consumers = graph.consumers
    for i, node in enumerate(nodes):
        if not isinstance(node.op, ElementwiseAffine) or i == 0:
            continue
        j = node.inputs[0]
        src = remap[j]
        if len(consumers[j]) == 1 and j != 0 and keep[src] and nodes[src].shape == node.shape \
                and _fold_affine(nodes[src].op, node.op, node.shape):
            keep[i] = False
            remap[i] = src
    kept = [i for i in range(len(nodes)) if keep[i]]
    new_index = {old: new for new, old in enumerate(kept)}
    new_nodes = [Node(nodes[i].name, nodes[i].op, tuple(new_index[remap[j]] for j in nodes[i].inputs),
                      nodes[i].shape, nodes[i].source) for i in kept]
    result = BoundGraph(new_nodes, new_index[remap[output]])
    _remove_dead_neurons(result)
    return result


def _remove_dead_neurons(graph: BoundGraph) -> None:
    """Linear -> ReLU -> Linear chains (1-D shapes, single consumers): drop neurons with all-zero
    incoming or outgoing weights, folding constant activations into the next bias."""
    nodes = graph.nodes
    for r, node in enumerate(nodes):
        if not isinstance(node.op, ReLU):
            continue
        z = node.inputs[0]
        first = nodes[z].op
        if not isinstance(first, Linear) or len(node.shape) != 1 or len(graph.consumers[z]) != 1 \
                or len(graph.consumers[r]) != 1:
            continue
        nxt = graph.consumers[r][0]
        second = nodes[nxt].op
        if not isinstance(second, Linear) or len(nodes[nxt].shape) != 1:
            continue
        W1, W2 = first.weight(), second.weight()
        b1 = first.bias() if first.bias is not None else torch.zeros(W1.shape[0], dtype=W1.dtype, device=W1.device)
        b2 = second.bias() if second.bias is not None else torch.zeros(W2.shape[0], dtype=W2.dtype, device=W2.device)
        dead_in = (W1 == 0).all(1)
        dead_out = (W2 == 0).all(0)
        drop = dead_in | dead_out
        if not bool(drop.any()) or bool(drop.all()):
            continue
        alive = ~drop
        graph.removed[z] = RemovedNeurons(W1.shape[0], alive.nonzero().flatten(), drop.nonzero().flatten(),
                                          W1[drop], b1[drop])
        b2 = b2 + W2[:, dead_in & ~dead_out] @ torch.relu(b1[dead_in & ~dead_out])
        first.weight, first.bias = _const(W1[alive]), _const(b1[alive])
        second.weight, second.bias = _const(W2[:, alive]), _const(b2)
        n = int(alive.sum())
        nodes[z].shape = (n,)
        node.shape = (n,)
