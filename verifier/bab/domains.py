"""Subdomains of ReLU branch and bound as rows of tensors, and the store of open ones.

A step of the search takes the few hundred worst domains out of a store that can hold hundreds
of thousands. The store therefore keeps its rows in preallocated buffers (capacity doubled when
full) and moves only the rows it takes or receives: a step costs the batch, not the store.
Rebuilding the store by concatenation each step instead copied every open domain (tens of KB
each on mnistfc 256x4) several times per step, and the search slowed from 1000 to 370 domains
a second as the store grew to 60 k (RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..ops import Bounds
from ..runtime import available_memory


class StoreFull(Exception):
    """The store would need more memory than the device has left (the search's memory budget)."""


@dataclass
class Domains:
    """A batch of M subdomains of one region and one disjunct (R rows)."""

    signs: dict[int, Tensor]            # z node -> (M, *shape) in {-1, 0, +1}
    bounds: list[Optional[Bounds]]      # per node, (M, *shape) where a relaxation needs them, else None
    alphas: dict[int, Tensor]           # relu node -> (M, R, *shape) lower slopes, output objective
    betas: dict[int, Tensor]            # z node -> (M, 1, *shape) >= 0
    lower: Tensor                       # (M,) best margin lower bound (proven when > 0)
    decision: Tensor                    # (M,) flat neuron index over all ReLU layers, -1 if none
    depth: Tensor                       # (M,)
    ids: Tensor                         # (M,)

    def __len__(self) -> int:
        return self.lower.shape[0]

    def tensors(self) -> list[Tensor]:
        """Every per-domain tensor, in the order ``with_tensors`` reads them back."""
        out = [self.signs[k] for k in sorted(self.signs)]
        for b in self.bounds:
            if b is not None:
                out += [b.lower, b.upper]
        out += [self.alphas[k] for k in sorted(self.alphas)] + [self.betas[k] for k in sorted(self.betas)]
        return out + [self.lower, self.decision, self.depth, self.ids]

    def with_tensors(self, tensors: list[Tensor]) -> "Domains":
        """Domains of the same layout as this one, made of ``tensors`` (as from ``tensors()``)."""
        it = iter(tensors)
        signs = {k: next(it) for k in sorted(self.signs)}
        bounds = [None if b is None else Bounds(next(it), next(it)) for b in self.bounds]
        alphas = {k: next(it) for k in sorted(self.alphas)}
        betas = {k: next(it) for k in sorted(self.betas)}
        return Domains(signs, bounds, alphas, betas, next(it), next(it), next(it), next(it))

    def take(self, index: Tensor) -> "Domains":
        return self.with_tensors([t[index] for t in self.tensors()])


class DomainStore:
    """The open domains of one search: rows of preallocated buffers keyed by their bounds (never
    NaN, below +inf), a free row's key +inf.

    ``push`` writes rows into free slots, ``pop(k)`` removes the k domains with the lowest bounds.
    Every domain pushed must have the layout (keys, shapes) of the first. Growing copies the
    buffers into ones twice as large, or as large as fits in ``memory_share`` of the device's
    available memory; where even the rows needed do not fit, ``push`` raises ``StoreFull``. The
    new buffers are counted whole: the copy holds the old and the new ones at once, and the
    search's steps need memory beside the store."""

    def __init__(self, like: Domains, capacity: int = 1024, memory_share: float = 0.5):
        self.like, self.memory_share = like, memory_share
        self.buffers = [t.new_empty((capacity, *t.shape[1:])) for t in like.tensors()]
        self.keys = torch.full((capacity,), float("inf"), dtype=like.lower.dtype, device=like.lower.device)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        old = self.capacity
        row_bytes = sum(b[:1].numel() * b.element_size() for b in self.buffers) + self.keys.element_size()
        available = available_memory(self.keys.device)
        if available is not None:
            fits = int(self.memory_share * available) // row_bytes
            if fits < needed:
                raise StoreFull(f"{needed} domains of {row_bytes} bytes: {available >> 20} MiB available")
            capacity = min(capacity, fits)
        self.buffers = [torch.cat([b, b.new_empty((capacity - old, *b.shape[1:]))]) for b in self.buffers]
        self.keys = torch.cat([self.keys, self.keys.new_full((capacity - old,), float("inf"))])

    def push(self, domains: Domains) -> None:
        n = len(domains)
        if n == 0:
            return
        if self.count + n > self.capacity:
            self._grow(self.count + n)
        slots = torch.isposinf(self.keys).nonzero().squeeze(1)[:n]
        for buffer, t in zip(self.buffers, domains.tensors()):
            buffer[slots] = t
        self.keys[slots] = domains.lower
        self.count += n

    def pop(self, k: int) -> Domains:
        """The min(k, len) open domains with the lowest bounds, removed from the store."""
        k = min(k, self.count)
        slots = torch.topk(self.keys, k, largest=False).indices
        taken = self.like.with_tensors([b[slots] for b in self.buffers])
        self.keys[slots] = float("inf")
        self.count -= k
        return taken

    def lowest(self) -> float:
        """The lowest bound among the open domains (+inf when empty)."""
        return float(self.keys.min()) if self.count else float("inf")
