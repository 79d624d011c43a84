"""Bounds compared with values known exactly.

- Affine models (every linear op alone) and ReLU networks whose ReLUs are all stable on the box:
  CROWN equals the exact range of the affine map, ``C f(c) -/+ |C J| r`` (J the Jacobian, c the
  box centre, r its radius).
- Tiny ReLU networks: the triangle-relaxation LP, solved by ``scipy.optimize.linprog``, lies
  between CROWN and the true minimum: CROWN lower <= LP(CROWN's own intermediate bounds) and
  every method <= LP(layerwise LP intermediate bounds) <= true minimum (dense grid / sampling).
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linprog

from conftest import (DTYPES, METHODS, Lambda, assert_close, assert_le, dtype_id, generator, init_,
                      random_spec, sample_box)
from verifier import BoundedModel


# ---- exact affine ranges ----------------------------------------------------------------------
def exact_affine_range(module: nn.Module, center: torch.Tensor, radius: torch.Tensor, spec: torch.Tensor):
    """Exact range of spec @ f over the box, for f affine on it (float64).

    center, radius: (B, *shape); spec: (B, S, n_out) -> lower, upper: (B, S)."""
    f = copy.deepcopy(module).double().eval()
    lows, highs = [], []
    for b in range(center.shape[0]):
        x0 = center[b:b + 1]
        J = torch.autograd.functional.jacobian(lambda x: f(x).reshape(-1), x0).reshape(-1, x0.numel())
        with torch.no_grad():
            mid = spec[b] @ f(x0).reshape(-1)
        half_width = (spec[b] @ J).abs() @ radius[b].reshape(-1)
        lows.append(mid - half_width)
        highs.append(mid + half_width)
    return torch.stack(lows), torch.stack(highs)


def _affine(factory, **buffers):
    """Builder of an nn.Sequential around factory(), or with buffers (shapes of random constants,
    or tensors) of a Lambda around the function factory."""
    if not buffers:
        return lambda rng: init_(nn.Sequential(factory()), rng)
    return lambda rng: Lambda(factory, **{k: s if isinstance(s, torch.Tensor) else torch.randn(*s, generator=rng)
                                          for k, s in buffers.items()})


class AffineBranches(nn.Module):
    """Two conv branches of one input: their sum, difference and a padded, cropped copy, concatenated."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return torch.cat([a + b, a - b, F.pad(a, (1, 0, 0, 1), value=-0.3)[:, :, :4, :4]], dim=1)


AFFINE_MODELS = {
    "linear": (_affine(lambda: nn.Linear(5, 3)), (5,)),
    "conv_stride2_pad1": (_affine(lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 6, 6)),
    "conv_stride3_unreached_rows": (_affine(lambda: nn.Conv2d(2, 2, 2, stride=3)), (2, 7, 8)),
    "conv_dilation2_groups2": (_affine(lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)), (4, 6, 6)),
    "batchnorm2d_eval": (_affine(lambda: nn.BatchNorm2d(3)), (3, 3, 3)),
    "avgpool_count_include_pad": (_affine(lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=True)), (2, 5, 5)),
    "avgpool_exclude_pad": (_affine(lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False)), (2, 5, 5)),
    "matmul_constants_both_sides": (_affine(lambda m, x: m.left @ (x @ m.right), left=(2, 4), right=(3, 5)), (4, 3)),
    "normalise_permute_reshape": (_affine(lambda m, x: ((x - m.mean) / m.std).permute(0, 3, 1, 2).reshape(-1, 2, 12),
                                          mean=(2,), std=torch.tensor([0.7, -1.3])), (3, 4, 2)),
    "branches_add_sub_concat_pad": (lambda rng: init_(AffineBranches(), rng), (2, 4, 4)),
}
# IBP is exact per output only where every output is reached by a single path from the input
IBP_NOT_EXACT = {"branches_add_sub_concat_pad"}




@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(AFFINE_MODELS))
def test_crown_equals_exact_range_on_affine_models(name, dtype):
    build, shape = AFFINE_MODELS[name]
    rng = generator(30)
    model = build(rng)
    center = torch.randn(2, *shape, generator=rng, dtype=torch.float64)
    radius = 0.05 + 0.5 * torch.rand(2, *shape, generator=rng, dtype=torch.float64)
    n_out = model(center.float()).reshape(2, -1).shape[1]
    spec = random_spec(2, 4, n_out, rng)
    want_lb, want_ub = exact_affine_range(model, center, radius, spec)
    bm = BoundedModel(model, dtype=dtype)
    for method in ("crown", "alpha-crown", "crown-ibp"):
        lb, ub = bm.compute_bounds((center - radius).to(dtype), (center + radius).to(dtype), spec.to(dtype),
                                   method=method)
        assert_close(lb.detach(), want_lb, dtype, f"{name} {method} lower")
        assert_close(ub.detach(), want_ub, dtype, f"{name} {method} upper")
    if name in IBP_NOT_EXACT:
        return
    # without a spec and along a single path IBP is exact too
    eye = torch.eye(n_out, dtype=torch.float64).expand(2, n_out, n_out)
    want_lb, want_ub = exact_affine_range(model, center, radius, eye)
    lb, ub = bm.compute_bounds((center - radius).to(dtype), (center + radius).to(dtype), method="ibp")
    assert_close(lb.detach(), want_lb, dtype, f"{name} ibp lower")
    assert_close(ub.detach(), want_ub, dtype, f"{name} ibp upper")


class ResidualReLU(nn.Module):
    """conv -> ReLU -> conv, minus the input (Sub of branches), ReLU, AvgPool, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) - x)
        return self.head(torch.flatten(self.pool(y), 1))


STABLE_NETWORKS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), (5,)),
    "cnn_batchnorm": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                            nn.Conv2d(3, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)), (1, 6, 6)),
    "residual_avgpool": (ResidualReLU, (2, 4, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(STABLE_NETWORKS))
def test_crown_equals_exact_affine_range_when_all_relus_stable(name, dtype):
    factory, shape = STABLE_NETWORKS[name]
    rng = generator(31)
    model = init_(factory(), rng)
    center = torch.randn(2, *shape, generator=rng, dtype=torch.float64)
    bm = BoundedModel(model, dtype=torch.float64)
    # shrink the box until every ReLU is stable by a margin (checked on CROWN's bounds)
    radius = 0.2
    while True:
        pre = bm.relu_bounds(center - radius, center + radius, method="crown")
        if all(bool(((l > 1e-3) | (u < -1e-3)).all()) for l, u in pre):
            break
        radius /= 2
        assert radius > 1e-5, "no box around the centre keeps every ReLU stable"
    radius_t = radius * (0.5 + 0.5 * torch.rand(2, *shape, generator=rng, dtype=torch.float64))
    spec = random_spec(2, 4, 3 if name != "cnn_batchnorm" else 2, rng)
    want_lb, want_ub = exact_affine_range(model, center, radius_t, spec)
    bm = BoundedModel(model, dtype=dtype)
    for method in ("crown", "alpha-crown"):
        lb, ub = bm.compute_bounds((center - radius_t).to(dtype), (center + radius_t).to(dtype), spec.to(dtype),
                                   method=method)
        assert_close(lb.detach(), want_lb, dtype, f"{name} {method} lower (radius {radius})")
        assert_close(ub.detach(), want_ub, dtype, f"{name} {method} upper (radius {radius})")


# ---- the triangle-relaxation LP ---------------------------------------------------------------
LP_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


def triangle_lp(weights, biases, lower, upper, pre_bounds, objective_layer, objective):
    """min objective · z_k over the triangle relaxation (Ehlers 2017) of a ReLU MLP.

    weights[k], biases[k]: layer k maps a_{k-1} (a_0 = x) to z_k = W a + b; pre_bounds[k] = (L, U)
    for hidden layers k < objective_layer, numpy float64. Variables: x, then (z_k, a_k) per
    hidden layer, then z of the objective layer. Returns the optimum (float)."""
    d = len(lower)
    sizes = [W.shape[0] for W in weights[:objective_layer + 1]]
    n_var = d + 2 * sum(sizes[:-1]) + sizes[-1]
    bounds = [(float(lo), float(hi)) for lo, hi in zip(lower, upper)]
    A_eq, b_eq, A_ub, b_ub = [], [], [], []
    prev = list(range(d))
    offset = d
    for k in range(objective_layer + 1):
        W, b = weights[k], biases[k]
        z = list(range(offset, offset + W.shape[0]))
        offset += W.shape[0]
        for j in range(W.shape[0]):                     # z_j = W_j a_prev + b_j
            row = np.zeros(n_var)
            row[z[j]] = 1.0
            row[prev] = -W[j]
            A_eq.append(row)
            b_eq.append(b[j])
        if k == objective_layer:
            bounds += [(None, None)] * W.shape[0]
            break
        L, U = pre_bounds[k]
        bounds += [(float(lo), float(hi)) for lo, hi in zip(L, U)]
        a = list(range(offset, offset + W.shape[0]))
        offset += W.shape[0]
        for j in range(W.shape[0]):
            if U[j] <= 0:                                # inactive: a = 0
                bounds.append((0.0, 0.0))
            elif L[j] >= 0:                              # active: a = z
                bounds.append((None, None))
                row = np.zeros(n_var)
                row[a[j]], row[z[j]] = 1.0, -1.0
                A_eq.append(row)
                b_eq.append(0.0)
            else:                                        # a >= 0, a >= z, a <= U (z - L) / (U - L)
                bounds.append((0.0, None))
                row = np.zeros(n_var)
                row[z[j]], row[a[j]] = 1.0, -1.0
                A_ub.append(row)
                b_ub.append(0.0)
                slope = U[j] / (U[j] - L[j])
                row = np.zeros(n_var)
                row[a[j]], row[z[j]] = 1.0, -slope
                A_ub.append(row)
                b_ub.append(-slope * L[j])
        prev = a
    c = np.zeros(n_var)
    c[n_var - sizes[-1]:] = objective
    result = linprog(c, A_ub=np.array(A_ub) if A_ub else None, b_ub=b_ub or None, A_eq=np.array(A_eq), b_eq=b_eq,
                     bounds=bounds, method="highs-ds", options=LP_OPTIONS)
    assert result.status == 0, result.message
    return float(result.fun)


def layerwise_lp_bounds(weights, biases, lower, upper):
    """Pre-activation bounds of every hidden layer, each by LPs over the triangle relaxation
    built with the LP bounds of the layers before it (the tightest triangle bounds there are)."""
    pre = []
    for k in range(len(weights) - 1):
        n = weights[k].shape[0]
        L = np.array([triangle_lp(weights, biases, lower, upper, pre, k, np.eye(n)[j]) for j in range(n)])
        U = np.array([-triangle_lp(weights, biases, lower, upper, pre, k, -np.eye(n)[j]) for j in range(n)])
        pre.append((L, U))
    return pre


def tiny_net(seed: int, d: int, hidden: tuple[int, ...], n_out: int = 2) -> nn.Sequential:
    layers, sizes = [], (d, *hidden, n_out)
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return init_(nn.Sequential(*layers[:-1]), generator(seed), scale=1.5)


def grid(lower: np.ndarray, upper: np.ndarray, per_dim: int) -> torch.Tensor:
    axes = [np.linspace(lo, hi, per_dim) for lo, hi in zip(lower, upper)]
    return torch.tensor(np.array(list(itertools.product(*axes))), dtype=torch.float64)


def true_extremes(model: nn.Module, lower: np.ndarray, upper: np.ndarray, spec: np.ndarray):
    """min and max of spec @ f over a dense grid plus 10^4 samples (upper / lower estimates of
    the true min / max), float64. spec: (S, n_out) -> (S,), (S,)."""
    per_dim = {1: 100_001, 2: 301, 3: 41}[len(lower)]
    lo_t, hi_t = torch.tensor(lower).unsqueeze(0), torch.tensor(upper).unsqueeze(0)
    points = torch.cat([grid(lower, upper, per_dim), sample_box(lo_t, hi_t, generator(0))[0]])
    with torch.no_grad():
        values = copy.deepcopy(model).double()(points) @ torch.tensor(spec).T
    return values.min(0).values, values.max(0).values


def _t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


LP_NETS = [  # (seed, inputs, hidden layers): 1-3 inputs, two hidden layers of 3-5 ReLUs
    (40, 1, (4, 4)), (48, 1, (5, 3)), (42, 2, (3, 4)), (43, 2, (5, 5)), (44, 2, (4, 3)), (45, 3, (4, 4)),
    (46, 3, (5, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seed, d, hidden", LP_NETS, ids=[f"{d}in-{h[0]}x{h[1]}-s{s}" for s, d, h in LP_NETS])
def test_crown_never_tighter_than_triangle_lp_and_lp_below_true_minimum(seed, d, hidden, dtype):
    model = tiny_net(seed, d, hidden)
    rng = generator(seed)
    center = torch.randn(d, generator=rng, dtype=torch.float64) * 0.5
    radius = 0.3 + 0.7 * torch.rand(d, generator=rng, dtype=torch.float64)
    lower, upper = (center - radius).numpy(), (center + radius).numpy()
    spec = random_spec(1, 3, 2, rng)[0].numpy()
    weights = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    bm = BoundedModel(model, dtype=dtype)
    box = (torch.tensor(lower).unsqueeze(0).to(dtype), torch.tensor(upper).unsqueeze(0).to(dtype))
    C = torch.tensor(spec).unsqueeze(0).to(dtype)
    bounds = {m: [t.detach()[0].double() for t in bm.compute_bounds(*box, C, method=m)] for m in METHODS}
    crown_pre = [(l.detach()[0].double().numpy(), u.detach()[0].double().numpy())
                 for l, u in bm.relu_bounds(*box, method="crown")]
    unstable = sum(int(((l < 0) & (u > 0)).sum()) for l, u in crown_pre)
    assert unstable >= 2, "the box should leave some ReLUs unstable, or the LP test is trivial"
    exact_pre = layerwise_lp_bounds(weights, biases, lower, upper)
    true_min, true_max = true_extremes(model, lower, upper, spec)
    last = len(weights) - 1
    for s in range(spec.shape[0]):
        objective = spec[s] @ np.eye(2)
        lp_crown_min = triangle_lp(weights, biases, lower, upper, crown_pre, last, objective)
        lp_crown_max = -triangle_lp(weights, biases, lower, upper, crown_pre, last, -objective)
        lp_min = triangle_lp(weights, biases, lower, upper, exact_pre, last, objective)
        lp_max = -triangle_lp(weights, biases, lower, upper, exact_pre, last, -objective)
        what = f"spec row {s}"
        # CROWN is a feasible dual of the LP with its own intermediate bounds
        assert_le(bounds["crown"][0][s], _t(lp_crown_min), dtype, f"{what}: CROWN lower <= LP")
        assert_le(_t(lp_crown_max), bounds["crown"][1][s], dtype, f"{what}: LP max <= CROWN upper")
        # no method beats the LP over the tightest triangle relaxation ...
        for method in METHODS:
            assert_le(bounds[method][0][s], _t(lp_min), dtype, f"{what}: {method} lower <= layerwise LP")
            assert_le(_t(lp_max), bounds[method][1][s], dtype, f"{what}: layerwise LP max <= {method} upper")
        # ... which is a relaxation: never above the true minimum
        assert_le(_t(lp_min), true_min[s], torch.float64, f"{what}: LP <= true min")
        assert_le(_t(lp_crown_min), _t(lp_min), dtype, f"{what}: LP(CROWN) <= LP(exact)")
        assert_le(true_max[s], _t(lp_max), torch.float64, f"{what}: true max <= LP max")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seed, d", [(50, 1), (51, 1), (52, 2), (53, 2)])
def test_bounds_contain_grid_extremes_of_one_and_two_input_nets(seed, d, dtype):
    model = tiny_net(seed, d, (6, 6), n_out=3)
    rng = generator(seed)
    centers = torch.randn(3, d, generator=rng, dtype=torch.float64)
    radii = 0.1 + torch.rand(3, d, generator=rng, dtype=torch.float64)
    spec = random_spec(3, 2, 3, rng)
    bm = BoundedModel(model, dtype=dtype)
    for b in range(3):
        lower, upper = (centers[b] - radii[b]).numpy(), (centers[b] + radii[b]).numpy()
        grid_min, grid_max = true_extremes(model, lower, upper, spec[b].numpy())
        for method in METHODS:
            lb, ub = bm.compute_bounds(torch.tensor(lower).unsqueeze(0).to(dtype),
                                       torch.tensor(upper).unsqueeze(0).to(dtype), spec[b:b + 1].to(dtype),
                                       method=method)
            assert_le(lb.detach()[0], grid_min, dtype, f"box {b} {method} lower <= grid min")
            assert_le(grid_max, ub.detach()[0], dtype, f"box {b} {method} upper >= grid max")


# ---- alpha-CROWN's optimisation loop ----------------------------------------------------------
def test_alpha_crown_stops_early_only_after_patience_steps_without_gain(monkeypatch):
    """The early stop fires after ``early_stop_patience`` consecutive steps that do not improve
    the objective, never while it improves (a comparison with the initial -inf once made every
    run stop after exactly ``patience`` steps)."""
    import verifier.bounds.alpha as alpha_module
    from verifier.bounds.alpha import AlphaConfig, alpha_crown
    from verifier.ops import Bounds

    model = tiny_net(7, 4, (16, 16, 16), n_out=3)
    bm = BoundedModel(model, dtype=torch.float64)
    graph = bm.graph((4,))
    rng = generator(7)
    center = torch.randn(1, 4, generator=rng, dtype=torch.float64)
    box = Bounds(center - 1.0, center + 1.0)
    C = random_spec(1, 2, 3, rng)
    objectives = []
    real = alpha_module.output_bounds

    def spy(*args, **kwargs):
        lb, ub = real(*args, **kwargs)
        objectives.append(float(lb.detach().sum() - ub.detach().sum()))
        return lb, ub

    monkeypatch.setattr(alpha_module, "output_bounds", spy)
    patience, iterations = 2, 30
    alpha_crown(graph, box, C, AlphaConfig(iterations=iterations, early_stop_patience=patience, lr=0.05))
    steps = objectives[:-1]   # the last call evaluates the final iterate after the loop
    expected, best, stale = iterations, None, 0
    for k, value in enumerate(steps):
        if best is None or value > best + 1e-6 * max(1.0, abs(best)):
            best, stale = value, 0
        else:
            stale += 1
            if stale == patience:
                expected = k + 1
                break
    assert len(steps) == expected, f"ran {len(steps)} steps, the rule says {expected}: {steps}"
    assert len(steps) > 2 * patience, f"this net's objective improves for more than {2 * patience} steps: {steps}"


def test_precomputed_relu_lines_give_the_same_bounds():
    """``output_bounds(..., lines=relu_lines(...))`` (alpha-CROWN's loop with fixed intermediate
    bounds) equals recomputing each relaxation in the pass, with and without slopes."""
    from verifier.bounds.alpha import init_alphas
    from verifier.bounds.crown import crown_bounds, output_bounds, relu_lines
    from verifier.ops import Bounds

    model = tiny_net(8, 5, (12, 12), n_out=4)
    graph = BoundedModel(model, dtype=torch.float64).graph((5,))
    rng = generator(8)
    center = torch.randn(3, 5, generator=rng, dtype=torch.float64)
    box = Bounds(center - 0.7, center + 0.7)
    C = random_spec(3, 2, 4, rng)
    bounds = crown_bounds(graph, box)
    assert any(bool(((bounds[graph.nodes[r].inputs[0]].lower < 0) & (bounds[graph.nodes[r].inputs[0]].upper > 0)).any())
               for r in graph.relu_nodes()), "the box must leave some ReLU unstable"
    slopes = init_alphas(graph, {graph.output: 2}, bounds, {graph.output: True})
    with torch.no_grad():
        for pair in slopes.values():
            for a in pair:
                a.uniform_(0, 1, generator=rng)
    for alphas in (None, slopes):
        want = output_bounds(graph, box, C, bounds, alphas=alphas)
        got = output_bounds(graph, box, C, bounds, alphas=alphas, lines=relu_lines(graph, bounds))
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
