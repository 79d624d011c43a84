"""How a computation rounds: the small type that the ops' float-soundness rules take.

Every op offers three rules (``Op.float_error``, ``Op.float_gain``, ``Op.float_coefficient_gain``;
the analysis that uses them, and its proof, is in ``verifier/bounds/floating.py``). They take a
``Rounding``: the unit roundoff ``u`` of the arithmetic and ``gamma(n) = n u / (1 - n u)``, the
bound of Higham ("Accuracy and Stability of Numerical Algorithms", 2nd ed., ch. 3, Lemma 3.1 and
eq. (3.5)) on the relative error of a dot product of length n computed in any order, with or
without fused multiply-adds: ``|fl(w . x) - w . x| <= gamma(n) |w| . |x|``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rounding:
    """unit: the unit roundoff u (2^-24 for float32, 2^-53 for float64).
    extra: roundings added to every length n (the accumulation of a backward pass's bias terms
    over the graph's nodes, and the few roundings of the bound's own widening), so that
    ``gamma(n)`` covers them too.
    step: which computation the error is of: "forward" (a runtime's evaluation of the op),
    "ibp" (our ``ibp``: each end) or "backward" (our ``backward``, per unit of |A|).
    function_error: absolute error allowed to a runtime's elementwise transcendental functions
    (sigmoid, tanh), beyond the propagated input error.
    constant_magnitude: for a runtime, the largest ``|mean * scale| + |beta|`` of the model's
    BatchNormalization nodes: a runtime that folds BatchNorm into the preceding Gemm / Conv (or
    not) rounds constants of that size, which our graph (folded in float64) no longer shows.
    """

    unit: float
    extra: int = 8
    step: str = "backward"
    function_error: float = 0.0
    constant_magnitude: float = 0.0

    def gamma(self, n: int) -> float:
        """gamma_{n + extra}; infinite where (n + extra) u >= 1/2 (no useful bound)."""
        nu = (int(n) + self.extra) * self.unit
        return float("inf") if nu >= 0.5 else nu / (1 - nu)

    @property
    def runtime(self) -> bool:
        return self.step == "forward"

    @property
    def backward(self) -> bool:
        return self.step == "backward"
