"""What every bound op provides, and the small types the bound passes exchange.

Shapes: every tensor that flows between nodes is batched, ``(N, *shape)`` with ``shape`` the
node's per-sample shape. A linear bound on a node is a pair of coefficient tensors
``lA, uA: (N, S, *shape)`` (``S`` = number of objectives, e.g. spec rows) meaning
``lA·x + lbias <= objective <= uA·x + ubias`` for every x the node can take.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class Bounds(NamedTuple):
    """Elementwise interval ``lower <= x <= upper``; both ``(N, *shape)``."""

    lower: Tensor
    upper: Tensor


# The result of propagating (lA, uA) backward through an op: one (lA, uA) pair per perturbed
# input (None where the op has no dependence on it), and the bias terms (N, S) it produced.
class BackwardResult(NamedTuple):
    input_A: list[tuple[Optional[Tensor], Optional[Tensor]]]
    lbias: Tensor | float
    ubias: Tensor | float


Param = Callable[[], Tensor]
"""A parameter read at call time: constants of an ONNX file, or live weights of an nn.Module
(so a BoundedModel built once follows training and stays differentiable)."""


def constant(t: Tensor) -> Param:
    return lambda: t


class Op:
    """One node's operation. Subclasses implement the three views of the same function.

    - ``forward(*xs)``: concrete values ``(N, *in_shape) -> (N, *out_shape)``;
    - ``ibp(*bounds)``: interval propagation;
    - ``backward(lA, uA, *input_bounds)``: push linear bounds from the op's output to its
      inputs using the op's relaxation on the given input bounds.
    ``input_bounds`` are Bounds of the op's perturbed inputs (needed by nonlinear ops only).
    """

    nonlinear = False  # needs bounds on its input for a relaxation

    def forward(self, *xs: Tensor) -> Tensor:
        raise NotImplementedError

    def ibp(self, *bounds: Bounds) -> Bounds:
        raise NotImplementedError

    def backward(self, lA: Optional[Tensor], uA: Optional[Tensor], *input_bounds: Bounds) -> BackwardResult:
        raise NotImplementedError

    def cast(self, device: torch.device, dtype: torch.dtype) -> "Op":
        """Move constant tensors to device/dtype; returns self."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and value.is_floating_point():
                setattr(self, name, value.to(device=device, dtype=dtype))
            elif isinstance(value, Tensor):
                setattr(self, name, value.to(device=device))
        return self

    def describe(self) -> str:
        return type(self).__name__

    # ---- float soundness (issue 26; the analysis: verifier/bounds/floating.py) ----------------
    # The conservative default of an op without its own rules: None, "no rounding rule". In
    # float mode "sound", ``verify`` then answers ``unknown`` naming the op, before any bounding,
    # and a bound pass over the graph raises UnsupportedOperatorError; float mode "fast" bounds
    # it as before. Subclasses override all three.
    def float_error(self, inputs: Sequence[Bounds], rounding) -> Optional[Tensor]:
        """A bound (N, *out_shape), >= 0, on the rounding error of this op's computation, given
        Bounds ``inputs`` (N, *in_shape) of each perturbed input's value, in arithmetic
        ``rounding`` (``verifier.ops.rounding.Rounding``). With ``rounding.runtime`` only the
        concrete forward evaluation counts; otherwise it also bounds (a) the error of each end
        of ``ibp`` and (b) the error that one ``backward`` step through the op adds to a bound,
        per unit of |A| on the op's output: the step's result differs from the exact one by at
        most ``|A| . float_error``."""
        return None

    def float_gain(self, *errors: Tensor) -> Optional[Tensor]:
        """How input perturbations reach the output: |f(x + d) - f(x)| <= float_gain(|d|)
        elementwise, for perturbation bounds ``errors`` (N, *in_shape) -> (N, *out_shape).
        Monotone and positively homogeneous in ``errors``."""
        return None

    def float_coefficient_gain(self, *magnitudes: Tensor) -> Optional[Tensor]:
        """The transpose of a bound on |backward|: a map G with sum |A_in| . m <= |A| . G(m) for
        the coefficients A_in = backward(A) of every relaxation the op can use. For linear maps
        and slopes in [-1, 1] this is ``float_gain``."""
        return self.float_gain(*magnitudes)


def magnitude(b: Bounds) -> Tensor:
    """max |x| over the interval: (N, *shape)."""
    return torch.maximum(b.lower.abs(), b.upper.abs())


def contract(A: Tensor, t: Tensor) -> Tensor:
    """``sum over the per-sample dims of A * t``: A (N, S, *shape), t broadcastable to
    (N, 1, *shape) (per-batch terms) or to (*shape) (per-sample constants) -> (N, S)."""
    prod = A * t
    return prod.flatten(2).sum(-1) if prod.dim() > 2 else prod


def map_A(fn, lA: Optional[Tensor], uA: Optional[Tensor]):
    """Apply fn to whichever of lA, uA is present."""
    return (None if lA is None else fn(lA)), (None if uA is None else fn(uA))


def split_pos_neg(A: Tensor) -> tuple[Tensor, Tensor]:
    return A.clamp(min=0), A.clamp(max=0)


def as_batched(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample tensor t (*shape) to like's (N, *shape) leading dim if needed."""
    return t if t.dim() == like.dim() else t.unsqueeze(0)


def sum_bias(parts: Sequence[Tensor | float]) -> Tensor | float:
    total: Tensor | float = 0.0
    for p in parts:
        total = total + p
    return total
