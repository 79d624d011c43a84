"""alpha-CROWN (Xu et al., ICLR 2021): the lower-relaxation slope of every unstable ReLU becomes
a free variable in [0, 1], one per (objective, neuron), optimised by projected Adam to tighten
the bound. Every iterate is a valid CROWN bound, so the best value seen for each objective is
kept -- stopping early never costs soundness.
"""
from __future__ import annotations

import time

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..graph import BoundGraph
from ..ops import Bounds
from .budget import log
from .crown import (Alphas, IntermediateSlopes, SplitState, crown_bounds, intersect, output_bounds, relu_lines,
                    unstable_rows)
from .optim import Adam


@dataclass(frozen=True)
class AlphaConfig:
    iterations: int = 20
    lr: float = 0.1
    lr_decay: float = 0.98
    optimize_intermediate: bool = True  # also optimise slopes used for intermediate bounds
    early_stop_patience: int = 5        # stop when the objective has not improved for this many steps
    beta_lr: Optional[float] = None     # Adam step of beta-CROWN's split multipliers (None: ``lr``)
    # the most the slopes (and their Adam state, gradients: counted 4x) may take; passes whose
    # slopes do not fit keep CROWN's choice, largest first (see _fit_budget)
    slope_memory_bytes: int = 2 << 30

    @property
    def multiplier_lr(self) -> float:
        return self.lr if self.beta_lr is None else self.beta_lr


def _optimisable_before(graph: BoundGraph, start: int) -> list[int]:
    anc = set(graph.ancestors(start))
    return [r for r in graph.optimisable_nodes() if r in anc and r != start]


def init_alphas(graph: BoundGraph, starts: dict[int, int], bounds: list[Optional[Bounds]], need_upper: dict[int, bool],
                warm: Optional[Alphas] = None) -> Alphas:
    """One slope tensor (N, S_start, *shape) per (start, optimisable node) pair, initialised at the
    op's own choice (``Op.init_slopes``: CROWN's for a ReLU) or from ``warm`` where shapes match."""
    alphas: Alphas = {}
    for start, S in starts.items():
        for r in _optimisable_before(graph, start):
            node = graph.nodes[r]
            lower_slope = node.op.init_slopes(*(bounds[j] for j in node.inputs))
            init = lower_slope.unsqueeze(1).expand(-1, S, *lower_slope.shape[1:])
            pair = []
            for side, wanted in ((0, True), (1, need_upper[start])):
                if not wanted:
                    pair.append(None)
                    continue
                if warm is not None and (start, r) in warm and warm[(start, r)][side] is not None \
                        and warm[(start, r)][side].shape == init.shape:
                    a = warm[(start, r)][side].detach().clone()
                else:
                    a = init.clone()
                pair.append(a.requires_grad_(True))
            alphas[(start, r)] = tuple(pair)
    return alphas


def _optimised_rows(graph: BoundGraph, initial: list[Optional[Bounds]]) -> dict[int, Tensor]:
    """The neurons of each intermediate node whose bounds alpha-CROWN optimises: (S_node,)."""
    return {i: unstable_rows(graph, i, initial[i]) for i in graph.needs_bounds()}


def intermediate_slopes(graph: BoundGraph, alphas: Alphas, initial: list[Optional[Bounds]]) -> IntermediateSlopes:
    """The slopes that ``alpha_crown`` (``optimize_intermediate``, batch 1) returned for the
    intermediate nodes, with the neurons they belong to; ``initial``: the bounds it started from."""
    out = graph.output
    row_of = {}
    for i, rows in _optimised_rows(graph, initial).items():
        row_of[i] = torch.zeros(graph.nodes[i].numel, dtype=torch.long, device=rows.device)
        row_of[i][rows] = torch.arange(len(rows), device=rows.device)
    return IntermediateSlopes({key: tuple(None if a is None else a.detach() for a in pair)
                               for key, pair in alphas.items() if key[0] != out}, row_of)


def alpha_crown(graph: BoundGraph, box: Bounds, C: Tensor, config: AlphaConfig = AlphaConfig(),
                need_upper: bool = True, initial: Optional[list[Optional[Bounds]]] = None,
                splits: Optional[SplitState] = None, warm: Optional[Alphas] = None,
                extra_params: Optional[list[Tensor]] = None, record: Optional[dict[int, Tensor]] = None,
                deadline: Optional[float] = None, proven_above: Optional[Tensor] = None):
    """Optimised bounds of ``C @ output`` over the box.

    C: (N, S, *output_shape). initial: CROWN bounds to start from (computed if None).
    extra_params: further tensors to optimise jointly (beta-CROWN's multipliers live in
    ``splits.betas``; they are projected to >= 0 here).
    Returns (lb, ub, bounds, alphas): lb, ub (N, S) best over iterations (ub None without
    need_upper), the tightest intermediate bounds seen, and the final slopes for warm starts.
    ``record`` receives the coefficients of the final pass (see ``backward_bound``).
    ``deadline`` (time.monotonic()) ends the optimisation early; every iterate is sound, so the
    best bounds so far are returned.
    ``proven_above``: thresholds broadcastable to (N, S) (branch and bound: a subdomain is proven
    once some row's lower bound exceeds its threshold). With fixed intermediate bounds
    (``optimize_intermediate`` off) and no upper bound, a proven sample then leaves the
    optimisation: its slopes, multipliers and bound are final, and the rest run on a smaller
    batch. Its ``record`` rows are zero (nothing reads a proven subdomain's coefficients). That
    path runs every iteration (no early stop on the objective, which shrinks with the batch).
    """
    with torch.no_grad():
        if initial is None:
            initial = crown_bounds(graph, box, splits=splits)
    needed = graph.needs_bounds()
    rows = _optimised_rows(graph, initial)
    starts = {graph.output: C.shape[1]}
    upper_wanted = {graph.output: need_upper}
    if config.optimize_intermediate:
        for i in needed:
            starts[i] = len(rows[i])
            upper_wanted[i] = True
    starts = _fit_budget(graph, starts, upper_wanted, C.shape[0], C.element_size(), config.slope_memory_bytes)
    alphas = init_alphas(graph, starts, initial, upper_wanted, warm)
    betas = list(splits.betas.values()) if splits is not None else []
    params = [([a for pair in alphas.values() for a in pair if a is not None] + list(extra_params or []), config.lr),
              (betas, config.multiplier_lr)]
    params = [group for group in params if group[0]]
    if not params:
        with torch.no_grad():
            lb, ub = output_bounds(graph, box, C, initial, need_upper, splits=splits, record=record)
        return lb, ub, initial, alphas
    with torch.enable_grad():   # the slopes are optimised by gradient even under a caller's no_grad
        if proven_above is not None and not config.optimize_intermediate and not need_upper and not extra_params:
            lb = _optimise_until_proven(graph, box, C, config, initial, splits, alphas, proven_above, record,
                                        deadline)
            return lb, None, initial, alphas
        return _optimise(graph, box, C, config, need_upper, initial, splits, alphas, params, betas, rows, record,
                         deadline)


def _fit_budget(graph: BoundGraph, starts: dict[int, int], upper_wanted: dict[int, bool], N: int, itemsize: int,
                memory_bytes: int) -> dict[int, int]:
    """The passes (start node -> rows) whose slopes fit the memory budget: the largest
    intermediate ones are dropped first (their bounds stay CROWN's), the output's last."""
    def size(start: int) -> int:
        sides = 2 if upper_wanted[start] else 1
        return 4 * sides * N * starts[start] * itemsize * sum(graph.nodes[r].numel
                                                             for r in _optimisable_before(graph, start))
    kept = dict(starts)
    total = sum(size(s) for s in kept)
    for start in sorted(kept, key=lambda s: (s == graph.output, -size(s))):
        if total <= memory_bytes:
            break
        total -= size(start)
        del kept[start]
        log.warning("alpha-CROWN: the slopes of the pass from node %d (%s) exceed the %.0f MiB budget; CROWN's kept",
                    start, graph.nodes[start].name, memory_bytes / 2**20)
    return kept


def _optimise(graph, box, C, config, need_upper, initial, splits, alphas, params, betas, rows, record, deadline):
    optimizer = Adam(params, config.lr_decay)
    best_lb = best_ub = None
    best_bounds = list(initial)
    best_objective, stale = None, 0
    # fixed intermediate bounds: the ReLU relaxations are the same in every iteration
    lines = None if config.optimize_intermediate else relu_lines(graph, initial)
    for _ in range(config.iterations):
        if config.optimize_intermediate:
            bounds = crown_bounds(graph, box, alphas, splits, reference=best_bounds, rows=rows, deadline=deadline)
        else:
            bounds = initial
        lb, ub = output_bounds(graph, box, C, bounds, need_upper, alphas, splits, lines=lines)
        with torch.no_grad():
            best_lb = lb.detach() if best_lb is None else torch.maximum(best_lb, lb.detach())
            if need_upper:
                best_ub = ub.detach() if best_ub is None else torch.minimum(best_ub, ub.detach())
            if config.optimize_intermediate:
                best_bounds = [b if (b is None or r is None) else
                               Bounds(torch.maximum(b.lower.detach(), r.lower), torch.minimum(b.upper.detach(), r.upper))
                               for b, r in zip(bounds, best_bounds)]
        if deadline is not None and time.monotonic() > deadline:
            break
        objective = lb.sum() - (ub.sum() if need_upper else 0)
        value = float(objective.detach())
        if best_objective is None or value > best_objective + 1e-6 * max(1.0, abs(best_objective)):
            best_objective, stale = value, 0
        else:
            stale += 1
            if stale >= config.early_stop_patience:
                break
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
        _project(graph, alphas, betas)
    # evaluate the final iterate too: the last step may have improved it
    with torch.no_grad():
        bounds = crown_bounds(graph, box, alphas, splits, reference=best_bounds, rows=rows, deadline=deadline) \
            if config.optimize_intermediate else initial
        lb, ub = output_bounds(graph, box, C, bounds, need_upper, alphas, splits, record=record, lines=lines)
        best_lb = torch.maximum(best_lb, lb)
        if need_upper:
            best_ub = torch.minimum(best_ub, ub)
        if config.optimize_intermediate:
            best_bounds = [b if (b is None or r is None) else intersect(b, r) for b, r in zip(bounds, best_bounds)]
    return best_lb, best_ub, best_bounds, alphas


@torch.no_grad()
def _project(graph: BoundGraph, alphas: Alphas, multipliers: list[Tensor]) -> None:
    """Back into the feasible set after a step: each op's parameters by ``Op.project_slopes``
    (a ReLU's slopes into [0, 1]), multipliers to >= 0."""
    for (_, node), pair in alphas.items():
        for a in pair:
            if a is not None:
                graph.nodes[node].op.project_slopes(a)
    for b in multipliers:
        b.clamp_(min=0)


def _optimise_until_proven(graph, box, C, config, initial, splits, alphas, proven_above, record, deadline) -> Tensor:
    """``_optimise`` for lower bounds under fixed intermediate bounds, where a sample leaves the
    batch once proven (see ``alpha_crown``). The slopes in ``alphas`` and the multipliers in
    ``splits.betas`` are updated in place with every sample's final values. Returns the best
    lower bounds (N, S)."""
    N, S = C.shape[:2]
    threshold = proven_above.expand(N, S)
    betas = splits.betas if splits is not None else {}
    signs = splits.signs if splits is not None else {}
    points = splits.points if splits is not None else {}
    lines = relu_lines(graph, initial)
    best_lb = C.new_full((N, S), -float("inf"))
    active = torch.arange(N, device=C.device)
    work = _ActiveBatch(active, box, C, initial, lines, signs, alphas, betas, config, points=points)
    for step in range(config.iterations + 1):
        final = step == config.iterations or (deadline is not None and time.monotonic() > deadline)
        lb, _ = output_bounds(graph, work.box, work.C, work.bounds, False, work.alphas, work.splits, lines=work.lines,
                              record=work.record if final and record is not None else None)
        with torch.no_grad():
            best = torch.maximum(best_lb[active], lb.detach())
            best_lb[active] = best
            proven = (best > threshold[active]).any(1)
        if final or bool(proven.all()):
            break
        work.optimizer.zero_grad()
        (-lb.sum()).backward()
        work.optimizer.step()
        _project(graph, work.alphas, list(work.splits.betas.values()))
        if int(proven.sum()) * 4 >= len(active):   # shrink once a quarter is proven: copies cost too
            work.write_back(alphas, betas)
            keep = (~proven).nonzero().squeeze(1)
            active = active[keep]
            work = work.subset(keep, active, box, C, initial, lines, signs, alphas, betas, points)
    work.write_back(alphas, betas)
    if record is not None:
        for key, value in work.record.items():
            full = value.new_zeros(N, *value.shape[1:])
            full[active] = value
            record[key] = full
    return best_lb


class _ActiveBatch:
    """The not-yet-proven samples ``active`` of ``_optimise_until_proven``: their slices of the
    box, objectives, bounds, relaxations and split signs, their own slopes and multipliers
    (leaf tensors) and the Adam optimiser over them (``optimizer``: continue that one's state,
    restricted to rows ``rows`` of its tensors)."""

    def __init__(self, active, box, C, initial, lines, signs, alphas, betas, config,
                 optimizer: Optional[Adam] = None, rows: Optional[Tensor] = None, points: Optional[dict] = None):
        take = (lambda t: t) if optimizer is None and len(active) == C.shape[0] else (lambda t: t[active])
        self.active = active
        self.box = Bounds(take(box.lower), take(box.upper))
        self.C = take(C)
        self.bounds = [None if b is None else Bounds(take(b.lower), take(b.upper)) for b in initial]
        self.lines = {r: tuple(take(t) for t in four) for r, four in lines.items()}
        self.alphas = {key: (take(pair[0].detach()).clone().requires_grad_(True), None) for key, pair in alphas.items()}
        live = {z: take(b.detach()).clone().requires_grad_(True) for z, b in betas.items()}
        self.splits = SplitState({z: take(s) for z, s in signs.items()}, live, {z: take(p) for z, p in (points or {}).items()})
        self.record: dict[int, Tensor] = {}
        groups = [([pair[0] for pair in self.alphas.values()], config.lr),
                  (list(live.values()), config.multiplier_lr)]
        self.optimizer = Adam(groups, config.lr_decay) if optimizer is None else \
            optimizer.restricted([p for tensors, _ in groups for p in tensors], rows)
        self.config = config

    def write_back(self, alphas, betas) -> None:
        """Copy the working slopes and multipliers into the full-batch tensors."""
        with torch.no_grad():
            for key, pair in self.alphas.items():
                alphas[key][0][self.active] = pair[0].detach()
            for z, b in self.splits.betas.items():
                betas[z][self.active] = b.detach()

    def subset(self, keep, active, box, C, initial, lines, signs, alphas, betas, points=None) -> "_ActiveBatch":
        """The batch of samples ``active`` = rows ``keep`` of this one, with their Adam state."""
        return _ActiveBatch(active, box, C, initial, lines, signs, alphas, betas, self.config,
                            optimizer=self.optimizer, rows=keep, points=points)
