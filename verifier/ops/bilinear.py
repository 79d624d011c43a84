"""Products of two perturbed tensors: elementwise Mul and MatMul (attention scores and values).

McCormick's planes (as in Shi et al. 2020, "Robustness Verification for Transformers", and
auto_LiRPA's BoundMul, Xu et al. 2020): for x in [lx, ux], y in [ly, uy],

    x y >= ly x + lx y - lx ly,        x y >= uy x + ux y - ux uy,
    x y <= uy x + lx y - lx uy,        x y <= ly x + ux y - ux ly,

each exact at two corners of the box. Any convex combination of the two lower (upper) planes is a
lower (upper) plane too: ``alpha`` in [0, 1] weighs the first, per output element and per spec,
optimisable like ReLU's alpha. Its default is 0.5, the mean of the two planes: auto_LiRPA's
choice (1) gives 20-68% wider concretised MatMul bounds on random boxes of radius 1-3 and about
the same at radius 0.1 (benchmarks/relaxation_widths.py). A bound pushed backward
returns A for both inputs. A MatMul sums k such products per output, so its planes are the
sums of the planes of the products, computed as matrix products of the bounds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import UnsupportedOperatorError
from .base import BackwardResult, Bounds, Op, contract, magnitude
from .relax import (GROW, MARGIN_ULPS, TINY_FLOORS, broadcast_repeats, finite, product_step_error, project,
                    relative_ends, tiny, unbroadcast)

DEFAULT_ALPHA = 0.5


def _matmul_eps(t: Tensor) -> float:
    """Machine epsilon of a float32 matmul as torch runs it: TF32's 2^-10 on CUDA where allowed
    (torch.backends.cuda.matmul.allow_tf32 or float32 matmul precision below "highest")."""
    if t.dtype == torch.float32 and t.is_cuda and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return 2.0 ** -10
    return torch.finfo(t.dtype).eps


def _magnitude(b: Bounds) -> Tensor:
    return torch.maximum(b.lower.abs(), b.upper.abs())


def _sides(A: Optional[Tensor], alpha: Optional[Tensor], lower_side: bool):
    """Split A (N, S, *out) into the parts that take the first and second lower planes and the
    first and second upper planes, weighted by alpha (the lower side of a bound takes the
    lower planes where A >= 0)."""
    pos = A.clamp(min=0)
    neg = A - pos
    on_lower, on_upper = (pos, neg) if lower_side else (neg, pos)
    alpha = DEFAULT_ALPHA if alpha is None else project(alpha)
    return on_lower * alpha, on_lower * (1 - alpha), on_upper * alpha, on_upper * (1 - alpha)


class Mul(Op):
    """``x * y`` of two perturbed tensors (broadcasting). bx: (N, *x_shape), by: (N, *y_shape)."""

    nonlinear = True
    optimisable = True

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x * y

    def ibp(self, bx: Bounds, by: Bounds) -> Bounds:
        # a rounded product is monotone in the exact one, so the corners bound it exactly
        corners = torch.stack(torch.broadcast_tensors(bx.lower * by.lower, bx.lower * by.upper,
                                                      bx.upper * by.lower, bx.upper * by.upper))
        return Bounds(corners.amin(0), corners.amax(0))

    def default_alpha(self, bx: Bounds, by: Bounds) -> Tensor:
        return torch.full_like(bx.lower * by.lower, DEFAULT_ALPHA)

    def backward(self, lA, uA, bx: Bounds, by: Bounds, alpha_l=None, alpha_u=None) -> BackwardResult:
        """lA, uA: (N, S, *out_shape); alpha_l, alpha_u: (N, S, *out_shape) or broadcastable."""
        lx, ux, ly, uy = (t.unsqueeze(1) for t in (bx.lower, bx.upper, by.lower, by.upper))
        # the planes touch x*y at the corners, where the rounded product may sit an ulp away
        margin = (MARGIN_ULPS * torch.finfo(lx.dtype).eps) * (_magnitude(bx) * _magnitude(by)).unsqueeze(1)
        parts, biases = [], []
        for A, alpha, lower_side in ((lA, alpha_l, True), (uA, alpha_u, False)):
            if A is None:
                parts.append((None, None))
                biases.append(0.0)
                continue
            low1, low2, up1, up2 = _sides(A, alpha, lower_side)
            A_x = low1 * ly + low2 * uy + up1 * uy + up2 * ly
            A_y = low1 * lx + low2 * ux + up1 * lx + up2 * ux
            bias = -(low1 * (lx * ly) + low2 * (ux * uy) + up1 * (lx * uy) + up2 * (ux * ly))
            bias = bias + (-margin if lower_side else margin) * A.abs()
            parts.append((unbroadcast(A_x, bx.lower.shape[1:]), unbroadcast(A_y, by.lower.shape[1:])))
            biases.append(bias.flatten(2).sum(-1))
        (lA_x, lA_y), (uA_x, uA_y) = parts
        return BackwardResult([(lA_x, uA_x), (lA_y, uA_y)], biases[0], biases[1])

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """With P = max |x| max |y| (N, *out_shape): a runtime's product and our IBP's corners
        round once (u P, and the underflow floor). A backward step, per unit of |A|: the weights
        ``A alpha``, ``A (1 - alpha)`` sum to A (1 + theta), |theta| <= gamma_2, so the planes
        they weigh bound ``A x y`` up to gamma_2 P; the coefficients of x and y sum two rounded
        products (gamma_2 P each) and r broadcast entries (gamma_r); the bias terms (<= P (1 +
        the margin)) sum 5 products and then the node (gamma_{numel + 6})."""
        bx, by = inputs
        if not rounding.backward:
            return torch.maximum(*self.float_error_ends(inputs, rounding))
        P = magnitude(bx) * magnitude(by)
        r = broadcast_repeats(P[0].numel(), bx.lower[0].numel(), by.lower[0].numel())
        bias = 1 + rounding.gamma(2) + MARGIN_ULPS * torch.finfo(P.dtype).eps   # |bias term| / (|A| P)
        return product_step_error(rounding, P, 3 * rounding.gamma(2), r, 2, 6, bias)

    def float_error_ends(self, inputs, rounding) -> Optional[Bounds]:
        """Per end (``relax.relative_ends``): a product rounds relative to itself."""
        if rounding.backward:
            return None
        out = self.ibp(*inputs)
        return relative_ends(out, rounding.unit, TINY_FLOORS * tiny(out.lower))

    def float_gain(self, *errors, inputs=None):
        """|x' y' - x y| <= |y| d_x + |x| d_y + d_x d_y; without ``inputs`` no finite bound."""
        dx, dy = errors
        if inputs is None:
            return torch.where((dx == 0) & (dy == 0), 0.0, math.inf).to(dx.dtype)
        mx, my = magnitude(inputs[0]), magnitude(inputs[1])
        return finite(GROW * (my * dx + mx * dy + dx * dy))

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        """|A_x| <= |A| max |y|, |A_y| <= |A| max |x| (the planes' coefficients are bounds of the
        other factor)."""
        m_x, m_y = magnitudes
        if inputs is None:
            return torch.where((m_x == 0) & (m_y == 0), 0.0, math.inf).to(m_x.dtype)
        return finite(GROW * (magnitude(inputs[1]) * m_x + magnitude(inputs[0]) * m_y))


class MatMul(Op):
    """``x @ y`` of two perturbed tensors: x (N, *batch, m, k), y (N, *batch, k, n), the batch
    dims broadcasting as in torch.matmul; per-sample rank >= 2 for both."""

    nonlinear = True
    optimisable = True

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = self._aligned(x, y)
        return x @ y

    @staticmethod
    def _aligned(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Singleton dims after the leading N so that both have the same rank (torch.matmul
        would otherwise align N with a batch dim of the other)."""
        if x.dim() < 3 or y.dim() < 3:
            raise UnsupportedOperatorError("MatMul of two perturbed tensors needs both of per-sample rank >= 2")
        while x.dim() < y.dim():
            x = x.unsqueeze(1)
        while y.dim() < x.dim():
            y = y.unsqueeze(1)
        return x, y

    def ibp(self, bx: Bounds, by: Bounds) -> Bounds:
        # interval arithmetic on each product, summed: centre/radius form, then widened for the
        # rounding of the k-term sums (the forward's own sum rounds too)
        lx, ly = self._aligned(bx.lower, by.lower)
        ux, uy = self._aligned(bx.upper, by.upper)
        corners = torch.stack([lx.unsqueeze(-1) * ly.unsqueeze(-3), lx.unsqueeze(-1) * uy.unsqueeze(-3),
                               ux.unsqueeze(-1) * ly.unsqueeze(-3), ux.unsqueeze(-1) * uy.unsqueeze(-3)])
        lower, upper = corners.amin(0).sum(-2), corners.amax(0).sum(-2)     # (N, *batch, m, n)
        slack = self._margin(bx, by)
        return Bounds(lower - slack, upper + slack)

    def _margin(self, bx: Bounds, by: Bounds) -> Tensor:
        """Rounding of a k-term dot product in the forward and of our sums: (N, *batch, m, n)."""
        mx, my = self._aligned(_magnitude(bx), _magnitude(by))
        k = mx.shape[-1]
        return (MARGIN_ULPS * (k + 2) * _matmul_eps(mx)) * (mx @ my)

    def default_alpha(self, bx: Bounds, by: Bounds) -> Tensor:
        mx, my = self._aligned(bx.lower, by.lower)
        shape = torch.broadcast_shapes(mx.shape[:-2], my.shape[:-2]) + (mx.shape[-2], my.shape[-1])
        return torch.full(shape, DEFAULT_ALPHA, dtype=mx.dtype, device=mx.device)

    def backward(self, lA, uA, bx: Bounds, by: Bounds, alpha_l=None, alpha_u=None) -> BackwardResult:
        """lA, uA: (N, S, *batch, m, n); alpha_l, alpha_u: (N, S, *batch, m, n) or broadcastable.
        Returns A for x (N, S, *x_shape) and for y (N, S, *y_shape)."""
        lx, ly = self._aligned(bx.lower, by.lower)
        ux, uy = self._aligned(bx.upper, by.upper)
        lx, ux, ly, uy = (t.unsqueeze(1) for t in (lx, ux, ly, uy))
        margin = self._margin(bx, by).unsqueeze(1)
        T = lambda t: t.transpose(-1, -2)
        parts, biases = [], []
        for A, alpha, lower_side in ((lA, alpha_l, True), (uA, alpha_u, False)):
            if A is None:
                parts.append((None, None))
                biases.append(0.0)
                continue
            low1, low2, up1, up2 = _sides(A, alpha, lower_side)
            # plane coefficients per product (i, k, j): x_ik takes ly_kj (first lower, second
            # upper plane) or uy_kj; y_kj takes lx_ik (first planes) or ux_ik
            A_x = (low1 + up2) @ T(ly) + (low2 + up1) @ T(uy)
            A_y = T(lx) @ (low1 + up1) + T(ux) @ (low2 + up2)
            bias = -(low1 * (lx @ ly) + low2 * (ux @ uy) + up1 * (lx @ uy) + up2 * (ux @ ly))
            bias = bias + (-margin if lower_side else margin) * A.abs()
            parts.append((unbroadcast(A_x, bx.lower.shape[1:]), unbroadcast(A_y, by.lower.shape[1:])))
            biases.append(bias.flatten(2).sum(-1))
        (lA_x, lA_y), (uA_x, uA_y) = parts
        return BackwardResult([(lA_x, uA_x), (lA_y, uA_y)], biases[0], biases[1])

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def _products(self, mx: Tensor, my: Tensor) -> Tensor:
        """``mx @ my`` of non-negative bounds (N, *batch, m, n), in float64 (exact enough whatever
        torch's matmul precision), returned in the inputs' dtype (GROW covers that rounding)."""
        mx, my = self._aligned(mx, my)
        return (mx.double() @ my.double()).to(mx.dtype)

    def float_error(self, inputs, rounding):
        """With P = max|x| @ max|y| (N, *batch, m, n) and x (.., m, k), y (.., k, n): a runtime's
        dot products of length k, in any order, with or without FMA: gamma_k P (Higham, ch. 3);
        our IBP sums k rounded corner products and subtracts its margin: gamma_{k+2} P. A
        backward step, per unit of |A|: the weights' split (gamma_2 P, as for Mul), the
        coefficients of x (sums of n products, two matrix products added: gamma_{n+1} P) and of y
        (gamma_{m+1} P), each summed over r broadcast batch entries (gamma_r), the bias terms
        (``lx @ ly``: gamma_{k+4} with its 5 products) summed over the node (gamma_{numel+6})."""
        bx, by = inputs
        P = self._products(magnitude(bx), magnitude(by))
        floor = TINY_FLOORS * tiny(P)
        k = bx.lower.shape[-1]
        if rounding.runtime:
            return finite(GROW * rounding.gamma(k) * P + k * floor)
        if not rounding.backward:
            return finite(GROW * rounding.gamma(k + 2) * P + k * floor)
        m, n = bx.lower.shape[-2], by.lower.shape[-1]
        r = broadcast_repeats(P[0].numel(), bx.lower[0].numel() // k * n, by.lower[0].numel() // k * m)
        bias = 1 + rounding.gamma(k + 4) + MARGIN_ULPS * (k + 2) * _matmul_eps(P)   # |bias term| / (|A| P)
        coefficient = rounding.gamma(2) + rounding.gamma(n + 1) + rounding.gamma(m + 1) + rounding.gamma(k + 4)
        return product_step_error(rounding, P, coefficient, r, 2, 6, bias, floors=(k + 1) * TINY_FLOORS)

    def float_gain(self, *errors, inputs=None):
        """|x' @ y' - x @ y| <= |x| @ d_y + d_x @ |y| + d_x @ d_y (entrywise); without ``inputs``
        no finite bound."""
        dx, dy = errors
        if inputs is None:
            reach = self._products(dx.ne(0).to(dx.dtype), torch.ones_like(dy)) \
                + self._products(torch.ones_like(dx), dy.ne(0).to(dy.dtype))
            return torch.where(reach == 0, 0.0, math.inf).to(dx.dtype)
        mx, my = magnitude(inputs[0]), magnitude(inputs[1])
        return finite(GROW * (self._products(mx, dy) + self._products(dx, my) + self._products(dx, dy)))

    def float_coefficient_gain(self, *magnitudes, inputs=None):
        """A_x = A @ (bounds of y)^T, A_y = (bounds of x)^T @ A: |A_x| . m_x + |A_y| . m_y <=
        |A| . (m_x @ |y| + |x| @ m_y)."""
        m_x, m_y = magnitudes
        if inputs is None:
            return self.float_gain(m_x, m_y)
        return finite(GROW * (self._products(m_x, magnitude(inputs[1])) + self._products(magnitude(inputs[0]), m_y)))
