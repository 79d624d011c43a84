"""Random small networks as PyTorch modules: IBP, CROWN, alpha-CROWN and crown-ibp bounds
contain >= 10^4 sampled outputs per box (identity and random specs, float32 and float64); the
methods are ordered; bounds do not depend on the other boxes of a batch; torch pruning masks are
honoured; IBP bounds are differentiable in the parameters; and bad input raises the project's
errors.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from conftest import (METHODS, Case, assert_close, assert_contains, assert_le, case_params,
                      check_contains_samples, check_forward, check_ordering, generator, init_, random_box,
                      random_spec, sample_box)
from verifier import BoundedModel
from verifier.errors import DimensionMismatchError, ModelValueError


def _seq(layers):
    return lambda rng: init_(nn.Sequential(*layers()), rng)


class ResidualBlock(nn.Module):
    """y = relu(conv2(relu(conv1 x)) + x); z = relu(lin(y) - skip(y)): Add and Sub of branches."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.flatten = nn.Flatten()
        self.lin, self.skip = nn.Linear(32, 6), nn.Linear(32, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        y = self.flatten(y)
        return self.head(torch.relu(self.lin(y) - self.skip(y)))


class ConcatNet(nn.Module):
    """Two conv branches concatenated along channels, then a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 3, 3, stride=1, dilation=2, padding=2)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))

    def forward(self, x):
        return self.head(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


class ShapeOpsNet(nn.Module):
    """NHWC input with a permute, Pad, Reshape, Transpose, Flatten around ReLU layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.lin1 = nn.Linear(4, 5)
        self.lin2 = nn.Linear(3 * 5 * 4, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x.permute(0, 3, 1, 2)))                  # (3, 3, 3)
        x = nn.functional.pad(x, (0, 1, 1, 0), value=0.25)                 # (3, 4, 4)
        x = torch.relu(self.lin1(x.reshape(-1, 3, 4, 4).transpose(2, 3)))  # (3, 4, 5)
        return self.lin2(torch.flatten(x.unsqueeze(1).squeeze(1), 1))


class NormalisedMatMulNet(nn.Module):
    """Input normalisation by constants, then MatMul by constants (+ bias) and ReLU."""

    def __init__(self, rng):
        super().__init__()
        self.register_buffer("mean", torch.randn(5, generator=rng))
        self.register_buffer("std", 0.5 + torch.rand(5, generator=rng))
        self.register_buffer("w1", torch.randn(5, 8, generator=rng) / 5 ** 0.5)
        self.register_buffer("b1", 0.3 * torch.randn(8, generator=rng))
        self.register_buffer("w2", torch.randn(3, 8, generator=rng) / 8 ** 0.5)

    def forward(self, x):
        h = torch.relu((x - self.mean) / self.std @ self.w1 + self.b1)
        return (self.w2 @ h.unsqueeze(-1)).squeeze(-1)


NETWORK_CASES = [
    Case("mlp_relu", _seq(lambda: [nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)]),
         (6,), radius=(0.05, 0.4)),
    Case("mlp_relu_deep_narrow", _seq(lambda: [nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5),
                                               nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)]),
         (3,), radius=(0.2, 0.8)),
    Case("mlp_sigmoid_tanh", _seq(lambda: [nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]),
         (4,), radius=(0.1, 1.0), center_scale=2.0),
    Case("mlp_relu_sigmoid_batchnorm1d",
         _seq(lambda: [nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 2)]),
         (5,), radius=(0.1, 0.6)),
    Case("cnn_stride_padding_dilation_groups",
         _seq(lambda: [nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                       nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 4 * 4, 3)]), (2, 7, 7), radius=(0.02, 0.2)),
    Case("cnn_batchnorm_eval", _seq(lambda: [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                             nn.Conv2d(3, 3, 2, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(12, 2)]),
         (1, 6, 6), radius=(0.02, 0.2)),
    Case("cnn_tanh", _seq(lambda: [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)]), (1, 5, 5),
         radius=(0.05, 0.5)),
    Case("residual_add_and_sub", lambda rng: init_(ResidualBlock(), rng), (2, 4, 4), radius=(0.02, 0.2)),
    Case("avgpool_with_and_without_count_include_pad",
         _seq(lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1,
                                                                              count_include_pad=False),
                       nn.Conv2d(3, 3, 2), nn.ReLU(), nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=True),
                       nn.Flatten(), nn.Linear(3 * 3 * 3, 2)]), (2, 5, 5), radius=(0.02, 0.3)),
    Case("maxpool_padding_stride",
         _seq(lambda: [nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                       nn.Conv2d(3, 3, 2), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(3, 2)]),
         (1, 6, 6), radius=(0.02, 0.3)),
    Case("concat_of_conv_branches", lambda rng: init_(ConcatNet(), rng), (1, 4, 4), radius=(0.02, 0.3)),
    Case("nhwc_permute_pad_reshape_transpose", lambda rng: init_(ShapeOpsNet(), rng), (4, 4, 2), radius=(0.02, 0.3)),
    Case("normalised_input_matmul_by_constants", lambda rng: NormalisedMatMulNet(rng), (5,), radius=(0.1, 0.6)),
]




@pytest.mark.parametrize("case, dtype, method", case_params(NETWORK_CASES, methods=True))
def test_network_bounds_contain_samples(case, dtype, method):
    check_contains_samples(case, dtype, method)


@pytest.mark.parametrize("case, dtype", case_params(NETWORK_CASES))
def test_network_bounds_ordered_crown_within_ibp_alpha_within_crown(case, dtype):
    check_ordering(case, dtype)


@pytest.mark.parametrize("case, dtype", case_params(NETWORK_CASES))
def test_network_forward_of_bound_graph_equals_module(case, dtype):
    check_forward(case, dtype)


# ---- batch independence -----------------------------------------------------------------------
def _mlp(rng, sizes=(4, 8, 8, 3)):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return init_(nn.Sequential(*layers[:-1]), rng)


@pytest.mark.parametrize("method", METHODS)
def test_bounds_of_a_box_alone_equal_its_bounds_inside_a_batch(method):
    rng = generator(11)
    model = _mlp(rng)
    lower, upper = random_box((4,), 6, rng, radius=(0.1, 0.8))
    spec = random_spec(6, 3, 3, rng)
    bm = BoundedModel(model, dtype=torch.float64)
    lb, ub = bm.compute_bounds(lower, upper, spec, method=method)
    for i in range(6):
        lb_i, ub_i = bm.compute_bounds(lower[i:i + 1], upper[i:i + 1], spec[i:i + 1], method=method)
        assert_close(lb_i.detach(), lb[i:i + 1].detach(), torch.float64, f"{method} lower, box {i}")
        assert_close(ub_i.detach(), ub[i:i + 1].detach(), torch.float64, f"{method} upper, box {i}")


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_crown_on_each_boxs_own_unstable_neurons_equals_bounds_of_the_box_alone(net, monkeypatch):
    """Large batches bound each box's own unstable neurons (grouped by count), not every neuron
    unstable in some box: the result must equal each box bounded alone, and contain samples."""
    import verifier.bounds.crown as crown
    rng = generator(13)
    if net == "mlp":
        model, shape = _mlp(rng, sizes=(6, 24, 24, 24, 3)), (6,)
    else:
        model = init_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(64, 3)), rng)
        shape = (1, 6, 6)
    # radii from tiny to large: few unstable neurons in some boxes, many in others
    lower, upper = random_box(shape, 24, rng, radius=(0.01, 0.6))
    bm = BoundedModel(model, dtype=torch.float64)
    calls = []
    grouped = crown._crown_per_sample_rows
    monkeypatch.setattr(crown, "_crown_per_sample_rows", lambda *a: calls.append(grouped(*a)) or calls[-1])
    lb, ub = bm.compute_bounds(lower, upper, method="crown")
    assert any(c is not None for c in calls), "the grouped per-box path was not taken"
    for i in range(len(lower)):
        lb_i, ub_i = bm.compute_bounds(lower[i:i + 1], upper[i:i + 1], method="crown")
        assert_close(lb_i, lb[i:i + 1], torch.float64, f"lower, box {i}")
        assert_close(ub_i, ub[i:i + 1], torch.float64, f"upper, box {i}")
    points = sample_box(lower, upper, rng)                                # (B, m, *shape)
    out = model.double()(points.flatten(0, 1)).reshape(len(lower), points.shape[1], -1)
    assert_le(lb.unsqueeze(1).expand_as(out), out, torch.float64, "lower")
    assert_le(out, ub.unsqueeze(1).expand_as(out), torch.float64, "upper")


# ---- pruning masks ----------------------------------------------------------------------------
def _pruned_pair(rng):
    """A conv+MLP model pruned with torch.nn.utils.prune, and a copy with the zeros written in."""
    model = init_(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(),
                                nn.Linear(8, 2)), rng)
    dense = copy.deepcopy(model)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[3], "weight", amount=0.6)
    prune.ln_structured(model[5], "weight", amount=0.5, n=1, dim=1)
    with torch.no_grad():
        for i in (0, 3, 5):
            dense[i].weight.mul_(getattr(model[i], "weight_mask"))
    return model, dense


@pytest.mark.parametrize("method", METHODS)
def test_bounds_of_pruned_module_equal_bounds_with_zeros_written_in(method):
    rng = generator(12)
    pruned, dense = _pruned_pair(rng)
    # the masks zero non-zero entries of weight_orig: a verifier reading weight_orig would differ
    assert (pruned[3].weight_orig != pruned[3].weight).any()
    lower, upper = random_box((1, 4, 4), 3, rng, radius=(0.1, 0.5))
    got = BoundedModel(pruned, dtype=torch.float64).compute_bounds(lower, upper, method=method)
    want = BoundedModel(dense, dtype=torch.float64).compute_bounds(lower, upper, method=method)
    for g, w, side in zip(got, want, ("lower", "upper")):
        assert_close(g.detach(), w.detach(), torch.float64, f"{method} {side}")


def test_bounds_of_pruned_batchnorm_follow_weight_orig_without_a_forward_pass():
    """A pruned BatchNorm's gamma/beta are weight_orig * weight_mask at every call, not the value
    the last forward pass left in .weight (which goes stale after an optimiser step)."""
    rng = generator(14)
    model = init_(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                nn.Linear(12, 2)), rng).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5, generator=rng)
        model[1].running_var.uniform_(0.5, 2.0, generator=rng)
    prune.custom_from_mask(model[1], "weight", torch.tensor([1.0, 0.0, 1.0]))
    prune.custom_from_mask(model[1], "bias", torch.tensor([1.0, 0.0, 1.0]))
    lower, upper = random_box((1, 4, 4), 2, rng)
    bm = BoundedModel(model, dtype=torch.float64)
    bm.compute_bounds(lower, upper)
    with torch.no_grad():   # an optimiser step: no forward pass refreshes .weight / .bias
        model[1].weight_orig.mul_(3.0)
        model[1].bias_orig.add_(1.0)
    points = sample_box(lower, upper, rng)
    model.double()
    out = model(points.flatten(0, 1)).reshape(2, points.shape[1], -1)   # the forward refreshes them
    for method in METHODS:
        lb, ub = bm.compute_bounds(lower, upper, method=method)
        assert_le(lb.unsqueeze(1).expand_as(out), out, torch.float64, f"{method} lower")
        assert_le(out, ub.unsqueeze(1).expand_as(out), torch.float64, f"{method} upper")


def test_bounds_follow_pruning_applied_after_construction():
    rng = generator(13)
    model = init_(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), rng)
    dense = copy.deepcopy(model)
    lower, upper = random_box((4,), 2, rng)
    bm = BoundedModel(model, dtype=torch.float64)
    bm.compute_bounds(lower, upper)   # the bound graph is built before pruning
    prune.l1_unstructured(model[2], "weight", amount=0.7)
    with torch.no_grad():
        dense[2].weight.mul_(model[2].weight_mask)
    got = bm.compute_bounds(lower, upper)
    want = BoundedModel(dense, dtype=torch.float64).compute_bounds(lower, upper)
    for g, w in zip(got, want):
        assert_close(g.detach(), w.detach(), torch.float64, "pruned after construction")


def test_bounds_survive_prune_remove_after_construction():
    rng = generator(14)
    pruned, _ = _pruned_pair(rng)
    lower, upper = random_box((1, 4, 4), 2, rng)
    bm = BoundedModel(pruned, dtype=torch.float64)
    before = bm.compute_bounds(lower, upper)
    for i in (0, 3, 5):
        prune.remove(pruned[i], "weight")   # make the pruning permanent, as pruning.sparsity does
    after = bm.compute_bounds(lower, upper)
    for b, a in zip(before, after):
        assert_close(a.detach(), b.detach(), torch.float64, "after prune.remove")


# ---- gradients --------------------------------------------------------------------------------
def test_ibp_relu_bounds_are_differentiable_in_module_parameters():
    rng = generator(15)
    model = init_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 6),
                                nn.ReLU(), nn.Linear(6, 2)), rng)
    lower, upper = random_box((1, 4, 4), 3, rng)
    relu_bounds = BoundedModel(model).relu_bounds(lower.float(), upper.float(), method="ibp")
    assert len(relu_bounds) == 2
    loss = sum((u - l).sum() + u.relu().sum() for l, u in relu_bounds)
    loss.backward()
    # the last Linear feeds no ReLU; every parameter before it shapes some ReLU's bounds
    for name, p in list(model.named_parameters())[:-2]:
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_relu_bounds_contain_sampled_preactivations():
    rng = generator(16)
    model = _mlp(rng, (3, 6, 6, 2))
    lower, upper = random_box((3,), 2, rng, radius=(0.2, 0.8))
    points = torch.rand(2, 10_000, 3, generator=rng, dtype=torch.float64) * (upper - lower).unsqueeze(1) \
        + lower.unsqueeze(1)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        pre1 = model64[0](points)
        pre2 = model64[2](torch.relu(pre1))
    for method in ("ibp", "crown"):
        bounds = BoundedModel(model, dtype=torch.float64).relu_bounds(lower, upper, method=method)
        assert len(bounds) == 2
        for (l, u), pre in zip(bounds, (pre1, pre2)):
            assert l.shape == u.shape == (2, 6)
            assert_contains(l.detach(), u.detach(), pre, torch.float64, f"relu_bounds {method}")


def test_alpha_crown_runs_under_no_grad():
    """Evaluation code calls compute_bounds inside torch.no_grad(); alpha-CROWN must still
    optimise (its slopes need autograd) and return bounds at least as tight as CROWN."""
    rng = generator(17)
    model = _mlp(rng)
    lower, upper = random_box((4,), 2, rng, radius=(0.3, 0.8))
    bm = BoundedModel(model, dtype=torch.float64)
    crown = bm.compute_bounds(lower, upper, method="crown")
    with torch.no_grad():
        alpha = bm.compute_bounds(lower, upper, method="alpha-crown")
    assert_le(crown[0].detach(), alpha[0], torch.float64, "alpha-CROWN lower >= CROWN lower")
    assert_le(alpha[1], crown[1].detach(), torch.float64, "alpha-CROWN upper <= CROWN upper")


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["linear_weight_nan", "linear_weight_inf", "linear_bias_inf", "conv_weight_nan",
                                   "batchnorm_running_var_nan"])
def test_non_finite_weights_raise_model_value_error(where):
    rng = generator(18)
    model = init_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)), rng)
    target = {"linear_weight_nan": (model[4].weight, float("nan")),
              "linear_weight_inf": (model[4].weight, float("inf")),
              "linear_bias_inf": (model[4].bias, float("-inf")),
              "conv_weight_nan": (model[0].weight, float("nan")),
              "batchnorm_running_var_nan": (model[1].running_var, float("nan"))}[where]
    with torch.no_grad():
        target[0].view(-1)[1] = target[1]
    with pytest.raises(ModelValueError):
        BoundedModel(model).compute_bounds(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))


def _small_model():
    return init_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), generator(19))


@pytest.mark.parametrize("method", METHODS)
def test_lower_above_upper_raises_dimension_mismatch(method):
    lower = torch.zeros(2, 4)
    upper = torch.ones(2, 4)
    upper[1, 2] = -0.5
    with pytest.raises(DimensionMismatchError):
        BoundedModel(_small_model()).compute_bounds(lower, upper, method=method)


@pytest.mark.parametrize("lower_shape, upper_shape", [((2, 4), (2, 5)), ((2, 4), (3, 4)), ((2, 5), (2, 5)),
                                                      ((4,), (4,)), ((2, 2, 2), (2, 2, 2))],
                         ids=["lower_upper_differ", "batch_differs", "wrong_width", "no_batch_dim", "wrong_rank"])
def test_wrong_input_shape_raises_dimension_mismatch(lower_shape, upper_shape):
    with pytest.raises(DimensionMismatchError):
        BoundedModel(_small_model()).compute_bounds(torch.zeros(lower_shape), torch.ones(upper_shape))


def test_wrong_input_channels_of_conv_module_raise_dimension_mismatch():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(DimensionMismatchError):
        BoundedModel(model).compute_bounds(torch.zeros(1, 2, 5, 5), torch.ones(1, 2, 5, 5))


@pytest.mark.parametrize("spec_shape", [(2, 3, 3), (1, 3, 2), (3, 2), (2, 3, 2, 1)],
                         ids=["wrong_n_out", "wrong_batch", "missing_batch", "extra_dim"])
def test_wrong_spec_shape_raises_dimension_mismatch(spec_shape):
    with pytest.raises(DimensionMismatchError):
        BoundedModel(_small_model()).compute_bounds(torch.zeros(2, 4), torch.ones(2, 4), torch.ones(spec_shape))


@pytest.mark.parametrize("factory", [lambda: nn.Linear(4, 3), lambda: nn.Conv2d(1, 2, 3)], ids=["linear", "conv2d"])
def test_bare_leaf_module_as_model_is_bounded(factory):
    """A single nn.Linear / nn.Conv2d is a valid model (fx traces its forward to F.linear /
    F.conv2d rather than a call_module node)."""
    module = init_(factory(), generator(20))
    shape = (4,) if isinstance(module, nn.Linear) else (1, 4, 4)
    lower, upper = random_box(shape, 2, generator(21))
    lb, ub = BoundedModel(module, dtype=torch.float64).compute_bounds(lower, upper, method="ibp")
    points = torch.stack([lower, upper], 1)
    values = module.double()(points.reshape(-1, *shape)).reshape(2, 2, -1)
    assert_contains(lb, ub, values, torch.float64, "bare leaf module")
