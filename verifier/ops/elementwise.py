"""Smooth elementwise functions: Exp, Log, Reciprocal, Sqrt, Pow (constant exponent), Sin, Cos.

Relaxations of the CROWN family (Zhang et al. 2018, "Efficient Neural Network Robustness
Certification with General Activation Functions"; Xu et al. 2020, auto_LiRPA): where f is convex
on the box the upper line is the chord and the lower line a tangent at ``t = l + alpha (u - l)``;
where f is concave, the other way round. alpha in [0, 1] is optimisable like ReLU's alpha
(alpha-CROWN); its default 0.5, the midpoint, is the tangent of least area for any convex f
(the area between f and the tangent at t has derivative ``f''(t) (t - m)`` in t, m = (l+u)/2).
Where f is neither on the box (Pow with an odd exponent across 0, Sin and Cos on a box holding an
inflection point) both lines take the chord's slope, the upper line touching f above, the lower
one below (as for Sigmoid in activation.py). Intercepts are always fitted (relax.fit_intercepts)
over the complete list of points where ``f - k x`` can peak, so the convexity masks decide only
the tightness of a line, never its soundness.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .base import Bounds, Op, magnitude
from .relax import (GROW, LIBM_ABSOLUTE, LIBM_ERROR, PERIODIC_EXACT_RANGE, TINY_FLOORS, Lines, Relaxed,
                    check_domain, chord_slope, finite, finite_slope, fit_intercepts, line_step_error, project,
                    relative_ends, tiny, widen)


class _Smooth(Relaxed, Op):
    """An elementwise f with f' and, per element of a box, whether f is convex or concave on it.
    Subclasses give ``f``, ``df``, ``shape(l, u) -> (convex, concave)`` masks and, where the masks
    can both be False, ``critical(k, l, u)``: every point of [l, u] where f'(x) = k."""

    optimisable = True
    splittable = True   # branch and bound may split the input anywhere (bab/general_split.py)
    curvature = 0.0   # bound on |f''| near computed critical points (see fit_intercepts)
    floor: Optional[float] = None   # a lower bound of f on its whole domain, if any

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def shape(self, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def critical(self, k: Tensor, l: Tensor, u: Tensor) -> list[Tensor]:
        return []

    def stationary(self, l: Tensor, u: Tensor) -> list[Tensor]:
        """Points of [l, u] where f may peak besides the ends (f' = 0); for IBP."""
        return []

    def check(self, b: Bounds) -> None:
        """Raise ModelValueError where the box leaves the domain."""

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)

    def ibp(self, b: Bounds) -> Bounds:
        self.check(b)
        values = torch.stack([self.f(x) for x in (b.lower, b.upper, *self.stationary(b.lower, b.upper))])
        low, high = widen(Bounds(values.amin(0), values.amax(0)))
        # the widening must not leave f's range: a Sqrt after a square needs a lower bound >= 0
        return Bounds(low.clamp(min=self.floor) if self.floor is not None else low, high)

    def default_alpha(self, b: Bounds) -> Tensor:
        return torch.full_like(b.lower, 0.5)

    def relaxation(self, b: Bounds, alpha: Optional[Tensor] = None) -> Lines:
        """Lines (N, *shape), or (N, S, *shape) for alpha (N, S, *shape) with b (N, 1, *shape)."""
        self.check(b)
        l, u = b.lower, b.upper
        if alpha is not None:
            l, u, alpha = torch.broadcast_tensors(l, u, project(alpha))
        t = l + (0.5 if alpha is None else alpha) * (u - l)
        chord = chord_slope(self.f, self.df, l, u)
        tangent = finite_slope(self.df(t))
        convex, concave = self.shape(l, u)
        lower_slope = torch.where(convex, tangent, chord)
        upper_slope = torch.where(concave, tangent, chord)
        ends = [l, u, t]
        lower_points = ends + self.critical(lower_slope, l, u)
        upper_points = ends + self.critical(upper_slope, l, u)
        lower_intercept = fit_intercepts(lower_points, [self.f(x) for x in lower_points], lower_slope,
                                         upper=False, curvature=self.curvature)
        upper_intercept = fit_intercepts(upper_points, [self.f(x) for x in upper_points], upper_slope,
                                         upper=True, curvature=self.curvature)
        return Lines(lower_slope, lower_intercept, upper_slope, upper_intercept)

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    lipschitz = math.inf      # max |f'| over f's whole domain (float_gain without input bounds)
    singular = False          # f' unbounded near 0 (a widened box reaching 0 has no finite gain)
    absolute_error = 0.0      # LIBM_ABSOLUTE for sin / cos: an absolute error in units of u

    def extra_relative_error(self, rounding) -> float:
        """Relative error beyond libm's (Pow: repeated multiplication)."""
        return 0.0

    def slope_bound(self, b: Bounds) -> Tensor:
        """Max |slope| of every line ``relaxation`` can use on the box (N, *shape): a tangent at
        a point of the box (|f'| at an end, moved out one ulp: |f'| is monotone on each side of 0
        for these f, and t may round an ulp past an end), or the chord as computed (on a tiny
        box the computed chord may be far from every f'(x): it is recomputed, the same way)."""
        ends = widen(b)
        tangent = torch.maximum(self.df(ends.lower).abs(), self.df(ends.upper).abs())
        return torch.maximum(tangent, chord_slope(self.f, self.df, b.lower, b.upper).abs())

    def float_error(self, inputs, rounding):
        """A runtime's f and our IBP's f at the ends: libm's error (relax.LIBM_ERROR u |f|, and
        Pow's multiplications) of results as large as max |f| over the box (the larger of
        ``float_error_ends``). A backward step:
        ``relax.line_step_error`` with the slope bound (``slope_bound``); the lines themselves
        carry fit_intercepts' margin against the rounding of f and k x. (N, *shape)."""
        b = inputs[0]
        if not rounding.backward:
            return torch.maximum(*self.float_error_ends(inputs, rounding))
        return line_step_error(rounding, magnitude(b), magnitude(self.ibp(b)), GROW * self.slope_bound(b))

    def float_error_ends(self, inputs, rounding) -> Optional[Bounds]:
        """``float_error`` of a forward or IBP step at each end of the IBP bounds (the libm error
        is relative: ``relax.relative_ends``); None for a backward step."""
        if rounding.backward:
            return None
        out = self.ibp(inputs[0])
        relative = LIBM_ERROR * rounding.unit + self.extra_relative_error(rounding)
        return relative_ends(out, relative, rounding.unit * self.absolute_error + TINY_FLOORS * tiny(out.lower))

    def float_gain(self, *errors, inputs=None):
        """|f(x + d) - f(x)| <= max |f'| over the box widened by d, times d; without ``inputs``
        (Bounds of x) the global Lipschitz constant (infinite for exp, log, 1/x, sqrt, pow)."""
        d = errors[0]
        if inputs is None:
            slope = torch.full_like(d, self.lipschitz)
        else:
            wide = Bounds(inputs[0].lower - d, inputs[0].upper + d)
            slope = torch.maximum(self.df(wide.lower).abs(), self.df(wide.upper).abs())
            slope = torch.minimum(slope, torch.full_like(slope, self.lipschitz))
            if self.singular:
                slope = torch.where((wide.lower <= 0) & (wide.upper >= 0), math.inf, slope)
        return torch.where(d == 0, torch.zeros_like(d), finite(GROW * slope * d))

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        """|A_in| <= |A| max |slope|: ``slope_bound`` with ``inputs``; without, no finite bound
        (a computed chord on a tiny box is not bounded by f')."""
        m = magnitudes[0]
        slope = torch.full_like(m, math.inf) if inputs is None else GROW * self.slope_bound(inputs[0])
        return torch.where(m == 0, torch.zeros_like(m), finite(slope * m))


def _everywhere(l: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(l, dtype=torch.bool), torch.zeros_like(l, dtype=torch.bool)


class Exp(_Smooth):
    """``exp(x)``: convex and increasing; lower tangent, upper chord."""

    floor = 0.0

    def f(self, x):
        return torch.exp(x)

    def df(self, x):
        return torch.exp(x)

    def shape(self, l, u):
        return _everywhere(l)


class Log(_Smooth):
    """``log(x)`` on x > 0: concave and increasing; upper tangent, lower chord."""

    singular = True

    def f(self, x):
        return torch.log(x)

    def df(self, x):
        return 1 / x

    def shape(self, l, u):
        return _everywhere(l)[::-1]

    def check(self, b):
        check_domain(b.lower <= 0, "Log", "input lower bound <= 0, outside the domain x > 0")


class Sqrt(_Smooth):
    """``sqrt(x)`` on x >= 0: concave and increasing; upper tangent, lower chord."""

    floor = 0.0
    singular = True

    def f(self, x):
        return torch.sqrt(x)

    def df(self, x):
        return 0.5 / torch.sqrt(x)

    def shape(self, l, u):
        return _everywhere(l)[::-1]

    def check(self, b):
        check_domain(b.lower < 0, "Sqrt", "input lower bound < 0, outside the domain x >= 0")


class Reciprocal(_Smooth):
    """``1 / x`` on x > 0 (convex) or x < 0 (concave), decreasing on each; no box may hold 0."""

    singular = True

    def f(self, x):
        return torch.reciprocal(x)

    def df(self, x):
        return -torch.reciprocal(x * x)

    def shape(self, l, u):
        return l > 0, u < 0

    def check(self, b):
        check_domain((b.lower <= 0) & (b.upper >= 0), "Reciprocal", "input interval contains 0")


class Pow(_Smooth):
    """``x ** exponent`` for a constant exponent.

    Integer exponents: 0 and 1 are affine; even ones are convex everywhere; odd ones >= 3 are
    concave on x <= 0 and convex on x >= 0, and on a box across 0 take chord-slope lines with
    the two critical points ``+-(k / p) ** (1 / (p - 1))``; negative ones are defined off 0
    (convex on x > 0; on x < 0 convex if even, concave if odd). Any other real exponent needs
    x >= 0 (x > 0 if negative): convex for p > 1 or p < 0, concave for 0 < p < 1."""

    def __init__(self, exponent: float):
        self.exponent = float(exponent)
        self.integer = self.exponent == round(self.exponent)
        even = self.integer and int(self.exponent) % 2 == 0
        self.floor = 0.0 if even or not self.integer else None   # x^p >= 0 (x >= 0 off integers)
        # float soundness: f' = p x^(p-1) is bounded near 0 only for p = 0 and p >= 1
        self.singular = self.exponent < 1 and self.exponent != 0
        self.lipschitz = {0.0: 0.0, 1.0: 1.0}.get(self.exponent, math.inf)

    def extra_relative_error(self, rounding) -> float:
        """An integer power may be computed by |p| - 1 multiplications (and a division): onnxruntime
        and torch compute x^3 as x * x * x (measured 1.97 u |y|)."""
        p = abs(self.exponent)
        return rounding.gamma(int(p) + 2) if self.integer and p >= 2 else 0.0

    def describe(self) -> str:
        return f"Pow({self.exponent:g})"

    def f(self, x):
        return torch.pow(x, self.exponent)

    def df(self, x):
        p = self.exponent
        if p == 0:
            return torch.zeros_like(x)
        return p * torch.pow(x, p - 1)

    def shape(self, l, u):
        p = self.exponent
        if self.integer and 0 <= p <= 1:
            return _everywhere(l)          # affine: both lines are the chord
        if self.integer and int(p) % 2 == 0:
            return _everywhere(l)
        if self.integer:                   # odd: convex on the positive side
            positive, negative = l >= 0, u <= 0
            return (positive, negative) if p > 0 else (l > 0, u < 0)
        convex = torch.full_like(l, p > 1 or p < 0, dtype=torch.bool)
        return convex, ~convex

    def critical(self, k, l, u):
        p = self.exponent
        if not (self.integer and p >= 3 and int(p) % 2 == 1):
            return []
        root = torch.pow((k / p).clamp(min=0), 1 / (p - 1))
        return [torch.maximum(torch.minimum(root, u), l), torch.maximum(torch.minimum(-root, u), l)]

    def stationary(self, l, u):
        return [torch.maximum(torch.minimum(torch.zeros_like(l), u), l)] if self.exponent > 0 else []

    def check(self, b):
        p = self.exponent
        name = self.describe()
        if p < 0 and self.integer:
            check_domain((b.lower <= 0) & (b.upper >= 0), name, "input interval contains 0")
        elif p < 0:
            check_domain(b.lower <= 0, name, "input lower bound <= 0, outside the domain x > 0")
        elif not self.integer:
            check_domain(b.lower < 0, name, "input lower bound < 0, outside the domain x >= 0")


class _Periodic(_Smooth):
    """Sin and Cos (period 2 pi, |f''| <= 1). On a box of width >= 2 pi the lines are the
    constants -1 and 1; otherwise convex where f'' = -f >= 0 over the box (f <= 0), concave
    where f >= 0, and chord-slope lines in between, with candidate points ``c + 2 pi n`` for the
    two solutions c of ``f'(c) = k`` and the three n that can land in a box narrower than 2 pi."""

    curvature = 1.0
    lipschitz = 1.0
    absolute_error = LIBM_ABSOLUTE

    def slope_bound(self, b):
        """|f'| <= 1, and the chord as computed (which rounding can push past 1 on a tiny box)."""
        return chord_slope(self.f, self.df, b.lower, b.upper).abs().clamp(min=1.0)

    def float_error_ends(self, inputs, rounding):
        """As for every libm function, but past ``relax.PERIODIC_EXACT_RANGE`` (float32 inputs
        are integers there; SLEEF documents any value of [-1, 1] past 1e28) any value: 2."""
        ends = super().float_error_ends(inputs, rounding)
        if ends is None:
            return None
        far = magnitude(inputs[0]) > PERIODIC_EXACT_RANGE
        return Bounds(*(torch.where(far, 2.0, e) for e in ends))

    def float_gain(self, *errors, inputs=None):
        return errors[0] * GROW   # 1-Lipschitz (|f'| is not monotone on a box: no tighter rule here)

    def base_points(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """The two solutions of f'(c) = k (|k| <= 1) in one period."""
        raise NotImplementedError

    def critical(self, k, l, u):
        points = []
        for c in self.base_points(k.clamp(-1, 1)):
            first = c + 2 * math.pi * torch.floor((l - c) / (2 * math.pi))
            for n in range(3):
                points.append(torch.maximum(torch.minimum(first + 2 * math.pi * n, u), l))
        return points

    def _wide(self, l: Tensor, u: Tensor) -> Tensor:
        return ~(u - l < 2 * math.pi)     # also catches infinite and NaN widths

    def range(self, l: Tensor, u: Tensor) -> Bounds:
        """min and max of f over [l, u]: the ends and the critical points of slope 0."""
        wide = self._wide(l, u)
        l_, u_ = torch.where(wide, torch.zeros_like(l), l), torch.where(wide, torch.zeros_like(u), u)
        values = torch.stack([self.f(x) for x in [l_, u_] + self.critical(torch.zeros_like(l), l_, u_)])
        low, high = widen(Bounds(values.amin(0), values.amax(0)))
        # a rounded critical point misses the peak by up to curvature * delta^2 / 2 (fit_intercepts)
        missed = self.curvature * (4 * torch.finfo(l.dtype).eps * torch.maximum(l_.abs(), u_.abs())) ** 2
        low, high = low - missed, high + missed
        return Bounds(torch.where(wide, -1.0, low.clamp(min=-1)), torch.where(wide, 1.0, high.clamp(max=1)))

    def ibp(self, b):
        return self.range(b.lower, b.upper)

    def shape(self, l, u):
        low, high = self.range(l, u)
        return high <= 0, low >= 0

    def relaxation(self, b, alpha=None):
        lines = super().relaxation(b, alpha)
        wide = self._wide(*torch.broadcast_tensors(b.lower, b.upper, lines.lower_slope)[:2])
        zero = torch.zeros_like(lines.lower_slope)
        return Lines(torch.where(wide, zero, lines.lower_slope), torch.where(wide, -1.0, lines.lower_intercept),
                     torch.where(wide, zero, lines.upper_slope), torch.where(wide, 1.0, lines.upper_intercept))


class Sin(_Periodic):
    """``sin(x)``; see _Periodic."""

    def f(self, x):
        return torch.sin(x)

    def df(self, x):
        return torch.cos(x)

    def base_points(self, k):
        c = torch.acos(k)
        return c, -c


class Cos(_Periodic):
    """``cos(x)``; see _Periodic."""

    def f(self, x):
        return torch.cos(x)

    def df(self, x):
        return -torch.sin(x)

    def base_points(self, k):
        c = torch.asin(-k)
        return c, math.pi - c
