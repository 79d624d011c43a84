"""Elementwise affine maps (Add/Sub/Mul/Div by constants, Neg, BatchNorm in eval mode) and the
sum of several perturbed branches (residual Add, Sub of two branches)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import BackwardResult, Bounds, Op, Param, contract, magnitude, map_A


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

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """IBP ``l s + t`` and a runtime's ``x s + t`` (or ``(x - mean) / std``, or a BatchNorm
        with a shift as large as ``constant_magnitude`` before cancellation, folded into the
        layer before or not): gamma_4 (|s| m + |t|) (+ gamma_8 2 constant_magnitude). A backward
        step: ``A s`` (u |s| m) and ``A . t`` summed over the node (gamma_{numel + 4} |t|)."""
        m = magnitude(inputs[0])
        scale, shift = self.scale().abs(), self.shift().abs()
        if not rounding.backward:
            constant = 2 * rounding.constant_magnitude if rounding.runtime else 0.0
            return rounding.gamma(4) * (scale * m + shift) + rounding.gamma(8) * constant
        return rounding.gamma(4) * scale * m + rounding.gamma(m[0].numel() + 4) * shift

    def float_gain(self, error):
        return error * self.scale().abs()


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

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """A sum of r signed terms in any order: gamma_{r + 1} sum |sign_i| m_i (the product by
        a sign other than +-1 rounds once); a backward step scales A exactly for signs +-1."""
        total = sum(abs(s) * magnitude(b) for s, b in zip(self.signs, inputs))
        return rounding.gamma(len(self.signs) + 1) * total

    def float_gain(self, *errors):
        return sum(abs(s) * e for s, e in zip(self.signs, errors))
