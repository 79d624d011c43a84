"""Branch and bound on the input box, for networks with few inputs (ACAS Xu has 5).

Each step bounds a batch of boxes with CROWN in one call, then the boxes CROWN leaves open with a
few steps of alpha-CROWN (on ACAS Xu 4_2 prop_2 this needs 10 533 boxes instead of 261 215, and
3_3 prop_2, a timeout at 116 s with CROWN alone, is proven in 6 s), drops the boxes on which every
disjunct is impossible, tries the most promising point of each remaining box concretely, and
halves the rest along the dimension with the largest estimated effect on the bound:
``sum_r |A_r,d| * width_d^2`` over the rows r still unproven, where A is the CROWN lower-bound
coefficient of the input. The looseness of a linear relaxation over an interval grows with the
square of its width, so the sensitivity |A| is weighted by width squared (measured: ACAS Xu 1_4
prop_1 goes from a 30 s timeout with width to 1.5 s with width^2).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor

from ..bounds.alpha import AlphaConfig, alpha_crown
from ..bounds.crown import crown_bounds, output_bounds
from ..graph import BoundGraph
from ..ops import Bounds
from ..runtime import is_out_of_memory
from ..spec import RegionSpec
from .attacks import Checker, SearchAttacks
from .config import BabConfig
from .records import SubdomainRecords


def bound_boxes(graph: BoundGraph, spec: RegionSpec, lower: Tensor, upper: Tensor,
                reference: Optional[list[Optional[Bounds]]] = None, alpha_iterations: int = 0,
                alpha_lr: float = 0.5):
    """Lower bounds of the margins on each box: lower, upper (M, *in) -> (M, R) margins, the
    input coefficients (M, R, *in) of the lower bounds, and the intermediate bounds (per node,
    (M, *shape) or None). ``reference``: bounds of each box's parent, valid on the box (a subset),
    so the box starts from them: neurons stable in the parent get no CROWN pass.

    CROWN first; the boxes it leaves unproven then get ``alpha_iterations`` steps of alpha-CROWN
    on the output's slopes (intermediate bounds kept), each margin the better of the two."""
    box = Bounds(lower, upper)
    M = lower.shape[0]
    C = spec.C.unsqueeze(0).expand(M, *spec.C.shape)
    record: dict[int, Tensor] = {}
    with torch.no_grad():
        bounds = crown_bounds(graph, box, reference=reference)
        lb, _ = output_bounds(graph, box, C, bounds, need_upper=False, record=record)
    margins, A = lb - spec.rhs, record[0]
    open_ = (~spec.proven(margins)).nonzero().squeeze(1)
    if alpha_iterations and len(open_) and graph.relu_nodes():
        config = AlphaConfig(iterations=alpha_iterations, lr=alpha_lr, optimize_intermediate=False,
                             early_stop_patience=alpha_iterations)
        take = lambda t: t[open_]
        optimised, _, _, _ = alpha_crown(graph, Bounds(take(lower), take(upper)), take(C), config, need_upper=False,
                                         initial=[None if b is None else Bounds(take(b.lower), take(b.upper))
                                                  for b in bounds], proven_above=spec.rhs)
        margins = margins.index_copy(0, open_, torch.maximum(margins[open_], optimised.detach() - spec.rhs))
    return margins, A, bounds


def input_split_search(graph: BoundGraph, spec: RegionSpec, check: Checker, deadline: float, config: BabConfig,
                       records: SubdomainRecords, region: int = 0,
                       log: Callable[[str], None] = lambda s: None) -> tuple[str, Optional[tuple]]:
    """Returns ("unsat" | "sat" | "timeout" | "unknown", counterexample or None)."""
    lower, upper = spec.lower.unsqueeze(0), spec.upper.unsqueeze(0)
    device = lower.device           # the bookkeeping (ids, parents, ...) lives beside the boxes
    ids = records.new_ids(1, device)
    parents = torch.full((1,), -1, device=device)
    depth = torch.zeros(1, dtype=torch.long, device=device)
    dims = torch.full((1,), -1, device=device)
    steps, last_log = 0, time.monotonic()
    start = last_log
    attacks = SearchAttacks(graph, spec, check, deadline, config.attack_restarts, config.attack_share,
                            config.attack_after, log=log)
    needed = graph.needs_bounds()
    kept: dict[int, Bounds] = {}   # needed node -> bounds of each open box's parent, (M, *shape)
    batch = config.input_batch      # halved for good by an out-of-memory error
    while lower.shape[0]:
        if time.monotonic() > deadline:
            return "timeout", None
        found = attacks.maybe_run()
        if found is not None:
            return "sat", found
        # depth first in batches: the newest boxes are taken first, which keeps the store small
        take = min(batch, lower.shape[0])
        lo, hi = lower[-take:], upper[-take:]
        reference = None
        if kept:
            reference = [None] * len(graph.nodes)
            for i, b in kept.items():
                reference[i] = Bounds(b.lower[-take:], b.upper[-take:])

        # alpha-CROWN only once the search proves long: on easy instances it costs more than it saves
        alpha_iterations = config.input_alpha_iterations if time.monotonic() - start > config.input_alpha_after else 0
        try:
            margins, A, bounds = bound_boxes(graph, spec, lo, hi, reference, alpha_iterations, config.input_alpha_lr)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or take == 1:
                raise
            batch = max(1, take // 2)   # the boxes are still in the store: none is lost
            log(f"out of memory: input batch shrinks to {batch}")
            continue
        # bounded: the boxes leave the store
        b_ids, b_par, b_depth, b_dim = ids[-take:], parents[-take:], depth[-take:], dims[-take:]
        lower, upper = lower[:-take], upper[:-take]
        ids, parents, depth, dims = ids[:-take], parents[:-take], depth[:-take], dims[:-take]
        kept = {i: Bounds(b.lower[:-take], b.upper[:-take]) for i, b in kept.items()}
        proven = spec.proven(margins)
        worst = spec.worst(margins)
        records.add(b_ids, b_par, b_depth, worst, None, "input", split_index=b_dim, region=region)
        open_ = ~proven
        if not bool(open_.any()):
            continue
        lo, hi, margins, A = lo[open_], hi[open_], margins[open_], A[open_]
        open_bounds = {i: Bounds(bounds[i].lower[open_], bounds[i].upper[open_]) for i in needed}
        b_ids, b_depth = b_ids[open_], b_depth[open_]
        # the point minimising the worst row's linear lower bound, and the box centre
        worst_row = margins.argmin(1)
        A_worst = A[torch.arange(A.shape[0], device=A.device), worst_row]
        corner = torch.where(A_worst > 0, lo, hi)
        found = check(torch.cat([corner, (lo + hi) / 2]))
        if found is not None:
            return "sat", found
        width = hi - lo
        unproven_rows = (margins <= 0).to(A.dtype).unsqueeze(-1)
        flat_A = A.flatten(2)
        score = ((flat_A.abs() * unproven_rows).sum(1) + 1e-12) * width.flatten(1) ** 2
        dim = score.argmax(1)
        if bool((width.flatten(1).gather(1, dim.unsqueeze(1)) < config.min_box_width).any()):
            return "unknown", None
        mid = (lo.flatten(1).gather(1, dim.unsqueeze(1)) + hi.flatten(1).gather(1, dim.unsqueeze(1))) / 2
        left_hi, right_lo = hi.flatten(1).clone(), lo.flatten(1).clone()
        left_hi.scatter_(1, dim.unsqueeze(1), mid)
        right_lo.scatter_(1, dim.unsqueeze(1), mid)
        lower = torch.cat([lower, lo, right_lo.view_as(lo)])
        upper = torch.cat([upper, left_hi.view_as(hi), hi])
        for i, b in open_bounds.items():   # both halves start from their parent's bounds
            old = kept.get(i)
            parts_l = [b.lower, b.lower] if old is None else [old.lower, b.lower, b.lower]
            parts_u = [b.upper, b.upper] if old is None else [old.upper, b.upper, b.upper]
            kept[i] = Bounds(torch.cat(parts_l), torch.cat(parts_u))
        n = lo.shape[0]
        ids = torch.cat([ids, records.new_ids(2 * n, device)])
        parents = torch.cat([parents, b_ids, b_ids])
        depth = torch.cat([depth, b_depth + 1, b_depth + 1])
        dims = torch.cat([dims, dim, dim])
        if lower.shape[0] > config.max_domains:
            return "unknown", None
        steps += 1
        if time.monotonic() - last_log > 5:
            last_log = time.monotonic()
            log(f"input split: {records.count} boxes bounded, {lower.shape[0]} open")
    return "unsat", None
