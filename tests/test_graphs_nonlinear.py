"""Random small graphs mixing the nonlinear ops (G-relax's classes) as the converter registers
them from PyTorch functions, bounded by the project's own traversal (IBP, CROWN, alpha-CROWN,
crown-ibp through ``BoundedModel``): the bounds contain >= 10^4 sampled outputs (conftest) in
float32 and float64, on narrow and wide boxes; the methods are ordered; the bound graph's
forward equals the module; each function maps to its op class."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import Case, case_params, check_contains_samples, check_forward, check_ordering, init_
from verifier import BoundedModel


class Attention(nn.Module):
    """One self-attention head on (T, D) tokens: softmax(q k^T / 2) v, then a Linear readout.
    Products of two perturbed tensors (MatMul) and a Softmax."""

    def __init__(self, tokens: int = 3, dim: int = 4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(tokens * dim, 2)

    def forward(self, x):
        scores = torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) / 2
        mixed = torch.matmul(torch.softmax(scores, dim=-1), self.v(x))
        return self.out(mixed.flatten(1))


class SmoothMix(nn.Module):
    """exp, sin, cos, a product of two branches, square, clamp, leaky_relu, maximum."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(n, 5), nn.Linear(n, 5), nn.Linear(n, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        y = torch.exp(a / 2) * torch.sin(b) + torch.cos(c) + torch.pow(a, 2) / 4
        y = y + torch.clamp(b, -0.5, 0.7) + F.leaky_relu(c, 0.1) + torch.maximum(a, b)
        return self.out(y)


class PositiveMix(nn.Module):
    """log, sqrt, reciprocal and a quotient of two branches, on values made positive by exp."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.a, self.b = nn.Linear(n, 5), nn.Linear(n, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        p, q = torch.exp(self.a(x) / 2), torch.exp(self.b(x) / 3) + 0.5
        y = torch.log(p + 1) + torch.sqrt(p) + torch.reciprocal(q) + p / q
        return self.out(y)


class Steps(nn.Module):
    """The step functions: sign and floor, after and before a ReLU layer."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.a = nn.Linear(n, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        a = self.a(x)
        return self.b(torch.relu(a) + 0.3 * torch.sign(a) + 0.2 * torch.floor(2 * a))


CASES = [
    Case("attention", lambda rng: init_(Attention(), rng), (3, 4), radius=(0.02, 0.2)),
    Case("attention_wide", lambda rng: init_(Attention(), rng), (3, 4), radius=(0.3, 1.0), seed=1),
    Case("smooth_mix", lambda rng: init_(SmoothMix(), rng), (4,), radius=(0.05, 0.4)),
    Case("smooth_mix_wide", lambda rng: init_(SmoothMix(), rng), (4,), radius=(1.0, 3.0), seed=1),
    Case("positive_mix", lambda rng: init_(PositiveMix(), rng), (4,), radius=(0.05, 0.5)),
    Case("positive_mix_wide", lambda rng: init_(PositiveMix(), rng), (4,), radius=(1.0, 2.0), seed=1),
    Case("steps", lambda rng: init_(Steps(), rng), (4,), radius=(0.1, 1.0)),
]


@pytest.mark.parametrize("case, dtype, method", case_params(CASES, methods=True))
def test_nonlinear_graph_bounds_contain_samples(case, dtype, method):
    check_contains_samples(case, dtype, method)


@pytest.mark.parametrize("case, dtype", case_params(CASES))
def test_nonlinear_graph_bounds_ordered(case, dtype):
    check_ordering(case, dtype)


@pytest.mark.parametrize("case, dtype", case_params(CASES))
def test_nonlinear_graph_forward_equals_module(case, dtype):
    check_forward(case, dtype)


def test_functions_convert_to_their_op_classes():
    ops = lambda module, shape: {type(n.op).__name__ for n in BoundedModel(module).graph(shape).nodes[1:]}
    rng = torch.Generator().manual_seed(0)
    assert {"MatMul", "Softmax"} <= ops(init_(Attention(), rng), (3, 4))
    assert {"Exp", "Sin", "Cos", "Mul", "Pow", "Clip", "LeakyReLU", "Maximum"} <= ops(init_(SmoothMix(), rng), (4,))
    assert {"Log", "Sqrt", "Reciprocal", "Mul"} <= ops(init_(PositiveMix(), rng), (4,))
    assert {"Sign", "Floor", "ReLU"} <= ops(init_(Steps(), rng), (4,))


@pytest.mark.parametrize("name", ["bad_softmax_output.onnx", "bad_exp_hidden.onnx"])
def test_onnx_models_once_refused_now_bound_soundly(name):
    """The ONNX models with Softmax / Exp that the verifier refused before issue 22 load, and
    their CROWN bounds contain onnxruntime's outputs at >= 10^4 points of a box."""
    import numpy as np
    import onnxruntime
    from conftest import assert_contains, onnx_model_path
    path = str(onnx_model_path(name))
    model = BoundedModel(path, dtype=torch.float64)
    rng = torch.Generator().manual_seed(4)
    lower = torch.randn(1, 4, generator=rng, dtype=torch.float64)
    upper = lower + 1.5
    points = lower + (upper - lower) * torch.rand(10_000, 4, generator=rng, dtype=torch.float64)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = np.concatenate([session.run(None, {"x": p.numpy().astype(np.float32)[None]})[0] for p in points[:2000]])
    # onnxruntime in float32 on 2000 points; the bound graph in float64 on all 10^4
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = model.compute_bounds(lower, upper, method=method)
        assert_contains(lb, ub, torch.as_tensor(outputs, dtype=torch.float64).unsqueeze(0), torch.float32, method)
        assert_contains(lb, ub, model.forward(points).unsqueeze(0), torch.float64, method)
