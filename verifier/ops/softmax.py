"""Softmax along one dim, with tight IBP and a linear relaxation composed from exp and 1/t.

IBP (Shi et al. 2020, "Robustness Verification for Transformers"): softmax_i is increasing in
x_i and decreasing in every other x_j, so on a box

    lower_i = exp(l_i) / (exp(l_i) + sum_{j != i} exp(u_j)),   upper_i likewise with l <-> u,

computed stably as ``exp(l_i - logsumexp(l_i, u_{j != i}))``.

Linear relaxation: ``s_i = 1 / t_i`` with ``t_i = sum_j exp(x_j - x_i)``. Each ``exp(d_ij)``,
``d_ij = x_j - x_i`` in ``[l_j - u_i, u_j - l_i]``, lies between its tangent (below) and chord
(above) lines (CROWN, Zhang et al. 2018; verifier/ops/elementwise.py Exp), so
``L_i(x) <= t_i <= U_i(x)`` with L, U linear in x. 1/t is decreasing and convex on t > 0:
below it the tangent at t0, ``(2 t0 - t) / t0^2``, is decreasing in t, so
``s_i >= (2 t0 - U_i(x)) / t0^2``; above it, on ``t in [tl, tu]`` (IBP bounds of t), the chord
``(tl + tu - t) / (tl tu)``, so ``s_i <= (tl + tu - L_i(x)) / (tl tu)``. We take t0 = tu and the
tangents of exp at the lower ends of d: at the corner ``x_i = l_i, x_j = u_j`` (``x_i = u_i,
x_j = l_j``) the lower (upper) line then equals IBP's bound, its extreme over the box, so each
line is nowhere looser than IBP's constant; on random boxes and random A the pair is 1-38%
tighter than IBP (benchmarks/relaxation_widths.py). Where a line overflows,
or is looser at the box's centre after rounding, IBP's constant replaces it.

The lines are computed in float64 and widened for the rounding of the op's dtype: the cast of
their coefficients and the float forward's own error (an ``exp`` of ``x_i - max x`` and a sum
of K terms, relative ``eps (K + 2 + max u - l_i)``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UnsupportedOperatorError
from .base import BackwardResult, Bounds, Op
from .elementwise import Exp

_EXP = Exp()


class Softmax(Op):
    """``softmax(x, dim)``; ``dim`` is a dim of the batched tensor (N, *shape), as for
    torch.softmax, and not the batch dim 0."""

    nonlinear = True

    def __init__(self, dim: int):
        self.dim = int(dim)

    def describe(self) -> str:
        return f"Softmax(dim={self.dim})"

    def _axis(self, x: Tensor) -> int:
        axis = self.dim % x.dim()
        if axis == 0:
            raise UnsupportedOperatorError("Softmax over the batch dim 0 is not supported")
        return axis

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x, self.dim)

    def _relative_error(self, l: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
        """Bound on the relative error of the float forward at any x of the box: (..., K)."""
        K = l.shape[-1]
        spread = u.amax(-1, keepdim=True) - l
        return 4 * torch.finfo(dtype).eps * (K + 2 + spread)

    def _ibp64(self, l: Tensor, u: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """l, u: (..., K) float64. Returns the bounds of s and of t = 1 / s, all (..., K)."""
        eye = torch.eye(l.shape[-1], dtype=torch.bool, device=l.device)
        rows_low = torch.where(eye, l.unsqueeze(-2), u.unsqueeze(-2))     # row i: l_i, u_{j != i}
        rows_high = torch.where(eye, u.unsqueeze(-2), l.unsqueeze(-2))
        log_t_high = torch.logsumexp(rows_low, -1) - l                   # log of the largest t_i
        log_t_low = torch.logsumexp(rows_high, -1) - u
        rel = self._relative_error(l, u, dtype)
        tiny = torch.finfo(dtype).tiny
        lowest, highest = torch.exp(-log_t_high), torch.exp(-log_t_low)
        # an output that underflows to 0 is 0 in the forward too (rel may be infinite there)
        lower = torch.where(lowest == 0, 0.0, lowest * (1 - rel)).clamp(min=0)
        upper = (torch.where(highest == 0, 0.0, highest * (1 + rel)) + tiny).clamp(max=1)
        return lower, upper, torch.exp(log_t_low), torch.exp(log_t_high)

    def ibp(self, b: Bounds) -> Bounds:
        axis = self._axis(b.lower)
        l, u = (t.movedim(axis, -1).double() for t in b)
        lower, upper, _, _ = self._ibp64(l, u, b.lower.dtype)
        return Bounds(_outward(lower, b.lower.dtype, -1).clamp(min=0).movedim(-1, axis),
                      _outward(upper, b.lower.dtype, 1).clamp(max=1).movedim(-1, axis))

    def relaxation(self, b: Bounds) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Lines along the softmax dim, moved last: ``lower_w . x + lower_c <= s <= upper_w . x +
        upper_c`` with w (N, *other, K_out, K_in) and c (N, *other, K_out), in b's dtype;
        ``*other`` are the dims of (N, *shape) but the softmax dim, in order."""
        dtype = b.lower.dtype
        axis = self._axis(b.lower)
        l, u = (t.movedim(axis, -1).double() for t in b)
        K = l.shape[-1]
        s_low, s_high, t_low, t_high = self._ibp64(l, u, dtype)
        eye = torch.eye(K, dtype=torch.bool, device=l.device)
        # exp(d_ij), d_ij = x_j - x_i in [l_j - u_i, u_j - l_i]; d_ii = 0 exactly
        d = Bounds(l.unsqueeze(-2) - u.unsqueeze(-1), u.unsqueeze(-2) - l.unsqueeze(-1))
        d = Bounds(torch.where(eye, 0.0, d.lower), torch.where(eye, 0.0, d.upper))
        # a masked input (upper bound -inf, e.g. an attention mask) adds exp(-inf) = 0 to every t_i
        masked = (u == float("-inf")).unsqueeze(-2) & ~eye
        d = Bounds(torch.where(masked, 0.0, d.lower), torch.where(masked, 0.0, d.upper))
        e = _EXP.relaxation(d, torch.zeros_like(d.lower))   # tangents at the lower ends of d
        zero, one = torch.zeros_like(d.lower), torch.ones_like(d.lower)
        constant = torch.where(eye, one, zero)
        below_slope, below_int = torch.where(eye | masked, zero, e.lower_slope), torch.where(eye | masked, constant, e.lower_intercept)
        above_slope, above_int = torch.where(eye | masked, zero, e.upper_slope), torch.where(eye | masked, constant, e.upper_intercept)
        magnitude = torch.maximum(l.abs(), u.abs())                        # (..., K)
        t0 = t_high
        # s_i >= (2 t0 - U_i(x)) / t0^2, U_i(x) = sum_j above_ij (x_j - x_i) + above_int_ij
        lower_w, lower_c, lower_mag = _compose(above_slope, above_int, magnitude, -1 / t0 ** 2, 2 / t0)
        # s_i <= (tl + tu - L_i(x)) / (tl tu)
        scale = 1 / (t_low * t_high)
        upper_w, upper_c, upper_mag = _compose(below_slope, below_int, magnitude, -scale, (t_low + t_high) * scale)
        rel = self._relative_error(l, u, dtype)
        ulps = (K + 8) * torch.finfo(dtype).eps
        tiny = torch.finfo(dtype).tiny
        lower_c = lower_c - ulps * lower_mag - rel * s_high - tiny
        upper_c = upper_c + ulps * upper_mag + rel * s_high + tiny
        centre = torch.where(u == float("-inf"), 0.0, (l + u) / 2)   # masked inputs have w = 0
        lower_w, lower_c = _or_constant(lower_w, lower_c, centre, s_low, keep_larger=True)
        upper_w, upper_c = _or_constant(upper_w, upper_c, centre, s_high, keep_larger=False)
        return (lower_w.to(dtype), _outward(lower_c, dtype, -1), upper_w.to(dtype), _outward(upper_c, dtype, 1))

    def backward(self, lA, uA, b: Bounds) -> BackwardResult:
        """lA, uA: (N, S, *shape) -> A (N, S, *shape) on the input, biases (N, S)."""
        axis = self._axis(b.lower)
        lower_w, lower_c, upper_w, upper_c = (t.unsqueeze(1) for t in self.relaxation(b))
        lA_in = uA_in = None
        lbias = ubias = 0.0
        if lA is not None:
            lA_in, lbias = _through(lA, axis, (lower_w, lower_c), (upper_w, upper_c))
        if uA is not None:
            uA_in, ubias = _through(uA, axis, (upper_w, upper_c), (lower_w, lower_c))
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)


def _compose(slope: Tensor, intercept: Tensor, magnitude: Tensor, factor: Tensor, offset: Tensor):
    """``offset_i + factor_i * sum_j (slope_ij (x_j - x_i) + intercept_ij)`` as ``w . x + c``:
    w (..., K, K), c (..., K); and the sum of the magnitudes of its terms (..., K), for the
    rounding margin."""
    f = factor.unsqueeze(-1)
    w = f * slope - torch.diag_embed(f.squeeze(-1) * slope.sum(-1))
    c = offset + factor * intercept.sum(-1)
    spread = magnitude.unsqueeze(-2) + magnitude.unsqueeze(-1)
    terms = (torch.where(slope == 0, 0.0, slope.abs() * spread) + intercept.abs()).sum(-1)
    return w, c, offset.abs() + factor.abs() * terms


def _or_constant(w: Tensor, c: Tensor, centre: Tensor, constant: Tensor, keep_larger: bool):
    """Per output i, the line (w_i, c_i) or the constant line ``constant_i``: the constant where
    the line is not finite or is the looser one at the box's centre."""
    at_centre = (w * centre.unsqueeze(-2)).sum(-1) + c
    finite = torch.isfinite(c) & torch.isfinite(w).all(-1) & torch.isfinite(at_centre)
    better = at_centre > constant if keep_larger else at_centre < constant
    use_line = finite & better
    return (torch.where(use_line.unsqueeze(-1), w, torch.zeros_like(w)).nan_to_num(0.0),
            torch.where(use_line, c, constant))


def _outward(t: Tensor, dtype: torch.dtype, direction: int) -> Tensor:
    """float64 t in dtype, rounded one ulp further down (direction -1) or up (+1)."""
    cast = t.to(dtype)
    return torch.nextafter(cast, torch.full_like(cast, direction * float("inf")))


def _through(A: Tensor, axis: int, positive: tuple[Tensor, Tensor], negative: tuple[Tensor, Tensor]):
    """A (N, S, *shape) through lines chosen by the sign of A's entries: w (N, 1, *other, K, K),
    c (N, 1, *other, K). Returns A_in (N, S, *shape) and the bias (N, S)."""
    a = A.movedim(axis + 1, -1)
    pos = a.clamp(min=0)
    neg = a - pos
    a_in = (pos.unsqueeze(-2) @ positive[0]).squeeze(-2) + (neg.unsqueeze(-2) @ negative[0]).squeeze(-2)
    bias = (pos * positive[1] + neg * negative[1]).flatten(2).sum(-1)
    return a_in.movedim(-1, axis + 1), bias
