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
from verifier.graph import BoundGraph, Node
from verifier.ops import Linear, constant
from verifier.ops.activation import ReLU, Sigmoid, Tanh
from verifier.ops.bilinear import Mul
from verifier.ops.elementwise import Cos, Exp, Log, Pow, Reciprocal, Sin, Sqrt
from verifier.ops.piecewise import Clip, LeakyReLU
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


# every splittable elementwise op, and a bias that keeps the pre-activations inside its domain
ELEMENTWISE = [("exp", Exp, 0.0), ("sin", Sin, 0.0), ("cos", Cos, 0.0), ("log", Log, 3.0), ("sqrt", Sqrt, 3.0),
               ("reciprocal", Reciprocal, 3.0), ("square", lambda: Pow(2.0), 0.0), ("cube", lambda: Pow(3.0), 0.0),
               ("leaky_relu", lambda: LeakyReLU(0.1), 0.0), ("clip", lambda: Clip(-0.5, 0.7), 0.0)]


def linear(gen, n_in: int, n_out: int, scale: float, bias: float) -> Linear:
    W = scale * torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5
    b = bias + 0.1 * torch.randn(n_out, generator=gen, dtype=torch.float64)
    return Linear(constant(W), constant(b))


def graph_of(ops: list[tuple], input_shape: tuple[int, ...]) -> BoundGraph:
    """A bound graph from (op, input indices) rows, row 0 the input; shapes by a forward pass."""
    nodes = [Node("x", None, (), input_shape)]
    values = [torch.zeros(1, *input_shape, dtype=torch.float64)]
    for k, (op, inputs) in enumerate(ops[1:], start=1):
        values.append(op.forward(*(values[j] for j in inputs)))
        nodes.append(Node(f"n{k}", op, inputs, tuple(values[-1].shape[1:])))
    return BoundGraph(nodes, len(nodes) - 1)


def elementwise_graph(make_op, bias: float, gen) -> BoundGraph:
    """3 inputs -> Linear(10) -> op -> Linear(10) -> op -> Linear(3); with a bias of 3 and small
    weights, every pre-activation of [-1, 1]^3 stays positive (Log, Sqrt, Reciprocal)."""
    scale = 0.5 if bias else 2.0
    return graph_of([(None, ()), (linear(gen, 3, 10, scale, bias), (0,)), (make_op(), (1,)),
                     (linear(gen, 10, 10, scale / 4 if bias else scale, bias), (2,)), (make_op(), (3,)),
                     (linear(gen, 10, 3, 1.0, 0.0), (4,))], (3,))


@pytest.mark.parametrize("name, make_op, bias", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_every_splittable_op_bounds_under_split_points_contain_points_satisfying_them(name, make_op, bias):
    gen = torch.Generator().manual_seed(1)
    graph = elementwise_graph(make_op, bias, gen)
    split_ops = [i for i, n in enumerate(graph.nodes) if n.op is not None and n.op.splittable]
    assert len(split_ops) == 2 and has_general_splits(graph)
    box = Bounds(-torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    z_nodes = [graph.nodes[i].inputs[0] for i in split_ops]
    anchor = graph.forward(torch.rand(1, 3, generator=gen, dtype=torch.float64) * 2 - 1, keep=True)
    splits = random_splits(graph, z_nodes, anchor, gen)
    root = crown_bounds(graph, box)
    for z in z_nodes:      # the search splits inside a neuron's bounds (and the op's domain)
        splits.points[z] = torch.minimum(torch.maximum(splits.points[z], root[z].lower), root[z].upper)
    C = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    bounds = crown_bounds(graph, box, splits=splits)
    lb, ub = output_bounds(graph, box, C, bounds, splits=splits)
    x = torch.rand(100_000, 3, generator=gen, dtype=torch.float64) * 2 - 1
    values = graph.forward(x, keep=True)
    feasible = torch.ones(len(x), dtype=torch.bool)
    for z in z_nodes:
        feasible &= (splits.signs[z][0] * (values[z] - splits.points[z][0]) >= 0).all(1)
    assert int(feasible.sum()) > 50
    out = values[graph.output][feasible] @ C[0].T
    assert torch.all(out >= lb - TOL) and torch.all(out <= ub + TOL)
    for op_node, z in zip(split_ops, z_nodes):     # and the lines read for branching contain the op
        op = graph.nodes[op_node].op
        lines = element_lines(op, bounds[z])
        inside = values[z][feasible]
        f = op.forward(inside)
        assert torch.all(lines.lower_slope * inside + lines.lower_intercept <= f + TOL)
        assert torch.all(lines.upper_slope * inside + lines.upper_intercept >= f - TOL)
        choice = choose_points(op, bounds[z], 1e-6)
        split = torch.isfinite(choice.gain)
        assert torch.all((choice.point > bounds[z].lower)[split]) and torch.all((choice.point < bounds[z].upper)[split])


@pytest.mark.parametrize("seed", range(2))
def test_products_are_split_on_a_factor_and_decided_as_subdivision_and_sampling_say(seed):
    """x -> a, b (two Linear maps) -> a * b -> Linear: the search splits the factors (no
    elementwise op to split) and decides a threshold below the sound subdivision minimum and one
    above a sampled value."""
    gen = torch.Generator().manual_seed(seed)
    graph = graph_of([(None, ()), (linear(gen, 2, 4, 1.5, 0.0), (0,)), (linear(gen, 2, 4, 1.5, 0.0), (0,)),
                      (Mul(), (1, 2)), (linear(gen, 4, 2, 1.0, 0.0), (3,))], (2,))
    assert has_general_splits(graph)
    c = np.array([1.0, -1.0])
    C = torch.as_tensor(c).view(1, 1, 2)
    edges = torch.linspace(-1, 1, 201, dtype=torch.float64)
    lo, hi = torch.cartesian_prod(edges[:-1], edges[:-1]), torch.cartesian_prod(edges[1:], edges[1:])
    with torch.no_grad():
        cells = Bounds(lo, hi)
        lower_bound = float(output_bounds(graph, cells, C.expand(len(lo), 1, 2), crown_bounds(graph, cells),
                                          need_upper=False)[0].min())
        attained = float((graph.forward(torch.cat([lo, hi, (lo + hi) / 2])) @ torch.as_tensor(c)).min())
        box = Bounds(-torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
        root = float(output_bounds(graph, box, C, crown_bounds(graph, box), need_upper=False)[0])
    below = lower_bound - 0.5 * (lower_bound - root)
    assert root < below and attained - lower_bound < 0.05
    spec_of = (lambda rhs: region_specs(property_for(c, rhs, -np.ones(2), np.ones(2)), (2,), "cpu", torch.float64)[0])
    config = BabConfig(input_split="off", general=GeneralSplitConfig(batch=8))
    def check(points):
        values = graph.forward(points) @ torch.as_tensor(c)
        return (points, values) if bool((values <= attained + 0.005).any()) else None

    outcome, _ = GeneralSplitSearch(graph, spec_of(below), check, config, SubdomainRecords()).run(time.monotonic() + 60)
    assert outcome == "unsat"
    outcome, found = GeneralSplitSearch(graph, spec_of(attained + 0.005), check, config,
                                        SubdomainRecords()).run(time.monotonic() + 60)
    assert outcome == "sat" and found is not None
