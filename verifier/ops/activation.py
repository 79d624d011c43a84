"""Nonlinear elementwise ops and their linear relaxations.

ReLU (CROWN, Zhang et al. 2018): for an unstable neuron (l < 0 < u) the upper line is the chord
``u (x - l) / (u - l)``; the lower line is ``alpha * x`` for any alpha in [0, 1]. CROWN picks
alpha = 1 if u >= -l else 0 (the smaller-area choice); alpha-CROWN optimises it per spec.

Sigmoid and Tanh: S-shaped with a derivative that is even and unimodal. For any slope k the
extremes of ``g(x) = f(x) - k x`` on [l, u] lie at l, u or where ``f'(x) = k`` (two symmetric
points at most), so ``k x + min g`` and ``k x + max g`` are sound lower and upper lines. We take
k as the chord slope: the upper (lower) line is then the chord where f is convex (concave), and
its parallel tangent on the other side -- the CROWN relaxation in the one-sided cases.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import BackwardResult, Bounds, Op, contract, magnitude


class ReLU(Op):
    nonlinear = True
    optimisable = True   # the lower slope of each unstable neuron, in [0, 1]
    branchable = True

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(torch.relu(b.lower), torch.relu(b.upper))

    @staticmethod
    def relaxation(b: Bounds) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (upper_slope, upper_intercept, default_lower_slope, unstable), each (N, *shape).
        Stable neurons get the exact slope (1 active, 0 inactive) on both sides."""
        l, u = b.lower, b.upper
        unstable = (l < 0) & (u > 0)
        active = l >= 0
        denom = torch.where(unstable, u - l, torch.ones_like(u))
        upper_slope = torch.where(unstable, u / denom, active.to(u.dtype))
        upper_intercept = torch.where(unstable, -l * upper_slope, torch.zeros_like(u))
        lower_slope = torch.where(unstable, (u >= -l).to(u.dtype), active.to(u.dtype))
        return upper_slope, upper_intercept, lower_slope, unstable

    def lines(self, b: Bounds) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.relaxation(b)

    def loose(self, b: Bounds) -> Tensor:
        return (b.lower < 0) & (b.upper > 0)

    def init_slopes(self, b: Bounds) -> Tensor:
        """CROWN's choice of lower slope: (N, *shape)."""
        return self.relaxation(b)[2]

    def backward(self, lA: Optional[Tensor], uA: Optional[Tensor], b: Bounds,
                 alpha_l: Optional[Tensor] = None, alpha_u: Optional[Tensor] = None,
                 lines: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None) -> BackwardResult:
        """lA, uA: (N, S, *shape); alpha_l, alpha_u: optional lower slopes of unstable neurons,
        (N, S, *shape) or broadcastable, used on the lA (resp. uA) side. ``lines``: this op's
        ``relaxation(b)`` computed once by a caller that bounds many times with the same ``b``."""
        upper_slope, upper_intercept, lower_slope, unstable = self.relaxation(b) if lines is None else lines
        up_s = upper_slope.unsqueeze(1)
        lA_in = uA_in = None
        lbias = ubias = 0.0
        if lA is not None:   # a lower bound takes the lower line where A >= 0, the upper one elsewhere
            lo = lower_slope.unsqueeze(1) if alpha_l is None else torch.where(
                unstable.unsqueeze(1), alpha_l, lower_slope.unsqueeze(1))
            lA_in, lbias = _through_lines(lA, lo, up_s, upper_intercept, intercept_on_negative=True)
        if uA is not None:
            lo = lower_slope.unsqueeze(1) if alpha_u is None else torch.where(
                unstable.unsqueeze(1), alpha_u, lower_slope.unsqueeze(1))
            uA_in, ubias = _through_lines(uA, up_s, lo, upper_intercept, intercept_on_negative=False)
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP are exact on floats (a runtime's too). A backward step, per unit of |A|:
        the coefficient ``A s1 + min(A, 0) (s2 - s1)`` has three roundings on slopes in [0, 1]
        (3 gamma_3 m over the input's values, |y| <= m); the computed upper line
        ``s = fl(u / fl(u - l))``, ``t = fl(-l s)`` may lie below the chord by gamma_3 m at the
        ends (the lower lines ``a y``, a in [0, 1], hold exactly); the intercepts t <= m summed
        over the k neurons unstable in a sample: gamma_{k + 2} m. (N, *shape)."""
        b = inputs[0]
        if not rounding.backward:
            return torch.zeros_like(b.lower)
        m = magnitude(b)
        unstable = ((b.lower < 0) & (b.upper > 0)).flatten(1).sum(1).max()
        return (4 * rounding.gamma(3) + rounding.gamma(int(unstable) + 2)) * m

    def float_gain(self, error):
        return error   # 1-Lipschitz; backward slopes lie in [0, 1]

    float_contractive = True   # backward slopes in [0, 1] (floating.PassSlack.step)


def _through_lines(A: Tensor, slope_nonneg: Tensor, slope_neg: Tensor, intercept: Tensor,
                   intercept_on_negative: bool) -> tuple[Tensor, Tensor]:
    """A (N, S, *shape) through per-neuron lines, the line chosen by the sign of each entry of A:
    coefficient ``A * slope`` (slopes broadcastable to A) and bias ``sum A * intercept`` over the
    entries of one sign (intercept (N, *shape): the upper line's, the only non-zero one). As
    ``A * slope_nonneg + min(A, 0) * (slope_neg - slope_nonneg)``: the elementwise passes over A
    are what ReLU backward costs, and this form takes the fewest.
    Returns (A_in (N, S, *shape), bias (N, S))."""
    negative = A.clamp(max=0)
    A_in = A * slope_nonneg
    A_in.addcmul_(negative, slope_neg - slope_nonneg)
    # sums of products rather than bmm: a batched matrix-vector product is 2-4x slower on CPU
    row = intercept.unsqueeze(1)                                     # (N, 1, *shape)
    bias = contract(negative, row)
    if not intercept_on_negative:
        bias = contract(A, row) - bias
    return A_in, bias


class _SShaped(Op):
    """Shared relaxation of Sigmoid and Tanh; subclasses give f and the inverse of f'."""

    nonlinear = True
    splittable = True
    inflection = 0.0   # branch and bound splits here first: each half is convex or concave

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def tangent_points(self, k: Tensor) -> Tensor:
        """The x >= 0 with f'(x) = k, for 0 < k <= max f' (k is clamped into that range)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(self.f(b.lower), self.f(b.upper))  # monotone increasing

    def relaxation(self, b: Bounds) -> tuple[Tensor, Tensor, Tensor]:
        """(slope, lower_intercept, upper_intercept), each (N, *shape)."""
        l, u = b.lower, b.upper
        fl, fu = self.f(l), self.f(u)
        width = u - l
        degenerate = width <= 1e-12
        chord = (fu - fl) / torch.where(degenerate, torch.ones_like(width), width)
        k = torch.where(degenerate, self.df(l), chord)
        x_star = self.tangent_points(k)
        candidates = torch.stack([l, u, x_star.clamp(l, u), (-x_star).clamp(l, u)])
        kx = k * candidates
        g = self.f(candidates) - kx
        # widen by a few ulps of the terms so that rounding in f and k*x cannot cut a sample off
        margin = 16 * torch.finfo(g.dtype).eps * (1 + g.abs().amax(0) + kx.abs().amax(0))
        return k, g.amin(0) - margin, g.amax(0) + margin

    def backward(self, lA, uA, b: Bounds) -> BackwardResult:
        k, lower_i, upper_i = self.relaxation(b)
        k1, lo1, up1 = k.unsqueeze(1), lower_i.unsqueeze(1), upper_i.unsqueeze(1)
        lA_in = uA_in = None
        lbias = ubias = 0.0
        if lA is not None:
            lA_in = lA * k1
            lbias = contract(lA.clamp(min=0), lo1) + contract(lA.clamp(max=0), up1)
        if uA is not None:
            uA_in = uA * k1
            ubias = contract(uA.clamp(min=0), up1) + contract(uA.clamp(max=0), lo1)
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    # max f' over the reals: the Lipschitz constant, and a bound on the chord slopes k
    max_slope = 1.0

    def float_error(self, inputs, rounding):
        """A runtime: ``function_error`` (its approximation of f; the input's error is
        ``float_gain``'s). Ours: IBP evaluates f by libm (a few ulps of |f| <= 1: 16 u, as the
        relaxation's own margin); a backward step rounds ``A k`` (u |k| m) and sums the
        intercepts (|intercept| <= 1 + |k| m) over the node: gamma_{numel + 4} (2 + 2 m).
        The lines themselves carry a margin of 16 ulps against rounding in f (``relaxation``)."""
        b = inputs[0]
        if rounding.runtime:
            return torch.full_like(b.lower, rounding.function_error)
        if not rounding.backward:
            return torch.full_like(b.lower, 16 * rounding.unit)
        return rounding.gamma(b.lower[0].numel() + 4) * (2 + 2 * magnitude(b))

    def float_gain(self, error):
        return self.max_slope * error

    float_contractive = True   # chord slopes in [0, max_slope], max_slope <= 1


class Sigmoid(_SShaped):
    def f(self, x):
        return torch.sigmoid(x)

    def df(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)

    def tangent_points(self, k):
        # s (1 - s) = k  =>  s = (1 + sqrt(1 - 4k)) / 2, x = logit(s) >= 0
        k = k.clamp(1e-12, 0.25)
        s = (1 + torch.sqrt((1 - 4 * k).clamp(min=0))) / 2
        return torch.logit(s.clamp(max=1 - 1e-7 if s.dtype == torch.float32 else 1 - 1e-15))

    max_slope = 0.25   # float soundness: sigmoid' <= 1/4


class Tanh(_SShaped):
    def f(self, x):
        return torch.tanh(x)

    def df(self, x):
        return 1 - torch.tanh(x) ** 2

    def tangent_points(self, k):
        # 1 - t^2 = k  =>  t = sqrt(1 - k), x = atanh(t) >= 0
        t = torch.sqrt((1 - k.clamp(1e-12, 1.0)).clamp(min=0))
        return torch.atanh(t.clamp(max=1 - 1e-7 if t.dtype == torch.float32 else 1 - 1e-15))
