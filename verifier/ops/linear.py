"""Affine ops with weights: Linear (Gemm, MatMul by a constant) and Conv2d.

Both bound by the exact rules of an affine map: IBP through centre and radius
(``W c + b``, ``|W| r``), backward by the transpose (``A W`` for Linear, transposed
convolution for Conv).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BackwardResult, Bounds, Op, Param, magnitude, map_A


class Linear(Op):
    """``y = x @ W^T + b`` on the last dim. W: (out, in), b: (out,) or None.
    Per-sample shapes ``(*pre, in) -> (*pre, out)``."""

    def __init__(self, weight: Param, bias: Optional[Param]):
        self.weight = weight
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias()
        return F.linear(x, self.weight(), b)

    def ibp(self, b: Bounds) -> Bounds:
        W = self.weight()
        center = F.linear((b.upper + b.lower) / 2, W, None if self.bias is None else self.bias())
        radius = F.linear((b.upper - b.lower) / 2, W.abs())
        return Bounds(center - radius, center + radius)

    def backward(self, lA, uA, *_) -> BackwardResult:
        W = self.weight()
        lA_in, uA_in = map_A(lambda A: A.matmul(W), lA, uA)
        lbias = ubias = 0.0
        if self.bias is not None:
            b = self.bias()
            lbias, ubias = map_A(lambda A: _sum_shape(A.matmul(b)), lA, uA)
        return BackwardResult([(lA_in, uA_in)], lbias if lA is not None else 0.0,
                              ubias if uA is not None else 0.0)

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP: dot products of length in (+ bias, centre and radius roundings);
        backward: ``A W`` sums ``out`` products per entry and ``A b`` all of the output's entries.
        (``_affine_error``; N, *out). A runtime that folds a BatchNorm into this layer rounds its
        bias from constants as large as ``constant_magnitude``."""
        m = magnitude(inputs[0])
        W = self.weight()
        rows = m[0].numel() // W.shape[1]   # entries of the leading per-sample dims
        return _affine_error(F.linear(m, W.abs()), None if self.bias is None else self.bias().abs(),
                             W.shape[1], W.shape[0], rows + W.shape[0], rounding)

    def float_gain(self, error):
        return F.linear(error, self.weight().abs())

    def identity_rows(self, rows: Tensor, N: int, in_shape: tuple[int, ...]):
        """Identity rows of a 1-D output are rows of W: rows (S,) shared or (N, S) per sample ->
        (A (N, S, in), bias (1 or N, S) or 0); None for a Linear on the last dim of a larger shape."""
        W = self.weight()
        if len(in_shape) != 1:
            return None
        A = W[rows] if rows.dim() == 2 else W[rows].unsqueeze(0).expand(N, len(rows), W.shape[1])
        bias = 0.0
        if self.bias is not None:
            b = self.bias()[rows]
            bias = b if rows.dim() == 2 else b.unsqueeze(0)
        return A, bias

    def bound_over_box(self, lA, uA, box: Bounds):
        """Bounds over the box of ``A (W x + b)`` without materialising ``A W`` (N, S, d) at once:
        formed a chunk of samples at a time and concretised at once, which is what the last step
        of every backward pass costs. lA, uA: (N, S, out) or None; box: (N, d) -> lb, ub (N, S)
        or None."""
        if box.lower.dim() != 2:
            return None
        W = self.weight()
        bias = self.bias() if self.bias is not None else None
        center = (box.upper + box.lower) / 2
        radius = (box.upper - box.lower) / 2

        def bound(A: Tensor, sign: float) -> Tensor:
            offset = 0.0 if bias is None else A.matmul(bias)
            if A.shape[0] > 1 and A.stride(0) == 0:
                A0W = A[0] @ W
                return center @ A0W.t() + sign * (radius @ A0W.abs().t()) + offset
            N, S = A.shape[:2]
            step = max(1, _CHUNK_ELEMENTS // max(1, S * W.shape[1]))
            out = torch.empty(N, S, dtype=A.dtype, device=A.device)
            for n in range(0, N, step):
                AW = A[n:n + step].matmul(W)                                   # (n_c, S, d)
                part = (AW * center[n:n + step].unsqueeze(1)).sum(-1)
                part += sign * AW.abs_().mul_(radius[n:n + step].unsqueeze(1)).sum(-1)
                out[n:n + step] = part
            return out + offset

        return (None if lA is None else bound(lA, -1.0)), (None if uA is None else bound(uA, 1.0))


# Elements of one chunk of ``A W`` in Linear.bound_over_box: small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 20


def _sum_shape(t: Tensor) -> Tensor:
    """(N, S, *rest) -> (N, S)."""
    return t.flatten(2).sum(-1) if t.dim() > 2 else t


class _WeightedMap(Op):
    """A convolution-like linear map ``apply(x, W, b)`` of constant weights: its forward and its
    IBP (centre through W, radius through |W|: exact for a linear map of a box)."""

    def apply(self, x: Tensor, W: Tensor, b: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.apply(x, self.weight(), None if self.bias is None else self.bias())

    def ibp(self, b: Bounds) -> Bounds:
        W = self.weight()
        center = self.apply((b.upper + b.lower) / 2, W, None if self.bias is None else self.bias())
        radius = self.apply((b.upper - b.lower) / 2, W.abs(), None)
        return Bounds(center - radius, center + radius)


class Conv2d(_WeightedMap):
    """2-D convolution, per-sample ``(C_in, H, W) -> (C_out, H_out, W_out)``."""

    def __init__(self, weight: Param, bias: Optional[Param], stride, padding, dilation, groups: int,
                 in_shape: tuple[int, ...]):
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape = tuple(in_shape)

    def apply(self, x: Tensor, W: Tensor, b: Optional[Tensor]) -> Tensor:
        return F.conv2d(x, W, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, lA, uA, *_) -> BackwardResult:
        W = self.weight()

        def transpose(A: Tensor) -> Tensor:
            N, S = A.shape[:2]
            out = A.reshape(N * S, *A.shape[2:])
            # output_padding recovers the input rows the strided convolution never reached
            pad = [(self.in_shape[1 + i] + 2 * self.padding[i] - self.dilation[i] * (W.shape[2 + i] - 1) - 1)
                   % self.stride[i] for i in range(2)]
            x = F.conv_transpose2d(out, W, None, self.stride, self.padding, tuple(pad), self.groups,
                                   self.dilation)
            return x.reshape(N, S, *x.shape[1:])

        lA_in, uA_in = map_A(transpose, lA, uA)
        lbias = ubias = 0.0
        if self.bias is not None:
            b = self.bias()
            lbias, ubias = map_A(lambda A: A.sum((-1, -2)).matmul(b), lA, uA)
        return BackwardResult([(lA_in, uA_in)], lbias if lA is not None else 0.0,
                              ubias if uA is not None else 0.0)

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """As ``Linear.float_error``: a forward entry sums C_in k_h k_w / groups products, a
        backward entry at most C_out k_h k_w (transposed convolution), the bias term every output
        entry (``_affine_error``). Assumes a direct or
        im2col + GEMM convolution (MLAS, oneDNN's default); a Winograd or FFT algorithm has a
        larger error, which this does not bound."""
        m = magnitude(inputs[0])
        W = self.weight()
        products = self.apply(m, W.abs(), None)
        bias = None if self.bias is None else self.bias().abs().view(-1, 1, 1)
        # an input entry of the transposed convolution sums at most C_out k_h k_w products; the
        # bias term sums A over the output positions, then over the channels
        return _affine_error(products, bias, W[0].numel(), W.shape[0] * W[0, 0].numel(),
                             products[0, 0].numel() + W.shape[0], rounding)

    def float_gain(self, error):
        return self.apply(error, self.weight().abs(), None)


def _affine_error(products: Tensor, bias: Optional[Tensor], fan_in: int, fan_out: int, bias_terms: int,
                  rounding) -> Tensor:
    """The error of a forward step (a runtime's: dot products of ``fan_in`` terms and the bias),
    or of our IBP (the same, centre and radius) and backward steps (``A W`` sums ``fan_out``
    products per entry, ``A . b`` ``bias_terms``): gamma_{fan + 4} |W| m + gamma_{terms + 4} |b|,
    plus, for a runtime, gamma_{fan_in + 8} 2 constant_magnitude (a BatchNorm folded into this
    layer). products (N, *out) = |W| m, bias |b| broadcastable to (*out) or None."""
    if not rounding.backward:
        error = rounding.gamma(fan_in + 4) * products
        size = (0.0 if bias is None else bias) + (2 * rounding.constant_magnitude if rounding.runtime else 0.0)
        return error + rounding.gamma(fan_in + 8) * size
    error = rounding.gamma(fan_out + 4) * products
    if bias is not None:
        error = error + rounding.gamma(bias_terms + fan_out + 4) * bias
    return error


class ConvTranspose2d(_WeightedMap):
    """Transposed 2-D convolution, per-sample ``(C_in, H, W) -> (C_out, H_out, W_out)``; weight
    (C_in, C_out / groups, kh, kw). Affine, so bounded exactly: IBP by centre and radius, backward
    by its adjoint, the convolution with the same weight (which maps (C_out, H_out, W_out) back to
    (C_in, H, W) because output_padding < stride)."""

    def __init__(self, weight: Param, bias: Optional[Param], stride, padding, output_padding, dilation,
                 groups: int):
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation, self.groups = dilation, groups

    def apply(self, x: Tensor, W: Tensor, b: Optional[Tensor]) -> Tensor:
        return F.conv_transpose2d(x, W, b, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)

    def backward(self, lA, uA, *_) -> BackwardResult:
        W = self.weight()

        def adjoint(A: Tensor) -> Tensor:
            N, S = A.shape[:2]
            x = F.conv2d(A.reshape(N * S, *A.shape[2:]), W, None, self.stride, self.padding, self.dilation,
                         self.groups)
            return x.reshape(N, S, *x.shape[1:])

        lA_in, uA_in = map_A(adjoint, lA, uA)
        lbias = ubias = 0.0
        if self.bias is not None:
            b = self.bias()
            lbias, ubias = map_A(lambda A: A.sum((-1, -2)).matmul(b), lA, uA)
        return BackwardResult([(lA_in, uA_in)], lbias if lA is not None else 0.0,
                              ubias if uA is not None else 0.0)


class AffineMap(Op):
    """Any affine map of the whole per-sample tensor, ``y = M vec(x) + c`` reshaped: M
    (out_numel, in_numel), c (out_numel,). Found by probing source operators that are linear but
    not a plain rearrangement (ReduceSum, ReduceMean, Resize with linear interpolation, ...).
    Exact, like Linear."""

    def __init__(self, matrix: Param, offset: Param, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.matrix, self.offset = matrix, offset
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(1), self.matrix(), self.offset()).reshape(x.shape[0], *self.out_shape)

    def ibp(self, b: Bounds) -> Bounds:
        M = self.matrix()
        center = F.linear(((b.upper + b.lower) / 2).flatten(1), M, self.offset())
        radius = F.linear(((b.upper - b.lower) / 2).flatten(1), M.abs())
        N = b.lower.shape[0]
        return Bounds((center - radius).reshape(N, *self.out_shape), (center + radius).reshape(N, *self.out_shape))

    def backward(self, lA, uA, *_) -> BackwardResult:
        M, c = self.matrix(), self.offset()

        def through(A: Tensor) -> Tensor:
            flat = A.reshape(*A.shape[:2], -1)
            return flat.matmul(M).reshape(*A.shape[:2], *self.in_shape)

        lA_in, uA_in = map_A(through, lA, uA)
        lbias, ubias = map_A(lambda A: A.reshape(*A.shape[:2], -1).matmul(c), lA, uA)
        return BackwardResult([(lA_in, uA_in)], 0.0 if lbias is None else lbias, 0.0 if ubias is None else ubias)
