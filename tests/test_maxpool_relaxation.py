"""Max-pooling's optimisable relaxation (ops/pooling.py): the lines contain the maximum for any
parameters (sampling, overlapping and padded windows, windows straddling and decided), the
default parameters are CROWN's constant roof and argmax-of-lower line, and alpha-CROWN over them
is no looser than CROWN and still contains sampled outputs."""
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.bounds.alpha import AlphaConfig, alpha_crown
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.ops import Bounds
from verifier.ops.pooling import MaxPool2d

TOL = 1e-9   # float64 throughout


def linear_value(A: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    """A (1, S, *in) . x (P, *in) + bias -> (P, S)."""
    return x.flatten(1) @ A[0].flatten(1).T + bias


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                                     ((3, 2), (1, 1), (0, 1))])
@pytest.mark.parametrize("params", ["default", "random", "wild"])
def test_maxpool_lines_contain_the_maximum_for_any_parameters(kernel, stride, padding, params):
    gen = torch.Generator().manual_seed(0)
    in_shape = (2, 5, 6)
    op = MaxPool2d(kernel, stride, padding, (1, 1), in_shape)
    centre = torch.randn(1, *in_shape, generator=gen, dtype=torch.float64)
    # small radii make decided windows, large ones straddling windows
    radius = torch.rand(1, *in_shape, generator=gen, dtype=torch.float64) * torch.where(
        torch.rand(1, *in_shape, generator=gen) < 0.5, 0.05, 2.0).double()
    b = Bounds(centre - radius, centre + radius)
    out_shape = op.forward(b.lower).shape[1:]
    S = 5
    A = torch.randn(1, S, *out_shape, generator=gen, dtype=torch.float64)
    alpha = None
    if params != "default":
        init = op.init_slopes(b).unsqueeze(1).expand(1, S, *op.init_slopes(b).shape[1:])
        noise = torch.rand(init.shape, generator=gen, dtype=torch.float64)
        alpha = (noise, noise.flip(1)) if params == "random" else (noise * 6 - 3, -noise)   # unprojected too
    result = op.backward(A, A, b, *(alpha or ()))
    lA, uA = result.input_A[0]
    x = b.lower + torch.rand(20_000, *in_shape, generator=gen, dtype=torch.float64) * (b.upper - b.lower)
    x = torch.cat([x, torch.where(torch.rand(2_000, *in_shape, generator=gen) < 0.5, b.lower, b.upper)])  # corners
    y = (op.forward(x).flatten(1) @ A[0].flatten(1).T)                                                    # (P, S)
    assert torch.all(linear_value(lA, result.lbias, x) <= y + TOL)
    assert torch.all(linear_value(uA, result.ubias, x) >= y - TOL)


def test_maxpool_default_parameters_are_crowns_relaxation():
    """Without parameters: lower line x_j (j = argmax l), upper the constant max u where undecided,
    y = x_j where decided; the same bounds as the parameters of ``init_slopes``."""
    op = MaxPool2d((2, 2), (2, 2), (0, 0), (1, 1), (1, 2, 4))
    lower = torch.tensor([[[[0.0, -1.0, 5.0, 0.0], [1.0, -2.0, 0.0, 0.0]]]], dtype=torch.float64)
    upper = torch.tensor([[[[2.0, 0.0, 6.0, 1.0], [3.0, 1.0, 1.0, 4.5]]]], dtype=torch.float64)
    b = Bounds(lower, upper)
    A = torch.tensor([[[[1.0, 1.0]], [[-1.0, -1.0]]]], dtype=torch.float64)                 # (1, 2, 1, 1, 2)
    result = op.backward(A, None, b)
    lA = result.input_A[0][0]
    # window 0 undecided: lower x at (1, 0) (l = 1), roof max u = 3; window 1 decided by x (0, 2)
    assert lA[0, 0, 0, 1, 0] == 1 and lA[0, 0, 0, 0, 2] == 1 and lA[0, 0].abs().sum() == 2
    assert lA[0, 1, 0, 0, 2] == -1 and lA[0, 1].abs().sum() == 1
    assert float(result.lbias[0, 0]) == 0.0 and float(result.lbias[0, 1]) == -3.0
    init = op.init_slopes(b).unsqueeze(1).expand(1, 2, *op.init_slopes(b).shape[1:])
    again = op.backward(A, None, b, alpha_l=init)
    assert torch.equal(again.input_A[0][0], lA) and torch.equal(again.lbias, result.lbias)


def maxpool_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3),
                         nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(2, 3)).double().eval()


@pytest.mark.parametrize("seed", range(3))
def test_alpha_crown_on_maxpool_is_no_looser_than_crown_and_contains_samples(seed):
    net = maxpool_net(seed)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((1, 8, 8))
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64)
    box = Bounds(centre - 0.1, centre + 0.1)
    C = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        bounds = crown_bounds(graph, box)
        crown_lb, crown_ub = output_bounds(graph, box, C, bounds)
    lb, ub, _, _ = alpha_crown(graph, box, C, AlphaConfig(iterations=20), initial=bounds)
    assert torch.all(lb >= crown_lb - TOL) and torch.all(ub <= crown_ub + TOL)
    x = box.lower + torch.rand(20_000, 1, 8, 8, generator=gen, dtype=torch.float64) * (box.upper - box.lower)
    with torch.no_grad():
        y = net(x) @ C[0].T
    assert torch.all(y >= lb - TOL) and torch.all(y <= ub + TOL)


def tiny_maxpool_net(seed: int) -> nn.Sequential:
    """3 inputs (1, 1, 3) -> conv (4, 1, 2) -> ReLU -> max-pool over the 2 columns -> 2 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, (1, 2)), nn.ReLU(), nn.MaxPool2d((1, 2)), nn.Flatten(),
                         nn.Linear(6, 2)).double().eval()


def min_brackets(net: nn.Sequential, graph, c: torch.Tensor, cells: int = 40) -> tuple[float, float]:
    """(a sound lower bound, an attained value) of min over [-1, 1]^3 of c . net(x): CROWN on every
    cell of a cells^3 subdivision (each sound, so their minimum is), and the least value at the
    cells' corners and centres."""
    edges = torch.linspace(-1, 1, cells + 1, dtype=torch.float64)
    lo = torch.cartesian_prod(edges[:-1], edges[:-1], edges[:-1]).view(-1, 1, 1, 3)
    hi = torch.cartesian_prod(edges[1:], edges[1:], edges[1:]).view(-1, 1, 1, 3)
    box = Bounds(lo, hi)
    with torch.no_grad():
        lb, _ = output_bounds(graph, box, c.view(1, 1, -1).expand(len(lo), 1, -1), crown_bounds(graph, box),
                              need_upper=False)
        values = net(torch.cat([lo, hi, (lo + hi) / 2])) @ c
    return float(lb.min()), float(values.min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_decides_tiny_maxpool_nets_as_subdivision_and_sampling_say(seed):
    import numpy as np
    from verifier.bab.config import BabConfig
    from verifier.io.vnnlib import InputRegion, OutputConstraint, Property
    from verifier.verify import VerifyConfig, verify

    net = tiny_maxpool_net(seed)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((1, 1, 3))
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    lower_bound, attained = min_brackets(net, graph, c)
    assert attained - lower_bound < 0.05                      # the brackets are tight
    box = Bounds(-torch.ones(1, 1, 1, 3, dtype=torch.float64), torch.ones(1, 1, 1, 3, dtype=torch.float64))
    with torch.no_grad():
        root, _ = output_bounds(graph, box, c.view(1, 1, 2), crown_bounds(graph, box), need_upper=False)
    below = lower_bound - 0.5 * (lower_bound - float(root[0, 0]))   # holds; CROWN alone does not prove it
    assert float(root[0, 0]) < below
    lower, upper = -np.ones(3), np.ones(3)
    config = VerifyConfig(timeout=60, bab=BabConfig(input_split="off"))
    for rhs, expected in ((below, "unsat"), (attained + 0.005, "sat")):
        prop = Property("<test>", 3, 2, (InputRegion(lower, upper, (OutputConstraint(
            c.numpy().reshape(1, -1), np.array([rhs])),)),))
        result = verify(model, prop, config)
        assert result.status == expected, (seed, rhs, lower_bound, attained)
        if expected == "sat":
            x, y = result.counterexample
            assert np.all(x >= lower) and np.all(x <= upper) and c.numpy() @ y <= rhs + 1e-9
