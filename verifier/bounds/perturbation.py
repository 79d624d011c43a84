"""Input sets other than boxes: an Lp ball around a point (p = 1 or 2), intersected with a box.

The passes see an ``LpBall`` as its enclosing box (``lower``, ``upper``: every relaxation built
from those bounds is sound on the ball, a subset). Only the last step of a backward pass, the
concretisation of ``A x + b``, uses the ball: by Hoelder's inequality
``min_{||x - c||_p <= eps} A x = A c - eps ||A||_q`` with ``1/p + 1/q = 1`` (auto_LiRPA's
PerturbationLpNorm does the same). The input set is the ball *and* the box, so the bound taken is
the better of the ball's and the box's, each sound on it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import Bounds


class LpBall(NamedTuple):
    """``{x : ||x - center||_p <= eps, lower <= x <= upper}``; lower, upper, center: (N, *shape)
    (lower, upper within center -+ eps); eps: (N,); p: 1.0 or 2.0."""

    lower: Tensor
    upper: Tensor
    center: Tensor
    eps: Tensor
    p: float

    @staticmethod
    def around(center: Tensor, eps: Tensor | float, p: float, lower: Optional[Tensor] = None,
               upper: Optional[Tensor] = None) -> "LpBall":
        """The ball of radius eps ((N,) or a number) around center (N, *shape), clipped to the
        box [lower, upper] where given."""
        if p not in (1.0, 2.0):
            raise ValueError(f"an Lp ball needs p = 1 or 2, got {p}")
        eps_t = torch.as_tensor(eps, dtype=center.dtype, device=center.device).expand(center.shape[0]).clone()
        radius = eps_t.reshape(-1, *([1] * (center.dim() - 1)))
        lo, hi = center - radius, center + radius
        if lower is not None:
            lo = torch.maximum(lo, lower)
        if upper is not None:
            hi = torch.minimum(hi, upper)
        return LpBall(lo, hi, center, eps_t, float(p))

    def take(self, index: Tensor) -> "LpBall":
        """Rows ``index`` (a long tensor or slice) of every field."""
        return LpBall(self.lower[index], self.upper[index], self.center[index], self.eps[index], self.p)


def take_rows(box: Bounds | LpBall, index) -> Bounds | LpBall:
    """Samples ``index`` of an input set (a box or a ball)."""
    if isinstance(box, LpBall):
        return box.take(index)
    return Bounds(box.lower[index], box.upper[index])


def ball_concretize(A: Tensor, ball: LpBall, sign: float) -> Tensor:
    """``min`` (sign -1) or ``max`` (sign +1) of ``A x`` over the ball alone: A (N, S, *shape) ->
    (N, S)."""
    flat = A.flatten(2)
    q = 2.0 if ball.p == 2.0 else float("inf")
    dual = flat.norm(p=q, dim=-1)                                          # (N, S)
    return (flat * ball.center.flatten(1).unsqueeze(1)).sum(-1) + sign * ball.eps.unsqueeze(1) * dual
