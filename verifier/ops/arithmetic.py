"""Elementwise affine maps (Add/Sub/Mul/Div by constants, Neg, BatchNorm in eval mode) and the
sum of several perturbed branches (residual Add, Sub of two branches)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import BackwardResult, Bounds, Op, Param, contract, map_A


class ElementwiseAffine(Op):
    """``y = x * scale + shift``; scale, shift broadcastable to the per-sample shape.
    Exact: IBP takes the min/max of the two scaled ends, backward scales A."""

    def __init__(self, scale: Param, shift: Param):
        self.scale, self.shift = scale, shift

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale() + self.shift()

    def ibp(self, b: Bounds) -> Bounds:
        scale, shift = self.scale(), self.shift()
        lo, hi = b.lower * scale, b.upper * scale
        return Bounds(torch.minimum(lo, hi) + shift, torch.maximum(lo, hi) + shift)

    def backward(self, lA, uA, *_) -> BackwardResult:
        scale, shift = self.scale(), self.shift()
        lA_in, uA_in = map_A(lambda A: A * scale, lA, uA)
        lbias, ubias = map_A(lambda A: contract(A, shift), lA, uA)
        return BackwardResult([(lA_in, uA_in)], 0.0 if lbias is None else lbias,
                              0.0 if ubias is None else ubias)


class Sum(Op):
    """``y = sum_i sign_i * x_i`` of perturbed branches with the same per-sample shape."""

    def __init__(self, signs: tuple[float, ...]):
        self.signs = tuple(signs)

    def forward(self, *xs: Tensor) -> Tensor:
        return sum(s * x for s, x in zip(self.signs, xs))

    def ibp(self, *bs: Bounds) -> Bounds:
        lower = sum(b.lower if s > 0 else s * b.upper for s, b in zip(self.signs, bs))
        upper = sum(b.upper if s > 0 else s * b.lower for s, b in zip(self.signs, bs))
        return Bounds(lower, upper)

    def backward(self, lA, uA, *_) -> BackwardResult:
        parts = [map_A(lambda A, s=s: A if s == 1 else A * s, lA, uA) for s in self.signs]
        return BackwardResult(parts, 0.0, 0.0)
