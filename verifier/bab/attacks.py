"""Falsification during branch and bound: PGD attacks interleaved with the search.

The attack before the search (``verify``) starts from the box centre and random points. During a
search two things change: the search knows where the network comes close to a violation (the
minimiser of each open domain's linear lower bound, evaluated concretely), and time has shown the
instance to be hard, so wider attacks are worth their cost. ``SearchAttacks`` runs PGD at most a
share of the search's time so far, each attack 4x wider than the last if it finished within its
budget, started from the most promising points the search has offered since the last attack.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor

from ..attack import AttackConfig, pgd_search
from ..graph import BoundGraph
from ..runtime import available_memory
from ..spec import RegionSpec

# check(points (M, *in)) -> a confirmed counterexample (x32, y), or None
Checker = Callable[[Tensor], Optional[tuple]]


class SearchAttacks:
    """PGD with many restarts over the whole box, interleaved with a search.

    Input splitting (few inputs): thousands of restarts cost about as much as one batch of boxes,
    and they find counterexamples that hide in regions too small for the first attack (ACAS Xu
    1_9 prop_7: none in 5000 restarts, found with 50000 in about a second). ReLU splitting: the
    restarts begin at the points offered (``offer``), the minimisers of the open domains' linear
    lower bounds with the lowest concrete margins.

    An attack starts only when at most ``share`` of the time so far went to attacks (the first
    after ``after`` seconds: most instances are decided before) and may run for at most ``share``
    of the time so far, so a wider one cannot take the budget of an instance that needs the
    search (before this limit, ACAS Xu 3_3 prop_2 spent 10.6 s of a 40 s run in attacks against
    a share of 10 %); one stopped by that limit is not widened. Nor is one whose next width would
    need more than ``memory_share`` of the memory available (every restart keeps each node's
    values for the backward pass: a 65 536-restart attack on a CIFAR network needs gigabytes)."""

    def __init__(self, graph: BoundGraph, spec: RegionSpec, check: Checker, deadline: float, restarts: int,
                 share: float, after: float, keep: int = 0, log: Callable[[str], None] = lambda s: None,
                 memory_share: float = 0.25):
        """``keep``: how many offered points the next attack starts from (0: none are kept)."""
        self.graph, self.spec, self.check, self.deadline, self.log = graph, spec, check, deadline, log
        self.restarts, self.share, self.keep, self.memory_share = restarts, share, keep, memory_share
        self.start = time.monotonic()
        self.spent = share * after          # as if spent: the first attack waits
        self.seed = 1
        self.points: Optional[Tensor] = None   # (S, *in), the most promising offered so far
        self.margins: Optional[Tensor] = None  # (S,) their worst-disjunct margins, ascending

    def offer(self, points: Tensor) -> None:
        """Candidate starts (M, *in) inside the box; the ``keep`` with the lowest concrete
        worst-disjunct margins (with those kept so far) are kept."""
        if self.keep <= 0 or self.restarts <= 0 or not len(points):
            return
        with torch.no_grad():
            margins = self.spec.worst(self.spec.margins(self.graph.forward(points)))
        if self.points is not None:
            points, margins = torch.cat([self.points, points]), torch.cat([self.margins, margins])
        order = margins.argsort()[:self.keep]
        self.points, self.margins = points[order].detach(), margins[order]

    def fits(self, restarts: int) -> bool:
        """Whether an attack with ``restarts`` restarts per disjunct fits in ``memory_share`` of the
        available memory: per point, every node's values, saved inputs and gradients (an estimate)."""
        available = available_memory(self.spec.lower.device)
        if available is None:
            return True
        per_point = 3 * sum(node.numel for node in self.graph.nodes) * self.spec.lower.element_size()
        return restarts * self.spec.n_disjuncts * per_point <= self.memory_share * available

    def maybe_run(self) -> Optional[tuple]:
        """An attack if its turn has come: a confirmed counterexample, or None."""
        now = time.monotonic()
        budget = self.share * (now - self.start)
        if self.restarts <= 0 or self.spent > budget:
            return None
        attack = AttackConfig(restarts=self.restarts, steps=100, seed=self.seed)
        with torch.enable_grad():
            outcome = pgd_search(self.graph.forward, self.spec, attack, min(self.deadline, now + budget),
                                 starts=self.points)
        took = time.monotonic() - now
        lowest = float("nan") if outcome.best_margin is None else outcome.best_margin
        self.log(f"attack: {self.restarts} restarts, {0 if self.points is None else len(self.points)} from the "
                 f"search, {took:.2f} s, lowest margin {lowest:.4g}")
        self.spent += took
        if took < budget and self.fits(4 * self.restarts):
            self.restarts *= 4
        self.seed += 1
        self.points = self.margins = None   # the next attack starts from points offered after this one
        if outcome.point is None:
            return None
        return self.check(outcome.point.unsqueeze(0))
