"""Shared machinery of the elementwise relaxations: lines fitted to a function on an interval,
and linear bounds pushed backward through such lines.

An elementwise relaxation is a pair of lines per neuron, ``ls x + li <= f(x) <= us x + ui`` for
every x in [l, u] (Zhang et al. 2018, CROWN; Xu et al. 2020, auto_LiRPA). We choose the slopes
(chord, tangent, ...) and then *fit* the intercepts: for a slope k the tightest sound intercepts
are ``min`` and ``max`` of ``g(x) = f(x) - k x`` over [l, u], attained at the ends, at points
where ``f'(x) = k`` or at kinks. Each op lists those candidate points; soundness then rests only
on the list being complete, never on the choice of slopes. The intercepts are widened by a few
ulps of the terms so that rounding in f and in ``k x`` cannot cut a sample off.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ModelValueError
from .base import BackwardResult, Bounds, contract

# ulps of the largest term by which fitted intercepts are widened (see _SShaped's margin)
MARGIN_ULPS = 16


class Lines(NamedTuple):
    """``lower_slope * x + lower_intercept <= f(x) <= upper_slope * x + upper_intercept`` on the
    box; each (N, *shape), or (N, S, *shape) when built from per-spec parameters."""

    lower_slope: Tensor
    lower_intercept: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor


def finite_slope(k: Tensor) -> Tensor:
    """Slopes that overflowed (an infinite derivative, a chord of huge values) become 0: any
    slope is sound once the intercept is fitted to it."""
    return torch.where(torch.isfinite(k), k, torch.zeros_like(k))


def fit_intercepts(points: Sequence[Tensor], values: Sequence[Tensor], slope: Tensor,
                   upper: bool, curvature: float = 0.0) -> Tensor:
    """The intercept of a sound lower (``upper=False``) or upper line of slope ``slope``, given
    every point where ``f(x) - slope * x`` can reach its extreme on the box (``points``, each
    inside the box) and f there (``values``). All tensors broadcast together to (..., *shape).

    ``curvature`` bounds |f''| near points that are computed (critical points of periodic
    functions): a point off by one rounding ``delta`` misses the extreme by ``curvature delta^2 / 2``.
    Non-finite results saturate at the largest finite float (sound wherever f itself is finite)."""
    x = torch.stack(torch.broadcast_tensors(*points))
    fx = torch.stack(torch.broadcast_tensors(*values))
    kx = slope * x
    g = fx - kx
    # each candidate's value is off by at most a few ulps of its own terms: widen it by those
    eps = torch.finfo(g.dtype).eps
    margin = MARGIN_ULPS * eps * (fx.abs() + kx.abs()).nan_to_num(nan=0.0, posinf=0.0) + torch.finfo(g.dtype).tiny
    if curvature:
        margin = margin + curvature * (4 * eps * x.abs()) ** 2
    big = torch.finfo(g.dtype).max
    if upper:
        return (g + margin).nan_to_num(nan=float("inf")).amax(0).clamp(-big, big)
    return (g - margin).nan_to_num(nan=float("-inf")).amin(0).clamp(-big, big)


def chord_slope(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor], l: Tensor, u: Tensor) -> Tensor:
    """``(f(u) - f(l)) / (u - l)``, and ``f'(l)`` on degenerate boxes (u == l)."""
    width = u - l
    flat = width <= 0
    chord = (f(u) - f(l)) / torch.where(flat, torch.ones_like(width), width)
    return finite_slope(torch.where(flat, df(l), chord))


def widen(b: Bounds) -> Bounds:
    """Interval bounds moved out by one ulp: IBP of a function evaluated at the ends, safe
    against a libm that is not exactly monotone."""
    return Bounds(torch.nextafter(b.lower, torch.full_like(b.lower, float("-inf"))),
                  torch.nextafter(b.upper, torch.full_like(b.upper, float("inf"))))


def check_domain(bad: Tensor, op: str, message: str) -> None:
    """One-line ModelValueError when any element of the box leaves the op's domain."""
    if bool(bad.any()):
        raise ModelValueError(f"{op}: {message} ({int(bad.sum())} of {bad.numel()} elements)")


def through_lines(lA: Optional[Tensor], uA: Optional[Tensor], lines_l: Lines, lines_u: Lines) -> BackwardResult:
    """Push ``lA, uA: (N, S, *shape)`` through per-neuron lines; a lower bound takes the lower
    line where an entry of A is >= 0 and the upper line elsewhere (CROWN, Zhang et al. 2018 eq. 5).
    ``lines_l`` serve the lA side, ``lines_u`` the uA side; each field (N, 1 or S, *shape).
    Returns A (N, S, *shape) and biases (N, S) for the op's one input."""
    lA_in = uA_in = None
    lbias = ubias = 0.0
    if lA is not None:
        pos = lA.clamp(min=0)
        neg = lA - pos
        lA_in = pos * lines_l.lower_slope + neg * lines_l.upper_slope
        lbias = contract(pos, lines_l.lower_intercept) + contract(neg, lines_l.upper_intercept)
    if uA is not None:
        pos = uA.clamp(min=0)
        neg = uA - pos
        uA_in = pos * lines_u.upper_slope + neg * lines_u.lower_slope
        ubias = contract(pos, lines_u.upper_intercept) + contract(neg, lines_u.lower_intercept)
    return BackwardResult([(lA_in, uA_in)], lbias, ubias)


def project(alpha: Tensor) -> Tensor:
    """alpha clamped into [0, 1] with the gradient of the identity: an optimiser starting from a
    default at 0 or 1 (a plain clamp has zero gradient there) can still move it inward."""
    return alpha + (alpha.clamp(0, 1) - alpha).detach()


def per_spec(b: Bounds) -> Bounds:
    """Bounds (N, *shape) -> (N, 1, *shape), to meet per-spec parameters (N, S, *shape)."""
    return Bounds(b.lower.unsqueeze(1), b.upper.unsqueeze(1))


def unsqueeze_lines(lines: Lines) -> Lines:
    return Lines(*(t.unsqueeze(1) for t in lines))


class Relaxed:
    """Mixin of an elementwise op with ``relaxation(bounds, alpha=None) -> Lines``; gives the
    backward pass. ``optimisable`` ops take ``alpha_l, alpha_u`` in [0, 1] (N, S, *shape) or
    broadcastable (the lA and uA sides, like ReLU's alpha) and give their CROWN default by
    ``default_alpha(bounds) -> (N, *shape)``; gradients flow from the bounds to alpha."""

    nonlinear = True
    optimisable = False

    def relaxation(self, b: Bounds, alpha: Optional[Tensor] = None) -> Lines:
        raise NotImplementedError

    def backward(self, lA: Optional[Tensor], uA: Optional[Tensor], b: Bounds,
                 alpha_l: Optional[Tensor] = None, alpha_u: Optional[Tensor] = None) -> BackwardResult:
        """lA, uA: (N, S, *shape); b: Bounds (N, *shape) of the input."""
        default = None
        if alpha_l is None or alpha_u is None:
            default = unsqueeze_lines(self.relaxation(b))
        lines_l = default if alpha_l is None else self.relaxation(per_spec(b), alpha_l)
        lines_u = default if alpha_u is None else self.relaxation(per_spec(b), alpha_u)
        return through_lines(lA, uA, lines_l, lines_u)


def unbroadcast(A: Tensor, shape: torch.Size) -> Tensor:
    """Sum A (N, S, *out_shape) over the dims an input of per-sample ``shape`` was broadcast
    along -> (N, S, *shape)."""
    extra = A.dim() - 2 - len(shape)
    if extra > 0:
        A = A.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(2 + i for i, n in enumerate(shape) if n == 1 and A.shape[2 + i] != 1)
    return A.sum(dim=dims, keepdim=True) if dims else A


# ---- float soundness (issue 26; the model and its proof: verifier/bounds/floating.py) ------------
# A libm-grade elementwise function (exp, log, sqrt, 1/x, pow, sin, cos) is taken to be within
# LIBM_ERROR u |f(x)| (+ LIBM_ABSOLUTE u for sin and cos, + TINY_FLOORS smallest normals for
# results that underflow or are flushed to zero) of the real value, u the unit roundoff: 8 ulps
# (an ulp of y is at most 2 u |y|). Sources: the glibc manual, "Known Maximum Errors in Math
# Functions" (sourceware.org/glibc/manual/2.39/html_node/Errors-in-Math-Functions.html: a few
# ulps, <= 2 for expf, logf, sinf, cosf, powf on x86_64); SLEEF's reference for the u10 functions
# that torch's CPU kernels call (1.0 ulp; sinf / cosf only for |x| <= 1e28, beyond which "an
# arbitrary value within [-1, 1] is returned": sin and cos therefore allow any value of [-1, 1]
# past PERIODIC_EXACT_RANGE); the CUDA C Programming Guide's table of single-precision functions
# (<= 4 ulps: powf; sqrtf and 1/x correctly rounded by default). Measured on 2 * 10^6 points per
# range (tests/test_float_nonlinear_ops.py states the figures): onnxruntime 1.32 (Eigen / MLAS)
# <= 3.8 u |y| (Log), torch 2.14 on CPU <= 1.6 u |y|; sin / cos <= 2.9 u |y| up to |x| = 1e7.
# Overflow is outside the model: a runtime value that overflows to inf lies outside every finite
# bound (our float32 bounds are then infinite too; float64 bounds of such a network are not).
LIBM_ERROR = 16.0
LIBM_ABSOLUTE = 4.0
PERIODIC_EXACT_RANGE = 2.0 ** 23   # |x| up to which sin / cos are trusted to LIBM_ERROR
TINY_FLOORS = 2.0
# Quantities that the rules bound by evaluating f, f' or products in floating point are taken
# a little larger than computed (1 + 2^-10 covers a few roundings at any u <= 2^-11).
GROW = 1.0 + 2.0 ** -10


def tiny(t: Tensor) -> float:
    """The smallest normal of float32 or of t's dtype, whichever is larger: the absolute error of a
    result that underflows, in a float32 runtime or in our arithmetic."""
    return max(torch.finfo(torch.float32).tiny, torch.finfo(t.dtype).tiny)


def finite(error: Tensor) -> Tensor:
    """An error bound with inf / nan turned into the largest finite float: an infinite slack
    reaches the bound as -inf / +inf (sound, useless), never as nan through ``0 * inf``."""
    big = torch.finfo(error.dtype).max
    return error.nan_to_num(nan=big, posinf=big).clamp(min=0, max=big)


def relative_ends(out: Bounds, relative: float | Tensor, absolute: float | Tensor) -> Bounds:
    """Errors at each end of ``out`` (forward / IBP) for a computation within ``relative |y| +
    absolute`` of every real value y: ``y - relative |y|`` is increasing in y (relative < 1), so
    the lowest runtime value is within ``relative |lower| + absolute`` of ``lower`` (likewise the
    highest), a much smaller widening of a small end than the symmetric ``float_error``."""
    return Bounds(finite(GROW * relative * out.lower.abs() + absolute),
                  finite(GROW * relative * out.upper.abs() + absolute))


def line_step_error(rounding, m: Tensor, values: Tensor, slopes: Tensor) -> Tensor:
    """Per unit of |A|, the error of one backward step through per-neuron lines (``through_lines``):
    ``A k`` rounds once (u K m; one of the two products is zero) and the intercepts, each at most
    ``F + K m`` (fitted at a point of the box, ``fit_intercepts``, its margin included by GROW),
    are summed over the node: gamma_{numel + 2}. m: max |x|, values F: max |f|, slopes K: max
    |slope| over every line the op can use on the box (any alpha); all (N, *shape)."""
    numel = m[0].numel()
    km = slopes * m
    return finite(GROW * (rounding.unit * km + rounding.gamma(numel + 2) * (values + km)) + TINY_FLOORS * tiny(m))


def broadcast_repeats(out_numel: int, *in_numels: int) -> int:
    """How many output entries one input entry reaches at most, when inputs of ``in_numels``
    entries broadcast to ``out_numel``: the terms a backward step sums into one coefficient."""
    return max(out_numel // max(1, n) for n in in_numels)


def product_step_error(rounding, scale: Tensor, coefficient: float, repeats: int, coefficient_sums: int,
                       node_terms: int, bias: float = 1.0, floors: float = TINY_FLOORS) -> Tensor:
    """Per unit of |A|, the error of one backward step through the planes of a two-input op
    (McCormick's for Mul and MatMul, relu(x - y)'s for Maximum), all in units of ``scale``
    (N, *out_shape), the largest term a plane contributes: ``coefficient`` for forming the
    coefficients, ``coefficient_sums`` sums over ``repeats`` broadcast entries (gamma_{r + 1}
    each), the bias terms (``bias`` times scale at most) summed over the node with
    ``node_terms`` more (gamma_{numel + node_terms}); plus ``floors`` underflow floors."""
    numel = scale[0].numel()
    error = scale * (coefficient + coefficient_sums * rounding.gamma(repeats + 1)
                     + rounding.gamma(numel + node_terms) * bias)
    return finite(GROW * error + floors * tiny(scale))
