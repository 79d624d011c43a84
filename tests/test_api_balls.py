"""BoundedModel.compute_bounds on L1 and L2 balls (dual-norm concretisation), the bound_lower /
bound_upper switches, case-insensitive method names and relu_bounds(method="alpha-crown").

Soundness by sampling: >= 10^4 points of each ball (uniform inside, on the sphere, and the
vertices of the L1 ball), through the float64 module; every output within the bounds up to
conftest's tolerance. The ball lies in its enclosing box, so its bounds are no looser."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import DTYPES, N_SAMPLES, assert_contains, assert_le, dtype_id, generator, init_, module_outputs
from verifier import BoundedModel

METHODS = ("ibp", "crown", "alpha-crown", "crown-ibp")


def _mlp(rng):
    return init_(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)), rng)


def _cnn(rng):
    return init_(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(),
                               nn.Linear(5, 3)), rng)


NETS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (1, 6, 6))}


def ball_points(center: torch.Tensor, eps: float, p: float, rng, n: int = N_SAMPLES) -> torch.Tensor:
    """Points of the ball ||x - center||_p <= eps: (B, m, *shape) float64, m >= n: half uniform
    inside, a quarter on the sphere, a quarter on faces/vertices (L1: +-eps e_i and mixes of two)."""
    B, shape = center.shape[0], center.shape[1:]
    d = center[0].numel()
    if p == 2.0:
        direction = torch.randn(B, n, d, generator=rng, dtype=torch.float64)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        radius = torch.rand(B, n, 1, generator=rng, dtype=torch.float64) ** (1.0 / d)
        radius[:, n // 2:] = 1.0   # on the sphere
        offsets = direction * radius
    else:
        # uniform in the L1 ball: Dirichlet weights times random signs, scaled by U^(1/d)
        weights = -torch.log(torch.rand(B, n, d + 1, generator=rng, dtype=torch.float64))
        weights = (weights / weights.sum(-1, keepdim=True))[..., :d]
        signs = torch.randint(0, 2, (B, n, d), generator=rng).to(torch.float64) * 2 - 1
        offsets = weights * signs
        vertices = torch.cat([torch.eye(d, dtype=torch.float64), -torch.eye(d, dtype=torch.float64)])
        offsets[:, :2 * d] = vertices
        offsets[:, n // 2:] /= offsets[:, n // 2:].abs().sum(-1, keepdim=True)   # on the sphere
    return center.to(torch.float64).reshape(B, 1, d) + eps * offsets.reshape(B, n, d)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("method", METHODS)
def test_ball_bounds_contain_samples_and_are_no_looser_than_its_box(net, p, dtype, method):
    build, shape = NETS[net]
    rng = generator(3)
    module = build(rng).eval()
    center = torch.randn(2, *shape, generator=rng, dtype=torch.float64)
    eps = 0.8 if p == 1.0 else 0.5
    points = ball_points(center, eps, p, rng)
    outputs = module_outputs(module.double(), points.reshape(2, -1, *shape))
    model = BoundedModel(module.to(dtype), dtype=dtype)
    lb, ub = model.compute_bounds(center=center.to(dtype), eps=eps, norm=p, method=method.upper())
    assert_contains(lb, ub, outputs, dtype, f"{net} L{p:g} {method}")
    box_lb, box_ub = model.compute_bounds(center.to(dtype) - eps, center.to(dtype) + eps, method=method)
    assert_le(box_lb, lb, dtype, "ball lower >= box lower")
    assert_le(ub, box_ub, dtype, "ball upper <= box upper")


def test_ball_clipped_to_a_box_contains_samples_of_both():
    rng = generator(5)
    module = _mlp(rng).double().eval()
    center = torch.randn(1, 6, generator=rng, dtype=torch.float64)
    lower, upper = center - 0.3, center + 2.0
    points = ball_points(center, 0.6, 2.0, rng, 4 * N_SAMPLES)
    inside = ((points >= lower.unsqueeze(1)) & (points <= upper.unsqueeze(1))).all(-1)
    kept = points[0][inside[0]].unsqueeze(0)
    assert kept.shape[1] >= N_SAMPLES
    outputs = module_outputs(module, kept)
    lb, ub = BoundedModel(module, dtype=torch.float64).compute_bounds(lower, upper, center=center, eps=0.6, norm=2)
    assert_contains(lb, ub, outputs, torch.float64, "L2 ball within a box")


@pytest.mark.parametrize("method", METHODS)
def test_one_sided_bounds_equal_the_two_sided_ones(method):
    rng = generator(7)
    module = _mlp(rng).double().eval()
    model = BoundedModel(module, dtype=torch.float64)
    lower = torch.randn(2, 6, generator=rng, dtype=torch.float64)
    upper = lower + 0.4
    lb, ub = model.compute_bounds(lower, upper, method=method)
    only_lb, none_ub = model.compute_bounds(lower, upper, method=method, bound_upper=False)
    none_lb, only_ub = model.compute_bounds(lower, upper, method=method, bound_lower=False)
    assert none_ub is None and none_lb is None
    if method == "alpha-crown":   # optimised for one side alone: another optimum, no looser than CROWN
        crown_lb, crown_ub = model.compute_bounds(lower, upper, method="crown")
        assert_le(crown_lb, only_lb, torch.float64, "alpha lower alone >= crown lower")
        assert_le(only_ub, crown_ub, torch.float64, "alpha upper alone <= crown upper")
        points = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(2, N_SAMPLES, 6, generator=rng,
                                                                                dtype=torch.float64)
        assert_contains(only_lb, only_ub, module_outputs(module, points), torch.float64, "one-sided alpha")
    else:
        torch.testing.assert_close(only_lb, lb)
        torch.testing.assert_close(only_ub, ub)


def test_relu_bounds_alpha_crown_within_crown_and_contain_samples():
    rng = generator(11)
    module = init_(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), rng)
    module = module.double().eval()
    model = BoundedModel(module, dtype=torch.float64)
    lower = torch.randn(2, 5, generator=rng, dtype=torch.float64)
    upper = lower + 0.8
    crown = model.relu_bounds(lower, upper, method="CROWN")
    alpha = model.relu_bounds(lower, upper, method="alpha-crown")
    assert len(alpha) == len(crown) == 2
    points = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(2, N_SAMPLES, 5, generator=rng,
                                                                            dtype=torch.float64)
    z1 = module[0](points)
    z2 = module[2](torch.relu(z1))
    for (l_a, u_a), (l_c, u_c), z in zip(alpha, crown, (z1, z2)):
        assert_le(l_c, l_a, torch.float64, "alpha lower >= crown lower")
        assert_le(u_a, u_c, torch.float64, "alpha upper <= crown upper")
        assert_contains(l_a, u_a, z, torch.float64, "alpha-crown relu bounds")


def test_unknown_method_and_bad_ball_are_refused():
    model = BoundedModel(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError):
        model.compute_bounds(torch.zeros(1, 3), torch.ones(1, 3), method="deeppoly")
    with pytest.raises(ValueError):
        model.compute_bounds(center=torch.zeros(1, 3), eps=0.1, norm=3)
    with pytest.raises(ValueError):
        model.compute_bounds(center=torch.zeros(1, 3))
