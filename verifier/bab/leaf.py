"""Exact answers on the leaves of ReLU branch and bound.

A subdomain whose every ReLU is decided (split, or stable under its bounds) makes the network
affine on it: the margins and the split neurons' inputs are affine functions of the input, and
the violation region is a polytope. Its emptiness is a linear program. beta-CROWN's bound is
the Lagrangian of that program for one choice of multipliers, and a few steps of their
optimisation can leave it below the program's optimum; the search would then have nothing left
to split and answer ``unknown`` on a property that holds. Here the program is solved (HiGHS,
through scipy), and its optimal dual multipliers are handed back to our own bound: the verdict
``unsat`` comes from ``output_bounds`` with those multipliers, sound for any multipliers >= 0,
never from the solver's arithmetic. A primal optimum that violates the property is a candidate
counterexample, confirmed by a concrete run like any other.

The program, over the input box, with one margin row per r and one split per neuron j
(sign s_j, input z_j(x)):  min t  s.t.  margin_r(x) <= t,  s_j z_j(x) >= 0.
Its optimum t* is the least worst-row margin on the leaf; t* > 0 proves the leaf. Its dual gives
lam >= 0 summing to 1 and mu >= 0 with  lam . margin(x) - mu . s z(x) >= t*  on the whole box:
beta-CROWN's bound for the objective lam . C (rhs lam . rhs) with multipliers mu. A leaf whose
splits no input satisfies makes the program infeasible; then  min t  s.t.  -s_j z_j(x) <= t
has t* > 0 and its multipliers prove the leaf empty (objective 0).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..bounds.crown import SplitState, backward_bound, output_bounds
from ..graph import BoundGraph
from ..ops import Bounds
from ..spec import RegionSpec


def _affine(graph: BoundGraph, start: int, C: Optional[Tensor], rows: Optional[Tensor],
            bounds: list[Optional[Bounds]], box: Bounds) -> tuple[np.ndarray, np.ndarray]:
    """(A (S, d), b (S,)) with value = A x + b on the leaf, for the objective rows C (1, S, *out)
    of the output, or the neurons ``rows`` of node ``start``. Exact because every ReLU is stable
    under ``bounds``: CROWN's lower and upper lines coincide."""
    record: dict[int, Tensor] = {}
    with torch.no_grad():
        lb, _ = backward_bound(graph, start, C, None, bounds, box, start_rows=rows, record=record)
    A = record[0].flatten(2)[0].double()                                   # (S, d)
    centre = ((box.lower + box.upper) / 2).flatten(1)[0].double()
    radius = ((box.upper - box.lower) / 2).flatten(1)[0].double()
    b = lb[0].double() - (A @ centre - A.abs() @ radius)
    return A.cpu().numpy(), b.cpu().numpy()


def settle_leaf(graph: BoundGraph, spec: RegionSpec, signs: dict[int, Tensor], bounds: list[Optional[Bounds]],
                check: Callable[[Tensor], Optional[tuple]]) -> tuple[str, Optional[tuple], float]:
    """Decide one leaf subdomain of a single disjunct: signs per ReLU input node (1, *shape),
    bounds per node (1, *shape) with every ReLU stable. Returns ("unsat" | "sat" | "unknown",
    counterexample or None, the leaf's certified lower bound)."""
    from scipy.optimize import linprog   # scipy's import costs ~0.3 s; leaves are rare

    box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
    R = spec.C.shape[0]
    A_m, b_m = _affine(graph, graph.output, spec.C.unsqueeze(0), None, bounds, box)
    b_m = b_m - spec.rhs.double().cpu().numpy()
    split_parts = []                                      # (node, flat indices, rows of G, entries of h)
    for z, s in signs.items():
        flat = s.flatten()
        idx = flat.nonzero().squeeze(1)
        if len(idx):
            A_z, b_z = _affine(graph, z, None, idx, bounds, box)
            sign = flat[idx].double().cpu().numpy()
            split_parts.append((z, idx, -sign[:, None] * A_z, -sign * b_z))
    G = np.vstack([A_m] + [p[2] for p in split_parts])                   # rows: value(x) <= t
    h = np.concatenate([b_m] + [p[3] for p in split_parts])
    d = G.shape[1]
    lower = spec.lower.flatten().double().cpu().numpy()
    upper = spec.upper.flatten().double().cpu().numpy()
    cost = np.zeros(d + 1)
    cost[-1] = 1.0
    box_and_t = list(zip(lower, upper)) + [(None, None)]
    with_t = np.zeros((len(h), 1))
    with_t[:R] = -1.0                                     # margin rows: value - t <= 0; splits: value <= 0
    result = linprog(cost, A_ub=np.hstack([G, with_t]), b_ub=-h, bounds=box_and_t, method="highs")
    empty = result.status == 2
    if empty and len(h) > R:                              # no input satisfies the splits: prove it
        result = linprog(cost, A_ub=np.hstack([G[R:], -np.ones((len(h) - R, 1))]), b_ub=-h[R:],
                         bounds=box_and_t, method="highs")
    if result.status != 0:
        return "unknown", None, -float("inf")
    # the certificate: the dual multipliers (>= 0) in our own sound bound
    y = np.clip(-result.ineqlin.marginals, 0, None)
    if empty:
        y = np.concatenate([np.zeros(R), y])
    lam, dtype, device = y[:R], spec.C.dtype, spec.C.device
    objective = torch.as_tensor(lam, dtype=dtype, device=device) @ spec.C               # (n_out,)
    betas, offset = {z: torch.zeros(1, 1, *s.shape[1:], dtype=dtype, device=device) for z, s in signs.items()}, R
    for z, idx, _, _ in split_parts:                      # G's split rows, in this order
        betas[z].view(-1)[idx] = torch.as_tensor(y[offset:offset + len(idx)], dtype=dtype, device=device)
        offset += len(idx)
    with torch.no_grad():
        lb, _ = output_bounds(graph, box, objective.view(1, 1, *spec.C.shape[1:]), bounds, need_upper=False,
                              splits=SplitState(signs, betas))
    certified = float(lb[0, 0]) - float(torch.as_tensor(lam, dtype=dtype, device=device) @ spec.rhs)
    if certified > 0:
        return "unsat", None, float("inf") if empty else certified
    if empty:
        return "unknown", None, -float("inf")
    x = torch.as_tensor(result.x[:d], dtype=dtype, device=device).view(1, *spec.lower.shape)
    found = check(torch.clamp(x, spec.lower, spec.upper))
    return ("sat", found, certified) if found is not None else ("unknown", None, certified)
