"""Widths of the non-linear relaxations of verifier/ops (issue 22) against IBP, on random boxes.

    .venv/bin/python -m benchmarks.relaxation_widths

Prints, in float64 on one thread (means over boxes and random spec rows A of the concretised
upper minus lower bound of ``A . op(x)`` over the box):
- Softmax (K = 8, centres N(0, 4), radii U(0, r)): the linear relaxation vs IBP, for random A
  and for A = identity (where IBP is the exact range);
- MatMul (4x5 @ 5x6) and Mul: McCormick with the default mix (alpha 0.5), auto_LiRPA's planes
  (alpha 1), the other pair (alpha 0) vs IBP;
- the two mixed graphs of tests/test_ops_nonlinear_graphs.py: CROWN (IBP intermediate bounds,
  default alphas) vs IBP at the output, A = identity.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from verifier.ops import Bounds
from verifier.ops.bilinear import MatMul, Mul
from verifier.ops.softmax import Softmax


def _concretise(result, bounds):
    lower, upper = result.lbias, result.ubias
    for (lA, uA), b in zip(result.input_A, bounds):
        mid, rad = ((b.lower + b.upper) / 2).unsqueeze(1), ((b.upper - b.lower) / 2).unsqueeze(1)
        lower = lower + (lA * mid).flatten(2).sum(-1) - (lA.abs() * rad).flatten(2).sum(-1)
        upper = upper + (uA * mid).flatten(2).sum(-1) + (uA.abs() * rad).flatten(2).sum(-1)
    return lower, upper


def _width(op, bounds, A, alpha=None):
    kwargs = {} if alpha is None else {"alpha_l": torch.full_like(A, alpha), "alpha_u": torch.full_like(A, alpha)}
    lower, upper = _concretise(op.backward(A, A, *bounds, **kwargs), bounds)
    return (upper - lower).mean().item()


def _ibp_width(op, bounds, A):
    b = op.ibp(*bounds)
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    lower = (pos * b.lower.unsqueeze(1) + neg * b.upper.unsqueeze(1)).flatten(2).sum(-1)
    upper = (pos * b.upper.unsqueeze(1) + neg * b.lower.unsqueeze(1)).flatten(2).sum(-1)
    return (upper - lower).mean().item()


def _box(rng, shape, centre_scale, radius):
    centre = centre_scale * torch.randn(shape, generator=rng, dtype=torch.float64)
    r = radius * torch.rand(shape, generator=rng, dtype=torch.float64)
    return Bounds(centre - r, centre + r)


def softmax_rows(rng):
    print("softmax K=8, 64 boxes    linear(A random)  IBP(A random)  linear(A = I)  IBP(A = I)")
    for radius in (0.05, 0.3, 1.0, 3.0):
        b = _box(rng, (64, 8), 2.0, radius)
        A = torch.randn(64, 4, 8, generator=rng, dtype=torch.float64)
        eye = torch.eye(8, dtype=torch.float64).expand(64, 8, 8)
        op = Softmax(-1)
        print(f"  r = {radius:<5}  {_width(op, [b], A):16.4f} {_ibp_width(op, [b], A):14.4f} "
              f"{_width(op, [b], eye):14.4f} {_ibp_width(op, [b], eye):11.4f}")


def bilinear_rows(rng):
    print("McCormick, 64 boxes      alpha 0.5 (default)  alpha 1 (auto_LiRPA)  alpha 0     IBP")
    for radius in (0.1, 1.0, 3.0):
        bx, by = _box(rng, (64, 4, 5), 1.0, radius), _box(rng, (64, 5, 6), 1.0, radius)
        A = torch.randn(64, 3, 4, 6, generator=rng, dtype=torch.float64)
        widths = [_width(MatMul(), [bx, by], A, a) for a in (None, 1.0, 0.0)]
        print(f"  MatMul r = {radius:<4} {widths[0]:19.4f} {widths[1]:21.4f} {widths[2]:10.4f} "
              f"{_ibp_width(MatMul(), [bx, by], A):8.4f}")
        A = torch.randn(64, 3, 4, 5, generator=rng, dtype=torch.float64)
        widths = [_width(Mul(), [bx, bx], A, a) for a in (None, 1.0, 0.0)]
        print(f"  Mul    r = {radius:<4} {widths[0]:19.4f} {widths[1]:21.4f} {widths[2]:10.4f} "
              f"{_ibp_width(Mul(), [bx, bx], A):8.4f}")


def graph_rows():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_ops_nonlinear_graphs import _crown, _forward, attention, elementwise_mix
    print("mixed graphs, 5 seeds x 2 boxes, A = I   CROWN     IBP")
    for graph in (attention, elementwise_mix):
        for radius in (0.01, 0.1, 0.3):
            crown = ibp = 0.0
            for seed in range(5):
                rng = torch.Generator().manual_seed(seed)
                nodes, shape = graph(rng, torch.float64)
                box = _box(rng, (2,) + shape, 1.0, 0.0)
                box = Bounds(box.lower - radius, box.upper + radius)
                out_shape = _forward(nodes, box.lower).shape[1:]
                n = out_shape.numel()
                spec = torch.eye(n, dtype=torch.float64).reshape((n,) + out_shape).expand((2, n) + out_shape)
                lower, upper, out = _crown(nodes, box, spec)
                crown += (upper - lower).mean().item() / 5
                ibp += (out.upper - out.lower).mean().item() / 5
            print(f"  {graph.__name__:<16} r = {radius:<5} {crown:9.4f} {ibp:7.4f}")


def main():
    torch.set_num_threads(1)
    rng = torch.Generator().manual_seed(1)
    softmax_rows(rng)
    bilinear_rows(rng)
    graph_rows()


if __name__ == "__main__":
    main()
