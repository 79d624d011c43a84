"""The linear-family ops added for VNN-COMP 2022-2025 models: ConvTranspose2d, Conv1d, affine
maps found by probing (ReduceSum, ReduceMean, linear Resize), nearest Resize, Split, Pow with
exponent 1.

Every case: bounds by IBP, CROWN, alpha-CROWN and crown-ibp contain >= 10^4 sampled points
(conftest), float32 and float64, on narrow and wide boxes and after a ReLU (kinks straddled);
methods are ordered; the bound graph's forward equals the module. Exactness: on purely affine
cases CROWN's bounds are the exact range ``M c -+ |M| r`` (M the Jacobian, in float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import (DTYPES, Case, Lambda, assert_close, case_data, case_params, check_contains_samples,
                      check_forward, check_ordering, dtype_id, init_, method_bounds)


def _module(factory):
    return lambda rng: init_(nn.Sequential(factory()), rng)


def _fn(fn):
    return lambda rng: Lambda(fn)


def _then_relu(factory, mixer_shape):
    """factory's op after a random affine map and a ReLU, so that the op sees correlated,
    kinked inputs (the mixer keeps the per-sample shape)."""
    def build(rng):
        numel = 1
        for d in mixer_shape:
            numel *= d
        mixer = nn.Sequential(nn.Flatten(), nn.Linear(numel, numel), nn.ReLU(), nn.Unflatten(1, mixer_shape))
        return init_(nn.Sequential(mixer, factory(), nn.Flatten(), nn.Linear(_out_numel(factory, mixer_shape), 3)),
                     rng)
    return build


def _out_numel(factory, shape) -> int:
    with torch.no_grad():
        return factory()(torch.zeros(1, *shape)).numel()


class SplitAndMix(nn.Module):
    """torch.split into three pieces, recombined: a - b and a concatenation with c."""

    def forward(self, x):
        a, b, c = torch.split(x, [2, 2, 3], dim=1)
        return torch.cat([a - b, c], dim=1)


AFFINE_CASES = [
    Case("conv_transpose_stride2_pad1_outpad1",
         _module(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)), (2, 4, 4)),
    Case("conv_transpose_groups2_dilation2", _module(lambda: nn.ConvTranspose2d(4, 2, 2, groups=2, dilation=2)),
         (4, 3, 3)),
    Case("conv_transpose_no_bias_rect", _module(lambda: nn.ConvTranspose2d(1, 2, (3, 2), stride=(1, 2), bias=False)),
         (1, 3, 4)),
    Case("conv1d_stride2_pad1", _module(lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1)), (2, 9)),
    Case("conv1d_one_channel", _module(lambda: nn.Conv1d(1, 4, 4)), (1, 8)),
    Case("reduce_sum_last_dim", _fn(lambda m, x: x.sum(-1)), (3, 4)),
    Case("reduce_mean_keepdim", _fn(lambda m, x: torch.mean(x, dim=1, keepdim=True)), (3, 4)),
    Case("resize_bilinear", _fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                           align_corners=False)), (2, 3, 3)),
    Case("resize_nearest", _fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")), (2, 3, 3)),
    Case("split_three_ways", lambda rng: SplitAndMix(), (7,)),
    Case("pow_exponent_one", _fn(lambda m, x: torch.pow(x, 1.0)), (5,)),
]
AFFINE_CASES += [Case(c.name + "_wide", c.build, c.input_shape, radius=(2.0, 6.0), center_scale=3.0, seed=1)
                 for c in AFFINE_CASES[:6]]
KINKED_CASES = [
    Case("relu_then_conv_transpose", _then_relu(lambda: nn.ConvTranspose2d(2, 2, 3, stride=2), (2, 3, 3)),
         (2, 3, 3), radius=(0.2, 1.0)),
    Case("relu_then_conv1d", _then_relu(lambda: nn.Conv1d(2, 2, 3), (2, 6)), (2, 6), radius=(0.2, 1.0)),
    Case("relu_then_reduce_mean", _then_relu(lambda: Lambda(lambda m, x: x.mean(-1)), (3, 4)), (3, 4),
         radius=(0.2, 1.0)),
    Case("relu_then_resize_bilinear",
         _then_relu(lambda: Lambda(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")), (1, 3, 3)),
         (1, 3, 3), radius=(0.2, 1.0)),
]
CASES = AFFINE_CASES + KINKED_CASES


@pytest.mark.parametrize("case, dtype, method", case_params(CASES, methods=True))
def test_linear_family_bounds_contain_samples(case, dtype, method):
    check_contains_samples(case, dtype, method)


@pytest.mark.parametrize("case, dtype", case_params(CASES))
def test_linear_family_bounds_ordered(case, dtype):
    check_ordering(case, dtype)


@pytest.mark.parametrize("case, dtype", case_params(CASES))
def test_linear_family_forward_equals_module(case, dtype):
    check_forward(case, dtype)


@pytest.mark.parametrize("case", AFFINE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_affine_ops_crown_bounds_are_the_exact_range(case, dtype):
    data = case_data(case, dtype)
    module = data.module.double()
    lower, upper = data.lower.double(), data.upper.double()
    (lb, ub), _ = method_bounds(case, dtype, "crown")
    for k in range(lower.shape[0]):
        center, radius = (upper[k] + lower[k]) / 2, (upper[k] - lower[k]) / 2
        jacobian = torch.autograd.functional.jacobian(lambda x: module(x.unsqueeze(0)).flatten(), center)
        M = jacobian.reshape(jacobian.shape[0], -1)
        mid = module(center.unsqueeze(0)).flatten()
        spread = M.abs() @ radius.flatten()
        assert_close(lb[k], mid - spread, dtype, f"{case.name} exact lower")
        assert_close(ub[k], mid + spread, dtype, f"{case.name} exact upper")


def test_resize_nearest_is_a_rearrangement_and_bilinear_an_affine_map():
    from verifier import BoundedModel
    nearest = BoundedModel(Lambda(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest"))).graph((1, 2, 2))
    bilinear = BoundedModel(Lambda(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear"))).graph((1, 2, 2))
    assert [type(n.op).__name__ for n in nearest.nodes[1:]] == ["Rearrange"]
    assert [type(n.op).__name__ for n in bilinear.nodes[1:]] == ["AffineMap"]
