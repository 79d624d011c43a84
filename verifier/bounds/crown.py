"""CROWN: backward linear bound propagation over the bound graph (Zhang et al., NeurIPS 2018).

``backward_bound`` pushes linear functions of one node's value back to the input and
concretises them over the input box. ``crown_bounds`` computes the pre-activation bounds of
every node a relaxation needs, in topological order, each by one backward pass that uses the
bounds found before it. Optional hooks let alpha-CROWN pass optimised slopes and beta-CROWN its
split multipliers; without them this is plain CROWN.
"""
from __future__ import annotations

import time

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ..graph import BoundGraph
from ..ops import Bounds
from ..ops.base import LinearBound, contract
from .budget import CrownBudget, bytes_per_row, row_chunks
from .floating import pass_slack, widen_ibp
from .ibp import ibp_bounds
from .perturbation import LpBall, ball_concretize, take_rows

# node -> its op's relaxation under the current bounds (``Op.lines``: for a ReLU, upper slope,
# upper intercept, default lower slope, unstable; each (N, *shape))
ReluLines = dict[int, object]

# (start node, optimisable node) -> the op's free parameters for the lA side and the uA side,
# each (N, S_start, *shape) or None (for a ReLU, lower-relaxation slopes).
Alphas = dict[tuple[int, int], tuple[Optional[Tensor], Optional[Tensor]]]


@dataclass
class SplitState:
    """Split decisions of a batch of subdomains, per split input node: the constraint
    ``s (z - p) >= 0`` on each neuron z, with
    ``signs[node]``: (N, *shape) s = +1 (z >= p enforced), -1 (z <= p) or 0 (free);
    ``points[node]``: (N, *shape) the split points p, absent for ReLU splits (p = 0);
    ``betas[node]``: (N, S, *shape) or (N, 1, *shape) non-negative multipliers, or absent."""

    signs: dict[int, Tensor] = field(default_factory=dict)
    betas: dict[int, Tensor] = field(default_factory=dict)
    points: dict[int, Tensor] = field(default_factory=dict)

    def apply(self, node: int, b: Bounds) -> Bounds:
        """Tighten bounds of a split node: z >= p lifts the lower bound to p, z <= p lowers the
        upper one."""
        s = self.signs.get(node)
        if s is None:
            return b
        p = self.points.get(node)
        if p is None:
            return Bounds(torch.where(s > 0, b.lower.clamp(min=0), b.lower),
                          torch.where(s < 0, b.upper.clamp(max=0), b.upper))
        return Bounds(torch.where(s > 0, torch.maximum(b.lower, p), b.lower),
                      torch.where(s < 0, torch.minimum(b.upper, p), b.upper))

    def take(self, rows: Tensor) -> "SplitState":
        """The split state of samples ``rows`` (a long index)."""
        return SplitState({z: t[rows] for z, t in self.signs.items()}, {z: t[rows] for z, t in self.betas.items()},
                          {z: t[rows] for z, t in self.points.items()})


@dataclass(frozen=True)
class IntermediateSlopes:
    """Lower-relaxation slopes of the backward passes that bound intermediate nodes, optimised
    once (alpha-CROWN on the root) and reused to re-bound its subdomains, whose unstable neurons
    are among the root's. ``alphas[(start, relu)]``: (lower side, upper side), each
    (1, S_start, *relu_shape), one row per neuron of node ``start`` that the root optimised;
    ``row_of[start]``: (numel_start,) long, each neuron's row (0 for a neuron not optimised:
    any slopes in [0, 1] give sound bounds, and a subdomain never asks for one)."""

    alphas: Alphas
    row_of: dict[int, Tensor]

    def for_rows(self, start: int, rows: Tensor) -> Mapping:
        """The slopes of the backward pass from ``start`` for its neurons ``rows``: (S,) shared
        by every sample, or (G, S) per sample; as ``Alphas`` for ``backward_bound``, gathered
        when the pass reaches each ReLU (one ReLU's slopes in memory at a time), each
        (1, S, *relu_shape) or (G, S, *relu_shape)."""
        row_of = self.row_of.get(start)
        return {} if row_of is None else _GatheredSlopes(self.alphas, start, row_of[rows])


class _GatheredSlopes(Mapping):
    """``IntermediateSlopes.for_rows``: the (start, relu) slopes at rows ``index`` of the root's."""

    def __init__(self, alphas: Alphas, start: int, index: Tensor):
        self.keys_ = [key for key in alphas if key[0] == start]
        self.alphas, self.index = alphas, index

    def __getitem__(self, key):
        if key not in self.keys_:
            raise KeyError(key)
        return tuple(None if a is None else (a[0][self.index] if self.index.dim() == 2 else a[:, self.index])
                     for a in self.alphas[key])

    def __contains__(self, key) -> bool:   # without gathering
        return key in self.keys_

    def __iter__(self) -> Iterator:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def concretize(lA: Optional[Tensor], uA: Optional[Tensor], lbias, ubias, box: Bounds | LpBall):
    """Bounds of ``A x + bias`` over the box (or the ``LpBall``). lA, uA: (N, S, *in_shape) ->
    lb, ub: (N, S)."""
    center = ((box.upper + box.lower) / 2).flatten(1)   # (N, d)
    radius = ((box.upper - box.lower) / 2).flatten(1)
    lb = None if lA is None else _linear_over_box(lA.flatten(2), center, radius, -1.0) + lbias
    ub = None if uA is None else _linear_over_box(uA.flatten(2), center, radius, 1.0) + ubias
    if isinstance(box, LpBall):   # the input set is the ball within the box: the better of both
        lb = None if lA is None else torch.maximum(lb, ball_concretize(lA, box, -1.0) + lbias)
        ub = None if uA is None else torch.minimum(ub, ball_concretize(uA, box, 1.0) + ubias)
    return lb, ub


def _linear_over_box(A: Tensor, center: Tensor, radius: Tensor, sign: float) -> Tensor:
    """``A c + sign |A| r`` per sample: A (N, S, d), center, radius (N, d) -> (N, S). A matrix
    shared by every sample (an expanded view, stride 0) is used once, not materialised N times."""
    if A.shape[0] > 1 and A.stride(0) == 0:
        A0 = A[0]
        return center @ A0.t() + sign * (radius @ A0.abs().t())
    # sums of products rather than bmm: a batched matrix-vector product is 2-4x slower on CPU
    return (A * center.unsqueeze(1)).sum(-1) + sign * A.abs().mul_(radius.unsqueeze(1)).sum(-1)


def _start_A(graph: BoundGraph, start: int, rows: Tensor, N: int, dtype, device):
    """Identity rows of node ``start``, rows (S,) shared or (N, S) per sample: (N, S, *shape)
    one-hot coefficients."""
    shape = graph.nodes[start].shape
    numel = graph.nodes[start].numel
    if rows.dim() == 2:
        eye = torch.zeros(*rows.shape, numel, dtype=dtype, device=device)
        return eye.scatter_(2, rows.unsqueeze(-1), 1.0).reshape(*rows.shape, *shape)
    eye = torch.zeros(len(rows), numel, dtype=dtype, device=device)
    eye[torch.arange(len(rows), device=device), rows] = 1
    return eye.reshape(1, len(rows), *shape).expand(N, len(rows), *shape)


def _start_bound(graph: BoundGraph, start: int, rows: Tensor, N: int, box: Bounds) -> tuple[int, LinearBound]:
    """The identity rows of node ``start`` as a linear bound: on the node itself (one-hot), or
    on its input where its op offers ``identity_rows`` (then that node is returned)."""
    node = graph.nodes[start]
    if len(node.inputs) == 1:
        direct = node.op.identity_rows(rows, N, graph.nodes[node.inputs[0]].shape)
        if direct is not None:
            A, bias = direct
            return node.inputs[0], LinearBound(A, A, bias, bias)
    A = _start_A(graph, start, rows, N, box.lower.dtype, box.lower.device)
    return start, LinearBound(A, A)


def backward_bound(graph: BoundGraph, start: int, lA: Optional[Tensor], uA: Optional[Tensor],
                   bounds: list[Optional[Bounds]], box: Bounds, alphas: Optional[Alphas] = None,
                   splits: Optional[SplitState] = None, start_rows: Optional[Tensor] = None,
                   record: Optional[dict[int, Tensor]] = None, lines: Optional[ReluLines] = None):
    """Bound linear functions of node ``start``'s value over the input box.

    lA, uA: (N, S, *shape_start) objectives for the lower / upper bound (either may be None);
    or, with ``start_rows`` long, the identity rows of the node (lA, uA then ignored): (S,) rows
    shared by every sample, or (N, S) rows of each sample.
    bounds: per node, Bounds (N, *shape) wherever a relaxation needs them.
    Returns lb, ub: (N, S) (None for a side not asked for). With ``record``, the lower-side
    coefficients reaching every branchable or splittable node's output (N, S, *shape) and the input (key 0)
    are stored there (branching heuristics read them). ``lines``: relaxations computed once from
    ``bounds`` (``relu_lines``) by a caller that bounds repeatedly with the same intermediate
    bounds. The pass names no op: each node's op propagates the bound (``Op.backward``) and
    offers its own shortcuts (``Op.identity_rows``, ``Op.bound_over_box``).
    """
    N = box.lower.shape[0]
    slack = pass_slack(graph, start, bounds, box, splits)   # float-soundness pass (issue 26)
    if start_rows is not None:
        first, bound = _start_bound(graph, start, start_rows, N, box)
    else:
        first, bound = start, LinearBound(lA, uA)
    want_l, want_u = bound.lA is not None, bound.uA is not None
    pending: dict[int, LinearBound] = {first: LinearBound(bound.lA, bound.uA)}
    total = LinearBound(None, None, bound.lbias, bound.ubias)   # constants collected on the way
    flat_input = len(graph.input_shape) == 1
    for i in reversed(graph.ancestors(first)):
        if i == 0:
            break
        at_i = pending.pop(i, None)
        if at_i is None or at_i.is_empty:
            continue
        lA_i, uA_i = at_i.lA, at_i.uA
        if splits is not None and i in splits.betas and i != start:
            # beta-CROWN: min f s.t. s z >= 0  >=  min f - beta s z  (beta >= 0), so the lower
            # objective gains -beta*s on z and the upper one +beta*s
            term = splits.betas[i] * splits.signs[i].unsqueeze(1)
            lA_i = None if lA_i is None else lA_i - term
            uA_i = None if uA_i is None else uA_i + term
            if i in splits.points:   # s (z - p) >= 0: the constant beta s p joins the biases
                point = splits.points[i].unsqueeze(1)
                constant = contract(term, point)
                # widened by a bound on the sum's rounding (n terms: n eps of the sum of |terms|)
                n = point[0].numel()
                rounding = 2 * n * torch.finfo(term.dtype).eps * contract(term.abs(), point.abs())
                total = total.shift(constant - rounding if lA_i is not None else 0.0,
                                    -constant + rounding if uA_i is not None else 0.0)
        node = graph.nodes[i]
        op = node.op
        if record is None and slack is None and flat_input and node.inputs == (0,) \
                and not isinstance(box, LpBall):
            direct = op.bound_over_box(lA_i, uA_i, box)
            if direct is not None:
                total = total.shift(0.0 if direct[0] is None else direct[0], 0.0 if direct[1] is None else direct[1])
                continue
        if record is not None and (op.branchable or op.splittable) and lA_i is not None:
            record[i] = lA_i
        kwargs = {}
        if alphas is not None and (start, i) in alphas:
            kwargs["alpha_l"], kwargs["alpha_u"] = alphas[(start, i)]
        if lines is not None and i in lines:
            kwargs["lines"] = lines[i]
        if slack is not None:   # float-soundness pass (issue 26)
            slack.step(i, lA_i, uA_i)
        result = op.backward(lA_i, uA_i, *(bounds[j] for j in node.inputs), **kwargs)
        total = total.shift(result.lbias, result.ubias)
        for j, (l_j, u_j) in zip(node.inputs, result.input_A):
            if l_j is not None or u_j is not None:
                contribution = LinearBound(l_j, u_j)
                pending[j] = contribution if j not in pending else pending[j] + contribution
    at_input = pending.get(0, LinearBound(None, None))
    lA0, uA0 = at_input.lA, at_input.uA
    if want_l and lA0 is None:  # no (further) dependence on the input
        lA0 = torch.zeros(N, 1, *graph.input_shape, dtype=box.lower.dtype, device=box.lower.device)
    if want_u and uA0 is None:
        uA0 = torch.zeros(N, 1, *graph.input_shape, dtype=box.lower.dtype, device=box.lower.device)
    if record is not None and lA0 is not None:
        record[0] = lA0
    lb, ub = (concretize if slack is None else slack.concretize)(lA0 if want_l else None, uA0 if want_u else None,
                                                                 total.lbias, total.ubias, box)
    if slack is not None:   # float-soundness pass (issue 26)
        lb, ub = slack.finish(lA0 if want_l else None, uA0 if want_u else None, lb, ub, start_rows)
    return lb, ub


def unstable_rows(graph: BoundGraph, node: int, b: Bounds) -> Tensor:
    """Flat indices of the node's neurons whose bounds a CROWN pass can still improve usefully:
    those loose in some batch element (``loose_mask``: for a ReLU input the unstable ones); all
    where a consumer cannot tell."""
    loose = loose_mask(graph, node, b)
    if loose is not None:
        return loose.flatten(1).any(0).nonzero().squeeze(1)
    return torch.arange(graph.nodes[node].numel, device=b.lower.device)


def loose_mask(graph: BoundGraph, node: int, b: Bounds) -> Optional[Tensor]:
    """(N, *shape) bool: the neurons of ``node`` where some consumer's relaxation is not exact
    under bounds b (``Op.loose``), or None where a consumer cannot tell (then all may be)."""
    masks = []
    for c in graph.consumers[node]:
        op = graph.nodes[c].op
        if not op.nonlinear:
            continue
        mask = op.loose(b) if len(graph.nodes[c].inputs) == 1 else None
        if mask is None:
            return None
        masks.append(mask)
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


# Rows (sample, neuron) of one group's backward pass in _crown_per_sample_rows.
_GROUP_ROWS = 1 << 16


def _crown_per_sample_rows(graph: BoundGraph, node: int, b: Bounds, bounds: list[Optional[Bounds]],
                           splits: Optional[SplitState] = None,
                           slopes: Optional[IntermediateSlopes] = None,
                           box: Optional[Bounds | LpBall] = None,
                           budget: CrownBudget = CrownBudget()) -> Optional[Bounds]:
    """CROWN on each sample's own unstable neurons of a ReLU input ``node`` rather than on every
    neuron unstable in some sample: a large batch of boxes (or of branch-and-bound subdomains)
    has nearly every neuron unstable in one of them, while each has fewer. Samples are sorted by
    their number of unstable neurons and bounded in groups of similar counts, each sample with
    its own rows (padded to the group's largest count; padding results are discarded), so a
    sample's bounds do not depend on the other samples of the batch.
    b: (N, *shape) current bounds; ``splits``: the samples' split decisions and multipliers
    (``SplitState``; betas (N, 1, *shape), shared by every row); ``slopes``: the lower slopes of
    each row (``IntermediateSlopes``; CROWN's own choice without). Returns the bounds tightened
    (before ``splits.apply``), or None when this would not save work over shared rows (then the
    caller bounds those)."""
    N = b.lower.shape[0]
    if N == 1:
        return None
    loose = loose_mask(graph, node, b)
    if loose is None:
        return None
    unstable = loose.flatten(1)                                          # (N, numel)
    counts = unstable.sum(1)
    if int(counts.sum()) >= 0.75 * N * int(unstable.any(0).sum()):
        return None
    # each sample's unstable neurons first, in index order
    rows_of = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)
    order = torch.argsort(counts, stable=True)
    order = order[counts[order] > 0].tolist()
    count_of = counts.tolist()
    # a row of one sample: the widest node's coefficients of that sample
    group_rows = min(_GROUP_ROWS, max(1, budget.memory_bytes // bytes_per_row(graph, node, 1, b.lower.element_size(),
                                                                              budget)))
    flat_l, flat_u = b.lower.flatten(1).clone(), b.upper.flatten(1).clone()
    ancestors = graph.ancestors(node)[:-1]
    k = 0
    while k < len(order):
        first_count = count_of[order[k]]
        end = k + 1
        while end < len(order) and count_of[order[end]] <= 1.25 * first_count + 4 \
                and (end - k + 1) * count_of[order[end]] <= group_rows:
            end += 1
        group = torch.tensor(order[k:end], device=b.lower.device)
        width = count_of[order[end - 1]]
        rows = rows_of[group, :width]                                        # (G, width)
        valid = torch.arange(width, device=rows.device) < counts[group].unsqueeze(1)
        gathered: list[Optional[Bounds]] = [None] * len(bounds)
        for j in ancestors:
            if bounds[j] is not None:
                gathered[j] = take_rows(bounds[j], group)
        group_splits = None if splits is None else splits.take(group)
        group_box = gathered[0] if box is None else take_rows(box, group)
        lb, ub = backward_bound(graph, node, None, None, gathered, group_box, splits=group_splits,
                                start_rows=rows, alphas=None if slopes is None else slopes.for_rows(node, rows))
        at = (group.unsqueeze(1), rows)
        flat_l[at] = torch.where(valid, torch.maximum(flat_l[at], lb), flat_l[at])
        flat_u[at] = torch.where(valid, torch.minimum(flat_u[at], ub), flat_u[at])
        k = end
    return Bounds(flat_l.reshape(b.lower.shape), flat_u.reshape(b.upper.shape))


def intersect(a: Bounds, b: Bounds) -> Bounds:
    return Bounds(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def crown_bounds(graph: BoundGraph, box: Bounds, alphas: Optional[Alphas] = None,
                 splits: Optional[SplitState] = None, reference: Optional[list[Optional[Bounds]]] = None,
                 rows: Optional[dict[int, Tensor]] = None, method: str = "crown",
                 recompute_from: int = 0, deadline: Optional[float] = None,
                 slopes: Optional[IntermediateSlopes] = None,
                 budget: CrownBudget = CrownBudget()) -> list[Optional[Bounds]]:
    """Bounds of every node that a relaxation needs (others: IBP), in topological order.

    Each needed node gets IBP from its (already tightened) inputs, intersected with ``reference``
    bounds where given (e.g. the parent subdomain's), tightened by the split decisions, then --
    with method "crown" -- by a backward pass on the rows that are still unstable (``rows``
    overrides that choice; alpha-CROWN keeps rows fixed while it optimises). Needed nodes before
    ``recompute_from`` keep their reference bounds without a backward pass (branch and bound:
    layers before the earliest new split cannot change). Past ``deadline`` (time.monotonic())
    no further backward pass runs: the bounds stay sound, only looser. ``slopes``: the lower
    slopes of those passes (``IntermediateSlopes``); ``alphas`` (alpha-CROWN's own, with
    ``rows``) take precedence; without either, CROWN's choice. ``budget``: the memory one
    backward pass may take; its rows are bounded in chunks that fit (``CrownBudget``).
    """
    needed = set(graph.needs_bounds())
    bounds: list[Optional[Bounds]] = [Bounds(box.lower, box.upper)]
    # each op's relaxation, formed once its inputs' bounds are final and reused by every later pass
    lines: ReluLines = {}
    for i, node in enumerate(graph.nodes[1:], start=1):
        _add_lines(graph, i - 1, bounds, lines)
        b = node.op.ibp(*(bounds[j] for j in node.inputs))
        b = widen_ibp(graph, i, b, bounds)   # float-soundness pass (issue 26)
        if i in needed:
            if reference is not None and reference[i] is not None:
                b = intersect(b, reference[i])
            if splits is not None:
                b = splits.apply(i, b)
            keep_reference = i < recompute_from and reference is not None and reference[i] is not None
            late = deadline is not None and time.monotonic() > deadline
            if method == "crown" and not keep_reference and not late:
                per_sample = None
                if rows is None and alphas is None:
                    per_sample = _crown_per_sample_rows(graph, i, b, bounds, splits, slopes, box, budget)
                if per_sample is not None:
                    b = per_sample if splits is None else splits.apply(i, per_sample)
                    bounds.append(b)
                    continue
                sel = rows[i] if rows is not None and i in rows else unstable_rows(graph, i, b)
                chunks = row_chunks(graph, i, sel, b.lower.shape[0], b.lower.element_size(), budget) if len(sel) else []
                if chunks:
                    parts = []
                    for part in chunks:
                        part_alphas = alphas if len(chunks) == 1 else _alpha_rows(alphas, i, part)
                        pass_alphas = part_alphas if alphas is not None or slopes is None \
                            else slopes.for_rows(i, sel[part])
                        parts.append(backward_bound(graph, i, None, None, bounds, box, pass_alphas, splits,
                                                    start_rows=sel[part], lines=lines))
                    lb, ub = (parts[0] if len(parts) == 1 else
                              (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)))
                    flat_l, flat_u = b.lower.flatten(1), b.upper.flatten(1)
                    flat_l = flat_l.index_copy(1, sel, torch.maximum(flat_l[:, sel], lb))
                    flat_u = flat_u.index_copy(1, sel, torch.minimum(flat_u[:, sel], ub))
                    b = Bounds(flat_l.reshape(b.lower.shape), flat_u.reshape(b.upper.shape))
                    if splits is not None:
                        b = splits.apply(i, b)
        bounds.append(b)
    return bounds


def _add_lines(graph: BoundGraph, last: int, bounds: list[Optional[Bounds]], lines: ReluLines) -> None:
    """Relaxations (``Op.lines``) of the nonlinear consumers of node ``last`` whose inputs are all
    bounded now (nodes <= last)."""
    for c in graph.consumers[last]:
        node = graph.nodes[c]
        if node.op.nonlinear and c not in lines and max(node.inputs) == last:
            found = node.op.lines(*(bounds[j] for j in node.inputs))
            if found is not None:
                lines[c] = found


def _alpha_rows(alphas: Optional[Alphas], start: int, part: slice) -> Optional[Alphas]:
    """The passes from ``start`` restricted to rows ``part`` of their slopes (N, S, *shape)."""
    if alphas is None:
        return None
    return {key: tuple(None if a is None else a[:, part] for a in pair) for key, pair in alphas.items()
            if key[0] == start}


def relu_lines(graph: BoundGraph, bounds: list[Optional[Bounds]]) -> ReluLines:
    """The relaxation of every op that offers one to reuse (``Op.lines``) under the given
    intermediate bounds."""
    out = {}
    for i, node in enumerate(graph.nodes[1:], start=1):
        if node.op.nonlinear:
            lines = node.op.lines(*(bounds[j] for j in node.inputs))
            if lines is not None:
                out[i] = lines
    return out


def output_bounds(graph: BoundGraph, box: Bounds, C: Tensor, bounds: list[Optional[Bounds]],
                  need_upper: bool = True, alphas: Optional[Alphas] = None, splits: Optional[SplitState] = None,
                  record: Optional[dict[int, Tensor]] = None, lines: Optional[ReluLines] = None):
    """Bounds of ``C @ output``: C (N, S, *output_shape) -> lb, ub (N, S) (ub None without need_upper).
    ``lines``: see ``backward_bound``."""
    return backward_bound(graph, graph.output, C, C if need_upper else None, bounds, box, alphas, splits,
                          record=record, lines=lines)
