"""MaxPool2d and its sound linear relaxation (AveragePool is linear: the loader builds it as a
depthwise Conv2d).

For one window with input bounds [l_i, u_i]:

- lower line: ``y >= sum_i lambda_i x_i`` for any lambda in the simplex (the maximum is at least
  any convex combination of the entries). CROWN's choice is the entry j = argmax_i l_i; the
  weights are optimisable (alpha-CROWN), the window's entries sharing one simplex.
- upper line: ``y <= t x_k + c(t)`` with k = argmax_i u_i, M = max_{i != k} u_i and
  ``c(t) = max(max(u_k, M) - t u_k, max(l_k, M) - t l_k)``: max(x) <= max(x_k, M), and
  ``max(x_k, M) - t x_k`` is convex in x_k, so it peaks at an end of [l_k, u_k]; sound for any t.
  t = 0 is the constant ``max_i u_i`` (CROWN's choice here), t in [0, 1] is optimisable
  (the one-parameter family of planes through the window's roof used by alpha-beta-CROWN's
  max-pool relaxation, after PRIMA's observation that the constant is the loosest of them).
- a decided window (``l_j >= max_{i != j} u_i``): y = x_j exactly (t = 1, c = 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BackwardResult, Bounds, Op, magnitude


class MaxPool2d(Op):
    nonlinear = True
    optimisable = True   # the lower line's weights per window entry and the upper line's slope t

    def __init__(self, kernel, stride, padding, dilation, in_shape):
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.in_shape = tuple(in_shape)  # (C, H, W)
        C, H, W = self.in_shape
        # position of every window entry in the unpadded (H*W) plane, -1 on padding: (K, L)
        plane = torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W) + 1
        plane = F.pad(plane, (padding[1], padding[1], padding[0], padding[0]), value=0)
        cols = F.unfold(plane, kernel, dilation=dilation, stride=stride)[0]
        self.positions = (cols - 1).long()

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation)

    def ibp(self, b: Bounds) -> Bounds:
        return Bounds(self.forward(b.lower), self.forward(b.upper))

    def _windows(self, t: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, K, L) with -inf on padding."""
        N, C = t.shape[:2]
        p = self.padding
        padded = F.pad(t, (p[1], p[1], p[0], p[0]), value=float("-inf"))
        cols = F.unfold(padded.reshape(N * C, 1, *padded.shape[2:]), self.kernel,
                        dilation=self.dilation, stride=self.stride)
        return cols.reshape(N, C, cols.shape[1], cols.shape[2])

    def _window_lines(self, b: Bounds):
        """Per window (N, C, L) and entry (K): the default lower weights (one-hot at argmax l),
        the upper line's entry k (one-hot), whether the window is decided, the valid entries
        (not padding), and the inputs of c(t): u_k, l_k, M."""
        lw, uw = self._windows(b.lower), self._windows(b.upper)
        K = lw.shape[2]
        best_lower, j = lw.max(dim=2)                                      # (N, C, L)
        others_upper_j = uw.scatter(2, j.unsqueeze(2), float("-inf")).amax(2)
        decided = best_lower >= others_upper_j
        u_k, k = uw.max(dim=2)
        l_k = lw.gather(2, k.unsqueeze(2)).squeeze(2)
        others_upper_k = uw.scatter(2, k.unsqueeze(2), float("-inf")).amax(2)
        entries = torch.arange(K, device=lw.device).view(1, 1, K, 1)
        onehot_j = (entries == j.unsqueeze(2)).to(lw.dtype)
        onehot_k = (entries == k.unsqueeze(2)).to(lw.dtype)
        valid = torch.isfinite(uw)
        return onehot_j, onehot_k, decided, valid, u_k, l_k, others_upper_k

    def init_slopes(self, b: Bounds) -> Tensor:
        """(N, C, K + 1, L): CROWN's lower weights (one-hot at argmax l) and t = 0."""
        onehot_j = self._window_lines(b)[0]
        return torch.cat([onehot_j, torch.zeros_like(onehot_j[:, :, :1])], dim=2)

    def project_slopes(self, alpha: Tensor) -> None:
        alpha.clamp_(0, 1)   # lower weights are normalised per window in ``backward``

    def backward(self, lA, uA, b: Bounds, alpha_l: Optional[Tensor] = None, alpha_u: Optional[Tensor] = None
                 ) -> BackwardResult:
        """lA, uA: (N, S, C, H', W'); alpha_l, alpha_u: optional parameters, each
        (N, S, C, K + 1, L) or broadcastable, for the lA (resp. uA) side (``init_slopes``)."""
        onehot_j, onehot_k, decided, valid, u_k, l_k, M = self._window_lines(b)

        def lines(a: Optional[Tensor]):
            """(lower weights (N|1, S|1, C, K, L), t and c (N|1, S|1, C, L)) for parameters a."""
            dec = decided.unsqueeze(1)
            if a is None:
                weights, t = onehot_j.unsqueeze(1), torch.zeros_like(u_k).unsqueeze(1)
            else:
                raw = _clamp_keep_grad(a[:, :, :, :-1], 0.0, None) * valid.unsqueeze(1)
                total = raw.sum(3, keepdim=True)
                weights = torch.where(total > 0, raw / torch.where(total > 0, total, torch.ones_like(total)),
                                      onehot_j.unsqueeze(1))
                t = _clamp_keep_grad(a[:, :, :, -1], 0.0, 1.0)
            weights = torch.where(dec.unsqueeze(3), onehot_j.unsqueeze(1), weights)
            t = torch.where(dec, torch.ones_like(t), t)
            uk, lk, m = u_k.unsqueeze(1), l_k.unsqueeze(1), M.unsqueeze(1)
            c = torch.maximum(torch.maximum(uk, m) - t * uk, torch.maximum(lk, m) - t * lk)
            return weights, t, c

        def side(A: Tensor, a: Optional[Tensor], lower_side: bool):
            N, S = A.shape[:2]
            A = A.reshape(N, S, *u_k.shape[1:])                                     # (N, S, C, L)
            weights, t, c = lines(a)
            convex_part, roof_part = (A.clamp(min=0), A.clamp(max=0)) if lower_side else (A.clamp(max=0), A.clamp(min=0))
            coef = convex_part.unsqueeze(3) * weights + (roof_part * t).unsqueeze(3) * onehot_k.unsqueeze(1)
            bias = (roof_part * c).flatten(2).sum(-1)
            return self._to_input(coef), bias

        lA_in = uA_in = None
        lbias = ubias = 0.0
        if lA is not None:
            lA_in, lbias = side(lA, alpha_l, True)
        if uA is not None:
            uA_in, ubias = side(uA, alpha_u, False)
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)

    def _to_input(self, coef: Tensor) -> Tensor:
        """Window-entry coefficients (N, S, C, K, L) summed onto the input (N, S, C, H, W)."""
        C, H, W = self.in_shape
        N, S = coef.shape[:2]
        positions = self.positions.to(coef.device)                                  # (K, L)
        valid = positions >= 0
        index = positions.clamp(min=0).unsqueeze(0) + torch.arange(C, device=coef.device).view(C, 1, 1) * (H * W)
        coef = coef * valid.to(coef.dtype)
        out = coef.new_zeros(N, S, C * H * W)
        out.scatter_add_(2, index.reshape(1, 1, -1).expand(N, S, -1), coef.reshape(N, S, -1))
        return out.reshape(N, S, C, H, W)

    def cast(self, device, dtype):
        self.positions = self.positions.to(device)
        return self

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP (a max) are exact. A backward step scatters each output's coefficient
        to the K entries of its window (the lower line's weights, normalised by a division) and to
        the roof's entry k, and sums the roof's intercepts c(t) <= 2 max m over the node: twice
        the one-entry rule's gamma_{numel + K} 2 maxpool(m), with one more term per sum."""
        m = magnitude(inputs[0])
        if not rounding.backward:
            return torch.zeros_like(self.forward(m))
        window = self.kernel[0] * self.kernel[1]
        return 4 * rounding.gamma(m[0].numel() + window + 1) * self.forward(m)

    def float_gain(self, error):
        return self.forward(error)   # |max x' - max x| <= max |x' - x|

    def float_coefficient_gain(self, magnitudes):
        """Each output's coefficient |A| goes to its window's entries with weights summing to 1
        (lower line) plus t <= 1 on one entry (roof): at most twice the sum over the window
        (zero padding)."""
        N, C = magnitudes.shape[:2]
        p = self.padding
        cols = F.unfold(magnitudes.reshape(N * C, 1, *magnitudes.shape[2:]), self.kernel, dilation=self.dilation,
                        padding=p, stride=self.stride)                      # (N C, K, L)
        out = self.forward(magnitudes)
        return 2 * cols.sum(1).reshape(out.shape)

def _clamp_keep_grad(a: Tensor, low: float, high: Optional[float]) -> Tensor:
    """a clamped into [low, high] in value, with the gradient of the identity: parameters start
    on the boundary (one-hot weights, t = 0), where clamp's own gradient is zero."""
    return a + (a.clamp(low, high) - a).detach()
