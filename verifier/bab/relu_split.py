"""Branch and bound on ReLU activations with beta-CROWN (Wang et al., NeurIPS 2021).

A subdomain fixes some ReLUs active (z >= 0) or inactive (z <= 0). Domains are rows of tensors:
split signs per ReLU layer, intermediate bounds, warm-start slopes (alpha) and split multipliers
(beta), the current lower bound and the next branching decision. Each step takes the batch of
domains with the lowest bounds, splits each on its chosen neuron, and bounds all children in
one call: intermediate bounds by CROWN under the splits (starting from the parent's), then the
output bound with alpha and beta optimised jointly. Children proven impossible are dropped; the
minimiser of each remaining child's linear lower bound is tried concretely.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor

from ..bounds.alpha import AlphaConfig, alpha_crown
from ..bounds.crown import IntermediateSlopes, SplitState, crown_bounds, output_bounds
from ..graph import BoundGraph
from ..ops import Bounds, ReLU
from ..spec import RegionSpec
from .attacks import SearchAttacks
from .config import BabConfig
from .domains import Domains, DomainStore
from .leaf import settle_leaf
from .records import SubdomainRecords
from .search_loop import best_first


class ReluLayout:
    """The ReLU layers of a graph and a flat numbering of their neurons."""

    def __init__(self, graph: BoundGraph):
        self.relus = graph.relu_nodes()
        self.z_nodes = [graph.nodes[r].inputs[0] for r in self.relus]
        sizes = [graph.nodes[z].numel for z in self.z_nodes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.total = sum(sizes)

    def locate(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat neuron index (M,) -> (layer position, index within the layer)."""
        offsets = torch.tensor(self.offsets, device=flat.device)
        layer = torch.searchsorted(offsets, flat, right=True) - 1
        return layer, flat - offsets[layer]


def branching_scores(layout: ReluLayout, graph: BoundGraph, bounds: list[Bounds], record: dict[int, Tensor]) -> Tensor:
    """BaBSR-style score of every neuron: (M, total) with -inf where nothing can be split.

    The lower bound pays, for an unstable neuron with negative coefficient A (on its ReLU
    output), the intercept of the upper line: |A^-| * (-l u / (u - l)). Splitting the neuron
    removes that term; it is the main estimate. A small term |A| * min(u, -l) breaks ties."""
    scores = []
    for r, z in zip(layout.relus, layout.z_nodes):
        l, u = bounds[z].lower.flatten(1), bounds[z].upper.flatten(1)
        A = record.get(r)
        unstable = (l < 0) & (u > 0)
        if A is None:
            scores.append(torch.where(unstable, (u - l), torch.full_like(l, -float("inf"))))
            continue
        A = A.flatten(2)
        width = torch.where(unstable, u - l, torch.ones_like(u))
        intercept = torch.where(unstable, -l * u / width, torch.zeros_like(u))
        s = (A.clamp(max=0).abs() * intercept.unsqueeze(1)).sum(1)
        s = s + 1e-3 * (A.abs() * torch.minimum(u, -l).clamp(min=0).unsqueeze(1)).sum(1)
        scores.append(torch.where(unstable, s, torch.full_like(s, -float("inf"))))
    return torch.cat(scores, dim=1)


def earliest_layer_only(layout: ReluLayout, scores: Tensor) -> Tensor:
    """scores (M, total) with -inf outside each domain's earliest layer that has a splittable
    neuron (``branching="layer"``)."""
    layer_of = torch.repeat_interleave(torch.arange(len(layout.sizes), device=scores.device),
                                       torch.tensor(layout.sizes, device=scores.device))
    first = torch.where(torch.isfinite(scores), layer_of, len(layout.sizes)).amin(1, keepdim=True)
    return torch.where(layer_of == first, scores, torch.full_like(scores, -float("inf")))


def choose_branching(config: BabConfig, layout: ReluLayout, bounds: list[Optional[Bounds]]) -> tuple[str, bool]:
    """The heuristic and whether children re-bound their intermediate layers, for ``config``
    and the root's intermediate bounds (batch 1)."""
    branching = config.branching
    if branching == "auto":
        # blown up: the bounds grew through the network, from a first layer at most half unstable
        # to a later one mostly unstable (on tiny nets over wide boxes every layer is
        # unstable from the first, and BaBSR is the better there)
        unstable = [float(((bounds[z].lower < 0) & (bounds[z].upper > 0)).float().mean()) for z in layout.z_nodes]
        blown_up = unstable[0] <= 0.5 and max(unstable[1:], default=0.0) >= config.layer_branching_unstable
        branching = "layer" if blown_up else "babsr"
    rebound = config.rebound_intermediate
    return branching, branching == "layer" if rebound is None else rebound


class ReluSplitSearch:
    def __init__(self, graph: BoundGraph, spec: RegionSpec, check: Callable[[Tensor], Optional[tuple]],
                 config: BabConfig, records: SubdomainRecords, region: int = 0,
                 log: Callable[[str], None] = lambda s: None):
        self.graph, self.spec, self.check, self.config = graph, spec, check, config
        self.records, self.region, self.log = records, region, log
        self.layout = ReluLayout(graph)
        self.needed = set(graph.needs_bounds())
        self.alpha_config = AlphaConfig(iterations=config.alpha_iterations, lr=config.alpha_lr,
                                        optimize_intermediate=False, early_stop_patience=config.alpha_iterations,
                                        beta_lr=config.beta_lr)
        self.catch_up_config = AlphaConfig(iterations=config.catch_up_iterations, lr=config.catch_up_lr,
                                           optimize_intermediate=False,
                                           early_stop_patience=config.catch_up_iterations, beta_lr=config.beta_lr)
        self.reason: Optional[str] = None   # why the search cannot decide (a leaf the LP left open)
        self.kind = "relu"
        self.branching, self.rebound = "babsr", False   # set at the root (choose_branching)
        self.deadline: Optional[float] = None
        self.attacks: Optional[SearchAttacks] = None   # set by run (it needs the deadline)
        self.root_record: dict[int, Tensor] = {}   # the root's coefficients and box, for its decisions
        self.root_box: Optional[Bounds] = None
        self.slopes: Optional[IntermediateSlopes] = None   # set by run: the slopes re-bounding uses

    # ---- bounding ------------------------------------------------------------------------
    def bound(self, signs: dict[int, Tensor], reference: list[Optional[Bounds]], alphas: dict[int, Tensor],
              betas: dict[int, Tensor], recompute_from: int = 0, catch_up: Optional[Tensor] = None):
        """Bound M subdomains whose splits differ from the reference's from node ``recompute_from``
        on. Returns margins (M, R), bounds, alphas, betas, record, box.

        ``catch_up`` (M,): the bound each domain's parent reached. A domain left below it and
        unproven by the optimisation gets ``config.catch_up_iterations`` more steps: its
        region lies inside its parent's, so it can do at least as well, and a subtree whose
        domains stay below their ancestor's bound is otherwise split without end (RESULTS.md)."""
        M = next(iter(signs.values())).shape[0] if signs else 1
        spec = self.spec
        box = Bounds(spec.lower.unsqueeze(0).expand(M, *spec.lower.shape),
                     spec.upper.unsqueeze(0).expand(M, *spec.upper.shape))
        C = spec.C.unsqueeze(0).expand(M, *spec.C.shape)
        with torch.no_grad():
            fixed = SplitState(signs, {z: b.detach() for z, b in betas.items()})
            bounds = crown_bounds(self.graph, box, splits=fixed, reference=reference, recompute_from=recompute_from,
                                  deadline=self.deadline, slopes=self.slopes)
        lb, alphas, betas, record = self.optimise(self.alpha_config, box, C, bounds, signs, alphas, betas)
        if catch_up is not None and self.config.catch_up_iterations > 0:
            best = _best_margin(lb - spec.rhs)
            lagging = ((best < catch_up) & (best <= 0)).nonzero().squeeze(1)
            if len(lagging):
                def rows(t: Tensor) -> Tensor:
                    return t[lagging]
                more = self.optimise(self.catch_up_config, Bounds(rows(box.lower), rows(box.upper)), rows(C),
                                     [None if b is None else Bounds(rows(b.lower), rows(b.upper)) for b in bounds],
                                     {z: rows(t) for z, t in signs.items()}, {r: rows(a) for r, a in alphas.items()},
                                     {z: rows(b) for z, b in betas.items()})
                lb[lagging] = torch.maximum(lb[lagging], more[0])
                for mine, theirs in ((alphas, more[1]), (betas, more[2]), (record, more[3])):
                    for key, value in theirs.items():
                        if key not in mine:
                            mine[key] = value.new_zeros(M, *value.shape[1:])
                        mine[key][lagging] = value
        # a domain keeps only the bounds a relaxation reads (ReLU inputs), not the input box or
        # the affine layers' values: most of a domain's memory otherwise
        bounds = [b if i in self.needed else None for i, b in enumerate(bounds)]
        return lb - spec.rhs, bounds, alphas, betas, record, box

    def optimise(self, config: AlphaConfig, box: Bounds, C: Tensor, bounds: list[Optional[Bounds]],
                 signs: dict[int, Tensor], alphas: dict[int, Tensor], betas: dict[int, Tensor]):
        """The output bound of M domains under fixed intermediate bounds, slopes and split
        multipliers optimised jointly from ``alphas`` and ``betas``. Returns lb (M, R), the
        final slopes and multipliers, and the last pass's coefficients (``alpha_crown``)."""
        live_betas = {z: b.detach().clone().requires_grad_(True) for z, b in betas.items()}
        out = self.graph.output
        warm = {(out, r): (a, None) for r, a in alphas.items()}
        record: dict[int, Tensor] = {}
        lb, _, _, new_alphas = alpha_crown(self.graph, box, C, config, need_upper=False, initial=bounds,
                                           splits=SplitState(signs, live_betas), warm=warm, record=record,
                                           deadline=self.deadline, proven_above=self.spec.rhs)
        alphas_out = {r: new_alphas[(out, r)][0].detach() for r in self.layout.relus if (out, r) in new_alphas}
        return lb, alphas_out, {z: b.detach() for z, b in live_betas.items()}, record

    def decide(self, bounds, record, signs, alphas, betas, box) -> Tensor:
        """The neuron each domain splits next: (M,) flat index, -1 where none is unstable."""
        scores = branching_scores(self.layout, self.graph, bounds, record)
        if self.branching == "layer":
            scores = earliest_layer_only(self.layout, scores)
        best, index = scores.max(1)
        if self.branching == "fsb" and scores.shape[1] > 1 and scores.shape[0]:
            index = self.smart_branching(scores, bounds, signs, alphas, betas, box)
        return torch.where(torch.isfinite(best), index, torch.full_like(index, -1))

    def smart_branching(self, scores, bounds, signs, alphas, betas, box) -> Tensor:
        """Filtered smart branching: bound both children of each of the top-k BaBSR candidates
        (CROWN with the domain's slopes and multipliers, intermediate bounds kept) in one batch and
        pick the candidate whose worse child is best."""
        M = scores.shape[0]
        k = min(self.config.fsb_candidates, scores.shape[1])
        top_scores, top = scores.topk(k, dim=1)                                  # (M, k)
        n = M * k * 2
        rep = torch.arange(M, device=top.device).repeat_interleave(2 * k)       # parent row of each trial
        cand = top.repeat_interleave(2, dim=1).reshape(-1)                       # (n,)
        sign = torch.tensor([1.0, -1.0], dtype=box.lower.dtype, device=top.device).repeat(M * k)
        layer, local = self.layout.locate(cand)
        trial_signs, trial_bounds = {}, [None if b is None else Bounds(b.lower[rep], b.upper[rep]) for b in bounds]
        rows = torch.arange(n, device=top.device)
        for pos, z in enumerate(self.layout.z_nodes):
            s = signs[z][rep].flatten(1).clone()
            hit = layer == pos
            s[rows[hit], local[hit]] = sign[hit]
            trial_signs[z] = s.view(n, *self.graph.nodes[z].shape)
        state = SplitState(trial_signs, {z: b[rep] for z, b in betas.items()})
        for z in self.layout.z_nodes:
            trial_bounds[z] = state.apply(z, trial_bounds[z])
        out = self.graph.output
        trial_alphas = {(out, r): (a[rep], None) for r, a in alphas.items()}
        trial_box = Bounds(box.lower[rep], box.upper[rep])
        C = self.spec.C.unsqueeze(0).expand(n, *self.spec.C.shape)
        with torch.no_grad():
            lb, _ = output_bounds(self.graph, trial_box, C, trial_bounds, False, trial_alphas, state)
        worse_child = (lb - self.spec.rhs).amax(1).view(M, k, 2).amin(2)
        worse_child = torch.where(torch.isfinite(top_scores), worse_child, torch.full_like(worse_child, -float("inf")))
        return top.gather(1, worse_child.argmax(1, keepdim=True)).squeeze(1)

    def counterexample(self, box: Bounds, margins: Tensor, record: dict[int, Tensor]) -> Optional[tuple]:
        """Try the minimiser of each domain's worst linear lower bound; where none is a
        counterexample, offer them to the attacks as starting points."""
        A = record.get(0)
        if A is None:
            return None
        worst_row = margins.argmin(1)
        A_worst = A[torch.arange(A.shape[0], device=A.device), worst_row]
        corner = torch.where(A_worst > 0, box.lower, box.upper)
        found = self.check(corner)
        if found is None and self.attacks is not None:
            self.attacks.offer(corner)
        return found

    # ---- the search ----------------------------------------------------------------------
    def root(self, reference: Optional[list[Optional[Bounds]]]) -> Domains:
        """The whole region as one domain, bounded and recorded, with no branching decision yet
        (``with_decisions``)."""
        signs = {z: torch.zeros(1, *self.graph.nodes[z].shape, dtype=self.spec.lower.dtype,
                                device=self.spec.lower.device) for z in self.layout.z_nodes}
        betas = {z: torch.zeros(1, 1, *self.graph.nodes[z].shape, dtype=self.spec.lower.dtype,
                                device=self.spec.lower.device) for z in self.layout.z_nodes}
        margins, bounds, alphas, betas, record, box = self.bound(signs, reference, {}, betas)
        ids = self.records.new_ids(1, margins.device)
        lower = _best_margin(margins)
        self.records.add(ids, torch.full((1,), -1), torch.zeros(1, dtype=torch.long), lower,
                         self.unstable_counts(bounds), "root", region=self.region)
        self.root_record, self.root_box = record, box
        return Domains(signs, bounds, alphas, betas, lower, torch.full_like(ids, -1),
                       torch.zeros(1, dtype=torch.long, device=ids.device), ids)

    def with_decisions(self, root: Domains, branching: str, rebound: bool) -> Domains:
        """The root domain with the decision of ``branching``, which the search then uses."""
        self.branching, self.rebound = branching, rebound
        self.log(f"branching: {branching}, intermediate bounds {'re-bounded' if rebound else 'kept'} after a split")
        decision = self.decide(root.bounds, self.root_record, root.signs, root.alphas, root.betas, self.root_box)
        return Domains(root.signs, root.bounds, root.alphas, root.betas, root.lower, decision, root.depth, root.ids)

    def run(self, deadline: float, reference: Optional[list[Optional[Bounds]]] = None,
            slopes: Optional[IntermediateSlopes] = None) -> tuple[str, Optional[tuple]]:
        """The search from the root, whose intermediate bounds start from ``reference`` (batch 1)
        and, when re-bounded in subdomains, use the root's optimised ``slopes``
        (``config.rebound_with_root_slopes``)."""
        if not self.layout.relus:
            self.reason = "no ReLU to split"
            return "unknown", None
        self.slopes = slopes if self.config.rebound_with_root_slopes else None
        self.deadline = deadline
        self.attacks = SearchAttacks(self.graph, self.spec, self.check, deadline, self.config.relu_attack_restarts,
                                     self.config.relu_attack_share, self.config.attack_after,
                                     keep=self.config.relu_attack_starts, log=self.log)
        root = self.root(reference)
        branching, rebound = choose_branching(self.config, self.layout, root.bounds)
        if self.config.branching == "auto" and branching == "layer":
            # BaBSR first: it finds the counterexamples near the root in seconds (256x4
            # prop_1_0.05), where the layer order's first re-bounded steps take tens
            phase_end = time.monotonic() + self.config.auto_babsr_share * max(0.0, deadline - time.monotonic())
            outcome, found = self.search(self.with_decisions(root, "babsr", False), phase_end)
            if outcome in ("sat", "unsat"):
                return outcome, found
            if time.monotonic() > deadline:
                return "timeout", None
            self.log("no verdict by BaBSR: the search restarts from the root")
            self.reason = None
        return self.search(self.with_decisions(root, branching, rebound), deadline)

    def search(self, root: Domains, deadline: float) -> tuple[str, Optional[tuple]]:
        """Best-first branch and bound from ``root`` until ``deadline`` (``search_loop.best_first``)."""
        self.deadline = deadline
        return best_first(self, root, deadline, self.config.relu_batch)

    def admit(self, store: DomainStore, domains: Domains) -> Optional[tuple]:
        """Push the open domains of ``domains`` into the store; settle its leaves (no unstable
        neuron left, bound not positive) at once. Returns a confirmed counterexample, or None."""
        open_ = domains.lower <= 0
        leaf = open_ & (domains.decision < 0)
        if bool(leaf.any()):
            found = self.settle_leaves(domains.take(leaf.nonzero().squeeze(1)))
            if found is not None:
                return found
        store.push(domains.take((open_ & ~leaf).nonzero().squeeze(1)))
        return None

    def unstable_counts(self, bounds) -> Tensor:
        return torch.stack([((bounds[z].lower < 0) & (bounds[z].upper > 0)).flatten(1).sum(1)
                            for z in self.layout.z_nodes], dim=1).cpu()

    def children(self, parents: Domains) -> tuple[dict, list, dict, dict, Tensor, Tensor]:
        """Both children of every parent: rows [0, P) active (z >= 0), [P, 2P) inactive."""
        P = len(parents)
        layer, local = self.layout.locate(parents.decision)
        sign_value = torch.cat([torch.ones(P), -torch.ones(P)]).to(parents.lower)
        rows = torch.arange(2 * P, device=parents.lower.device)
        signs, betas = {}, {}
        for pos, z in enumerate(self.layout.z_nodes):
            s = torch.cat([parents.signs[z], parents.signs[z]]).flatten(1).clone()
            hit = torch.cat([layer == pos, layer == pos])
            idx = torch.cat([local, local])
            s[rows[hit], idx[hit]] = sign_value[hit]
            signs[z] = s.view(2 * P, *self.graph.nodes[z].shape)
            betas[z] = torch.cat([parents.betas[z], parents.betas[z]])
        bounds = [None if b is None else Bounds(torch.cat([b.lower, b.lower]), torch.cat([b.upper, b.upper]))
                  for b in parents.bounds]
        alphas = {r: torch.cat([a, a]) for r, a in parents.alphas.items()}
        return signs, bounds, alphas, betas, torch.cat([layer, layer]), torch.cat([local, local])

    def settle_leaves(self, leaves: Domains) -> Optional[tuple]:
        """Decide each leaf exactly (``leaf.settle_leaf``); a leaf left undecided makes the
        search's answer ``unknown``. Returns a confirmed counterexample, or None."""
        for k in range(len(leaves)):
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.reason = self.reason or "the time limit came while leaf subdomains awaited their LP"
                return None
            leaf = leaves.take(torch.tensor([k], device=leaves.lower.device))
            outcome, found, _ = settle_leaf(self.graph, self.spec, leaf.signs, leaf.bounds, self.check)
            self.log(f"leaf subdomain (depth {int(leaf.depth[0])}): {outcome} by linear programming")
            if outcome == "sat":
                return found
            if outcome != "unsat":
                self.reason = "a leaf subdomain (every ReLU decided) that linear programming did not decide"
        return None

    def step(self, parents: Domains):
        signs, ref, alphas, betas, layer, local = self.children(parents)
        # without re-bounding, the intermediate layers keep the parent's bounds, the split neurons
        # clamped (SplitState.apply) and intervals propagated from them (crown_bounds' IBP pass)
        recompute_from = self.layout.z_nodes[int(layer.min())] + 1 if self.rebound \
            else len(self.graph.nodes)
        parent_lower = torch.cat([parents.lower, parents.lower])
        margins, bounds, alphas, betas, record, box = self.bound(signs, ref, alphas, betas, recompute_from,
                                                                 catch_up=parent_lower)
        # a child's region lies inside its parent's, so the parent's bound holds for it too: the
        # store's lowest bound (the progress log's) then never falls
        lower = torch.maximum(_best_margin(margins), parent_lower)
        ids = self.records.new_ids(len(lower), lower.device)
        depth = torch.cat([parents.depth, parents.depth]) + 1
        P = len(parents)
        self.records.add(ids, torch.cat([parents.ids, parents.ids]), depth, lower, self.unstable_counts(bounds),
                         "relu", split_layer=layer, split_index=local,
                         split_sign=torch.cat([torch.ones(P, dtype=torch.long), -torch.ones(P, dtype=torch.long)]),
                         region=self.region)
        open_ = lower <= 0
        if bool(open_.any()):
            found = self.counterexample(Bounds(box.lower[open_], box.upper[open_]), margins[open_],
                                        {0: record[0][open_]} if 0 in record else {})
            if found is not None:
                return "sat", found
        keep = open_.nonzero().squeeze(1)
        children = Domains(signs, bounds, alphas, betas, lower, torch.zeros_like(depth), depth, ids).take(keep)
        kept_record = {key: value[keep] for key, value in record.items()}
        kept_box = Bounds(box.lower[keep], box.upper[keep])
        children.decision = self.decide(children.bounds, kept_record, children.signs, children.alphas,
                                        children.betas, kept_box)
        return children


def _best_margin(margins: Tensor) -> Tensor:
    """margins (M, R) -> (M,) the domain's bound: the best row, -inf where any row is NaN (no
    bound; a NaN compared with 0 would otherwise pass for a proof)."""
    best = margins.amax(1)
    return torch.where(torch.isnan(best), torch.full_like(best, -float("inf")), best)

