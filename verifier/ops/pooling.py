"""MaxPool2d and its sound linear relaxation (AveragePool is linear: the loader builds it as a
depthwise Conv2d).

For one window with input bounds [l_i, u_i], let j = argmax_i l_i. Then ``y >= x_j`` always
(lower line). If ``l_j >= max_{i != j} u_i`` the window is decided and ``y = x_j`` (upper line
too); otherwise ``y <= max_i u_i`` (a constant upper line).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BackwardResult, Bounds, Op, magnitude


class MaxPool2d(Op):
    nonlinear = True

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

    def backward(self, lA, uA, b: Bounds) -> BackwardResult:
        C, H, W = self.in_shape
        lw, uw = self._windows(b.lower), self._windows(b.upper)
        best_lower, j = lw.max(dim=2)                                     # (N, C, L)
        others_upper = uw.scatter(2, j.unsqueeze(2), float("-inf")).amax(2)
        decided = best_lower >= others_upper
        max_upper = uw.amax(2)
        # flat input index of the chosen entry x_j: (N, C*L)
        pos = self.positions.to(j.device)[j, torch.arange(j.shape[2], device=j.device)]
        flat_index = (pos + torch.arange(C, device=j.device).view(1, C, 1) * (H * W)).reshape(j.shape[0], -1)
        const_upper = torch.where(decided, torch.zeros_like(max_upper), max_upper).reshape(j.shape[0], -1)
        upper_coef = decided.to(max_upper.dtype).reshape(j.shape[0], -1)

        def to_input(coef: Tensor) -> Tensor:
            N, S = coef.shape[:2]
            out = coef.new_zeros(N, S, C * H * W)
            out.scatter_add_(2, flat_index.unsqueeze(1).expand(N, S, -1), coef)
            return out.reshape(N, S, C, H, W)

        lA_in = uA_in = None
        lbias = ubias = 0.0
        if lA is not None:
            A = lA.reshape(*lA.shape[:2], -1)
            pos_part, neg_part = A.clamp(min=0), A.clamp(max=0)
            lA_in = to_input(pos_part + neg_part * upper_coef.unsqueeze(1))
            lbias = (neg_part * const_upper.unsqueeze(1)).sum(-1)
        if uA is not None:
            A = uA.reshape(*uA.shape[:2], -1)
            pos_part, neg_part = A.clamp(min=0), A.clamp(max=0)
            uA_in = to_input(neg_part + pos_part * upper_coef.unsqueeze(1))
            ubias = (pos_part * const_upper.unsqueeze(1)).sum(-1)
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)

    def cast(self, device, dtype):
        self.positions = self.positions.to(device)
        return self

    # ---- float soundness (issue 26; verifier/bounds/floating.py) -------------------------------
    def float_error(self, inputs, rounding):
        """Forward and IBP (a max) are exact. A backward step scatters each output's coefficient
        to one entry of its window (sums of at most K per input entry) and sums the constant
        upper lines (<= max m over the window) over the node: gamma_{numel + K} 2 maxpool(m)."""
        m = magnitude(inputs[0])
        if not rounding.backward:
            return torch.zeros_like(self.forward(m))
        window = self.kernel[0] * self.kernel[1]
        return 2 * rounding.gamma(m[0].numel() + window) * self.forward(m)

    def float_gain(self, error):
        return self.forward(error)   # |max x' - max x| <= max |x' - x|

    def float_coefficient_gain(self, magnitudes):
        """Each output's coefficient goes to one entry of its window: the transpose is the sum
        over the window (zero padding)."""
        N, C = magnitudes.shape[:2]
        p = self.padding
        cols = F.unfold(magnitudes.reshape(N * C, 1, *magnitudes.shape[2:]), self.kernel, dilation=self.dilation,
                        padding=p, stride=self.stride)                      # (N C, K, L)
        out = self.forward(magnitudes)
        return cols.sum(1).reshape(out.shape)
