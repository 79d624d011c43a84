"""Branch and bound on the inputs of any elementwise non-linearity (GenBaB: Shi et al., TACAS
2025), ReLUs included.

A subdomain constrains some neurons z of split nodes (inputs of ``Op.splittable`` or
``Op.branchable`` ops) by ``s (z - p) >= 0``: rows of tensors of split signs s, points p and
beta multipliers per node (``SplitState``), intermediate bounds, the current lower bound and the
next decision (a neuron and its point, ``branching.choose_points``). Each step takes the batch of
domains with the lowest bounds, splits each into z <= p and z >= p, clamps the split neuron's
bounds to its half (so its relaxation is rebuilt on the narrower interval), re-bounds the
intermediate layers after the earliest split by CROWN under the splits (or only by interval
propagation, ``GeneralSplitConfig.rebound``), and optimises the output bound with the split
multipliers (and any ReLU slopes) jointly, as beta-CROWN does for ReLUs. A neuron may be split
again on a later step: the newest constraint carries the multiplier, the older one stays in the
neuron's bounds.

A domain with nothing left to split (every neuron stable or narrower than
``GeneralSplitConfig.min_width``) and no proof is a leaf this search cannot settle: the minimiser
of its linear bound is tried concretely, and if that is no counterexample the answer becomes
``unknown`` with that reason (``reason``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..bounds.alpha import AlphaConfig, alpha_crown
from ..bounds.crown import SplitState, crown_bounds
from ..graph import BoundGraph
from ..ops import Bounds
from ..runtime import is_out_of_memory
from ..spec import RegionSpec
from .attacks import SearchAttacks
from .branching import choose_points, middle_points, weighted_scores
from .config import BabConfig
from .domains import DomainStore, StoreFull
from .records import SubdomainRecords
from .relu_split import ReluSplitSearch


class SplitLayout:
    """The split nodes of a graph and a flat numbering of their neurons: (op node, its input z,
    kind) with kind "element" for the input of a splittable or branchable op, "factor" for each
    input of a non-linear op of several perturbed inputs (a product of two variables, the
    maximum of two tensors: split at the middle of the factor's interval, which narrows the op's
    relaxation, e.g. McCormick's planes)."""

    def __init__(self, graph: BoundGraph):
        pairs, seen = [], set()
        for i, node in enumerate(graph.nodes):
            op = node.op
            if op is None or not op.nonlinear:
                continue
            if (op.splittable or op.branchable) and len(node.inputs) == 1:
                candidates, kind = node.inputs, "element"
            elif len(node.inputs) > 1:
                candidates, kind = node.inputs, "factor"
            else:
                continue
            for z in candidates:
                if z != 0 and z not in seen:
                    seen.add(z)
                    pairs.append((i, z, kind))
        self.ops = [p[0] for p in pairs]
        self.z_nodes = [p[1] for p in pairs]
        self.kinds = [p[2] for p in pairs]
        self.sizes = [graph.nodes[z].numel for z in self.z_nodes]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]

    def locate(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat neuron index (M,) -> (position in ``z_nodes``, index within that node)."""
        offsets = torch.tensor(self.offsets, device=flat.device)
        pos = torch.searchsorted(offsets, flat, right=True) - 1
        return pos, flat - offsets[pos]


def has_general_splits(graph: BoundGraph) -> bool:
    """Whether the graph has a non-linearity other than ReLU that this search can split."""
    layout = SplitLayout(graph)
    return any(kind == "factor" or not graph.nodes[op].op.branchable for op, kind in zip(layout.ops, layout.kinds))


@dataclass
class GeneralDomains:
    """A batch of M subdomains of one region and one disjunct (R rows)."""

    signs: dict[int, Tensor]            # z node -> (M, *shape) in {-1, 0, +1}
    points: dict[int, Tensor]           # z node -> (M, *shape) split points (0 where unsplit)
    betas: dict[int, Tensor]            # z node -> (M, 1, *shape) >= 0
    bounds: list[Optional[Bounds]]      # per node, (M, *shape) where a relaxation needs them
    lower: Tensor                       # (M,) best margin lower bound (proven when > 0)
    decision: Tensor                    # (M,) flat neuron index, -1 if nothing can be split
    decision_point: Tensor              # (M,) its split point
    depth: Tensor                       # (M,)
    ids: Tensor                         # (M,)

    def __len__(self) -> int:
        return self.lower.shape[0]

    def tensors(self) -> list[Tensor]:
        """Every per-domain tensor, in the order ``with_tensors`` reads them back."""
        out = [d[k] for d in (self.signs, self.points, self.betas) for k in sorted(d)]
        for b in self.bounds:
            if b is not None:
                out += [b.lower, b.upper]
        return out + [self.lower, self.decision, self.decision_point, self.depth, self.ids]

    def with_tensors(self, tensors: list[Tensor]) -> "GeneralDomains":
        it = iter(tensors)
        signs, points, betas = ({k: next(it) for k in sorted(d)} for d in (self.signs, self.points, self.betas))
        bounds = [None if b is None else Bounds(next(it), next(it)) for b in self.bounds]
        return GeneralDomains(signs, points, betas, bounds, *(next(it) for _ in range(5)))

    def take(self, index: Tensor) -> "GeneralDomains":
        return self.with_tensors([t[index] for t in self.tensors()])

    def splits(self, betas: Optional[dict[int, Tensor]] = None) -> SplitState:
        return SplitState(self.signs, self.betas if betas is None else betas, self.points)


class GeneralSplitSearch:
    """The search of one disjunct; same interface as ``ReluSplitSearch`` (``run``)."""

    def __init__(self, graph: BoundGraph, spec: RegionSpec, check: Callable[[Tensor], Optional[tuple]],
                 config: BabConfig, records: SubdomainRecords, region: int = 0,
                 log: Callable[[str], None] = lambda s: None):
        self.graph, self.spec, self.check, self.config = graph, spec, check, config
        self.general = config.general
        self.records, self.region, self.log = records, region, log
        self.layout = SplitLayout(graph)
        self.needed = set(graph.needs_bounds())
        iterations = self.general.alpha_iterations
        self.alpha_config = AlphaConfig(iterations=iterations, lr=config.alpha_lr, optimize_intermediate=False,
                                        early_stop_patience=iterations, beta_lr=self.general.beta_lr)
        self.deadline: Optional[float] = None
        self.reason: Optional[str] = None    # why the search could not decide, where it could not
        self.attacks: Optional[SearchAttacks] = None

    # ---- bounding ------------------------------------------------------------------------
    def bound(self, domains: GeneralDomains, recompute_from: int):
        """Bound M subdomains (signs, points, betas and reference bounds of ``domains``) whose
        splits differ from their reference bounds' from node ``recompute_from`` on. Returns the
        margins (M, R), the bounds, the optimised multipliers and the last pass's coefficients."""
        M = len(domains)
        spec = self.spec
        box = Bounds(spec.lower.unsqueeze(0).expand(M, *spec.lower.shape),
                     spec.upper.unsqueeze(0).expand(M, *spec.upper.shape))
        C = spec.C.unsqueeze(0).expand(M, *spec.C.shape)
        with torch.no_grad():
            fixed = domains.splits({z: b.detach() for z, b in domains.betas.items()})
            method = "crown" if self.general.rebound else "ibp"
            bounds = crown_bounds(self.graph, box, splits=fixed, reference=domains.bounds,
                                  recompute_from=recompute_from, deadline=self.deadline, method=method)
        live = {z: b.detach().clone().requires_grad_(True) for z, b in domains.betas.items()}
        record: dict[int, Tensor] = {}
        lb, _, _, _ = alpha_crown(self.graph, box, C, self.alpha_config, need_upper=False, initial=bounds,
                                  splits=domains.splits(live), record=record, deadline=self.deadline,
                                  proven_above=spec.rhs)
        bounds = [b if i in self.needed else None for i, b in enumerate(bounds)]
        return lb.detach() - spec.rhs, bounds, {z: b.detach() for z, b in live.items()}, record, box

    def decide(self, bounds: list[Optional[Bounds]], record: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        """The neuron each domain splits next and its point: (M,) flat index (-1 where nothing
        can be split) and (M,) point."""
        scores, points = [], []
        for op_node, z, kind in zip(self.layout.ops, self.layout.z_nodes, self.layout.kinds):
            op = self.graph.nodes[op_node].op
            if kind == "factor":
                choice = middle_points(bounds[z], self.general.min_width)
                scores.append(weighted_scores(choice, None, relu=False))
            else:
                choice = choose_points(op, bounds[z], self.general.min_width)
                scores.append(weighted_scores(choice, record.get(op_node), relu=not op.splittable))
            points.append(choice.point.flatten(1))
        scores, points = torch.cat(scores, 1), torch.cat(points, 1)
        best, index = scores.max(1)
        point = points.gather(1, index.unsqueeze(1)).squeeze(1)
        return torch.where(torch.isfinite(best), index, torch.full_like(index, -1)), point

    def counterexample(self, box: Bounds, margins: Tensor, record: dict[int, Tensor]) -> Optional[tuple]:
        """Try the minimiser of each domain's worst linear lower bound; offer them to the attacks."""
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
    def root(self, reference: Optional[list[Optional[Bounds]]]) -> GeneralDomains:
        dtype, device = self.spec.lower.dtype, self.spec.lower.device
        shapes = {z: self.graph.nodes[z].shape for z in self.layout.z_nodes}
        signs = {z: torch.zeros(1, *s, dtype=dtype, device=device) for z, s in shapes.items()}
        points = {z: torch.zeros(1, *s, dtype=dtype, device=device) for z, s in shapes.items()}
        betas = {z: torch.zeros(1, 1, *s, dtype=dtype, device=device) for z, s in shapes.items()}
        reference = reference if reference is not None else [None] * len(self.graph.nodes)
        empty = torch.zeros(1, dtype=torch.long, device=device)
        domain = GeneralDomains(signs, points, betas, reference, empty.to(dtype), empty, empty.to(dtype), empty, empty)
        margins, bounds, betas, record, box = self.bound(domain, 0)
        lower = _best_margin(margins)
        ids = self.records.new_ids(1, device)
        self.records.add(ids, torch.full((1,), -1), torch.zeros(1, dtype=torch.long), lower, None, "root",
                         region=self.region)
        found = self.counterexample(box, margins, record) if bool(lower <= 0) else None
        if found is not None:
            self.found_at_root = found
        decision, point = self.decide(bounds, record)
        return GeneralDomains(signs, points, betas, bounds, lower, decision, point, empty, ids)

    def run(self, deadline: float, reference: Optional[list[Optional[Bounds]]] = None,
            slopes=None) -> tuple[str, Optional[tuple]]:
        """Best-first search from the root (intermediate bounds from ``reference``, batch 1);
        ``slopes`` is accepted for ``ReluSplitSearch``'s interface and not used."""
        self.deadline = deadline
        if not self.layout.z_nodes:
            self.reason = "no non-linearity to split"
            return "unknown", None
        self.attacks = SearchAttacks(self.graph, self.spec, self.check, deadline, self.config.relu_attack_restarts,
                                     self.config.relu_attack_share, self.config.attack_after,
                                     keep=self.config.relu_attack_starts, log=self.log)
        self.found_at_root = None
        root = self.root(reference)
        if self.found_at_root is not None:
            return "sat", self.found_at_root
        self.log(f"general split: root bound {float(root.lower[0]):.4g}, {len(self.layout.z_nodes)} split nodes")
        store = DomainStore(root)
        found = self.admit(store, root)
        if found is not None:
            return "sat", found
        batch = most = self.general.batch
        last_log = time.monotonic()
        while True:
            if len(store) == 0:
                return ("unknown", None) if self.reason is not None else ("unsat", None)
            if time.monotonic() > deadline:
                return "timeout", None
            if len(store) > self.config.max_domains:
                self.reason = f"more open domains than bab.max_domains ({self.config.max_domains})"
                return "unknown", None
            found = self.attacks.maybe_run()
            if found is not None:
                return "sat", found
            parents = store.pop(batch)
            started = time.monotonic()
            try:
                result = self.step(parents)
            except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or batch == 1:
                    raise
                batch = most = max(1, batch // 2)
                self.log(f"out of memory: batch shrinks to {batch}")
                store.push(parents)
                continue
            if isinstance(result, tuple):
                return result
            try:
                found = self.admit(store, result)
            except StoreFull as exc:
                self.reason = f"memory budget reached ({exc})"
                return "unknown", None
            if found is not None:
                return "sat", found
            took = time.monotonic() - started
            if took > self.config.max_step_seconds and batch > 1:
                batch = max(1, batch // 2)
            elif took < self.config.max_step_seconds / 4 and batch < most:
                batch = min(most, 2 * batch)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                self.log(f"general split: {self.records.count} domains bounded, {len(store)} open, "
                         f"worst bound {store.lowest() if len(store) else 0:.4g}")

    def admit(self, store: DomainStore, domains: GeneralDomains) -> Optional[tuple]:
        """Push the open domains into the store. An open domain with nothing left to split is a
        leaf this search cannot settle: the answer becomes ``unknown`` (``reason``)."""
        open_ = domains.lower <= 0
        leaf = open_ & (domains.decision < 0)
        if bool(leaf.any()):
            self.reason = (f"{int(leaf.sum())} subdomain(s) with every split neuron stable or narrower than "
                           f"bab.general.min_width ({self.general.min_width:g}) and no proof")
            self.log(self.reason)
        store.push(domains.take((open_ & ~leaf).nonzero().squeeze(1)))
        return None

    def children(self, parents: GeneralDomains) -> tuple[GeneralDomains, Tensor, Tensor]:
        """Both children of every parent: rows [0, P) z >= p, rows [P, 2P) z <= p; with the
        split neuron's position (2P,) in ``layout.z_nodes`` and index within its node."""
        P = len(parents)
        pos, local = self.layout.locate(parents.decision)
        pos, local = torch.cat([pos, pos]), torch.cat([local, local])
        sign_value = torch.cat([torch.ones(P), -torch.ones(P)]).to(parents.lower)
        point_value = torch.cat([parents.decision_point, parents.decision_point])
        rows = torch.arange(2 * P, device=parents.lower.device)
        signs, points, betas = {}, {}, {}
        for k, z in enumerate(self.layout.z_nodes):
            hit = pos == k
            s = torch.cat([parents.signs[z], parents.signs[z]]).flatten(1).clone()
            p = torch.cat([parents.points[z], parents.points[z]]).flatten(1).clone()
            b = torch.cat([parents.betas[z], parents.betas[z]]).flatten(2).clone()
            s[rows[hit], local[hit]] = sign_value[hit]
            p[rows[hit], local[hit]] = point_value[hit]
            b[rows[hit], 0, local[hit]] = 0.0          # a new constraint: its multiplier starts at 0
            shape = self.graph.nodes[z].shape
            signs[z], points[z], betas[z] = s.view(2 * P, *shape), p.view(2 * P, *shape), b.view(2 * P, 1, *shape)
        split = SplitState(signs, betas, points)
        bounds = []
        for i, b in enumerate(parents.bounds):
            if b is None:
                bounds.append(None)
                continue
            doubled = Bounds(torch.cat([b.lower, b.lower]), torch.cat([b.upper, b.upper]))
            bounds.append(split.apply(i, doubled))
        cat = (lambda t: torch.cat([t, t]))
        children = GeneralDomains(signs, points, betas, bounds, cat(parents.lower), cat(parents.decision),
                                  cat(parents.decision_point), cat(parents.depth) + 1, cat(parents.ids))
        return children, pos, local

    def step(self, parents: GeneralDomains):
        children, pos, local = self.children(parents)
        first = self.layout.z_nodes[int(pos.min())] + 1
        margins, bounds, betas, record, box = self.bound(children, first)
        parent_lower = children.lower
        lower = torch.maximum(_best_margin(margins), parent_lower)
        ids = self.records.new_ids(len(lower), lower.device)
        P = len(parents)
        self.records.add(ids, children.ids, children.depth, lower, None, "general", split_layer=pos,
                         split_index=local, split_sign=torch.cat([torch.ones(P, dtype=torch.long),
                                                                  -torch.ones(P, dtype=torch.long)]),
                         region=self.region)
        open_ = lower <= 0
        if bool(open_.any()):
            found = self.counterexample(Bounds(box.lower[open_], box.upper[open_]), margins[open_],
                                        {0: record[0][open_]} if 0 in record else {})
            if found is not None:
                return "sat", found
        keep = open_.nonzero().squeeze(1)
        kept_record = {key: value[keep] for key, value in record.items()}
        kept_bounds = [None if b is None else Bounds(b.lower[keep], b.upper[keep]) for b in bounds]
        decision, point = self.decide(kept_bounds, kept_record)
        return GeneralDomains({z: t[keep] for z, t in children.signs.items()},
                              {z: t[keep] for z, t in children.points.items()},
                              {z: t[keep] for z, t in betas.items()}, kept_bounds, lower[keep], decision, point,
                              children.depth[keep], ids[keep])


def _best_margin(margins: Tensor) -> Tensor:
    """margins (M, R) -> (M,) the domain's bound: the best row, -inf where any row is NaN."""
    best = margins.amax(1)
    return torch.where(torch.isnan(best), torch.full_like(best, -float("inf")), best)


def split_search(graph: BoundGraph, spec: RegionSpec, check, config: BabConfig, records: SubdomainRecords,
                 region: int = 0, log: Callable[[str], None] = lambda s: None):
    """The search for one disjunct: general splits where the graph has a non-linearity other
    than ReLU to split (``has_general_splits``), else ReLU splitting (``ReluSplitSearch``)."""
    if has_general_splits(graph):
        return GeneralSplitSearch(graph, spec, check, config, records, region, log)
    return ReluSplitSearch(graph, spec, check, config, records, region, log)
