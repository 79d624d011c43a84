"""The operator registry (``verifier.ops.register``): a user's own op, registered for their own
torch module class, is traced whole, converted by the registry and bounded soundly by every
method; an unregistered one is refused in one line; the bound passes name no op."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import DTYPES, Case, check_contains_samples, check_ordering, dtype_id, init_
from verifier import BoundedModel
from verifier.errors import UnsupportedOperatorError
from verifier.ops import BackwardResult, Bounds, Op, register
from verifier.ops.base import contract
from verifier.ops.registry import lookup, onnx_supported


class AbsModule(nn.Module):
    """A user's activation: |x|. torch.fx would trace into it; registered, it stays one node."""

    def forward(self, x):
        return x.abs()


class UnknownModule(nn.Module):
    def forward(self, x):
        return torch.special.erf(x)


@register(modules=[AbsModule], onnx=["TestOnlyAbs"])
class AbsBound(Op):
    """|x|: convex, so the chord through (l, |l|), (u, |u|) is an upper line and any slope in
    [-1, 1] through the origin a lower one (here sign of the midpoint, exact when l, u share a
    sign)."""

    nonlinear = True

    def forward(self, x):
        return x.abs()

    def ibp(self, b: Bounds) -> Bounds:
        lower = torch.where((b.lower < 0) & (b.upper > 0), torch.zeros_like(b.lower),
                            torch.minimum(b.lower.abs(), b.upper.abs()))
        return Bounds(lower, torch.maximum(b.lower.abs(), b.upper.abs()))

    def backward(self, lA, uA, b: Bounds) -> BackwardResult:
        l, u = b.lower, b.upper
        width = (u - l).clamp(min=1e-12)
        chord = (u.abs() - l.abs()) / width
        chord_intercept = l.abs() - chord * l
        low = torch.where(u + l >= 0, torch.ones_like(l), -torch.ones_like(l)).unsqueeze(1)
        up, up_i = chord.unsqueeze(1), chord_intercept.unsqueeze(1)

        def through(A, lower_side: bool):
            pos, neg = A.clamp(min=0), A.clamp(max=0)
            if lower_side:     # positive coefficients take the lower line, negative the upper
                return pos * low + neg * up, contract(neg, up_i)
            return pos * up + neg * low, contract(pos, up_i)

        lA_in, lbias = through(lA, True) if lA is not None else (None, 0.0)
        uA_in, ubias = through(uA, False) if uA is not None else (None, 0.0)
        return BackwardResult([(lA_in, uA_in)], lbias, ubias)


def _net(rng):
    return init_(nn.Sequential(nn.Linear(4, 6), AbsModule(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), rng)


CASES = [Case("user_abs", _net, (4,)), Case("user_abs_wide", _net, (4,), radius=(1.0, 3.0), seed=1)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("method", ["ibp", "crown", "alpha-crown", "crown-ibp"])
def test_registered_user_op_bounds_contain_samples(case, dtype, method):
    check_contains_samples(case, dtype, method)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_registered_user_op_methods_are_ordered(case, dtype):
    check_ordering(case, dtype)


def test_registered_module_is_one_node_of_the_users_op():
    model = BoundedModel(_net(torch.Generator().manual_seed(0)))
    graph = model.graph((4,))
    assert [type(n.op).__name__ for n in graph.nodes[1:]] == ["Linear", "AbsBound", "Linear", "ReLU", "Linear"]
    assert onnx_supported("TestOnlyAbs") and lookup(AbsModule()) is not None


def test_unregistered_module_is_refused_in_one_line_naming_the_node():
    model = BoundedModel(nn.Sequential(nn.Linear(3, 3), UnknownModule()))
    with pytest.raises(UnsupportedOperatorError) as info:
        model.compute_bounds(torch.zeros(1, 3), torch.ones(1, 3))
    message = str(info.value)
    assert "\n" not in message and "erf" in message and "unsupported operator" in message


def test_bound_passes_name_no_op():
    """The traversal (CROWN, alpha-CROWN, IBP) uses op capabilities, never an op class."""
    root = Path(__file__).resolve().parent.parent / "verifier" / "bounds"
    op_names = "|".join(["Linear", "ReLU", "Conv2d", "Sigmoid", "Tanh", "MaxPool2d", "Rearrange", "Concat", "Sum",
                         "ElementwiseAffine"])
    for name in ("crown.py", "alpha.py", "ibp.py"):
        text = (root / name).read_text()
        assert not re.search(rf"isinstance\([^)]*\b({op_names})\b", text), name
        assert not re.search(rf"import[^\n]*\b({op_names})\b", text), name
