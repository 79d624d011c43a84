"""Discrete-valued ops (step functions of their inputs): the one-hot of an ArgMax along an axis,
ArgMax itself, OneHot of an index, Equal, and Trunc (ONNX Cast of a float to an integer type).

Their values lie in a finite set and change only by jumps, so no line through a jump beats the
constants: every op here bounds its output by the constants of its IBP (``lower <= f <= upper``),
and a backward step sends nothing to its inputs (the ``A`` on them is zero) and adds
``A+ . lower + A- . upper`` to the bias. The IBP decides an entry wherever the input box does:

- ``IsMax`` (ArgMax then OneHot, ONNX semantics: ties go to the first index, or the last with
  ``select_last_index``): entry k is 1 where ``x_k`` beats every ``x_j`` on the whole box
  (``l_k > u_j`` for a j that would win a tie, ``l_k >= u_j`` for one that would lose it), 0 where
  some ``x_j`` beats it (``u_k <= l_j``, resp. ``u_k < l_j``), else [0, 1];
- ``ArgMax``: the index interval from the first to the last entry that can be the maximum;
- ``OneHot``: 1 where the (truncated) index interval is the class alone, 0 where it misses it;
- ``Equal``: 1 where both inputs are the same point, 0 where their intervals are disjoint;
- ``Trunc``: ``[trunc(l), trunc(u)]`` (monotone).

Rounding (verifier/bounds/floating.py): comparisons, argmax, one-hot and trunc of floats are
exact, so forward and IBP add no error; a backward step only sums the constants over the node.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import BackwardResult, Bounds, Op, contract, magnitude
from .relax import line_step_error


class Step(Op):
    """A discrete-valued op bounded by its IBP's constants. Subclasses define ``forward``,
    ``ibp`` and ``jump`` (the largest change of one output entry, for ``float_gain``)."""

    nonlinear = True
    jump = 1.0

    def backward(self, lA, uA, *input_bounds: Bounds, **_) -> BackwardResult:
        """lA, uA: (N, S, *out_shape). Returns no A for the inputs; biases (N, S)."""
        out = self.ibp(*input_bounds)
        lower, upper = out.lower.unsqueeze(1), out.upper.unsqueeze(1)
        biases = []
        for A, first, second in ((lA, lower, upper), (uA, upper, lower)):
            biases.append(0.0 if A is None else contract(A.clamp(min=0), first) + contract(A.clamp(max=0), second))
        return BackwardResult([(None, None)] * len(input_bounds), biases[0], biases[1])

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP are exact. A backward step sums ``A . c`` over the node, c the IBP's
        constants: ``line_step_error`` with slope 0 and values max |c|. (N, *out_shape)."""
        out = self.ibp(*inputs)
        values = magnitude(out)
        if not rounding.backward:
            return torch.zeros_like(values)
        zero = torch.zeros_like(values)
        return line_step_error(rounding, zero, values, zero)

    def float_gain(self, *errors, inputs=None):
        """|f(x + d) - f(x)|: with ``inputs``, at most the IBP's width on the box widened by d
        (0 where the widened box still decides the entry); without, ``jump`` wherever some d > 0.
        (N, *out_shape)."""
        if inputs is not None:
            wide = self.ibp(*(Bounds(b.lower - d, b.upper + d) for b, d in zip(inputs, errors)))
            return (wide.upper - wide.lower).clamp(min=0)
        reach = self._reach(*errors)
        return torch.where(reach, self.jump, 0.0).to(errors[0].dtype)

    def _reach(self, *errors: Tensor) -> Tensor:
        """(N, *out_shape) bool: output entries that a perturbation d of the inputs may move."""
        if len(errors) == 1:
            return errors[0] > 0
        return torch.stack(torch.broadcast_tensors(*_aligned(*[d > 0 for d in errors]))).any(0)

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        """The backward step sends no coefficients to the inputs: zero. (N, *out_shape)."""
        return torch.zeros_like(self._reach(*magnitudes), dtype=magnitudes[0].dtype)


def _pairwise(l: Tensor, u: Tensor, select_last: bool) -> tuple[Tensor, Tensor]:
    """For bounds l, u (..., n) of entries along the last axis: (certain, possible), each
    (..., n) bool: entry k is the ONNX ArgMax on every point of the box / on some point."""
    n = l.shape[-1]
    k, j = torch.arange(n, device=l.device).unsqueeze(1), torch.arange(n, device=l.device).unsqueeze(0)
    j_wins_tie = (j > k) if select_last else (j < k)               # (n, n): j would take a tie
    lk, uk, lj, uj = l.unsqueeze(-1), u.unsqueeze(-1), l.unsqueeze(-2), u.unsqueeze(-2)
    beats_j = torch.where(j_wins_tie, lk > uj, lk >= uj) | (j == k)   # x_k wins against x_j on the box
    beaten_by_j = torch.where(j_wins_tie, uk <= lj, uk < lj) & (j != k)
    return beats_j.all(-1), ~beaten_by_j.any(-1)


class IsMax(Step):
    """``OneHot(ArgMax(x, axis))`` along per-sample ``axis``: (N, *shape) -> (N, *shape), 1 at
    the ArgMax of each line along the axis (first index on ties; last with ``select_last``)."""

    def __init__(self, axis: int, select_last: bool = False):
        self.axis, self.select_last = int(axis), bool(select_last)

    def describe(self) -> str:
        return f"IsMax(axis={self.axis}{', last' if self.select_last else ''})"

    def forward(self, x: Tensor) -> Tensor:
        dim = self.axis + 1
        index = _argmax(x, dim, self.select_last).unsqueeze(dim)
        return torch.zeros_like(x).scatter_(dim, index, 1.0)

    def ibp(self, b: Bounds) -> Bounds:
        dim = self.axis + 1
        l, u = b.lower.movedim(dim, -1), b.upper.movedim(dim, -1)
        certain, possible = _pairwise(l, u, self.select_last)
        return Bounds(certain.to(l.dtype).movedim(-1, dim), possible.to(l.dtype).movedim(-1, dim))

    def _reach(self, *errors):
        return errors[0].gt(0).any(self.axis + 1, keepdim=True).expand_as(errors[0])


class ArgMax(Step):
    """ONNX ArgMax along per-sample ``axis`` as a float: (N, *shape) -> (N, *reduced), the axis
    removed, or kept with size 1 (``keepdims``)."""

    def __init__(self, axis: int, keepdims: bool = False, select_last: bool = False):
        self.axis, self.keepdims, self.select_last = int(axis), bool(keepdims), bool(select_last)

    def describe(self) -> str:
        return f"ArgMax(axis={self.axis})"

    def forward(self, x: Tensor) -> Tensor:
        index = _argmax(x, self.axis + 1, self.select_last)
        return (index.unsqueeze(self.axis + 1) if self.keepdims else index).to(x.dtype)

    def ibp(self, b: Bounds) -> Bounds:
        dim = self.axis + 1
        _, possible = _pairwise(b.lower.movedim(dim, -1), b.upper.movedim(dim, -1), self.select_last)
        n = possible.shape[-1]
        positions = torch.arange(n, device=possible.device, dtype=b.lower.dtype)
        # the box holds a true maximum, so some entry is possible
        first = torch.where(possible, positions, float(n)).amin(-1)
        last = torch.where(possible, positions, -1.0).amax(-1)
        if self.keepdims:
            first, last = first.unsqueeze(dim), last.unsqueeze(dim)
        return Bounds(first, last)

    def _reach(self, *errors):
        return errors[0].gt(0).any(self.axis + 1, keepdim=self.keepdims)

    @property
    def jump(self) -> float:
        return float("inf")   # the index may move across the axis; ``float_gain`` with inputs is finite


def _argmax(x: Tensor, dim: int, select_last: bool) -> Tensor:
    """torch.argmax takes the first maximum; the last one is the first of the flipped axis."""
    if not select_last:
        return x.argmax(dim)
    return x.shape[dim] - 1 - x.flip(dim).argmax(dim)


class OneHot(Step):
    """ONNX OneHot of an index tensor: (N, *shape) -> (N, *shape with ``depth`` inserted at
    tensor dim ``dim``) (dim counts N). The index is truncated to an integer, a negative one
    counts from ``depth``, one outside [-depth, depth) gives ``off`` everywhere; class c gets
    ``on`` where the index is c, else ``off``."""

    def __init__(self, depth: int, dim: int, off: float = 0.0, on: float = 1.0):
        self.depth, self.dim, self.off, self.on = int(depth), int(dim), float(off), float(on)

    def describe(self) -> str:
        return f"OneHot(depth={self.depth})"

    def _classes(self, x: Tensor) -> Tensor:
        shape = [1] * (x.dim() + 1)
        shape[self.dim] = self.depth
        return torch.arange(self.depth, device=x.device, dtype=x.dtype).reshape(shape)

    def _value(self, hit: Tensor) -> Tensor:
        return self.off + (self.on - self.off) * hit

    def forward(self, x: Tensor) -> Tensor:
        t = torch.trunc(x).unsqueeze(self.dim)
        c = self._classes(x)
        return self._value(((t == c) | (t == c - self.depth)).to(x.dtype))

    def ibp(self, b: Bounds) -> Bounds:
        lo, hi = torch.trunc(b.lower).unsqueeze(self.dim), torch.trunc(b.upper).unsqueeze(self.dim)
        c = self._classes(b.lower)
        inside = lambda v: (lo <= v) & (v <= hi)
        may = (inside(c) | inside(c - self.depth)).to(b.lower.dtype)
        must = ((lo == hi) & ((lo == c) | (lo == c - self.depth))).to(b.lower.dtype)
        low, high = self._value(must), self._value(may)
        return Bounds(torch.minimum(low, high), torch.maximum(low, high))

    def _reach(self, *errors):
        d = errors[0].gt(0).unsqueeze(self.dim)
        return d.expand(*d.shape[:self.dim], self.depth, *d.shape[self.dim + 1:])

    @property
    def jump(self) -> float:
        return abs(self.on - self.off)


class Equal(Step):
    """``x == y`` as 1.0 / 0.0 (broadcasting): of two perturbed inputs, or of one and the
    constant ``other`` (per-sample shape, broadcastable)."""

    def __init__(self, other: Optional[Tensor] = None):
        self.other = other

    def _operands(self, xs) -> list:
        return _aligned(*xs) if self.other is None else [xs[0], self.other]

    def forward(self, *xs: Tensor) -> Tensor:
        x, y = self._operands(xs)
        return (x == y).to(xs[0].dtype)

    def ibp(self, *bs: Bounds) -> Bounds:
        if self.other is None:
            lx, ly = _aligned(bs[0].lower, bs[1].lower)
            ux, uy = _aligned(bs[0].upper, bs[1].upper)
        else:
            (lx, ux), ly, uy = bs[0], self.other, self.other
        disjoint = (ux < ly) | (uy < lx)
        same_point = (lx == ux) & (ly == uy) & (lx == ly)
        dtype = bs[0].lower.dtype
        return Bounds(same_point.to(dtype), (~disjoint).to(dtype))


def _aligned(x: Tensor, y: Tensor) -> list[Tensor]:
    """Two batched tensors (N, *shape_x), (N, *shape_y) of per-sample shapes that broadcast, with
    singleton dims inserted after N so that the per-sample shapes align from the right."""
    while x.dim() < y.dim():
        x = x.unsqueeze(1)
    while y.dim() < x.dim():
        y = y.unsqueeze(1)
    return [x, y]


class Trunc(Step):
    """Rounding toward zero (ONNX Cast of a float to an integer type): monotone, so the IBP is
    ``[trunc(l), trunc(u)]``. (N, *shape) -> (N, *shape)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.trunc(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(torch.trunc(b.lower), torch.trunc(b.upper))

    def float_gain(self, *errors, inputs=None):
        """|trunc(x + d) - trunc(x)| <= d + 1 for d > 0."""
        if inputs is not None:
            return super().float_gain(*errors, inputs=inputs)
        d = errors[0]
        return torch.where(d > 0, d + 1, torch.zeros_like(d))
