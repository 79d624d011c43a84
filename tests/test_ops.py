"""Every supported operator on its own, as a PyTorch module: bounds by IBP, CROWN, alpha-CROWN
and crown-ibp contain the true outputs of >= 10^4 sampled points (plus vertices) of random
boxes, with the identity and a random mixed-sign spec, in float32 and float64; and the
methods are ordered (CROWN within IBP, alpha-CROWN within CROWN).

Also the relaxations themselves: the lines an op's ``backward`` uses enclose the function on
extreme intervals (saturated, tiny, huge, degenerate) where the model-level tests rarely go.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import (DTYPES, Case, Lambda, assert_le, case_params, check_contains_samples, check_forward,
                      check_ordering, dtype_id, generator, init_)
from verifier import BoundedModel
from verifier.ops import Bounds, ReLU, Sigmoid, Tanh


def _module(factory):
    """Builder from a factory of an (uninitialised) module, inside an nn.Sequential so that fx
    keeps it as one call_module node (a bare leaf module as the root is tested separately)."""
    return lambda rng: init_(nn.Sequential(factory()), rng)


def _fn(fn, **buffers):
    """Builder of a Lambda around fn with buffers: random N(0, 1) constants of the given shapes,
    or tensors as given. (Constant arithmetic stays out of fn: in float32 buffers it would round
    differently from the float64 reference copy.)"""
    def build(rng):
        return Lambda(fn, **{k: s if isinstance(s, torch.Tensor) else torch.randn(*s, generator=rng)
                             for k, s in buffers.items()})
    return build


class TwoBranches(nn.Module):
    """Two affine branches of the same input combined by ``combine`` (residual Add, Sub, Concat)."""

    def __init__(self, n_in: int, n_hidden: int, combine):
        super().__init__()
        self.a, self.b = nn.Linear(n_in, n_hidden), nn.Linear(n_in, n_hidden)
        self.combine = combine

    def forward(self, x):
        return self.combine(self, self.a(x), self.b(x))


class Residual(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.inner = nn.Linear(n, n)

    def forward(self, x):
        return x + torch.relu(self.inner(x))


def _branches(combine):
    return lambda rng: init_(TwoBranches(5, 4, combine), rng)


# Input normalisation constants: per-channel for (C, H, W) inputs.
_MEAN = torch.tensor([0.2, -0.4]).view(1, 2, 1, 1)
_STD = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)

OP_CASES = [
    # affine with weights
    Case("linear", _module(lambda: nn.Linear(5, 4)), (5,)),
    Case("linear_no_bias", _module(lambda: nn.Linear(5, 4, bias=False)), (5,)),
    Case("linear_on_last_dim_of_3d", _module(lambda: nn.Linear(4, 3)), (2, 3, 4)),
    Case("conv_stride2_pad1", _module(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 6, 6)),
    Case("conv_stride3_unreached_rows", _module(lambda: nn.Conv2d(2, 3, 2, stride=3)), (2, 7, 8)),
    Case("conv_dilation2_pad2", _module(lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2)), (2, 6, 6)),
    Case("conv_groups2", _module(lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2)), (4, 5, 5)),
    Case("conv_depthwise_rect_kernel_stride",
         _module(lambda: nn.Conv2d(3, 3, (3, 2), stride=(2, 1), padding=(1, 0), groups=3)), (3, 7, 6)),
    Case("conv_1x1_no_bias", _module(lambda: nn.Conv2d(3, 2, 1, bias=False)), (3, 4, 4)),
    Case("matmul_right_constant", _fn(lambda m, x: x @ m.w, w=(5, 3)), (5,)),
    Case("matmul_right_constant_3d", _fn(lambda m, x: x @ m.w, w=(4, 3)), (2, 3, 4)),
    Case("matmul_left_constant", _fn(lambda m, x: m.w @ x, w=(2, 4)), (4, 3)),
    # elementwise affine
    Case("batchnorm2d_eval", _module(lambda: nn.BatchNorm2d(3)), (3, 4, 4)),
    Case("batchnorm1d_eval", _module(lambda: nn.BatchNorm1d(5)), (5,)),
    Case("add_constant", _fn(lambda m, x: x + m.c, c=(6,)), (6,)),
    Case("sub_constant", _fn(lambda m, x: x - m.c, c=(6,)), (6,)),
    Case("constant_minus_input", _fn(lambda m, x: m.c - x, c=(6,)), (6,)),
    Case("mul_constant_mixed_sign", _fn(lambda m, x: x * m.c, c=(6,)), (6,)),
    Case("div_constant", _fn(lambda m, x: x / m.c, c=torch.tensor([0.5, -0.7, 1.3, 2.0, -3.0, 0.9])), (6,)),
    Case("neg", _fn(lambda m, x: -x), (6,)),
    Case("input_normalisation", lambda rng: Lambda(lambda m, x: (x - m.mean) / m.std, mean=_MEAN, std=_STD),
         (2, 3, 3)),
    # sums of perturbed branches
    Case("residual_add_of_two_branches", _branches(lambda m, a, b: a + b), (5,)),
    Case("sub_of_two_branches", _branches(lambda m, a, b: a - b), (5,)),
    Case("residual_add_of_input_and_branch", lambda rng: init_(Residual(4), rng), (4,)),
    # activations (boxes straddle 0 so that neurons are unstable)
    Case("relu", _module(nn.ReLU), (8,), radius=(0.1, 1.5)),
    Case("relu_functional_3d", _fn(lambda m, x: torch.relu(x)), (2, 3, 3), radius=(0.1, 1.5)),
    Case("sigmoid", _module(nn.Sigmoid), (8,), radius=(0.01, 3.0), center_scale=2.0),
    Case("sigmoid_saturated", _module(nn.Sigmoid), (8,), radius=(0.01, 2.0), center_scale=12.0),
    Case("tanh", _module(nn.Tanh), (8,), radius=(0.01, 3.0), center_scale=2.0),
    Case("tanh_saturated", _module(nn.Tanh), (8,), radius=(0.01, 2.0), center_scale=8.0),
    # entry-moving ops
    Case("flatten", _module(nn.Flatten), (2, 3, 3)),
    Case("reshape", _fn(lambda m, x: x.reshape(-1, 3, 6)), (2, 3, 3)),
    Case("view_by_batch_size", _fn(lambda m, x: x.view(x.size(0), -1)), (2, 3, 3)),
    Case("permute_nhwc_to_nchw", _fn(lambda m, x: x.permute(0, 3, 1, 2)), (3, 4, 2)),
    Case("transpose", _fn(lambda m, x: x.transpose(1, 2)), (3, 4)),
    Case("unsqueeze_squeeze", _fn(lambda m, x: x.unsqueeze(1).flatten(2).squeeze(1)), (2, 3)),
    Case("pad_zeros", _fn(lambda m, x: F.pad(x, (1, 2, 0, 1))), (2, 3, 3)),
    Case("pad_constant_value", _fn(lambda m, x: F.pad(x, (1, 1, 1, 1), value=0.5)), (2, 3, 3)),
    Case("slice", _fn(lambda m, x: x[:, 1:4]), (6,)),
    Case("concat_of_two_branches", _branches(lambda m, a, b: torch.cat([a, torch.relu(b)], dim=1)), (5,)),
    # pooling
    Case("avgpool_k2", _module(lambda: nn.AvgPool2d(2)), (2, 4, 4)),
    Case("avgpool_pad_count_include_pad",
         _module(lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True)), (2, 5, 5)),
    Case("avgpool_pad_exclude_pad",
         _module(lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)), (2, 5, 5)),
    Case("maxpool_k2", _module(lambda: nn.MaxPool2d(2)), (2, 4, 4)),
    Case("maxpool_pad_stride", _module(lambda: nn.MaxPool2d(3, stride=2, padding=1)), (2, 5, 5)),
    Case("maxpool_overlapping_dilated", _module(lambda: nn.MaxPool2d(2, stride=1, dilation=2)), (2, 4, 4)),
]
# Pre-composed with a linear map, so that nonlinear ops see correlated inputs and CROWN's
# intermediate bounds come from a backward pass rather than the box itself.
OP_CASES += [
    Case("linear_then_relu", _module(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU())), (4,), radius=(0.3, 1.0)),
    Case("linear_then_sigmoid", _module(lambda: nn.Sequential(nn.Linear(4, 8, bias=True), nn.Sigmoid())), (4,),
         radius=(0.3, 2.0)),
    Case("linear_then_tanh", _module(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh())), (4,), radius=(0.3, 2.0)),
    Case("conv_then_maxpool", _module(lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(2, stride=1))),
         (1, 4, 4), radius=(0.2, 0.6)),
]


_FLAT_SPEC_CASES = ["avgpool_k2", "avgpool_pad_count_include_pad", "avgpool_pad_exclude_pad", "batchnorm2d_eval",
                    "conv_1x1_no_bias", "conv_depthwise_rect_kernel_stride", "conv_dilation2_pad2", "conv_groups2",
                    "conv_stride2_pad1", "conv_stride3_unreached_rows", "input_normalisation",
                    "linear_on_last_dim_of_3d", "matmul_right_constant_3d", "relu_functional_3d"]


@pytest.mark.parametrize("case, dtype, method", case_params(OP_CASES, methods=True))
def test_op_bounds_contain_samples(case, dtype, method):
    check_contains_samples(case, dtype, method)


@pytest.mark.parametrize("case, dtype", case_params(OP_CASES))
def test_op_bounds_ordered_crown_within_ibp_alpha_within_crown(case, dtype):
    check_ordering(case, dtype)


@pytest.mark.parametrize("case, dtype", case_params(OP_CASES))
def test_op_forward_of_bound_graph_equals_module(case, dtype):
    check_forward(case, dtype)


# ---- the relaxations on extreme intervals -----------------------------------------------------
def _extreme_intervals(dtype: torch.dtype, rng: torch.Generator) -> Bounds:
    """(1, n) intervals: random ones at every scale, plus saturated, tiny, huge and degenerate."""
    centre = torch.randn(4000, generator=rng, dtype=torch.float64) * torch.tensor([0.5, 3.0, 10.0, 30.0]).repeat(1000)
    width = 10 ** (torch.rand(4000, generator=rng, dtype=torch.float64) * 12 - 10)   # 1e-10 .. 1e2
    special = torch.tensor([[-1e-3, 1e-3], [-50.0, 50.0], [20.0, 20.5], [-40.0, -39.0], [-8.0, 0.0], [0.0, 8.0],
                            [3.0, 3.0], [0.0, 0.0], [-1.0, 1.0], [-1e-7, 1e-7], [-5.0, 2.0], [-2.0, 5.0],
                            [1.0, 1.0 + 1e-9], [-17.0, -16.999999], [16.0, 17.0]], dtype=torch.float64)
    lower = torch.cat([centre - width / 2, special[:, 0]])
    upper = torch.cat([centre + width / 2, special[:, 1]])
    return Bounds(lower.to(dtype).unsqueeze(0), torch.maximum(lower.to(dtype), upper.to(dtype)).unsqueeze(0))


def _points_in(b: Bounds, rng: torch.Generator, n: int = 64) -> torch.Tensor:
    """(n + 3, m) points of each interval in float64: both ends, the midpoint and uniform ones."""
    lo, hi = b.lower[0].to(torch.float64), b.upper[0].to(torch.float64)
    t = torch.cat([torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64),
                   torch.rand(n, generator=rng, dtype=torch.float64)]).unsqueeze(1)
    return lo + t * (hi - lo)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op, reference", [(Sigmoid(), torch.sigmoid), (Tanh(), torch.tanh)], ids=["sigmoid", "tanh"])
def test_s_shaped_relaxation_lines_enclose_function_on_extreme_intervals(op, reference, dtype):
    rng = generator(7)
    b = _extreme_intervals(dtype, rng)
    lower_slope, lower_intercept, upper_slope, upper_intercept = (t[0].to(torch.float64) for t in op.relaxation(b))
    x = _points_in(b, rng)
    f = reference(x)
    assert_le(lower_slope * x + lower_intercept, f, dtype, f"{type(op).__name__} lower line")
    assert_le(f, upper_slope * x + upper_intercept, dtype, f"{type(op).__name__} upper line")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_relu_relaxation_lines_enclose_relu(dtype):
    rng = generator(8)
    b = _extreme_intervals(dtype, rng)
    upper_slope, upper_intercept, lower_slope, unstable = (t[0] for t in ReLU.relaxation(b))
    x = _points_in(b, rng)
    f = torch.relu(x)
    up = upper_slope.to(torch.float64) * x + upper_intercept.to(torch.float64)
    assert_le(f, up, dtype, "ReLU upper line")
    for alpha in (lower_slope, torch.zeros_like(lower_slope), torch.ones_like(lower_slope)):
        slope = torch.where(unstable, alpha, lower_slope).to(torch.float64)
        assert_le(slope * x, f, dtype, "ReLU lower line")


def test_unsupported_module_op_raises_naming_node():
    from verifier.errors import UnsupportedOperatorError
    model = Lambda(lambda m, x: torch.erf(x))   # (exp, used here before issue 22, is supported now)
    bm = BoundedModel(model)
    with pytest.raises(UnsupportedOperatorError, match="erf"):
        bm.compute_bounds(torch.zeros(1, 3), torch.ones(1, 3))
