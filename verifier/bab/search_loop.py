"""The best-first loop shared by the activation-split searches (``relu_split.ReluSplitSearch``:
ReLUs at 0, BaBSR / FSB scores; ``general_split.GeneralSplitSearch``: split points on any
non-linearity, the gap-times-|A| score).

A search supplies how one batch of parents becomes its bounded children (``step``) and how
bounded domains enter the store, leaves settled on the way (``admit``); the loop owns the rest,
once for both: pick the batch of open domains with the lowest bounds, the deadline and the
domain budget, the attacks between steps, an allocation failure (the parents go back to the
store, the batch halves and never grows back to the size that failed), the batch size kept to
``max_step_seconds`` per step, and the progress log. A fix to any of these lands in both searches.
"""
from __future__ import annotations

import time
from typing import Optional, Protocol

import torch

from ..runtime import is_out_of_memory
from .domains import DomainStore, StoreFull


class SplitSearch(Protocol):
    """What ``best_first`` needs of a search (``ReluSplitSearch``, ``GeneralSplitSearch``).

    ``reason``: None while every domain the search dropped was proven; a sentence saying why
    the search cannot decide otherwise (set by ``admit`` for a leaf it could not settle, and by
    the loop for a budget it ran out of). ``kind``: the name the progress log uses."""

    config: object
    attacks: object
    records: object
    reason: Optional[str]
    kind: str

    def log(self, message: str) -> None: ...

    def step(self, parents): ...

    def admit(self, store: DomainStore, domains) -> Optional[tuple]: ...


def best_first(search: SplitSearch, root, deadline: float, batch: int) -> tuple[str, Optional[tuple]]:
    """Branch and bound from the bounded ``root`` domains until ``deadline``: ("unsat" | "sat" |
    "unknown" | "timeout", counterexample or None). ``batch``: parents per step at most."""
    config = search.config
    store = DomainStore(root)
    found = search.admit(store, root)
    if found is not None:
        return "sat", found
    most = batch   # what the batch may grow back to
    last_log = time.monotonic()
    while True:
        if len(store) == 0:
            return ("unknown", None) if search.reason is not None else ("unsat", None)
        if time.monotonic() > deadline:
            return "timeout", None
        if len(store) > config.max_domains:
            search.reason = f"{len(store)} open domains, more than bab.max_domains ({config.max_domains})"
            return "unknown", None
        found = search.attacks.maybe_run() if search.attacks is not None else None
        if found is not None:
            return "sat", found
        parents = store.pop(batch)
        started = time.monotonic()
        try:
            result = search.step(parents)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or batch == 1:
                raise
            # the parents go back to the store: no domain is lost; the batch that did not fit
            # is not tried again
            batch = most = max(1, batch // 2)
            search.log(f"out of memory: batch shrinks to {batch}")
            store.push(parents)
            continue
        took = time.monotonic() - started
        if isinstance(result, tuple):
            return result
        try:
            found = search.admit(store, result)
        except StoreFull as exc:
            search.reason = f"memory budget reached ({exc})"
            search.log(search.reason)
            return "unknown", None
        if found is not None:
            return "sat", found
        if took > config.max_step_seconds and batch > 1:
            # a step is the unit the deadline is checked in: keep it short
            batch = max(1, batch // 2)
            search.log(f"a step took {took:.1f} s: batch shrinks to {batch}")
        elif took < config.max_step_seconds / 4 and batch < most:
            # and grows back when steps are short again (a busy machine, deeper domains)
            batch = min(most, 2 * batch)
        if time.monotonic() - last_log > 5:
            last_log = time.monotonic()
            search.log(f"{search.kind} split: {search.records.count} domains bounded, {len(store)} open, "
                       f"worst bound {store.lowest() if len(store) else 0:.4g}")
