"""Branching for general non-linearities (GenBaB: Shi et al., "Neural Network Verification with
Branch-and-Bound for General Nonlinearities", TACAS 2025).

A split neuron z of an elementwise op f (``Op.splittable``) on [l, u] becomes two subdomains
z <= p and z >= p. Each child's relaxation of f is rebuilt on its half, so what a split buys is
the gap between f's upper and lower lines that the halves no longer have. The lines of any
elementwise op are read from its own ``backward`` (one entry per sample, objective 1 on both
sides), so this module names no op:

    gap(l, u) = max over x in {l, u} of (U(x) - L(x)),  U, L the op's upper and lower lines
    score = sum over objectives of |A| * (gap(l, u) - max(gap(l, p), gap(p, u)))

with A the lower bound's coefficient on the op's output (``backward_bound``'s record): BaBSR's
weighting (|A| times the intercept a split removes) carried to general lines. ReLUs (split at
0 only) keep BaBSR's own score, |A^-| * (-l u / (u - l)).

The split point p: an op's inflection point where the interval contains it (``inflection``
attribute: 0 for sigmoid and tanh, each half then convex or concave; a ReLU splits at 0 only);
elsewhere, among the points at 1/4, 1/2 and 3/4 of the interval, the one whose worse child has
the smaller gap.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import Bounds
from ..ops.base import Op

# fractions of [l, u] tried as split points besides 0
_FRACTIONS = (0.5, 0.25, 0.75)


class ElementLines(NamedTuple):
    """Per-neuron lines ``lower_slope x + lower_intercept <= f(x) <= upper_slope x +
    upper_intercept`` on an interval; each (N, *shape)."""

    lower_slope: Tensor
    lower_intercept: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor


def element_lines(op: Op, b: Bounds) -> ElementLines:
    """The relaxation of an elementwise op on bounds b (N, *shape), read from ``op.backward``
    with every neuron as its own sample: objective +1 on both sides gives the lower line
    (lA side) and the upper line (uA side)."""
    shape = b.lower.shape
    flat = Bounds(b.lower.reshape(-1, 1), b.upper.reshape(-1, 1))                # (n, 1)
    ones = torch.ones(flat.lower.shape[0], 1, 1, dtype=b.lower.dtype, device=b.lower.device)
    with torch.no_grad():
        result = op.backward(ones, ones, flat)
    lA, uA = result.input_A[0]

    def per_neuron(t, default: Optional[Tensor] = None) -> Tensor:
        if t is None:
            return default
        t = torch.as_tensor(t, dtype=b.lower.dtype, device=b.lower.device)
        n = flat.lower.shape[0]
        return (t.expand(n) if t.dim() == 0 else t.reshape(n)).reshape(shape)

    zero = torch.zeros(shape, dtype=b.lower.dtype, device=b.lower.device)
    return ElementLines(per_neuron(lA, zero), per_neuron(result.lbias, zero),
                        per_neuron(uA, zero), per_neuron(result.ubias, zero))


def line_gap(op: Op, b: Bounds) -> Tensor:
    """The largest vertical distance between the op's upper and lower lines on [l, u]:
    (N, *shape), >= 0. Attained at an end point: the difference of two lines is affine."""
    lines = element_lines(op, b)
    slope = lines.upper_slope - lines.lower_slope
    intercept = lines.upper_intercept - lines.lower_intercept
    gap = torch.maximum(slope * b.lower + intercept, slope * b.upper + intercept)
    return torch.nan_to_num(gap, nan=float("inf"), posinf=float("inf")).clamp(min=0)


class SplitChoice(NamedTuple):
    """Per neuron: the split point (N, *shape) and the gap that split removes (N, *shape;
    -inf where the neuron cannot be split)."""

    point: Tensor
    gain: Tensor


def choose_points(op: Op, b: Bounds, min_width: float) -> SplitChoice:
    """The split point of every neuron of an elementwise op's input with bounds b (N, *shape),
    and the gap it removes. Neurons narrower than ``min_width`` (or unbounded) are not split."""
    l, u = b.lower, b.upper
    width = u - l
    splittable = (width > min_width) & torch.isfinite(width)
    if not op.splittable:                           # a ReLU: at 0, where it is unstable
        splittable = splittable & (l < 0) & (u > 0)
        point = torch.zeros_like(l)
        gain = torch.where(splittable, -l * u / torch.where(splittable, width, torch.ones_like(width)),
                           torch.full_like(l, -float("inf")))
        return SplitChoice(point, gain)
    safe_l = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
    safe_w = torch.where(splittable, width, torch.zeros_like(width))
    parent = line_gap(op, Bounds(safe_l, safe_l + safe_w))
    inflection = getattr(op, "inflection", None)
    candidates = [safe_l + f * safe_w for f in _FRACTIONS]
    if inflection is not None:
        candidates.insert(0, torch.full_like(l, inflection))
    stacked = torch.stack(candidates)                                           # (K, N, *shape)
    lo = safe_l.expand_as(stacked)
    hi = (safe_l + safe_w).expand_as(stacked)
    worse = torch.maximum(line_gap(op, Bounds(lo, stacked)), line_gap(op, Bounds(stacked, hi)))
    best_worse, which = worse[1 if inflection is not None else 0:].min(0)
    point = stacked[1 if inflection is not None else 0:].gather(0, which.unsqueeze(0)).squeeze(0)
    if inflection is not None:                 # each half convex or concave: split there
        straddles = (l < inflection) & (u > inflection)
        point = torch.where(straddles, stacked[0], point)
        best_worse = torch.where(straddles, worse[0], best_worse)
    gain = torch.where(splittable, parent - best_worse, torch.full_like(l, -float("inf")))
    return SplitChoice(point, gain)


def middle_points(b: Bounds, min_width: float) -> SplitChoice:
    """Split at the middle of each interval (N, *shape); the gain is the width (a product's
    McCormick gap is proportional to each factor's width), -inf below ``min_width``."""
    width = b.upper - b.lower
    splittable = (width > min_width) & torch.isfinite(width)
    point = torch.where(splittable, (b.lower + b.upper) / 2, torch.zeros_like(width))
    return SplitChoice(point, torch.where(splittable, width, torch.full_like(width, -float("inf"))))


def weighted_scores(choice: SplitChoice, coefficients: Optional[Tensor], relu: bool) -> Tensor:
    """Scores (N, numel) of splitting each neuron: the gap a split removes weighted by the
    lower bound's coefficients on the op's output (N, S, *shape), summed over objectives
    (|A| for general ops; |A^-| for a ReLU, whose lower line is exact where A >= 0 (BaBSR)).
    Without coefficients (the op did not reach the objective), the gain alone, scaled down so
    that weighted neurons go first. -inf where the neuron cannot be split."""
    gain = choice.gain.flatten(1)
    if coefficients is None:
        return torch.where(torch.isfinite(gain), 1e-6 * gain, gain)
    A = coefficients.flatten(2)
    weight = (A.clamp(max=0).abs() if relu else A.abs()).sum(1)
    # ties (e.g. A^- = 0 everywhere) broken by the unweighted gain
    return torch.where(torch.isfinite(gain), weight * gain.clamp(min=0) + 1e-6 * gain, gain)
