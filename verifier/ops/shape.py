"""Ops that only move entries: Rearrange (Reshape, Flatten, Squeeze, Unsqueeze, Transpose,
Slice, Gather with constant indices, Pad with a constant) and Concat.

Rearrange is defined by an index map found once at load time: output entry j (flat, per sample)
is input entry ``index[j]``, or the constant ``fill[j]`` where ``index[j] == in_numel``.
It is monotone, so IBP maps the bounds themselves; backward scatters A back to the inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import BackwardResult, Bounds, Op, contract, magnitude, map_A


class Rearrange(Op):
    def __init__(self, index: Tensor, in_shape: Sequence[int], out_shape: Sequence[int],
                 fill: Optional[Tensor] = None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.in_numel = int(torch.tensor(self.in_shape).prod()) if self.in_shape else 1
        self.index = index.long()
        self.fill = fill  # (out_numel,) constants at padded entries, zeros elsewhere; or None
        self.is_reshape = fill is None and bool(
            self.index.numel() == self.in_numel and torch.equal(self.index, torch.arange(self.in_numel)))

    def _gather(self, x: Tensor) -> Tensor:
        N = x.shape[0]
        if self.is_reshape:
            return x.reshape(N, *self.out_shape)
        flat = x.reshape(N, self.in_numel)
        if self.fill is not None:
            flat = torch.cat([flat, flat.new_zeros(N, 1)], dim=1)
        y = flat[:, self.index]
        if self.fill is not None:
            y = y + self.fill
        return y.reshape(N, *self.out_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self._gather(x)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(self._gather(b.lower), self._gather(b.upper))

    def backward(self, lA, uA, *_) -> BackwardResult:
        def scatter(A: Tensor) -> Tensor:
            N, S = A.shape[:2]
            if self.is_reshape:
                return A.reshape(N, S, *self.in_shape)
            flat = A.reshape(N, S, -1)
            width = self.in_numel + (1 if self.fill is not None else 0)
            out = flat.new_zeros(N, S, width).index_add(2, self.index, flat)
            return out[:, :, : self.in_numel].reshape(N, S, *self.in_shape)

        lA_in, uA_in = map_A(scatter, lA, uA)
        bias = [0.0, 0.0]
        if self.fill is not None:
            bias = [0.0 if A is None else contract(A.reshape(*A.shape[:2], -1), self.fill) for A in (lA, uA)]
        return BackwardResult([(lA_in, uA_in)], bias[0], bias[1])

    def cast(self, device, dtype):
        self.index = self.index.to(device)
        if self.fill is not None:
            self.fill = self.fill.to(device=device, dtype=dtype)
        return self

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP move entries (adding a constant to an exact zero): exact. A backward
        step adds the coefficients of entries read r > 1 times (index_add: gamma_r m_out) and
        sums ``A . fill`` over the node (gamma_{numel} |fill|); a reshape is exact."""
        out = self.float_gain(magnitude(inputs[0]))
        if not rounding.backward or self.is_reshape:
            return torch.zeros_like(out)
        reads = torch.bincount(self.index, minlength=self.in_numel + 1)[:self.in_numel]
        repeated = int(reads.max()) if reads.numel() else 0
        error = rounding.gamma(repeated) * out if repeated > 1 else torch.zeros_like(out)
        if self.fill is not None:
            error = error + rounding.gamma(out[0].numel()) * self.fill.abs().reshape(self.out_shape)
        return error

    def float_gain(self, error):
        N = error.shape[0]
        if self.is_reshape:
            return error.reshape(N, *self.out_shape)
        flat = torch.cat([error.reshape(N, self.in_numel), error.new_zeros(N, 1)], dim=1)
        index = self.index if self.fill is not None else self.index.clamp(max=self.in_numel)
        return flat[:, index].reshape(N, *self.out_shape)


class Concat(Op):
    """Concatenation along per-sample ``axis`` of perturbed inputs and constants.
    ``parts`` lists, in order, either None (the next perturbed input) or a constant tensor of
    the per-sample shape of its slice."""

    def __init__(self, axis: int, parts: Sequence[Optional[Tensor]], sizes: Sequence[int]):
        self.axis, self.parts, self.sizes = axis, list(parts), list(sizes)

    def _assemble(self, xs: Sequence[Tensor]) -> Tensor:
        it = iter(xs)
        N = xs[0].shape[0]
        pieces = [next(it) if p is None else p.unsqueeze(0).expand(N, *p.shape) for p in self.parts]
        return torch.cat(pieces, dim=self.axis + 1)

    def forward(self, *xs: Tensor) -> Tensor:
        return self._assemble(xs)

    def ibp(self, *bs: Bounds) -> Bounds:
        return Bounds(self._assemble([b.lower for b in bs]), self._assemble([b.upper for b in bs]))

    def backward(self, lA, uA, *_) -> BackwardResult:
        dim = self.axis + 2
        l_pieces = None if lA is None else lA.split(self.sizes, dim=dim)
        u_pieces = None if uA is None else uA.split(self.sizes, dim=dim)
        inputs, lbias, ubias = [], 0.0, 0.0
        for i, part in enumerate(self.parts):
            lp = None if l_pieces is None else l_pieces[i]
            up = None if u_pieces is None else u_pieces[i]
            if part is None:
                inputs.append((lp, up))
            else:
                lbias = lbias if lp is None else lbias + contract(lp, part)
                ubias = ubias if up is None else ubias + contract(up, part)
        return BackwardResult(inputs, lbias, ubias)

    def cast(self, device, dtype):
        self.parts = [None if p is None else p.to(device=device, dtype=dtype) for p in self.parts]
        return self

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP copy: exact. A backward step sums ``A . part`` over each constant part:
        gamma_{numel + 4} |part| there, zero on the inputs' slices."""
        zeros = [torch.zeros_like(b.lower) for b in inputs]
        if not rounding.backward:
            return self._assemble(zeros) * 0
        N = zeros[0].shape[0] if zeros else 1
        it = iter(zeros)
        pieces = [next(it) if p is None else p.abs().unsqueeze(0).expand(N, *p.shape) for p in self.parts]
        out = torch.cat(pieces, dim=self.axis + 1)
        return rounding.gamma(out[0].numel() + 4) * out

    def float_gain(self, *errors):
        it = iter(errors)
        N = errors[0].shape[0]
        pieces = [next(it) if p is None else errors[0].new_zeros(N, *p.shape) for p in self.parts]
        return torch.cat(pieces, dim=self.axis + 1)
