"""Branch and bound on general non-linearities (bab/general_split.py, bab/branching.py): bounds
under split constraints s (z - p) >= 0 contain every sampled point satisfying them, the lines
read from each op contain the function, and known answers on tiny sigmoid / tanh nets (sat by a
sampled violation, unsat below a lower bound from exhaustive interval subdivision)."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.bab.branching import choose_points, element_lines, line_gap
from verifier.bab.config import BabConfig, GeneralSplitConfig
from verifier.bab.general_split import GeneralSplitSearch, has_general_splits, split_search
from verifier.bab.records import SubdomainRecords
from verifier.bab.relu_split import ReluSplitSearch
from verifier.bounds.crown import SplitState, crown_bounds, output_bounds
from verifier.io.vnnlib import InputRegion, OutputConstraint, Property
from verifier.ops import Bounds
from verifier.ops.activation import ReLU, Sigmoid, Tanh
from verifier.spec import region_specs
from verifier.verify import VerifyConfig, verify

TOL = 1e-9   # float64 throughout: rounding slack of the comparisons below

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
OPS = {"sigmoid": Sigmoid, "tanh": Tanh, "relu": ReLU}


def tiny_net(seed: int, activations: tuple[str, ...], n_in=2, width=8, n_out=2, scale=2.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, prev = [], n_in
    for name in activations:
        linear = nn.Linear(prev, width)
        with torch.no_grad():
            linear.weight.mul_(scale)
        layers += [linear, ACTIVATIONS[name]()]
        prev = width
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu"])
def test_element_lines_contain_the_function_on_random_intervals(name):
    op = OPS[name]()
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn(500, generator=gen, dtype=torch.float64) * 4
    radius = torch.rand(500, generator=gen, dtype=torch.float64) * torch.tensor([0.01, 1.0, 8.0]).repeat_interleave(
        167)[:500].double()
    b = Bounds(centre - radius, centre + radius)
    lines = element_lines(op, b)
    t = torch.rand(200, 500, generator=gen, dtype=torch.float64)
    x = b.lower + t * (b.upper - b.lower)
    f = op.forward(x)
    assert torch.all(lines.lower_slope * x + lines.lower_intercept <= f + TOL)
    assert torch.all(lines.upper_slope * x + lines.upper_intercept >= f - TOL)
    gap = line_gap(op, b)
    assert torch.all(gap >= 0) and torch.all(f - (lines.lower_slope * x + lines.lower_intercept) <= gap + TOL)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_split_points_lie_inside_and_split_s_shapes_at_their_inflection(name):
    op = OPS[name]()
    l = torch.tensor([[-3.0, -0.5, 1.0, 2.0, -1.0]], dtype=torch.float64)
    u = torch.tensor([[4.0, 0.5, 3.0, 2.0 + 1e-9, -1.0 + 1e-3]], dtype=torch.float64)
    choice = choose_points(op, Bounds(l, u), min_width=1e-6)
    inside = choice.point[:, [0, 1, 2, 4]]
    assert torch.all(inside > l[:, [0, 1, 2, 4]]) and torch.all(inside < u[:, [0, 1, 2, 4]])
    assert float(choice.point[0, 0]) == 0.0 and float(choice.point[0, 1]) == 0.0
    assert torch.isneginf(choice.gain[0, 3])      # narrower than min_width: not split
    assert torch.all(choice.gain[:, [0, 1, 2, 4]] >= 0)
    # the split leaves each half with a smaller gap than the whole
    lo_gap = line_gap(op, Bounds(l[:, :1], choice.point[:, :1]))
    assert float(lo_gap) < float(line_gap(op, Bounds(l[:, :1], u[:, :1])))


def random_splits(graph, z_nodes, anchor, gen, share=0.4):
    """Split constraints s (z - p) >= 0 that the anchor's values satisfy, on a share of the
    neurons, with random points on the anchor's side, and random multipliers."""
    signs, points, betas = {}, {}, {}
    for z in z_nodes:
        shape = graph.nodes[z].shape
        chosen = torch.rand(1, *shape, generator=gen) < share
        s = torch.where(torch.rand(1, *shape, generator=gen) < 0.5, 1.0, -1.0).double() * chosen
        offset = torch.rand(1, *shape, generator=gen, dtype=torch.float64)
        signs[z] = s
        points[z] = anchor[z] - s * offset           # s (anchor - p) = offset >= 0
        betas[z] = torch.rand(1, 1, *shape, generator=gen, dtype=torch.float64)
    return SplitState(signs, betas, points)


@pytest.mark.parametrize("activations", [("sigmoid", "sigmoid"), ("tanh", "tanh"), ("relu", "relu"),
                                         ("sigmoid", "relu", "tanh")])
@pytest.mark.parametrize("seed", range(3))
def test_bounds_under_split_points_contain_points_satisfying_them(activations, seed):
    net = tiny_net(seed, activations, n_in=3, width=10, n_out=3)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    box = Bounds(-torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    z_nodes = [graph.nodes[i].inputs[0] for i, n in enumerate(graph.nodes) if n.op is not None and n.op.nonlinear]
    gen = torch.Generator().manual_seed(seed)
    anchor = graph.forward(torch.rand(1, 3, generator=gen, dtype=torch.float64) * 2 - 1, keep=True)
    splits = random_splits(graph, z_nodes, anchor, gen)
    C = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    bounds = crown_bounds(graph, box, splits=splits)
    lb, ub = output_bounds(graph, box, C, bounds, splits=splits)
    x = torch.rand(200_000, 3, generator=gen, dtype=torch.float64) * 2 - 1
    values = graph.forward(x, keep=True)
    feasible = torch.ones(len(x), dtype=torch.bool)
    for z in z_nodes:
        s, p = splits.signs[z][0], splits.points[z][0]
        feasible &= (s * (values[z] - p) >= 0).all(1)
    assert int(feasible.sum()) > 50
    out = values[graph.output][feasible] @ C[0].T
    assert torch.all(out >= lb - TOL) and torch.all(out <= ub + TOL)
    for z in z_nodes:
        assert torch.all(values[z][feasible] >= bounds[z].lower - TOL)
        assert torch.all(values[z][feasible] <= bounds[z].upper + TOL)


def test_split_points_at_zero_give_the_relu_splits_bounds():
    """points = 0 gives the same bounds as a ReLU split without points (signs only)."""
    net = tiny_net(4, ("relu", "relu"), n_in=3, width=10, n_out=3)
    graph = BoundedModel(net, dtype=torch.float64).graph((3,))
    box = Bounds(-torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    signs = {z: torch.sign(torch.randn(1, *graph.nodes[z].shape, generator=gen)).double() for z in z_nodes}
    betas = {z: torch.rand(1, 1, *graph.nodes[z].shape, generator=gen, dtype=torch.float64) for z in z_nodes}
    zeros = {z: torch.zeros_like(s) for z, s in signs.items()}
    C = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    results = []
    for points in ({}, zeros):
        splits = SplitState(signs, betas, points)
        bounds = crown_bounds(graph, box, splits=splits)
        results.append(output_bounds(graph, box, C, bounds, splits=splits))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def property_for(c: np.ndarray, rhs: float, lower, upper) -> Property:
    return Property("<test>", lower.size, c.size,
                    (InputRegion(lower, upper, (OutputConstraint(c.reshape(1, -1), np.array([rhs])),)),))


def min_brackets(model: BoundedModel, c: np.ndarray, cells: int = 200) -> tuple[float, float]:
    """(a sound lower bound, an attained value) of min over [-1, 1]^2 of c . net(x): CROWN on
    every cell of a cells x cells subdivision (each sound, so their minimum is), and the least
    value at the cells' centres and corners."""
    graph = model.graph((2,))
    edges = torch.linspace(-1, 1, cells + 1, dtype=torch.float64)
    lo = torch.cartesian_prod(edges[:-1], edges[:-1])
    hi = torch.cartesian_prod(edges[1:], edges[1:])
    box = Bounds(lo, hi)
    C = torch.as_tensor(c).view(1, 1, -1).expand(len(lo), 1, -1)
    with torch.no_grad():
        lb, _ = output_bounds(graph, box, C, crown_bounds(graph, box), need_upper=False)
        points = torch.cat([lo, hi, (lo + hi) / 2])
        values = graph.forward(points) @ torch.as_tensor(c)
    return float(lb.min()), float(values.min())


@pytest.mark.parametrize("activations, seed", [(("sigmoid", "sigmoid"), 0), (("sigmoid", "sigmoid"), 1),
                                               (("tanh", "tanh"), 0), (("tanh", "tanh"), 2),
                                               (("tanh", "relu"), 3)])
def test_general_split_decides_tiny_nets_as_subdivision_and_sampling_say(activations, seed):
    net = tiny_net(seed, activations)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((2,))
    c = np.array([1.0, -1.0])
    lower_bound, attained = min_brackets(model, c)
    assert attained - lower_bound < 0.01            # the brackets are tight
    lower, upper = -np.ones(2), np.ones(2)
    box = Bounds(torch.as_tensor(lower).view(1, 2), torch.as_tensor(upper).view(1, 2))
    with torch.no_grad():
        root, _ = output_bounds(graph, box, torch.as_tensor(c).view(1, 1, 2), crown_bounds(graph, box),
                                need_upper=False)
    # just below the sound lower bound, where the root bound alone does not prove it
    below = lower_bound - 0.5 * (lower_bound - float(root[0, 0]))
    assert float(root[0, 0]) < below < lower_bound
    config = VerifyConfig(timeout=60, bab=BabConfig(input_split="off", general=GeneralSplitConfig(batch=8)))
    for rhs, expected in ((below, "unsat"), (attained + 0.005, "sat")):
        result = verify(model, property_for(c, rhs, lower, upper), config)
        assert result.status == expected, (activations, seed, rhs, lower_bound, attained)
        if expected == "sat":
            x, y = result.counterexample
            assert np.all(x >= lower) and np.all(x <= upper) and c @ y <= rhs + 1e-9


def test_search_is_chosen_by_the_graphs_nonlinearities():
    relu = BoundedModel(tiny_net(0, ("relu",)), dtype=torch.float64).graph((2,))
    sigmoid = BoundedModel(tiny_net(0, ("sigmoid", "relu")), dtype=torch.float64).graph((2,))
    assert not has_general_splits(relu) and has_general_splits(sigmoid)
    spec_prop = property_for(np.array([1.0, -1.0]), 0.0, -np.ones(2), np.ones(2))
    spec = region_specs(spec_prop, (2,), "cpu", torch.float64)[0]
    records = SubdomainRecords()
    assert isinstance(split_search(relu, spec, lambda x: None, BabConfig(), records), ReluSplitSearch)
    assert isinstance(split_search(sigmoid, spec, lambda x: None, BabConfig(), records), GeneralSplitSearch)


def test_a_search_that_cannot_split_further_says_unknown_with_the_reason():
    """With a minimum width wider than every interval nothing can be split: a property the root
    bound does not prove ends ``unknown`` (never ``unsat``), with the reason."""
    net = tiny_net(0, ("sigmoid", "sigmoid"))
    model = BoundedModel(net, dtype=torch.float64)
    c = np.array([1.0, -1.0])
    lower_bound, _ = min_brackets(model, c, cells=50)
    config = BabConfig(input_split="off", general=GeneralSplitConfig(min_width=1e6))
    graph = model.graph((2,))
    box = Bounds(-torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    with torch.no_grad():
        root, _ = output_bounds(graph, box, torch.as_tensor(c).view(1, 1, 2), crown_bounds(graph, box),
                                need_upper=False)
    rhs = lower_bound - 0.05 * (lower_bound - float(root[0, 0]))    # holds; the root does not prove it
    spec = region_specs(property_for(c, rhs, -np.ones(2), np.ones(2)), (2,), "cpu", torch.float64)[0]
    search = GeneralSplitSearch(graph, spec, lambda x: None, config, SubdomainRecords())
    outcome, _ = search.run(time.monotonic() + 30)
    assert outcome == "unknown" and "min_width" in search.reason
