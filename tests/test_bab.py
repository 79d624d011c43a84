"""Branch and bound: exact answers on tiny networks (MILP by scipy), beta-CROWN soundness under
split constraints, agreement of input and ReLU splitting, and honoured timeouts."""
import time
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import Bounds as LPBounds, LinearConstraint, milp

from conftest import assert_close, assert_le, sample_box
from verifier import BoundedModel
from verifier.bab.config import BabConfig
from verifier.bounds.crown import SplitState, crown_bounds, output_bounds
from verifier.io.vnnlib import InputRegion, OutputConstraint, Property
from verifier.ops import Bounds
from verifier.verify import VerificationResult, VerifyConfig, verify


def tiny_net(seed: int, n_in=2, hidden=(8, 8), n_out=2) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, prev = [], n_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers).double().eval()


def exact_min(net: nn.Sequential, c: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """min over the box of c . net(x), by a big-M MILP with sound interval bounds for M."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    n_in = lower.size
    # variable layout: x, then per hidden layer (z, a, delta)
    sizes = [l.out_features for l in linears[:-1]]
    n_var = n_in + sum(3 * s for s in sizes)
    rows, lo_rows, hi_rows = [], [], []
    lb_var = np.full(n_var, -np.inf)
    ub_var = np.full(n_var, np.inf)
    lb_var[:n_in], ub_var[:n_in] = lower, upper
    integrality = np.zeros(n_var)
    prev_index = np.arange(n_in)
    l_prev, u_prev = lower, upper
    offset = n_in
    for lin, s in zip(linears[:-1], sizes):
        W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        Wp, Wn = np.clip(W, 0, None), np.clip(W, None, 0)
        l = Wp @ l_prev + Wn @ u_prev + b
        u = Wp @ u_prev + Wn @ l_prev + b
        z, a, d = offset + np.arange(s), offset + s + np.arange(s), offset + 2 * s + np.arange(s)
        offset += 3 * s
        lb_var[z], ub_var[z] = l, u
        lb_var[a], ub_var[a] = 0, np.maximum(u, 0)
        lb_var[d], ub_var[d] = 0, 1
        integrality[d] = 1
        for k in range(s):
            row = np.zeros(n_var); row[z[k]] = 1; row[prev_index] = -W[k]
            rows.append(row); lo_rows.append(b[k]); hi_rows.append(b[k])           # z = W a + b
            row = np.zeros(n_var); row[a[k]] = 1; row[z[k]] = -1
            rows.append(row); lo_rows.append(0); hi_rows.append(np.inf)            # a >= z
            row = np.zeros(n_var); row[a[k]] = 1; row[z[k]] = -1; row[d[k]] = -l[k]
            rows.append(row); lo_rows.append(-np.inf); hi_rows.append(-l[k])      # a <= z - l (1 - d)
            row = np.zeros(n_var); row[a[k]] = 1; row[d[k]] = -max(u[k], 0)
            rows.append(row); lo_rows.append(-np.inf); hi_rows.append(0)          # a <= u d
        prev_index, l_prev, u_prev = a, np.maximum(l, 0), np.maximum(u, 0)
    W, b = linears[-1].weight.detach().numpy(), linears[-1].bias.detach().numpy()
    objective = np.zeros(n_var)
    objective[prev_index] = c @ W
    res = milp(objective, constraints=LinearConstraint(np.array(rows), lo_rows, hi_rows),
               integrality=integrality, bounds=LPBounds(lb_var, ub_var))
    assert res.success
    return float(res.fun + c @ b)


def property_for(c: np.ndarray, rhs: float, lower, upper) -> Property:
    return Property("<test>", lower.size, c.size,
                    (InputRegion(lower, upper, (OutputConstraint(c.reshape(1, -1), np.array([rhs])),)),))


def check_bab_against_milp(seed: int, split: str, device: str = "cpu", rebound: Optional[bool] = False,
                           branching: str = "babsr") -> None:
    """Just above / below the exact minimum (MILP) of a tiny net's output difference, BaB
    proves / refutes the property, and the counterexample is a real violation."""
    net = tiny_net(seed)
    lower, upper = -np.ones(2), np.ones(2)
    c = np.array([1.0, -1.0])
    m_star = exact_min(net, c, lower, upper)
    model = BoundedModel(net, device=device, dtype=torch.float64)
    model.graph((2,))
    for gap, expected in ((0.02, "unsat"), (-0.02, "sat")):
        prop = property_for(c, m_star - gap, lower, upper)
        config = VerifyConfig(timeout=60, bab=BabConfig(input_split=split, relu_batch=8, rebound_intermediate=rebound,
                                                        branching=branching))
        result = verify(model, prop, config)
        assert result.status == expected, (seed, split, rebound, branching, gap, m_star)
        if expected == "sat":
            x, y = result.counterexample
            assert np.all(x >= lower) and np.all(x <= upper)
            assert c @ y <= m_star - gap + 1e-9


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("split, rebound, branching", [("on", False, "babsr"), ("off", False, "babsr"),
                                                      ("off", True, "babsr"), ("off", None, "layer")])
def test_bab_matches_milp_on_tiny_nets(seed, split, rebound, branching):
    check_bab_against_milp(seed, split, rebound=rebound, branching=branching)


def test_auto_branching_picks_layer_order_where_a_layer_has_blown_up():
    """``branching="auto"``: the earliest layer first (and re-bounding) where the root's bounds
    grew from a first layer at most half unstable to a later one at least 3/4 unstable, BaBSR
    (bounds kept) elsewhere; the earliest-layer rule
    leaves only that layer's neurons."""
    from verifier.bab.relu_split import ReluLayout, choose_branching, earliest_layer_only
    net = tiny_net(0, n_in=2, hidden=(4, 4), n_out=2)
    graph = BoundedModel(net, dtype=torch.float64).graph((2,))
    layout = ReluLayout(graph)
    z1, z2 = layout.z_nodes
    bounds = [None] * len(graph.nodes)
    bounds[z1] = Bounds(torch.tensor([[-1.0, 0.5, -1.0, 0.5]]), torch.tensor([[1.0, 1.0, -0.5, 1.0]]))  # 1/4
    bounds[z2] = Bounds(-torch.ones(1, 4), torch.ones(1, 4))        # 4/4 unstable
    assert choose_branching(BabConfig(branching="auto"), layout, bounds) == ("layer", True)
    assert choose_branching(BabConfig(branching="auto", rebound_intermediate=False), layout, bounds) == ("layer", False)
    bounds[z1] = Bounds(-torch.ones(1, 4), torch.ones(1, 4))        # unstable from the first layer on
    assert choose_branching(BabConfig(branching="auto"), layout, bounds) == ("babsr", False)
    bounds[z1] = Bounds(torch.tensor([[-1.0, 0.5, -1.0, 0.5]]), torch.tensor([[1.0, 1.0, -0.5, 1.0]]))
    bounds[z2] = Bounds(torch.tensor([[-1.0, 0.1, -1.0, -1.0]]), torch.ones(1, 4))   # 3/4 unstable
    assert choose_branching(BabConfig(branching="auto"), layout, bounds) == ("layer", True)
    bounds[z2] = Bounds(torch.tensor([[-1.0, 0.1, -1.0, 0.1]]), torch.ones(1, 4))    # 2/4 unstable
    assert choose_branching(BabConfig(branching="auto"), layout, bounds) == ("babsr", False)
    assert choose_branching(BabConfig(branching="fsb"), layout, bounds) == ("fsb", False)
    inf = float("inf")
    scores = torch.tensor([[-inf, -inf, -inf, -inf, 1.0, 5.0, -inf, 2.0],
                           [0.5, -inf, 0.2, -inf, 9.0, 9.0, 9.0, 9.0]])
    kept = earliest_layer_only(layout, scores)
    assert kept.argmax(1).tolist() == [5, 0]
    assert torch.isinf(kept[1, 4:]).all() and torch.equal(kept[0], scores[0])


def test_auto_branching_restarts_in_layer_order_after_a_bounded_babsr_phase():
    """``auto`` where it picks the layer order: BaBSR first for ``auto_babsr_share`` of the time,
    then the search restarts from the root in the layer order, and still answers exactly (MILP)."""
    net = tiny_net(1, n_in=3, hidden=(16, 16, 16), n_out=2)
    lower, upper = -0.3 * np.ones(3), 0.3 * np.ones(3)
    c = np.array([1.0, -1.0])
    m_star = exact_min(net, c, lower, upper)
    model = BoundedModel(net, dtype=torch.float64)
    model.graph((3,))
    # every later layer counts as blown up; BaBSR gets no time, so the restart must happen
    bab = BabConfig(input_split="off", relu_batch=2, branching="auto", layer_branching_unstable=0.0,
                    auto_babsr_share=1e-9)
    logs: list[str] = []
    # float mode fast: the sound mode's alpha-CROWN (other intermediate bounds, another path of the
    # optimiser) happens to prove this root, and the test needs a search
    result = verify(model, property_for(c, m_star - 0.01, lower, upper),
                    VerifyConfig(timeout=60, bab=bab, float_mode="fast"), log=logs.append)
    assert result.status == "unsat"
    phases = [line for line in logs if line.startswith("branching:") or "restarts" in line]
    assert phases[0].startswith("branching: babsr") and "restarts" in phases[1]
    assert phases[2] == "branching: layer, intermediate bounds re-bounded after a split"
    result = verify(model, property_for(c, m_star + 0.01, lower, upper), VerifyConfig(timeout=60, bab=bab))
    assert result.status == "sat" and c @ result.counterexample[1] <= m_star + 0.01 + 1e-9


def test_a_nan_bound_is_no_proof():
    """A domain whose bound came out NaN stays open (bound -inf), first in line to be split;
    ``NaN <= 0`` is False, so a plain comparison would have dropped it as proven."""
    from verifier.bab.relu_split import _best_margin
    margins = torch.tensor([[0.5, float("nan")], [-1.0, 2.0], [-3.0, -2.0]])
    assert _best_margin(margins).tolist() == [-float("inf"), 2.0, -2.0]


def domains(lower: list[float], first_id: int):
    """Synthetic ReLU-split domains with bounds ``lower`` and ids from ``first_id``; every field
    of a row carries its id, so rows can be traced through the store."""
    from verifier.bab.domains import Domains
    n = len(lower)
    ids = torch.arange(first_id, first_id + n)
    return Domains({3: ids.double().view(n, 1).repeat(1, 2)},
                   [None, Bounds(-ids.double().view(n, 1), ids.double().view(n, 1))],
                   {4: torch.zeros(n, 2, 1)}, {3: torch.ones(n, 1, 2)}, torch.tensor(lower, dtype=torch.float64),
                   ids.clone(), torch.zeros(n, dtype=torch.long), ids)


def test_domain_store_pops_the_lowest_bounds_and_reuses_freed_rows():
    from verifier.bab.domains import DomainStore, StoreFull

    rng = np.random.default_rng(0)
    lowers = rng.normal(size=300).tolist()
    store = DomainStore(domains(lowers[:1], 0), capacity=4)
    for start in range(0, 300, 50):                      # grows 4 -> 512
        store.push(domains(lowers[start:start + 50], start))
    assert len(store) == 300 and store.capacity >= 300
    assert store.lowest() == min(lowers)
    taken = store.pop(7)
    assert sorted(taken.lower.tolist()) == sorted(lowers)[:7]
    for t in (taken.signs[3][:, 0], taken.bounds[1].upper[:, 0], taken.decision.double()):
        assert torch.equal(t, taken.ids.double())        # every field of a row travels together
    assert torch.equal(taken.bounds[1].lower[:, 0], -taken.ids.double())
    capacity = store.capacity
    store.push(domains([-10.0] * 7, 1000))              # into the freed rows
    assert store.capacity == capacity and len(store) == 300
    assert sorted(store.pop(7).ids.tolist()) == list(range(1000, 1007))
    assert len(store) == 293 and store.lowest() == sorted(lowers)[7]
    # the memory budget: growing past a share of the available memory is refused, not attempted
    small = DomainStore(domains([0.0], 0), capacity=2, memory_share=1e-12)
    small.push(domains([0.0, 1.0], 0))
    with pytest.raises(StoreFull):
        small.push(domains([2.0], 2))
    assert len(small) == 2


def test_domain_store_counts_its_whole_new_buffers_against_the_memory_budget(monkeypatch):
    """Growing copies the old rows into new buffers, so for a moment both are held: the budget
    must cover the new buffers whole, not only the rows they add. Where doubling does not fit,
    the store grows as far as fits."""
    import verifier.bab.domains as domains_module
    from verifier.bab.domains import DomainStore, StoreFull
    like = domains([0.0], 0)
    row_bytes = sum(t[:1].numel() * t.element_size() for t in like.tensors()) + like.lower.element_size()
    monkeypatch.setattr(domains_module, "available_memory", lambda device: 12 * row_bytes)
    store = DomainStore(like, capacity=2, memory_share=0.5)    # budget: 6 rows of new buffers
    store.push(domains([0.0, 1.0, 2.0, 3.0], 0))                 # 2 -> 4 rows: 4 <= 6
    assert store.capacity == 4
    store.push(domains([4.0], 4))                                # 8 rows do not fit (adding 4 would): 6
    assert store.capacity == 6
    store.push(domains([5.0], 5))
    with pytest.raises(StoreFull):                               # a 7th row does not fit
        store.push(domains([6.0], 6))
    assert len(store) == 6 and store.capacity == 6 and store.lowest() == 0.0


def relu_split_just_above_minimum(seed: int, log=lambda s: None, **bab) -> VerificationResult:
    """ReLU splitting (batches of 2 unless ``bab`` says) on a 3x16 tiny net, at its exact minimum
    (MILP) - 0.01; ``bab``: further BabConfig fields."""
    net = tiny_net(seed, n_in=3, hidden=(16, 16, 16), n_out=2)
    lower, upper = -np.ones(3), np.ones(3)
    c = np.array([1.0, -1.0])
    m_star = exact_min(net, c, lower, upper)
    model = BoundedModel(net, dtype=torch.float64)
    model.graph((3,))
    # float mode fast: these tests follow the search's own path (which leaves, which steps), which
    # the rounding analysis of the default mode shifts
    return verify(model, property_for(c, m_star - 0.01, lower, upper),
                  VerifyConfig(timeout=60, bab=BabConfig(**{"input_split": "off", "relu_batch": 2, **bab}),
                               float_mode="fast"), log=log)


def test_a_child_keeps_at_least_its_parents_bound():
    """A ReLU split's children lie inside their parent's region, so each child's recorded lower
    bound is at least its parent's (the parent's bound is sound for it), and the proof stands."""
    result = relu_split_just_above_minimum(0)
    assert result.status == "unsat"
    lower_of = {}
    relu_batches = 0
    for batch in result.records.batches:
        for i, parent, bound in zip(batch["id"].tolist(), batch["parent"].tolist(), batch["lower"].tolist()):
            lower_of[i] = bound
            if batch["kind"] == "relu":
                assert bound >= lower_of[parent], (i, parent)
        relu_batches += batch["kind"] == "relu"
    assert relu_batches >= 3, "the property must need several branching steps"


def _masked_affine(net: nn.Sequential, pattern: list[np.ndarray]):
    """The affine maps of a ReLU MLP with a fixed activation pattern (1 active, 0 inactive), by
    its weights: every hidden layer's pre-activations and the output, as (A, b) with value A x + b."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    A, b = np.eye(linears[0].in_features), np.zeros(linears[0].in_features)
    hidden = []
    for k, lin in enumerate(linears):
        W, c = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        A, b = W @ A, W @ b + c
        if k < len(pattern):
            hidden.append((A, b))
            A, b = pattern[k][:, None] * A, pattern[k] * b
    return hidden, (A, b)


def test_leaf_linear_program_is_exact_and_its_certificate_sound():
    """A leaf with every ReLU split: the certified bound of ``settle_leaf`` equals the minimum of
    the margin over the leaf's polytope (an independent LP on the masked weights) and lies below
    the margin of every sampled input in the leaf; above that minimum the leaf is not proven."""
    from scipy.optimize import linprog
    from verifier.bab.leaf import settle_leaf
    from verifier.spec import region_specs
    net = tiny_net(5, n_in=3, hidden=(12, 12), n_out=2)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    lower, upper = -np.ones(3), np.ones(3)
    c = np.array([1.0, -1.0])
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    with torch.no_grad():
        anchor = graph.forward(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64), keep=True)
    signs = {z: torch.where(anchor[z] >= 0, 1.0, -1.0).double() for z in z_nodes}
    pattern = [(signs[z][0].numpy() > 0).astype(float) for z in z_nodes]
    hidden, (A_out, b_out) = _masked_affine(net, pattern)
    # the exact minimum of c . y over the polytope {x in box : s z(x) >= 0 for every neuron}
    G = np.vstack([-pattern_sign[:, None] * A for (A, _), pattern_sign in zip(hidden, (2 * p - 1 for p in pattern))])
    h = np.concatenate([pattern_sign * b for (_, b), pattern_sign in zip(hidden, (2 * p - 1 for p in pattern))])
    exact = linprog(c @ A_out, A_ub=G, b_ub=h, bounds=list(zip(lower, upper)), method="highs")
    assert exact.status == 0
    minimum = exact.fun + c @ b_out
    xs = torch.rand(200_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        values = graph.forward(xs, keep=True)
    inside = torch.ones(len(xs), dtype=torch.bool)
    for z in z_nodes:
        inside &= (values[z] * signs[z] >= 0).all(1)
    sampled = (values[graph.output][inside] @ torch.tensor(c)).numpy()
    assert len(sampled) > 50
    for rhs, expected in ((minimum - 0.05, "unsat"), (minimum + 0.05, "sat")):
        spec = region_specs(property_for(c, rhs, lower, upper), (3,), "cpu", torch.float64)[0]
        box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
        with torch.no_grad():
            bounds = crown_bounds(graph, box, splits=SplitState(signs, {}))
        assert all(not bool(((bounds[z].lower < 0) & (bounds[z].upper > 0)).any()) for z in z_nodes)

        @torch.no_grad()
        def check(points):
            y = graph.forward(points)
            hit = (y @ torch.tensor(c) <= rhs).nonzero().squeeze(1)
            return None if len(hit) == 0 else (points[hit[0]].numpy(), y[hit[0]].numpy())
        outcome, found, certified = settle_leaf(graph, spec, signs, bounds, check)
        assert outcome == expected
        assert abs(certified - (minimum - rhs)) < 1e-6
        assert np.all(sampled - rhs >= certified - 1e-9)
        if expected == "sat":
            assert c @ found[1] <= rhs


def test_leaf_whose_splits_no_input_satisfies_is_proven_empty():
    """Splits x >= 0 and -x - 0.5 >= 0 leave no input: the leaf is proven (by the multipliers of
    the infeasibility program) whatever the margin, even one violated on the whole box."""
    from verifier.bab.leaf import settle_leaf
    from verifier.spec import region_specs
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -0.5]))
        net[2].weight.copy_(torch.eye(2))
        net[2].bias.zero_()
    graph = BoundedModel(net, dtype=torch.float64).graph((1,))
    z = graph.nodes[graph.relu_nodes()[0]].inputs[0]
    signs = {z: torch.ones(1, 2, dtype=torch.float64)}
    spec = region_specs(property_for(np.array([1.0, 0.0]), 10.0, -np.ones(1), np.ones(1)), (1,), "cpu",
                        torch.float64)[0]
    box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
    with torch.no_grad():
        bounds = crown_bounds(graph, box, splits=SplitState(signs, {}))
    outcome, found, certified = settle_leaf(graph, spec, signs, bounds, lambda points: None)
    assert outcome == "unsat" and found is None and certified == float("inf")


def test_leaves_left_by_the_optimisation_are_decided_exactly():
    """On this net, beta-CROWN's few optimisation steps (no catch-up steps) leave leaves (every
    ReLU decided) whose bound is not positive though the property holds; before the leaf LP the
    answer was ``unknown``. Now every leaf is decided, and the answer agrees with the MILP."""
    logs = []
    result = relu_split_just_above_minimum(4, logs.append, catch_up_iterations=0)
    assert result.status == "unsat"
    assert sum("unsat by linear programming" in line for line in logs) >= 1


def test_beta_crown_bounds_contain_points_satisfying_splits():
    net = tiny_net(11, n_in=3, hidden=(10, 10), n_out=3)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    box = Bounds(-torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    gen = torch.Generator().manual_seed(0)
    # split decisions that a random anchor point satisfies, so the split domain is not empty
    anchor = graph.forward(torch.rand(1, 3, generator=gen, dtype=torch.float64) * 2 - 1, keep=True)
    signs = {z: torch.sign(anchor[z]) * (torch.rand(1, *graph.nodes[z].shape, generator=gen) < 0.3)
             for z in z_nodes}
    betas = {z: torch.rand(1, 1, *graph.nodes[z].shape, generator=gen, dtype=torch.float64) for z in z_nodes}
    splits = SplitState(signs, betas)
    C = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    bounds = crown_bounds(graph, box, splits=splits)
    lb, ub = output_bounds(graph, box, C, bounds, splits=splits)
    x = torch.rand(200_000, 3, generator=gen, dtype=torch.float64) * 2 - 1
    values = graph.forward(x, keep=True)
    feasible = torch.ones(len(x), dtype=torch.bool)
    for z in z_nodes:
        s = signs[z][0]
        feasible &= ((values[z] * s >= 0) | (s == 0)).all(1)
    assert int(feasible.sum()) > 100
    out = values[graph.output][feasible] @ C[0].T
    assert torch.all(out >= lb - 1e-9) and torch.all(out <= ub + 1e-9)
    for z in z_nodes:
        assert torch.all(values[z][feasible] >= bounds[z].lower - 1e-9)
        assert torch.all(values[z][feasible] <= bounds[z].upper + 1e-9)


def test_split_domains_bounded_on_their_own_unstable_neurons_equal_each_bounded_alone(monkeypatch):
    """Re-bounding a batch of split subdomains (the layer order's intermediate bounds) uses each
    domain's own unstable neurons: the bounds must equal each domain bounded alone, and contain
    every sampled point that satisfies the domain's splits."""
    import verifier.bounds.crown as crown
    net = tiny_net(5, n_in=3, hidden=(24, 24, 24), n_out=3)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    gen = torch.Generator().manual_seed(3)
    N = 16
    # boxes from tiny to wide around random centres, and splits that each box's centre satisfies
    center = torch.rand(N, 3, generator=gen, dtype=torch.float64) * 2 - 1
    radius = torch.logspace(-2, 0, N, dtype=torch.float64).unsqueeze(1)
    box = Bounds(center - radius, center + radius)
    at_center = graph.forward(center, keep=True)
    signs = {z: torch.sign(at_center[z]) * (torch.rand(N, *graph.nodes[z].shape, generator=gen) < 0.3)
             for z in z_nodes}
    betas = {z: torch.rand(N, 1, *graph.nodes[z].shape, generator=gen, dtype=torch.float64) for z in z_nodes}
    calls = []
    grouped = crown._crown_per_sample_rows
    monkeypatch.setattr(crown, "_crown_per_sample_rows", lambda *a: calls.append(grouped(*a)) or calls[-1])
    bounds = crown_bounds(graph, box, splits=SplitState(signs, betas))
    assert any(c is not None for c in calls), "the per-domain path was not taken"
    for n in range(N):
        alone = crown_bounds(graph, Bounds(box.lower[n:n + 1], box.upper[n:n + 1]),
                             splits=SplitState({z: s[n:n + 1] for z, s in signs.items()},
                                               {z: b[n:n + 1] for z, b in betas.items()}))
        for z in z_nodes:
            assert_close(bounds[z].lower[n:n + 1], alone[z].lower, torch.float64, f"lower, node {z}, domain {n}")
            assert_close(bounds[z].upper[n:n + 1], alone[z].upper, torch.float64, f"upper, node {z}, domain {n}")
    points = sample_box(box.lower, box.upper, gen)                            # (N, m, 3)
    m = points.shape[1]
    values = graph.forward(points.flatten(0, 1), keep=True)
    feasible = torch.ones(N, m, dtype=torch.bool)
    for z in z_nodes:
        s = signs[z].unsqueeze(1)
        v = values[z].view(N, m, -1)
        feasible &= ((v * s >= 0) | (s == 0)).all(2)
    assert int(feasible.sum(1).min()) > 0
    for z in z_nodes:
        v = values[z].view(N, m, -1)[feasible]                                # (K, width)
        assert_le(bounds[z].lower.unsqueeze(1).expand(N, m, -1)[feasible], v, torch.float64, f"lower, node {z}")
        assert_le(v, bounds[z].upper.unsqueeze(1).expand(N, m, -1)[feasible], torch.float64, f"upper, node {z}")


def test_rebounding_with_the_roots_slopes_is_sound_and_takes_each_neurons_own_slopes(monkeypatch):
    """Subdomains re-bounded with the slopes alpha-CROWN optimised at the root
    (``IntermediateSlopes``): at the root they reproduce alpha-CROWN's own passes; on a batch of
    split domains each domain's bounds equal it bounded alone and contain every sampled point that
    satisfies its splits; and the slopes change the bounds (they are used)."""
    import verifier.bounds.crown as crown
    from verifier.bounds.alpha import AlphaConfig, alpha_crown, intermediate_slopes
    from verifier.bounds.crown import unstable_rows
    net = tiny_net(7, n_in=3, hidden=(24, 24, 24), n_out=3)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    gen = torch.Generator().manual_seed(5)
    # a box on which some neurons are stable at the root, so that slope rows are not neuron indices
    root_box = Bounds(torch.full((1, 3), -0.5, dtype=torch.float64), torch.full((1, 3), 0.5, dtype=torch.float64))
    C = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        initial = crown_bounds(graph, root_box)
    _, _, root, alphas = alpha_crown(graph, root_box, C, AlphaConfig(iterations=10), need_upper=False,
                                     initial=initial)
    slopes = intermediate_slopes(graph, alphas, initial)
    assert slopes.alphas, "no intermediate slopes were optimised"
    # at the root (within the bounds alpha-CROWN started from): the same passes as alpha-CROWN's
    # with its own rows
    own = {key: pair for key, pair in alphas.items() if key[0] != graph.output}
    rows = {i: unstable_rows(graph, i, initial[i]) for i in graph.needs_bounds()}
    with torch.no_grad():
        by_rows = crown_bounds(graph, root_box, alphas=own, rows=rows, reference=initial)
        by_slopes = crown_bounds(graph, root_box, reference=initial, slopes=slopes)
    for z in z_nodes:
        assert_close(by_slopes[z].lower, by_rows[z].lower, torch.float64, f"root lower, node {z}")
        assert_close(by_slopes[z].upper, by_rows[z].upper, torch.float64, f"root upper, node {z}")
    # split domains of the root box, the splits satisfied by random anchor points
    N = 16
    box = Bounds(root_box.lower.expand(N, 3), root_box.upper.expand(N, 3))
    anchors = graph.forward(torch.rand(N, 3, generator=gen, dtype=torch.float64) - 0.5, keep=True)
    signs = {z: torch.sign(anchors[z]) * (torch.rand(N, *graph.nodes[z].shape, generator=gen) < 0.3)
             for z in z_nodes}
    # small multipliers, as a search leaves them: large random ones make every re-bound looser than
    # the root's bounds, which then hide the slopes
    betas = {z: 0.05 * torch.rand(N, 1, *graph.nodes[z].shape, generator=gen, dtype=torch.float64)
             for z in z_nodes}
    reference = [None if b is None else Bounds(b.lower.expand(N, *b.lower.shape[1:]),
                                               b.upper.expand(N, *b.upper.shape[1:])) for b in root]
    calls = []
    grouped = crown._crown_per_sample_rows
    monkeypatch.setattr(crown, "_crown_per_sample_rows", lambda *a: calls.append(grouped(*a)) or calls[-1])
    splits = SplitState(signs, betas)
    with torch.no_grad():
        bounds = crown_bounds(graph, box, splits=splits, reference=reference, recompute_from=z_nodes[0] + 1,
                              slopes=slopes)
        default = crown_bounds(graph, box, splits=splits, reference=reference, recompute_from=z_nodes[0] + 1)
    assert any(c is not None for c in calls), "the per-domain path was not taken"
    assert any(not torch.equal(bounds[z].lower, default[z].lower) for z in z_nodes[1:]), "the slopes were not used"
    for n in range(N):
        with torch.no_grad():
            alone = crown_bounds(graph, root_box, splits=SplitState({z: s[n:n + 1] for z, s in signs.items()},
                                                                    {z: b[n:n + 1] for z, b in betas.items()}),
                                 reference=root, recompute_from=z_nodes[0] + 1, slopes=slopes)
        for z in z_nodes:
            assert_close(bounds[z].lower[n:n + 1], alone[z].lower, torch.float64, f"lower, node {z}, domain {n}")
            assert_close(bounds[z].upper[n:n + 1], alone[z].upper, torch.float64, f"upper, node {z}, domain {n}")
    points = sample_box(root_box.lower, root_box.upper, gen)[0]               # (m, 3)
    values = graph.forward(points, keep=True)
    checked = 0
    for n in range(N):
        feasible = torch.ones(len(points), dtype=torch.bool)
        for z in z_nodes:
            s = signs[z][n]
            feasible &= ((values[z] * s >= 0) | (s == 0)).all(1)
        checked += int(feasible.sum())
        for z in z_nodes:
            v = values[z][feasible]
            assert_le(bounds[z].lower[n].expand_as(v), v, torch.float64, f"lower, node {z}, domain {n}")
            assert_le(v, bounds[z].upper[n].expand_as(v), torch.float64, f"upper, node {z}, domain {n}")
    assert checked > 100


def test_timeout_is_honoured():
    net = tiny_net(3, n_in=6, hidden=(64, 64, 64), n_out=2)
    model = BoundedModel(net, dtype=torch.float64)
    model.graph((6,))
    lower, upper = -np.ones(6), np.ones(6)
    c = np.array([1.0, -1.0])
    # a threshold just below the sampled minimum: hard to prove, hard to refute
    with torch.no_grad():
        xs = torch.rand(20000, 6, dtype=torch.float64) * 2 - 1
        sampled = float((net(xs) @ torch.tensor(c)).min())
    prop = property_for(c, sampled - 1e-3, lower, upper)
    start = time.monotonic()
    result = verify(model, prop, VerifyConfig(timeout=2.0, bab=BabConfig(input_split="off", relu_batch=4)))
    elapsed = time.monotonic() - start
    assert result.status in ("timeout", "unsat", "sat")
    assert elapsed < 2.0 + 1.0


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: you "
                                                                 "tried to allocate 8589934592 bytes.")])
def test_out_of_memory_in_a_relu_split_step_halves_the_batch_and_loses_no_domain(monkeypatch, error):
    """A step that runs out of memory puts its domains back and the search goes on with half the
    batch, never growing back to the size that failed: the proof still comes, and every domain
    of the failed batches is branched later."""
    from verifier.bab.relu_split import ReluSplitSearch
    real_step, failed, stepped, sizes = ReluSplitSearch.step, [], set(), []

    def step(self, parents):
        sizes.append(len(parents))
        if len(parents) > 2:
            failed.extend(parents.ids.tolist())
            raise error
        stepped.update(parents.ids.tolist())
        return real_step(self, parents)

    monkeypatch.setattr(ReluSplitSearch, "step", step)
    messages = []
    result = relu_split_just_above_minimum(0, log=messages.append, relu_batch=4)
    assert result.status == "unsat"
    assert "out of memory: batch shrinks to 2" in messages
    assert failed and set(failed) <= stepped
    first_failure = next(k for k, size in enumerate(sizes) if size > 2)
    assert len(sizes) > first_failure + 3 and max(sizes[first_failure + 1:]) <= 2, \
        "the batch grew back to the size that did not fit"


def test_only_allocation_failures_count_as_out_of_memory():
    from verifier.runtime import is_out_of_memory
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 8589934592 bytes."))
    assert not is_out_of_memory(RuntimeError("view size is not compatible with input tensor's size and "
                                             "stride (at least one dimension spans across two contiguous "
                                             "subspaces). Use .reshape(...) instead."))
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be in the same memory format"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_out_of_memory_in_input_splitting_halves_the_batch_and_loses_no_box(monkeypatch):
    """Input splitting keeps boxes in its store until they are bounded: an allocation failure
    halves the batch, the proof still comes, and every box created is bounded (recorded)."""
    import verifier.bab.input_split as input_split
    real_bound_boxes, failures = input_split.bound_boxes, []

    def bound_boxes(graph, spec, lower, upper, *args):
        if lower.shape[0] > 2:
            failures.append(lower.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_bound_boxes(graph, spec, lower, upper, *args)

    monkeypatch.setattr(input_split, "bound_boxes", bound_boxes)
    net = tiny_net(1)
    lower, upper, c = -np.ones(2), np.ones(2), np.array([1.0, -1.0])
    model = BoundedModel(net, dtype=torch.float64)
    model.graph((2,))
    messages = []
    prop = property_for(c, exact_min(net, c, lower, upper) - 0.02, lower, upper)
    result = verify(model, prop, VerifyConfig(timeout=60, bab=BabConfig(input_split="on", input_batch=8)),
                    log=messages.append)
    assert result.status == "unsat"
    assert failures and "out of memory: input batch shrinks to 2" in messages
    bounded = [i for batch in result.records.batches if batch["kind"] == "input" for i in batch["id"].tolist()]
    assert len(bounded) > 8 and sorted(bounded) == list(range(result.records.next_id))


def test_wall_clock_alarm_ends_a_bounding_step_that_overruns_the_deadline():
    """The CLI's safety net: a verify() stuck in one long step past its deadline answers timeout
    half a second after it, not a late verdict."""
    from verifier.cli import _verify_within

    def stuck(model, prop, config, log):
        time.sleep(10)
        return VerificationResult("unsat", 10.0)

    start = time.monotonic()
    result = _verify_within(stuck, None, None, VerifyConfig(timeout=0.3), lambda s: None)
    assert result.status == "timeout"
    assert time.monotonic() - start < 1.5


def _narrow_dip_net() -> nn.Sequential:
    """f(x) = 1 - 4000 relu(x - 0.5) + 8000 relu(x - 0.5005) - 4000 relu(x - 0.501) on x in [0, 1]:
    1 everywhere but a dip to -1 at 0.5005, negative only on (0.50025, 0.50075); flat (zero
    gradient) outside [0.5, 0.501], so PGD finds the dip only from a start inside it."""
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.ones(3, 1))
        net[0].bias.copy_(torch.tensor([-0.5, -0.5005, -0.501]))
        net[2].weight.copy_(torch.tensor([[-4000.0, 8000.0, -4000.0]]))
        net[2].bias.fill_(1.0)
    return net.eval()


def test_wide_attack_finds_a_counterexample_that_few_restarts_miss():
    from verifier.attack import AttackConfig, pgd_search
    from verifier.bab.attacks import SearchAttacks
    from verifier.spec import region_specs
    from verifier.verify import concrete_evaluator, make_checker
    model = BoundedModel(_narrow_dip_net(), dtype=torch.float64)
    graph = model.graph((1,))
    prop = property_for(np.array([1.0]), 0.0, np.zeros(1), np.ones(1))   # violated where f(x) <= 0
    spec = region_specs(prop, graph.input_shape, model.device, model.dtype)[0]
    assert pgd_search(graph.forward, spec, AttackConfig(restarts=20)).point is None
    check = make_checker(graph, spec, concrete_evaluator(model))
    config = BabConfig(attack_after=0.0)
    attacks = SearchAttacks(graph, spec, check, time.monotonic() + 30, config.attack_restarts,
                            config.attack_share, config.attack_after)
    found = attacks.maybe_run()
    assert found is not None
    x, y = found
    assert 0.50025 <= float(x[0]) <= 0.50075 and float(y[0]) <= 0


def _corner_dip_net(n: int = 20) -> nn.Sequential:
    """f(x) = 1 - 4 relu(sum(x) - (n - 0.5)) on [0, 1]^n: negative only where sum(x) >= n - 0.25,
    next to the all-ones corner, and flat (zero gradient) wherever sum(x) < n - 0.5, which is
    everywhere random points and the centre fall: PGD moves only from a start near that corner."""
    net = nn.Sequential(nn.Linear(n, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(-(n - 0.5))
        net[2].weight.fill_(-4.0)
        net[2].bias.fill_(1.0)
    return net.eval()


def test_search_attacks_start_from_the_most_promising_points_offered():
    """ReLU splitting offers the minimisers of its domains' linear bounds to its attacks: the
    ones with the lowest concrete margins are kept, and an attack started from them finds a
    counterexample that the same attack from the centre and random points misses."""
    from verifier.bab.attacks import SearchAttacks
    from verifier.spec import region_specs
    from verifier.verify import concrete_evaluator, make_checker
    n = 20
    model = BoundedModel(_corner_dip_net(n), dtype=torch.float64)
    graph = model.graph((n,))
    spec = region_specs(property_for(np.array([1.0]), 0.0, np.zeros(n), np.ones(n)), graph.input_shape,
                        model.device, model.dtype)[0]
    check = make_checker(graph, spec, concrete_evaluator(model))

    def attacks(keep: int) -> SearchAttacks:
        return SearchAttacks(graph, spec, check, time.monotonic() + 30, restarts=64, share=1.0, after=0.0, keep=keep)

    blind = attacks(keep=0)
    blind.offer(torch.ones(1, n, dtype=torch.float64) * 0.98)
    assert blind.maybe_run() is None
    near = torch.ones(3, n, dtype=torch.float64)
    near[:, 0] = torch.tensor([0.2, 0.6, 0.4], dtype=torch.float64)   # margins 1 (clamped), 0.6, 1
    far = torch.rand(5, n, dtype=torch.float64)
    guided = attacks(keep=2)
    guided.offer(far)
    guided.offer(near)
    assert torch.allclose(guided.margins, torch.tensor([0.6, 1.0], dtype=torch.float64))
    assert float(guided.points[0, 0]) == 0.6
    found = guided.maybe_run()
    assert found is not None
    x, y = found
    assert x.sum() >= n - 0.25 - 1e-6 and float(y[0]) <= 0
    assert guided.points is None, "the next attack starts from points offered after this one"


@pytest.mark.parametrize("memory_points, widened", [(10 ** 9, True), (100, False)])
def test_search_attacks_widen_only_within_their_memory_share(monkeypatch, memory_points, widened):
    """An attack that finished within its time budget is widened 4x only if the wider one fits in
    its share of the available memory."""
    import verifier.bab.attacks as attacks_module
    from verifier.bab.attacks import SearchAttacks
    from verifier.spec import region_specs
    n = 20
    model = BoundedModel(_corner_dip_net(n), dtype=torch.float64)
    graph = model.graph((n,))
    spec = region_specs(property_for(np.array([1.0]), 0.0, np.zeros(n), np.ones(n)), graph.input_shape,
                        model.device, model.dtype)[0]
    point_bytes = 3 * sum(node.numel for node in graph.nodes) * 8
    monkeypatch.setattr(attacks_module, "available_memory", lambda device: memory_points * point_bytes)
    attacks = SearchAttacks(graph, spec, lambda points: None, time.monotonic() + 30, restarts=64, share=1.0,
                            after=0.0, memory_share=1.0)
    time.sleep(0.5)                                             # a budget of about 0.5 s
    assert attacks.maybe_run() is None
    assert attacks.restarts == (256 if widened else 64)


def test_input_split_child_bounds_from_parent_reference_contain_samples():
    """A half-box bounded from its parent's intermediate bounds (as input splitting does) keeps
    sound margins and intermediate bounds: every sampled point of the half lies inside them."""
    from verifier.bab.input_split import bound_boxes
    from verifier.spec import region_specs
    net = tiny_net(7, n_in=3, hidden=(16, 16, 16), n_out=3)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    c = np.array([1.0, -0.5, -0.5])
    prop = property_for(c, 0.0, -np.ones(3), np.ones(3))
    spec = region_specs(prop, graph.input_shape, model.device, model.dtype)[0]
    lower, upper = spec.lower.unsqueeze(0), spec.upper.unsqueeze(0)
    _, _, parent = bound_boxes(graph, spec, lower, upper)
    halves_lo = torch.cat([lower, lower.clone()])
    halves_hi = torch.cat([upper.clone(), upper])
    halves_hi[0, 1], halves_lo[1, 1] = 0.0, 0.0                      # split dimension 1 at 0
    reference = [None if b is None else Bounds(torch.cat([b.lower, b.lower]), torch.cat([b.upper, b.upper]))
                 for b in parent]
    margins, _, bounds = bound_boxes(graph, spec, halves_lo, halves_hi, reference)
    for half in range(2):
        x = halves_lo[half] + (halves_hi[half] - halves_lo[half]) * torch.rand(4000, 3, dtype=torch.float64)
        values = graph.forward(x, keep=True)
        assert torch.all(spec.margins(values[graph.output]) >= margins[half] - 1e-9)
        for i in graph.needs_bounds():
            assert torch.all(values[i] >= bounds[i].lower[half] - 1e-9)
            assert torch.all(values[i] <= bounds[i].upper[half] + 1e-9)


def test_beta_multipliers_take_their_own_step_size():
    """AlphaConfig.beta_lr steps the split multipliers (BabConfig.beta_lr reaches it): with 0
    they stay put while the slopes move; with a positive step they move."""
    from verifier.bounds.alpha import AlphaConfig, alpha_crown
    net = tiny_net(11, n_in=3, hidden=(10, 10), n_out=3)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    box = Bounds(-torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    crown = crown_bounds(graph, box)
    signs = {}
    for z in z_nodes:   # split every unstable neuron active: their multipliers get a gradient
        unstable = (crown[z].lower < 0) & (crown[z].upper > 0)
        signs[z] = unstable.to(torch.float64)
    C = torch.tensor([[[1.0, -1.0, 0.0]]], dtype=torch.float64)
    moved = {}
    for beta_lr in (0.0, 0.1):
        betas = {z: torch.full((1, 1, *graph.nodes[z].shape), 0.5, dtype=torch.float64, requires_grad=True)
                 for z in z_nodes}
        splits = SplitState(signs, betas)
        config = AlphaConfig(iterations=5, lr=0.1, optimize_intermediate=False, early_stop_patience=5,
                             beta_lr=beta_lr)
        with torch.no_grad():
            initial = crown_bounds(graph, box, splits=SplitState(signs, {z: b.detach() for z, b in betas.items()}))
        alpha_crown(graph, box, C, config, need_upper=False, initial=initial, splits=splits)
        moved[beta_lr] = max(float((b.detach() - 0.5).abs().max()) for b in betas.values())
    assert moved[0.0] == 0.0
    assert moved[0.1] > 1e-3
    assert BabConfig().beta_lr != BabConfig().alpha_lr


@pytest.mark.parametrize("quantile", [0.25, 0.5, 0.75])
def test_proven_samples_leave_the_optimisation_without_changing_the_others(quantile):
    """alpha/beta optimisation with ``proven_above`` (branch and bound drops a subdomain from the
    batch once proven) gives every unproven sample the bound, slopes, multipliers and branching
    coefficients of the full-batch optimisation; the proven ones end above the threshold. Equal
    up to float64 rounding: the matrix products run on batches of other sizes."""
    from verifier.bounds.alpha import AlphaConfig, alpha_crown
    net = tiny_net(8, n_in=5, hidden=(20, 20, 20), n_out=4)
    graph = BoundedModel(net, dtype=torch.float64).graph((5,))
    N = 64
    gen = torch.Generator().manual_seed(0)
    center = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    box = Bounds(center - 0.5, center + 0.5)
    C = torch.randn(N, 1, 4, generator=gen, dtype=torch.float64)
    z_nodes = [graph.nodes[r].inputs[0] for r in graph.relu_nodes()]
    signs = {z: (torch.randint(-1, 2, (N, 20), generator=gen) * (torch.rand(N, 20, generator=gen) < 0.2)).double()
             for z in z_nodes}
    config = AlphaConfig(iterations=10, optimize_intermediate=False, early_stop_patience=10, beta_lr=0.05)
    results = {}
    for mode in ("full", "shrinking"):
        betas = {z: torch.full((N, 1, 20), 0.1, dtype=torch.float64, requires_grad=True) for z in z_nodes}
        with torch.no_grad():
            initial = crown_bounds(graph, box, splits=SplitState(signs, {z: b.detach() for z, b in betas.items()}))
        record = {}
        # the threshold: a quantile of the initial CROWN bounds, so that samples leave at every step
        threshold = float(output_bounds(graph, box, C, initial, need_upper=False, splits=SplitState(signs, betas))[0]
                          .detach().quantile(quantile))
        above = torch.tensor([threshold], dtype=torch.float64) if mode == "shrinking" else None
        lb, _, _, alphas = alpha_crown(graph, box, C, config, need_upper=False, initial=initial,
                                       splits=SplitState(signs, betas), record=record, proven_above=above)
        results[mode] = (lb.detach(), [a[0].detach() for a in alphas.values()],
                         [b.detach() for b in betas.values()], [record[k] for k in sorted(record)])
    full, shrinking = results["full"], results["shrinking"]
    open_ = (shrinking[0] <= threshold).squeeze(1)
    assert 0 < int(open_.sum()) < N, "the threshold must split the batch"
    assert torch.all(full[0][~open_] > threshold)
    for want, got in zip([full[0], *full[1], *full[2], *full[3]],
                         [shrinking[0], *shrinking[1], *shrinking[2], *shrinking[3]]):
        assert torch.allclose(want[open_], got[open_], rtol=0, atol=1e-12)


def test_children_below_their_parents_bound_get_more_optimisation_steps():
    """``catch_up``: a child left below its parent's bound (and unproven) by the first steps gets
    ``catch_up_iterations`` more; its bound can only rise, stays below every feasible sampled
    margin, and the children already above their parent's are untouched."""
    from verifier.bab.records import SubdomainRecords
    from verifier.bab.relu_split import ReluSplitSearch
    from verifier.spec import region_specs
    net = tiny_net(3, n_in=3, hidden=(16, 16, 16), n_out=2)
    model = BoundedModel(net, dtype=torch.float64)
    graph = model.graph((3,))
    lower, upper = -np.ones(3), np.ones(3)
    c = np.array([1.0, -1.0])
    spec = region_specs(property_for(c, exact_min(net, c, lower, upper) - 0.01, lower, upper),
                        graph.input_shape, model.device, model.dtype)[0]

    def children(catch_up_iterations):
        config = BabConfig(input_split="off", alpha_iterations=1, catch_up_iterations=catch_up_iterations)
        search = ReluSplitSearch(graph, spec.select(0), lambda x: None, config, SubdomainRecords())
        root = search.with_decisions(search.root(None), "babsr", False)
        signs, ref, alphas, betas, _, _ = search.children(root)
        target = torch.tensor([-1e-6, -float("inf")], dtype=torch.float64)   # child 0 lags, child 1 not
        margins, *_ = search.bound(signs, ref, alphas, betas, len(graph.nodes), catch_up=target)
        return signs, margins.amax(1)

    signs, without = children(0)
    _, caught_up = children(50)
    assert float(without[0]) < -1e-6, "the first child must lag its target for the test to mean anything"
    assert caught_up[0] > without[0] + 1e-6
    assert caught_up[1] == without[1]
    x = torch.rand(100_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        values = graph.forward(x, keep=True)
    for k in range(2):
        feasible = torch.ones(len(x), dtype=torch.bool)
        for z, s in signs.items():
            feasible &= ((values[z] * s[k] >= 0) | (s[k] == 0)).flatten(1).all(1)
        margins = spec.select(0).margins(values[graph.output][feasible]).amax(1)
        assert int(feasible.sum()) > 100 and float(margins.min()) >= float(caught_up[k]) - 1e-9
