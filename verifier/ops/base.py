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


class LinearBound:
    """Linear bounds ``lA·x + lbias <= f <= uA·x + ubias`` on a node's value x, for S objectives.

    lA, uA: (N, S, *shape) or None (that side not asked for); lbias, ubias: (N, S), broadcastable,
    or 0. The algebra the backward traversal needs: sum (``+``, two bounds on the same node: the
    contributions of two consumers), ``shift`` (add constants to the biases) and ``is_empty``.
    """

    __slots__ = ("lA", "uA", "lbias", "ubias")

    def __init__(self, lA: Optional[Tensor], uA: Optional[Tensor], lbias: Tensor | float = 0.0,
                 ubias: Tensor | float = 0.0):
        self.lA, self.uA, self.lbias, self.ubias = lA, uA, lbias, ubias

    def __add__(self, other: "LinearBound") -> "LinearBound":
        return LinearBound(_add_optional(self.lA, other.lA), _add_optional(self.uA, other.uA),
                           self.lbias + other.lbias, self.ubias + other.ubias)

    def shift(self, lbias: Tensor | float, ubias: Tensor | float) -> "LinearBound":
        return LinearBound(self.lA, self.uA, self.lbias + lbias, self.ubias + ubias)

    @property
    def is_empty(self) -> bool:
        return self.lA is None and self.uA is None


def _add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a + b)


class Op:
    """One node's operation. Subclasses implement the three views of the same function.

    - ``forward(*xs)``: concrete values ``(N, *in_shape) -> (N, *out_shape)``;
    - ``ibp(*bounds)``: interval propagation;
    - ``backward(lA, uA, *input_bounds)``: push linear bounds from the op's output to its
      inputs using the op's relaxation on the given input bounds.
    ``input_bounds`` are Bounds of the op's perturbed inputs (needed by nonlinear ops only).

    Optional capabilities, which the bound passes use without knowing the op (defaults: absent):

    - ``lines(*input_bounds)``: the relaxation computed once, passed back to ``backward`` as
      ``lines=`` by a caller that bounds many times under the same input bounds;
    - optimisable relaxations (alpha-CROWN): ``optimisable = True``, ``init_slopes(*bounds)``
      the free parameters' starting point ``(N, *shape)`` (default: the op's ``default_alpha``)
      and ``project_slopes(a)`` (in place, back into the feasible set; default [0, 1]);
      ``backward`` then takes ``alpha_l``, ``alpha_u``, each ``(N, S, *shape)`` (or
      broadcastable) or None, for the lA and the uA side;
    - ``loose(b)``: (N, *in_shape) bool, the input neurons whose relaxation is not exact under
      bounds b (CROWN only tightens those); None where every neuron may be loose;
    - ``branchable = True``: branch and bound may split the op's input at 0 (ReLU);
    - ``splittable = True``: an elementwise op (shape-preserving, one input, each output entry a
      function of the same input entry, ``backward`` valid on any shape) whose input branch and
      bound may split at any point, the relaxation rebuilt on each half (GenBaB);
    - ``identity_rows(rows, N, in_shape)``: the backward pass of identity rows of its output, without the
      one-hot product: (A on the input (N, S, *in_shape), bias (N or 1, S)) or None;
    - ``bound_over_box(lA, uA, box)``: backward through the op *and* concretisation over a box
      of its input in one step, (lb, ub) (N, S) each, or None where no faster route exists.
    """

    nonlinear = False  # needs bounds on its input for a relaxation
    optimisable = False
    branchable = False
    splittable = False

    def lines(self, *input_bounds: Bounds):
        return None

    def loose(self, b: Bounds) -> Optional[Tensor]:
        return None

    def identity_rows(self, rows: Tensor, N: int, in_shape: tuple[int, ...]):
        return None

    def bound_over_box(self, lA: Optional[Tensor], uA: Optional[Tensor], box: Bounds):
        return None

    def init_slopes(self, *input_bounds: Bounds) -> Tensor:
        return self.default_alpha(*input_bounds)

    def project_slopes(self, alpha: Tensor) -> None:
        alpha.clamp_(0, 1)

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
