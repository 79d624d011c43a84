"""Piecewise functions: LeakyReLU, Clip (and Max / Min with a constant), Sign, Floor, and the
Max / Min of two perturbed tensors.

Relaxations of the CROWN family (Zhang et al. 2018; Xu et al. 2020, auto_LiRPA). A piecewise
linear f is convex or concave on a box holding one kink: the chord is one line, the other passes
through the kink with any slope between those of the two pieces -- ``alpha`` in [0, 1] picks it,
optimisable like ReLU's, and defaults to CROWN's smaller-area choice. On a box holding two kinks
(Clip) both lines take the chord's slope. For any slope the extremes of ``f - k x`` over [l, u]
lie at l, u or a kink, so the intercepts are fitted there (relax.fit_intercepts). The step
functions Sign and Floor get lines from their one-sided limits at the jumps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModelValueError
from .base import BackwardResult, Bounds, Op, contract, magnitude
from .relax import (GROW, TINY_FLOORS, Lines, Relaxed, broadcast_repeats, chord_slope, finite, finite_slope,
                    fit_intercepts, line_step_error, per_spec, product_step_error, project, relative_ends, tiny,
                    unbroadcast)


def _into(point: Tensor, l: Tensor, u: Tensor) -> Tensor:
    """point clamped into [l, u] (elementwise, tensors)."""
    return torch.maximum(torch.minimum(point, u), l)


def _fitted(f, points: list[Tensor], lower_slope: Tensor, upper_slope: Tensor) -> Lines:
    values = [f(x) for x in points]
    return Lines(lower_slope, fit_intercepts(points, values, lower_slope, upper=False),
                 upper_slope, fit_intercepts(points, values, upper_slope, upper=True))


def _prepare(b: Bounds, alpha: Optional[Tensor]):
    if alpha is None:
        return b.lower, b.upper, None
    return torch.broadcast_tensors(b.lower, b.upper, project(alpha))


# ---- float soundness (issue 26; verifier/bounds/floating.py) -----------------------------------
def _line_slopes(lines: Lines) -> Tensor:
    return torch.maximum(lines.lower_slope.abs(), lines.upper_slope.abs())


def _exact(inputs, rounding) -> Optional[Tensor]:
    """Zero error, (N, *shape), for a forward and IBP that are exact on floats (min, max,
    comparisons, floor, sign); None for a backward step (the caller's rule)."""
    return None if rounding.backward else torch.zeros_like(inputs[0].lower)


def _gain_of_slope(slope: float, d: Tensor) -> Tensor:
    return d * slope


def _coefficient_gain(op, m: Tensor, inputs, bound: float) -> Tensor:
    """|A_in| <= |A| max |slope|: ``bound`` for the slopes chosen by alpha, and the default
    lines' as computed (a chord) with ``inputs``; without them no finite bound."""
    if inputs is None:
        slope = torch.full_like(m, math.inf)
    else:
        slope = GROW * _line_slopes(op.relaxation(inputs[0])).clamp(min=bound)
    return torch.where(m == 0, torch.zeros_like(m), finite(slope * m))


class LeakyReLU(Relaxed, Op):
    """``x if x > 0 else slope * x``. Convex for slope <= 1 (lower line through 0 with a slope
    in [slope, 1]), concave for slope > 1 (the upper line), the chord on the other side."""

    optimisable = True
    splittable = True   # branch and bound may split the input (bab/general_split.py)
    inflection = 0.0    # at the kink first: each half is linear

    def __init__(self, slope: float = 0.01):
        self.slope = float(slope)

    def describe(self) -> str:
        return f"LeakyReLU({self.slope:g})"

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope)

    def ibp(self, b: Bounds) -> Bounds:
        # not monotone for a negative slope: the minimum is then at 0
        values = torch.stack([self.forward(x) for x in (b.lower, b.upper, _into(torch.zeros_like(b.lower), b.lower, b.upper))])
        return Bounds(values.amin(0), values.amax(0))

    def default_alpha(self, b: Bounds) -> Tensor:
        return (b.upper >= -b.lower).to(b.lower.dtype)

    def relaxation(self, b: Bounds, alpha: Optional[Tensor] = None) -> Lines:
        """Lines (N, *shape), or (N, S, *shape) for alpha (N, S, *shape) with b (N, 1, *shape)."""
        l, u, alpha = _prepare(b, alpha)
        if alpha is None:
            alpha = self.default_alpha(Bounds(l, u))
        a = self.slope
        unstable = (l < 0) & (u > 0)
        df = lambda x: torch.where(x > 0, 1.0, a).to(x.dtype)
        chord = torch.where(l >= 0, 1.0, torch.where(u <= 0, a, chord_slope(self.forward, df, l, u))).to(l.dtype)
        through_kink = a + alpha * (1 - a)
        convex = a <= 1
        lower_slope = torch.where(unstable & convex, through_kink, chord)
        upper_slope = torch.where(unstable & (not convex), through_kink, chord)
        return _fitted(self.forward, [l, u, _into(torch.zeros_like(l), l, u)], lower_slope, upper_slope)

    def float_error(self, inputs, rounding):
        """A runtime's and our forward round ``slope * x`` once (u |slope| m, and the underflow
        floor). A backward step: ``line_step_error`` with slopes between ``slope`` and 1 (alpha)
        or the chord as computed. (N, *shape)."""
        b = inputs[0]
        m = magnitude(b)
        if not rounding.backward:
            return torch.maximum(*self.float_error_ends(inputs, rounding))
        slopes = GROW * _line_slopes(self.relaxation(b)).clamp(min=max(1.0, abs(self.slope)))
        return line_step_error(rounding, m, magnitude(self.ibp(b)), slopes)

    def float_error_ends(self, inputs, rounding) -> Optional[Bounds]:
        """Per end (``relax.relative_ends``): ``slope * x`` rounds relative to itself."""
        if rounding.backward:
            return None
        out = self.ibp(inputs[0])
        return relative_ends(out, rounding.unit, TINY_FLOORS * tiny(out.lower))

    def float_gain(self, *errors, inputs=None):
        return _gain_of_slope(max(1.0, abs(self.slope)), errors[0])

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        return _coefficient_gain(self, magnitudes[0], inputs, max(1.0, abs(self.slope)))


class Clip(Relaxed, Op):
    """``min(max(x, low), high)`` with constants ``low <= high`` broadcastable to the
    per-sample shape; ``None`` is unbounded, so ``Clip(c, None)`` is Max with a constant and
    ``Clip(None, c)`` Min with one. Across ``low`` only it is convex (lower line through the kink),
    across ``high`` only concave (upper line through it); across both, chord-slope lines."""

    optimisable = True
    splittable = True   # branch and bound may split the input (bab/general_split.py)

    def __init__(self, low: Optional[Tensor | float] = None, high: Optional[Tensor | float] = None):
        self.low = torch.as_tensor(float("-inf") if low is None else low, dtype=torch.get_default_dtype())
        self.high = torch.as_tensor(float("inf") if high is None else high, dtype=torch.get_default_dtype())
        if bool((self.low > self.high).any()):
            raise ModelValueError("Clip: a lower limit exceeds its upper limit")

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, self.low), self.high)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(self.forward(b.lower), self.forward(b.upper))

    def _kinks(self, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        low, high = self.low.expand_as(l), self.high.expand_as(l)
        across_low, across_high = (l < low) & (u > low), (l < high) & (u > high)
        return low, high, across_low & ~across_high, across_high & ~across_low

    def default_alpha(self, b: Bounds) -> Tensor:
        l, u = b.lower, b.upper
        low, high, convex, concave = self._kinks(l, u)
        return torch.where(convex, (u - low >= low - l).to(l.dtype),
                           torch.where(concave, (high - l >= u - high).to(l.dtype), 0.5))

    def relaxation(self, b: Bounds, alpha: Optional[Tensor] = None) -> Lines:
        """Lines (N, *shape), or (N, S, *shape) for alpha (N, S, *shape) with b (N, 1, *shape)."""
        l, u, alpha = _prepare(b, alpha)
        if alpha is None:
            alpha = self.default_alpha(Bounds(l, u))
        low, high, convex, concave = self._kinks(l, u)
        inside = (l >= low) & (u <= high)
        flat = (u <= low) | (l >= high)
        df = lambda x: ((x > low) & (x < high)).to(x.dtype)
        chord = torch.where(inside, 1.0, torch.where(flat, 0.0, chord_slope(self.forward, df, l, u))).to(l.dtype)
        lower_slope = torch.where(convex, alpha, chord)
        upper_slope = torch.where(concave, alpha, chord)
        points = [l, u, _into(low, l, u), _into(high, l, u)]
        return _fitted(self.forward, points, lower_slope, upper_slope)

    def float_error(self, inputs, rounding):
        """Forward and IBP (min and max) are exact. A backward step: ``line_step_error`` with
        slopes in [0, 1] (alpha) or the chord as computed. (N, *shape)."""
        b = inputs[0]
        exact = _exact(inputs, rounding)
        if exact is not None:
            return exact
        slopes = GROW * _line_slopes(self.relaxation(b)).clamp(min=1.0)
        return line_step_error(rounding, magnitude(b), magnitude(self.ibp(b)), slopes)

    def float_gain(self, *errors, inputs=None):
        return _gain_of_slope(1.0, errors[0])   # 1-Lipschitz

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        return _coefficient_gain(self, magnitudes[0], inputs, 1.0)


class Sign(Relaxed, Op):
    """``sign(x)`` in {-1, 0, 1}. On [0, u] the lower line is x / u (above the constant 0), on
    [l, 0] the upper one x / -l. Across 0 the upper line passes through (0, 1) with slope
    ``alpha * 2 / -l`` (alpha = 1: through (l, -1)), the lower line through (0, -1) with slope
    ``alpha * 2 / u``; alpha is optimisable and defaults to 0, the constants -1 and 1, since a
    sloped line leaves [-1, 1] on the box and its concretised bound is then worse than IBP's."""

    optimisable = True

    def forward(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(torch.sign(b.lower), torch.sign(b.upper))

    def default_alpha(self, b: Bounds) -> Tensor:
        return torch.zeros_like(b.lower)

    def relaxation(self, b: Bounds, alpha: Optional[Tensor] = None) -> Lines:
        l, u, alpha = _prepare(b, alpha)
        zero = torch.zeros_like(l)
        alpha = zero if alpha is None else alpha
        across = (l < 0) & (u > 0)
        lower_slope = torch.where(across, alpha * 2 / u, torch.where((l == 0) & (u > 0), 1 / u, zero))
        upper_slope = torch.where(across, alpha * -2 / l, torch.where((u == 0) & (l < 0), -1 / l, zero))
        # sup / inf of sign(x) - k x: at the ends, at 0, or as x -> 0 from either side
        at_zero = _into(zero, l, u)
        v0 = torch.sign(at_zero)
        from_left = torch.where((l < 0) & (u >= 0), -1.0, v0).to(l.dtype)
        from_right = torch.where((u > 0) & (l <= 0), 1.0, v0).to(l.dtype)
        points = [l, u, at_zero, at_zero, at_zero]
        values = [torch.sign(l), torch.sign(u), v0, from_left, from_right]
        lower_slope, upper_slope = finite_slope(lower_slope), finite_slope(upper_slope)
        return Lines(lower_slope, fit_intercepts(points, values, lower_slope, upper=False),
                     upper_slope, fit_intercepts(points, values, upper_slope, upper=True))

    def _slope_bound(self, b: Bounds) -> Tensor:
        """The steepest slopes alpha can choose (alpha = 1), as computed: (N, *shape)."""
        return GROW * _line_slopes(self.relaxation(b, torch.ones_like(b.lower)))

    def float_error(self, inputs, rounding):
        """Forward and IBP are exact. A backward step: ``line_step_error`` with |f| <= 1 and the
        slopes of alpha = 1 (2 / u, 2 / -l across 0): steep lines on a box near 0 cost as much
        in rounding as they do in looseness. (N, *shape)."""
        b = inputs[0]
        exact = _exact(inputs, rounding)
        if exact is not None:
            return exact
        return line_step_error(rounding, magnitude(b), torch.ones_like(b.lower), self._slope_bound(b))

    def float_gain(self, *errors, inputs=None):
        """|sign(x + d) - sign(x)| <= 2 where the box widened by d reaches 0 (any d > 0 without
        ``inputs``), else 0: a step is not Lipschitz, so this is not homogeneous in d."""
        d = errors[0]
        reach = d > 0
        if inputs is not None:
            reach = reach & (inputs[0].lower - d <= 0) & (inputs[0].upper + d >= 0)
        return torch.where(reach, 2.0, 0.0).to(d.dtype)

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        m = magnitudes[0]
        slope = torch.full_like(m, math.inf) if inputs is None else self._slope_bound(inputs[0])
        return torch.where(m == 0, torch.zeros_like(m), finite(slope * m))


class Floor(Relaxed, Op):
    """``floor(x)``: constant on a box within one step; otherwise, per side, the constant
    ``floor(l)`` (``floor(u)``) or the line ``x - 1`` (``x``), whichever has the larger (smaller)
    mean over the box, since ``x - 1 < floor(x) <= x``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.floor(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(torch.floor(b.lower), torch.floor(b.upper))

    def relaxation(self, b: Bounds, alpha: Optional[Tensor] = None) -> Lines:
        l, u = b.lower, b.upper
        low, high = torch.floor(l), torch.floor(u)
        mid = (l + u) / 2
        diagonal_below = (mid - 1 > low) & (low < high)
        diagonal_above = (mid < high) & (low < high)
        one, zero = torch.ones_like(l), torch.zeros_like(l)
        return Lines(torch.where(diagonal_below, one, zero), torch.where(diagonal_below, -one, low),
                     torch.where(diagonal_above, one, zero), torch.where(diagonal_above, zero, high))

    def float_error(self, inputs, rounding):
        """Forward and IBP are exact (floor of a float is a float; ``x - 1 < floor(x) <= x``
        holds exactly). A backward step: ``line_step_error`` with slopes 0 or 1 and intercepts
        -1, 0, floor(l) or floor(u), at most max |floor| + 1. (N, *shape)."""
        b = inputs[0]
        exact = _exact(inputs, rounding)
        if exact is not None:
            return exact
        values = magnitude(self.ibp(b)) + 1
        return line_step_error(rounding, magnitude(b), values, torch.full_like(b.lower, GROW))

    def float_gain(self, *errors, inputs=None):
        """|floor(x + d) - floor(x)| <= d + 1 for d > 0 (a step: not homogeneous in d)."""
        d = errors[0]
        return torch.where(d > 0, d + 1, torch.zeros_like(d))

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        return magnitudes[0] * GROW   # slopes 0 or 1


class Maximum(Op):
    """``max(x, y)`` of two perturbed tensors (broadcasting), as ``y + relu(x - y)`` with
    ``x - y`` in ``[lx - uy, ux - ly]``: the ReLU lines of CROWN (slope alpha below, chord
    above), alpha optimisable. ``Minimum`` is ``x - relu(x - y)``."""

    nonlinear = True
    optimisable = True
    sign = 1.0

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.maximum(x, y)

    def ibp(self, bx: Bounds, by: Bounds) -> Bounds:
        return Bounds(self.forward(bx.lower, by.lower), self.forward(bx.upper, by.upper))

    @staticmethod
    def difference(bx: Bounds, by: Bounds) -> Bounds:
        """Bounds (N, *out_shape) of x - y."""
        return Bounds(bx.lower - by.upper, bx.upper - by.lower)

    def default_alpha(self, bx: Bounds, by: Bounds) -> Tensor:
        return _RELU.default_alpha(self.difference(bx, by))

    def _lines(self, d: Bounds, alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Coefficient of x and intercept of the lower and upper lines of the op, in terms of
        relu(d)'s lines; the coefficient of y is 1 minus that of x."""
        r = _RELU.relaxation(d, alpha)
        if self.sign > 0:    # y + relu(d)
            return r.lower_slope, r.lower_intercept, r.upper_slope, r.upper_intercept
        return 1 - r.upper_slope, -r.upper_intercept, 1 - r.lower_slope, -r.lower_intercept   # x - relu(d)

    def backward(self, lA, uA, bx: Bounds, by: Bounds, alpha_l=None, alpha_u=None) -> BackwardResult:
        """lA, uA: (N, S, *out_shape); bx, by: (N, *x_shape), (N, *y_shape); alpha_l, alpha_u:
        (N, S, *out_shape) or broadcastable. Returns A for x and for y."""
        d = self.difference(bx, by)
        parts, biases = [], []
        for A, alpha, lower_side in ((lA, alpha_l, True), (uA, alpha_u, False)):
            if A is None:
                parts.append((None, None))
                biases.append(0.0)
                continue
            if alpha is None:
                lx, li, ux, ui = (t.unsqueeze(1) for t in self._lines(d, None))
            else:
                lx, li, ux, ui = self._lines(per_spec(d), alpha)
            if not lower_side:
                lx, li, ux, ui = ux, ui, lx, li
            pos = A.clamp(min=0)
            neg = A - pos
            A_x = pos * lx + neg * ux
            parts.append((unbroadcast(A_x, bx.lower.shape[1:]), unbroadcast(A - A_x, by.lower.shape[1:])))
            biases.append(contract(pos, li) + contract(neg, ui))
        (lA_x, lA_y), (uA_x, uA_y) = parts
        return BackwardResult([(lA_x, uA_x), (lA_y, uA_y)], biases[0], biases[1])

    def float_error(self, inputs, rounding):
        """Forward and IBP (max / min of floats) are exact. A backward step, per unit of |A| on
        the output, with md = max |x| + max |y| and K >= the slopes of relu(d)'s lines (alpha in
        [0, 1], or the chord as computed): the computed bounds of d = x - y may miss the real ones
        by u md, and lines fitted on them (|slope| <= K, relu 1-Lipschitz) by (1 + K) u md beyond;
        the coefficients of x and y round (u K mx, u (1 + K) my) and are summed over r broadcast
        entries (gamma_r), the intercepts (<= (1 + K) md) over the node. (N, *out_shape)."""
        bx, by = inputs
        mx, my = torch.broadcast_tensors(magnitude(bx), magnitude(by))
        exact = _exact([Bounds(mx, my)], rounding)
        if exact is not None:
            return exact
        K = GROW * _line_slopes(_RELU.relaxation(self.difference(bx, by))).clamp(min=1.0)
        r = broadcast_repeats(mx[0].numel(), bx.lower[0].numel(), by.lower[0].numel())
        return product_step_error(rounding, (1 + K) * (mx + my), 3 * rounding.unit, r, 1, 2)

    def float_gain(self, *errors, inputs=None):
        dx, dy = errors
        return torch.maximum(dx, dy)   # |max(x', y') - max(x, y)| <= max(|x' - x|, |y' - y|)

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        """A_x = A k, A_y = A (1 - k) (Maximum) or the mirror (Minimum), k in [0, 1] up to the
        chord's rounding: |A_x| m_x + |A_y| m_y <= |A| K (m_x + m_y)."""
        mx, my = magnitudes
        K = GROW if inputs is None else GROW * _line_slopes(_RELU.relaxation(self.difference(*inputs))).clamp(min=1.0)
        return finite(K * (mx + my))


class Minimum(Maximum):
    __doc__ = Maximum.__doc__
    sign = -1.0

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.minimum(x, y)


_RELU = LeakyReLU(0.0)
