"""Nonlinear elementwise ops and their linear relaxations.

ReLU (CROWN, Zhang et al. 2018): for an unstable neuron (l < 0 < u) the upper line is the chord
``u (x - l) / (u - l)``; the lower line is ``alpha * x`` for any alpha in [0, 1]. CROWN picks
alpha = 1 if u >= -l else 0 (the smaller-area choice); alpha-CROWN optimises it per spec.

Sigmoid and Tanh: S-shaped with a derivative that is even and unimodal. For any slope k the
extremes of ``g(x) = f(x) - k x`` on [l, u] lie at l, u or where ``f'(x) = k`` (two symmetric
points at most), so ``k x + min g`` and ``k x + max g`` are sound lower and upper lines for every
k. Each line's slope is f' at a tangent point, a free parameter in [l, u] (alpha-CROWN optimises
it); CROWN's default takes the chord's slope for both lines: the upper (lower) line is then the
chord where f is convex (concave), and its parallel tangent on the other side.
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
    """Shared relaxation of Sigmoid and Tanh; subclasses give f, f' and the inverse of f'.

    Each line is fitted to a slope (module docstring): the lower line ``k_l x + min g`` and the
    upper line ``k_u x + max g`` are sound for any slopes. A line's slope is a tangent slope:
    ``k = f'(d)`` for a tangent point d in [l, u], parametrised by where k lies among the slopes f'
    takes on [l, u], ``k = k_min + a (k_max - k_min)`` with ``k_min = min(f'(l), f'(u))``,
    ``k_max = f'(clamp(0, l, u))`` (f' is even and unimodal) and a in [0, 1], one per line (lower,
    upper). Where d lies in the line's sound range (anywhere on the convex part for the lower
    line, up to the point whose tangent meets (u, f(u)) in the mixed case, and symmetrically for
    the upper line), the fitted line *is* the tangent at d (CROWN's and alpha-CROWN's lines, Zhang
    et al. 2018, Xu et al. 2021); elsewhere it is the line of that slope moved to touch f at an
    end. So every a gives sound lines and the projection is a clamp. (Slopes outside
    [k_min, k_max] give lines dominated by one of these.)

    CROWN's default a: the chord's slope for both lines (the upper line is then the chord where
    f is convex, the lower one where f is concave, and each has its parallel tangent on the other
    side). alpha-CROWN optimises a per objective; its parameters are ``SCALE * a`` (N, 2, *shape)
    (``init_slopes``: lower line, then upper line), so that an Adam step of lr moves a by lr /
    SCALE: branch and bound steps slopes with lr 1.6, which suits a ReLU's [0, 1] slopes but
    jumps a from end to end (measured: the general split search then stalls on tanh nets).
    """

    nonlinear = True
    optimisable = True
    splittable = True
    inflection = 0.0   # branch and bound splits here first: each half is convex or concave
    max_slope = 1.0    # max f' over the reals (float soundness: the Lipschitz constant)
    SCALE = 16.0       # parameters per unit of a (a power of 2: scaling is exact)

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def tangent_points(self, k: Tensor) -> Tensor:
        """The x >= 0 with f'(x) = k, for 0 <= k <= max f' (k is clamped into that range; k = 0
        gives +inf)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(self.f(b.lower), self.f(b.upper))  # monotone increasing

    def slope_range(self, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """(k_min, k_max): the least and largest f' on [l, u], each broadcast of l, u."""
        return (torch.minimum(self.df(l), self.df(u)),
                self.df(torch.minimum(torch.maximum(torch.zeros_like(l), l), u)))

    def init_slopes(self, b: Bounds) -> Tensor:
        """CROWN's parameters, (N, 2, *shape): SCALE * a with k_min + a (k_max - k_min) the chord's
        slope (1/2 where the range is empty), the same for the lower and the upper line."""
        l, u = b.lower, b.upper
        width = u - l
        flat = ~(width > 0)
        chord = (self.f(u) - self.f(l)) / torch.where(flat, torch.ones_like(width), width)
        k_min, k_max = self.slope_range(l, u)
        spread = k_max - k_min
        a = ((chord - k_min) / torch.where(spread > 0, spread, torch.ones_like(spread))).clamp(0, 1)
        a = torch.where(flat | ~(spread > 0) | ~torch.isfinite(a), torch.full_like(a, 0.5), a)
        return self.SCALE * torch.stack([a, a], dim=1)

    def project_slopes(self, alpha: Tensor) -> None:
        alpha.clamp_(0, self.SCALE)

    def fitted_line(self, l: Tensor, u: Tensor, p: Tensor, upper: bool) -> tuple[Tensor, Tensor]:
        """(slope, intercept) of the sound line of parameter p (= SCALE * a) on [l, u]: all three
        broadcastable to one shape. Differentiable in p, l and u: the extreme of g = f - k x sits
        at a candidate whose position does not move g to first order (an end, or f'(x) = k), so
        the interior candidates are taken as constants."""
        k_min, k_max = self.slope_range(l, u)
        k = k_min + _clamp_keep_grad(p / self.SCALE, 0.0, 1.0) * (k_max - k_min)
        k = k.clamp(0, self.max_slope)
        k = torch.where(torch.isfinite(k), k, torch.zeros_like(k))   # any slope is sound
        x_star = self.tangent_points(k.detach())
        candidates = torch.stack(torch.broadcast_tensors(
            l, u, torch.minimum(torch.maximum(x_star, l), u), torch.minimum(torch.maximum(-x_star, l), u)))
        kx = k * candidates
        g = self.f(candidates) - kx
        # widen by a few ulps of the terms so that rounding in f and k*x cannot cut a sample off
        margin = 16 * torch.finfo(g.dtype).eps * (1 + g.abs().amax(0) + kx.abs().amax(0))
        inf = float("inf")
        if upper:   # NaN (infinite bounds) -> a useless but sound infinite intercept
            return k, (g + margin).nan_to_num(nan=inf, posinf=inf, neginf=-inf).amax(0)
        return k, (g - margin).nan_to_num(nan=-inf, posinf=inf, neginf=-inf).amin(0)

    def relaxation(self, b: Bounds, a: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lower_slope, lower_intercept, upper_slope, upper_intercept) for parameters ``a``
        ((N, 2, *shape) or per objective (N, S, 2, *shape); CROWN's without); each
        (N, *shape), or (N, S, *shape) with per-objective ``a``."""
        l, u = b.lower, b.upper
        a = self.init_slopes(b) if a is None else a
        which = a.dim() - l.dim()          # the (lower, upper) dim: 1, or 2 per objective
        if which == 2:
            l, u = l.unsqueeze(1), u.unsqueeze(1)
        return (*self.fitted_line(l, u, a.select(which, 0), upper=False),
                *self.fitted_line(l, u, a.select(which, 1), upper=True))

    def backward(self, lA, uA, b: Bounds, alpha_l: Optional[Tensor] = None,
                 alpha_u: Optional[Tensor] = None) -> BackwardResult:
        """lA, uA: (N, S, *shape); alpha_l, alpha_u: optional parameters (N, S, 2, *shape)
        or broadcastable, for the lA (resp. uA) side. A lower bound takes the lower line where
        A >= 0 and the upper line elsewhere; an upper bound the other way round."""
        default = None
        if (lA is not None and alpha_l is None) or (uA is not None and alpha_u is None):
            default = tuple(t.unsqueeze(1) for t in self.relaxation(b))
        lA_in = uA_in = None
        lbias = ubias = 0.0
        if lA is not None:
            ls, li, us, ui = default if alpha_l is None else self.relaxation(b, alpha_l)
            pos, neg = lA.clamp(min=0), lA.clamp(max=0)
            lA_in = pos * ls + neg * us     # pos and neg never both non-zero: the sum is exact
            lbias = contract(pos, li) + contract(neg, ui)
        if uA is not None:
            ls, li, us, ui = default if alpha_u is None else self.relaxation(b, alpha_u)
            pos, neg = uA.clamp(min=0), uA.clamp(max=0)
            uA_in = pos * us + neg * ls
            ubias = contract(pos, ui) + contract(neg, li)
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
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

    float_contractive = True   # slopes f'(d) clamped into [0, max_slope], max_slope <= 1


class Sigmoid(_SShaped):
    max_slope = 0.25   # sigmoid' <= 1/4

    def f(self, x):
        return torch.sigmoid(x)

    def df(self, x):
        return torch.sigmoid(x) * torch.sigmoid(-x)   # s (1 - s) without cancellation at large x

    def tangent_points(self, k):
        # s (1 - s) = k with s >= 1/2: 1 - s = 2k / (1 + sqrt(1 - 4k)) (no cancellation for small
        # k, so the point stays accurate far out: a point cut short there could miss g's extreme)
        k = k.clamp(0, 0.25)
        tail = 2 * k / (1 + torch.sqrt((1 - 4 * k).clamp(min=0)))
        return torch.log1p(-tail) - torch.log(tail)   # logit(1 - tail); +inf at k = 0


class Tanh(_SShaped):
    max_slope = 1.0

    def f(self, x):
        return torch.tanh(x)

    def df(self, x):
        c = torch.cosh(x)
        return 1 / (c * c)   # sech^2 without the cancellation of 1 - tanh^2

    def tangent_points(self, k):
        # 1 - t^2 = k: t = sqrt(1 - k), 1 - t = k / (1 + t), atanh(t) = log(1 + t) - log(k) / 2
        k = k.clamp(0, 1)
        t = torch.sqrt(1 - k)
        return torch.log1p(t) - 0.5 * torch.log(k)   # +inf at k = 0


def _clamp_keep_grad(a: Tensor, low: float, high: float) -> Tensor:
    """a clamped into [low, high] in value, with the gradient of the identity (a parameter on the
    boundary can still move inward)."""
    return a + (a.clamp(low, high) - a).detach()
