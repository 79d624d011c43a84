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
from ..ops import Bounds, ReLU
from .crown import Alphas, SplitState, crown_bounds, intersect, output_bounds, relu_lines, unstable_rows


@dataclass(frozen=True)
class AlphaConfig:
    iterations: int = 20
    lr: float = 0.1
    lr_decay: float = 0.98
    optimize_intermediate: bool = True  # also optimise slopes used for intermediate bounds
    early_stop_patience: int = 5        # stop when the objective has not improved for this many steps
    beta_lr: Optional[float] = None     # Adam step of beta-CROWN's split multipliers (None: ``lr``)


def _relus_before(graph: BoundGraph, start: int) -> list[int]:
    anc = set(graph.ancestors(start))
    return [r for r in graph.relu_nodes() if r in anc and r != start]


def init_alphas(graph: BoundGraph, starts: dict[int, int], bounds: list[Optional[Bounds]], need_upper: dict[int, bool],
                warm: Optional[Alphas] = None) -> Alphas:
    """One slope tensor (N, S_start, *relu_shape) per (start, relu) pair, initialised at CROWN's
    choice (or from ``warm`` where shapes match)."""
    alphas: Alphas = {}
    for start, S in starts.items():
        for r in _relus_before(graph, start):
            _, _, lower_slope, _ = ReLU.relaxation(bounds[graph.nodes[r].inputs[0]])
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


def alpha_crown(graph: BoundGraph, box: Bounds, C: Tensor, config: AlphaConfig = AlphaConfig(),
                need_upper: bool = True, initial: Optional[list[Optional[Bounds]]] = None,
                splits: Optional[SplitState] = None, warm: Optional[Alphas] = None,
                extra_params: Optional[list[Tensor]] = None, record: Optional[dict[int, Tensor]] = None,
                deadline: Optional[float] = None):
    """Optimised bounds of ``C @ output`` over the box.

    C: (N, S, *output_shape). initial: CROWN bounds to start from (computed if None).
    extra_params: further tensors to optimise jointly (beta-CROWN's multipliers live in
    ``splits.betas``; they are projected to >= 0 here).
    Returns (lb, ub, bounds, alphas): lb, ub (N, S) best over iterations (ub None without
    need_upper), the tightest intermediate bounds seen, and the final slopes for warm starts.
    ``record`` receives the coefficients of the final pass (see ``backward_bound``).
    ``deadline`` (time.monotonic()) ends the optimisation early; every iterate is sound, so the
    best bounds so far are returned.
    """
    with torch.no_grad():
        if initial is None:
            initial = crown_bounds(graph, box, splits=splits)
    needed = graph.needs_bounds()
    rows = {i: unstable_rows(graph, i, initial[i]) for i in needed}
    starts = {graph.output: C.shape[1]}
    upper_wanted = {graph.output: need_upper}
    if config.optimize_intermediate:
        for i in needed:
            starts[i] = len(rows[i])
            upper_wanted[i] = True
    alphas = init_alphas(graph, starts, initial, upper_wanted, warm)
    betas = list(splits.betas.values()) if splits is not None else []
    params = [{"params": [a for pair in alphas.values() for a in pair if a is not None] + list(extra_params or [])},
              {"params": betas, "lr": config.lr if config.beta_lr is None else config.beta_lr}]
    params = [group for group in params if group["params"]]
    if not params:
        with torch.no_grad():
            lb, ub = output_bounds(graph, box, C, initial, need_upper, splits=splits, record=record)
        return lb, ub, initial, alphas
    with torch.enable_grad():   # the slopes are optimised by gradient even under a caller's no_grad
        return _optimise(graph, box, C, config, need_upper, initial, splits, alphas, params, betas, rows, record,
                         deadline)


def _optimise(graph, box, C, config, need_upper, initial, splits, alphas, params, betas, rows, record, deadline):
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, config.lr_decay)
    best_lb = best_ub = None
    best_bounds = list(initial)
    best_objective, stale = None, 0
    # fixed intermediate bounds: the ReLU relaxations are the same in every iteration
    lines = None if config.optimize_intermediate else relu_lines(graph, initial)
    for _ in range(config.iterations):
        if config.optimize_intermediate:
            bounds = crown_bounds(graph, box, alphas, splits, reference=best_bounds, rows=rows)
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
        scheduler.step()
        with torch.no_grad():
            for pair in alphas.values():
                for a in pair:
                    if a is not None:
                        a.clamp_(0, 1)
            for b in betas:
                b.clamp_(min=0)
    # evaluate the final iterate too: the last step may have improved it
    with torch.no_grad():
        bounds = crown_bounds(graph, box, alphas, splits, reference=best_bounds, rows=rows) \
            if config.optimize_intermediate else initial
        lb, ub = output_bounds(graph, box, C, bounds, need_upper, alphas, splits, record=record, lines=lines)
        best_lb = torch.maximum(best_lb, lb)
        if need_upper:
            best_ub = torch.minimum(best_ub, ub)
        if config.optimize_intermediate:
            best_bounds = [b if (b is None or r is None) else intersect(b, r) for b, r in zip(bounds, best_bounds)]
    return best_lb, best_ub, best_bounds, alphas
