"""Shared helpers of the tests of the non-linear ops (tests/test_ops_*.py): random boxes that
straddle every kink and period, samplers with the box corners, and the one tolerance.

Lines and IBP bounds are checked against the op's own forward in the op's dtype (float32 samples
against float32 outputs), with no slack: the relaxations widen themselves by a few ulps. A
bound pushed backward is summed over many terms in the op's dtype, so its check allows
``ROUNDING[dtype]`` times the sum of the magnitudes of the terms -- rounding only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from verifier.ops import Bounds

ROUNDING = {torch.float32: 64 * torch.finfo(torch.float32).eps, torch.float64: 64 * torch.finfo(torch.float64).eps}
SAMPLES = 10_000


def boxes(rng: torch.Generator, centres: Tensor, dtype: torch.dtype, n: int = 48) -> Bounds:
    """n boxes (1, n) of every width class -- degenerate, 1e-6, 1e-3, 0.1, 1, 10, 100 -- placed
    at random, and as many again around the given kinks ``centres`` (straddling them, or with an
    end on them)."""
    widths = torch.tensor([0.0, 1e-6, 1e-3, 0.1, 1.0, 3.0, 10.0, 100.0], dtype=torch.float64)
    width = widths[torch.randint(len(widths), (n,), generator=rng)] * (0.5 + torch.rand(n, generator=rng, dtype=torch.float64))
    width[: len(widths)] = widths
    free = 8 * torch.randn(n, generator=rng, dtype=torch.float64)
    kink = centres.double()[torch.randint(len(centres), (n,), generator=rng)]
    share = torch.rand(n, generator=rng, dtype=torch.float64)   # fraction of the box left of the kink
    share[::5], share[1::5] = 0.0, 1.0                           # an end exactly on the kink
    lower = torch.cat([free, kink - share * width])
    upper = torch.cat([free + width, kink + (1 - share) * width])
    return Bounds(lower.to(dtype).unsqueeze(0), upper.to(dtype).unsqueeze(0))


def restrict(b: Bounds, low: float = -math.inf, high: float = math.inf) -> Bounds:
    """The boxes clipped into [low, high] (for ops with a domain)."""
    lo, hi = b.lower.clamp(low, high), b.upper.clamp(low, high)
    return Bounds(lo, torch.maximum(lo, hi))


def sample(rng: torch.Generator, b: Bounds, count: int = SAMPLES) -> Tensor:
    """count points of the box (count, *box_shape): uniform, plus every box's two ends (for
    elementwise boxes the corners are the ends)."""
    t = torch.rand((count - 2,) + tuple(b.lower.shape), generator=rng, dtype=torch.float64)
    lo, hi = b.lower.double(), b.upper.double()
    inner = (lo + t * (hi - lo)).to(b.lower.dtype)
    inner = torch.minimum(torch.maximum(inner, b.lower), b.upper)
    return torch.cat([b.lower.unsqueeze(0), b.upper.unsqueeze(0), inner])


def below(value: Tensor, bound: Tensor) -> Tensor:
    """Number of samples where ``bound > value`` (a lower bound cut a sample off)."""
    return int((bound.double() > value.double()).sum())


def linear_gap(A_in: Tensor, bias: Tensor, A: Tensor, x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For samples x, fx (P, N, *shape) and a backward pass of A (N, S, *shape): the bound
    ``A_in . x + bias`` and the objective ``A . f(x)``, each (P, N, S) in float64, and the
    rounding slack allowed between them (P, N, S)."""
    xs, fs = x.double().unsqueeze(2), fx.double().unsqueeze(2)
    bound_terms = A_in.double().unsqueeze(0) * xs
    objective_terms = A.double().unsqueeze(0) * fs
    bound = bound_terms.flatten(3).sum(-1) + bias.double()
    objective = objective_terms.flatten(3).sum(-1)
    scale = bound_terms.abs().flatten(3).sum(-1) + objective_terms.abs().flatten(3).sum(-1) + bias.double().abs()
    return bound, objective, ROUNDING[x.dtype] * scale
