"""Sigmoid and Tanh's optimisable lines (verifier/ops/activation.py, ``_SShaped``): sound for every
parameter, the tangent where the parameter says so, CROWN's lines at the start, and alpha-CROWN
never looser than CROWN on small sigmoid / tanh networks.

Tolerance: the fitted lines carry their own margin against rounding, so sampled points are checked
with none (``f(x)`` computed by the same torch functions the lines were fitted to); network
outputs, a sum of many roundings, with ``NET_TOLERANCE``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.bounds.alpha import AlphaConfig, alpha_crown
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.ops import Bounds, Sigmoid, Tanh

OPS = {"sigmoid": Sigmoid, "tanh": Tanh}
MODULES = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
NET_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


def random_boxes(n: int, dtype, gen: torch.Generator) -> Bounds:
    """n intervals: centres in [-8, 8], widths from 1e-6 to 100 (log-uniform), plus ones straddling 0
    and a degenerate one."""
    centre = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 16
    width = 10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 6)
    centre[: n // 4] = (torch.rand(n // 4, generator=gen, dtype=torch.float64) - 0.5) * width[: n // 4]
    width[-1] = 0.0
    return Bounds((centre - width / 2).to(dtype), (centre + width / 2).to(dtype))


def samples_in(b: Bounds, count: int, gen: torch.Generator) -> torch.Tensor:
    """(count + 2, n): uniform points of each interval and both ends."""
    t = torch.rand(count, b.lower.shape[0], generator=gen, dtype=torch.float64).to(b.lower.dtype)
    x = (b.lower + t * (b.upper - b.lower)).clamp(b.lower, b.upper)
    return torch.cat([x, b.lower.unsqueeze(0), b.upper.unsqueeze(0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sshaped_lines_contain_samples_for_every_projected_parameter(name, dtype):
    op = OPS[name]()
    gen = torch.Generator().manual_seed(7)
    b = random_boxes(64, dtype, gen)
    S = 6
    raw = (torch.rand(64, S, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2) * op.SCALE   # some outside
    raw = raw.to(dtype)
    op.project_slopes(raw)
    raw[:, 0] = 0.0                    # both ends of the range
    raw[:, 1] = op.SCALE
    ls, li, us, ui = op.relaxation(b, raw)                                 # each (64, S)
    x = samples_in(b, 20000, gen)                                          # (P, 64)
    fx = op.forward(x).unsqueeze(-1)
    below = ls * x.unsqueeze(-1) + li - fx
    above = fx - (us * x.unsqueeze(-1) + ui)
    assert float(below.max()) <= 0 and float(above.max()) <= 0
    assert torch.isfinite(li).all() and torch.isfinite(ui).all()


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sshaped_line_is_the_tangent_inside_its_sound_range(name):
    """On a convex interval (u <= 0) every lower line is a tangent at its point d, where
    f'(d) = k; on a concave one (l >= 0) every upper line is."""
    op = OPS[name]()
    gen = torch.Generator().manual_seed(3)
    width = torch.rand(200, generator=gen, dtype=torch.float64) * 6 + 0.1
    upper_end = -torch.rand(200, generator=gen, dtype=torch.float64) * 3
    convex = Bounds(upper_end - width, upper_end)
    concave = Bounds(-upper_end, -upper_end + width)
    p = torch.rand(200, 2, generator=gen, dtype=torch.float64) * op.SCALE
    ls, li, _, _ = op.relaxation(convex, p)
    d = -op.tangent_points(ls)                                             # the convex side's point
    assert torch.all((d >= convex.lower - 1e-9) & (d <= convex.upper + 1e-9))
    assert torch.allclose(li, op.forward(d) - ls * d, atol=1e-12, rtol=0)
    _, _, us, ui = op.relaxation(concave, p)
    d = op.tangent_points(us)
    assert torch.allclose(ui, op.forward(d) - us * d, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sshaped_default_lines_are_the_initial_parameters_lines_and_the_chord(name):
    """CROWN's lines (no parameter) are those of ``init_slopes``, bit for bit, and their slope is
    the chord's where f is convex or concave on the interval (the upper resp. lower line)."""
    op = OPS[name]()
    gen = torch.Generator().manual_seed(5)
    b = random_boxes(128, torch.float64, gen)
    default = op.relaxation(b)
    initial = op.relaxation(b, op.init_slopes(b).unsqueeze(1))
    for t, s in zip(default, initial):
        assert torch.equal(t, s.squeeze(1))
    convex = (b.upper <= 0) & (b.upper - b.lower > 1e-3)
    chord = (op.forward(b.upper) - op.forward(b.lower)) / (b.upper - b.lower)
    assert torch.allclose(default[2][convex], chord[convex], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_sshaped_tangent_points_invert_the_derivative_far_out(name):
    """f'(x) = k solved accurately down to tiny k: a point cut short (the old clamp of k at 1e-12)
    misses the extreme of g by up to f's tail there, more than the lines' margin in float64."""
    op = OPS[name]()
    x = torch.cat([torch.linspace(0.01, 30, 300, dtype=torch.float64), torch.tensor([40.0, 60.0], dtype=torch.float64)])
    back = op.tangent_points(op.df(x))
    assert torch.allclose(back, x, rtol=1e-6, atol=1e-6)
    assert op.tangent_points(torch.zeros(1, dtype=torch.float64)).item() == float("inf")


def random_net(name: str, seed: int, dtype) -> nn.Sequential:
    torch.manual_seed(seed)
    act = MODULES[name]
    net = nn.Sequential(nn.Linear(4, 12), act(), nn.Linear(12, 10), act(), nn.Linear(10, 3))
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(2.0)
    return net.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_alpha_crown_bounds_on_sshaped_nets_contain_samples_and_beat_crown(name, dtype):
    gen = torch.Generator().manual_seed(11)
    improved = 0
    for seed in range(4):
        net = random_net(name, seed, dtype)
        graph = BoundedModel(net, dtype=dtype).graph((4,))
        centre = torch.randn(1, 4, generator=gen, dtype=torch.float64).to(dtype)
        radius = 0.6
        box = Bounds(centre - radius, centre + radius)
        C = torch.eye(3, dtype=dtype).unsqueeze(0)
        with torch.no_grad():
            crown_lb, crown_ub = output_bounds(graph, box, C, crown_bounds(graph, box))
        for intermediate in (False, True):
            config = AlphaConfig(iterations=30, optimize_intermediate=intermediate)
            lb, ub, _, _ = alpha_crown(graph, box, C, config)
            lb, ub = lb.detach(), ub.detach()
            # never looser than CROWN: the first iterate is CROWN's lines (bit for bit)
            assert torch.all(lb >= crown_lb - NET_TOLERANCE[dtype]) and torch.all(ub <= crown_ub + NET_TOLERANCE[dtype])
            improved += int(float((lb - crown_lb).sum() + (crown_ub - ub).sum()) > 1e-3)
            x = box.lower + torch.rand(20000, 4, generator=gen, dtype=torch.float64).to(dtype) * (box.upper - box.lower)
            with torch.no_grad():
                y = net(x)
            assert torch.all(y >= lb[0] - NET_TOLERANCE[dtype]) and torch.all(y <= ub[0] + NET_TOLERANCE[dtype])
    assert improved >= 4   # the optimisation tightens the bounds, not only keeps them


def test_sshaped_parameter_gradients_are_finite_on_wide_and_degenerate_intervals():
    op = Tanh()
    b = Bounds(torch.tensor([-50.0, -1e-9, 0.3, 2.0, -3.0], dtype=torch.float64),
               torch.tensor([50.0, 1e-9, 0.3, 2.5, 40.0], dtype=torch.float64))
    p = op.init_slopes(b).unsqueeze(1).clone().requires_grad_(True)
    ls, li, us, ui = op.relaxation(b, p)
    (li.sum() - ui.sum() + ls.sum() + us.sum()).backward()
    assert torch.isfinite(p.grad).all()
