"""Small random graphs mixing the new non-linear ops (an attention block: Linear, MatMul of two
perturbed tensors, Softmax; an elementwise mix: Exp, Sin, Mul, Clip, LeakyReLU, Maximum, Sign,
Pow, Sqrt, Log, Reciprocal, Floor, Cos), bounded by a minimal CROWN written here (IBP intermediate
bounds, one backward sweep from the output, A summed where a node feeds several others): the
bounds contain the outputs of >= 10^4 sampled points of the input box, in float32 and float64.

The traversal is the test's own, so that these ops are checked in composition independently of
the bound graph being redesigned (issue 22); the graph tests of the project's traversal come
with the converter's registration of these ops.
"""
from __future__ import annotations

import pytest
import torch

from nonlinear_cases import ROUNDING
from verifier.ops import Bounds, Linear, constant
from verifier.ops.base import BackwardResult, Op
from verifier.ops.bilinear import MatMul, Mul
from verifier.ops.elementwise import Cos, Exp, Log, Pow, Reciprocal, Sin, Sqrt
from verifier.ops.piecewise import Clip, Floor, LeakyReLU, Maximum, Sign
from verifier.ops.softmax import Softmax

DTYPES = [torch.float32, torch.float64]
SAMPLES = 10_000


class Transpose(Op):
    """The last two dims swapped (exact)."""

    def forward(self, x):
        return x.transpose(-1, -2)

    def ibp(self, b):
        return Bounds(b.lower.transpose(-1, -2), b.upper.transpose(-1, -2))

    def backward(self, lA, uA, *_):
        swap = lambda A: None if A is None else A.transpose(-1, -2)
        return BackwardResult([(swap(lA), swap(uA))], 0.0, 0.0)


class Shift(Op):
    """``x + c`` for a constant c (exact)."""

    def __init__(self, c: float):
        self.c = c

    def forward(self, x):
        return x + self.c

    def ibp(self, b):
        return Bounds(b.lower + self.c, b.upper + self.c)

    def backward(self, lA, uA, *_):
        bias = lambda A: 0.0 if A is None else self.c * A.flatten(2).sum(-1)
        return BackwardResult([(lA, uA)], bias(lA), bias(uA))


def _linear(rng, n_in, n_out, dtype, scale=1.0):
    W = (scale * torch.randn(n_out, n_in, generator=rng, dtype=torch.float64) / n_in ** 0.5).to(dtype)
    b = (0.1 * torch.randn(n_out, generator=rng, dtype=torch.float64)).to(dtype)
    return Linear(constant(W), constant(b))


def attention(rng, dtype):
    """x (T=4, D=3) -> softmax(q k^T) v -> Linear; nodes as (op, input indices), node 0 the input."""
    return [(None, ()), (_linear(rng, 3, 3, dtype, 2.0), (0,)), (_linear(rng, 3, 3, dtype, 2.0), (0,)),
            (_linear(rng, 3, 3, dtype), (0,)), (Transpose(), (2,)), (MatMul(), (1, 4)), (Softmax(-1), (5,)),
            (MatMul(), (6, 3)), (_linear(rng, 3, 2, dtype), (7,))], (4, 3)


def elementwise_mix(rng, dtype):
    """x (6,) through two branches of the elementwise ops, recombined by Mul and Maximum."""
    return [(None, ()), (_linear(rng, 6, 6, dtype), (0,)), (Exp(), (1,)), (Sin(), (0,)), (Mul(), (2, 3)),
            (Clip(-1.0, 1.0), (4,)), (LeakyReLU(0.2), (5,)), (Sign(), (1,)), (Maximum(), (6, 7)),
            (Pow(2), (8,)), (Sqrt(), (9,)), (Shift(1.5), (10,)), (Log(), (11,)), (Reciprocal(), (11,)),
            (Floor(), (0,)), (Cos(), (14,)), (Mul(), (12, 15)), (Pow(3), (13,)), (Maximum(), (16, 17)),
            (_linear(rng, 6, 3, dtype), (18,))], (6,)


def _forward(nodes, x):
    values = [x]
    for op, ins in nodes[1:]:
        values.append(op.forward(*[values[j] for j in ins]))
    return values[-1]


def _crown(nodes, box: Bounds, spec):
    """Lower and upper bounds (N, S) of ``spec . output`` over the box; spec (N, S, *out)."""
    bounds = [box]
    for op, ins in nodes[1:]:
        bounds.append(op.ibp(*[bounds[j] for j in ins]))
    A = {len(nodes) - 1: (spec, spec)}
    lower = upper = 0.0
    for i in reversed(range(1, len(nodes))):
        if i not in A:
            continue
        lA, uA = A.pop(i)
        op, ins = nodes[i]
        result = op.backward(lA, uA, *[bounds[j] for j in ins])
        lower, upper = lower + result.lbias, upper + result.ubias
        for j, (lA_j, uA_j) in zip(ins, result.input_A):
            old = A.get(j, (0.0, 0.0))
            A[j] = (old[0] + lA_j, old[1] + uA_j)
    lA, uA = A[0]
    mid, rad = ((box.lower + box.upper) / 2).unsqueeze(1), ((box.upper - box.lower) / 2).unsqueeze(1)
    lower = lower + (lA * mid).flatten(2).sum(-1) - (lA.abs() * rad).flatten(2).sum(-1)
    upper = upper + (uA * mid).flatten(2).sum(-1) + (uA.abs() * rad).flatten(2).sum(-1)
    return lower, upper, bounds[-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("radius", [0.01, 0.3, 1.5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("graph", [attention, elementwise_mix])
def test_crown_through_mixed_graphs_contains_samples(graph, seed, radius, dtype):
    rng = torch.Generator().manual_seed(seed * 10 + int(radius * 10))
    nodes, shape = graph(rng, dtype)
    n_boxes = 2
    centre = torch.randn((n_boxes,) + shape, generator=rng, dtype=torch.float64)
    box = Bounds((centre - radius).to(dtype), (centre + radius).to(dtype))
    spec = torch.randn((n_boxes, 4) + tuple(_forward(nodes, box.lower).shape[1:]), generator=rng, dtype=torch.float64).to(dtype)
    lower, upper, ibp = _crown(nodes, box, spec)
    t = torch.rand((SAMPLES,) + tuple(box.lower.shape), generator=rng, dtype=torch.float64)
    t[: SAMPLES // 4] = t[: SAMPLES // 4].round()                                  # vertices
    x = (box.lower.double() + t * (box.upper - box.lower).double()).to(dtype)
    x = torch.minimum(torch.maximum(x, box.lower), box.upper)
    out = _forward(nodes, x.reshape((-1,) + shape)).reshape((SAMPLES, n_boxes) + tuple(spec.shape[2:]))
    assert torch.isfinite(out).all()
    assert ((out >= ibp.lower) & (out <= ibp.upper)).all(), "IBP bounds miss a sample"
    objective = (spec.double().unsqueeze(0) * out.double().unsqueeze(2)).flatten(3).sum(-1)   # (P, N, S)
    slack = ROUNDING[dtype] * (1 + objective.abs().amax(0))
    assert (lower.double() <= objective.amin(0) + slack).all(), "CROWN lower bound above a sample"
    assert (upper.double() >= objective.amax(0) - slack).all(), "CROWN upper bound below a sample"
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
