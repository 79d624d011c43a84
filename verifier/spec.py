"""A VNN-LIB property as tensors: per input region, a box and the stacked rows of all its
output disjuncts, so one bound call covers the whole region."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .io.vnnlib import Property


@dataclass(frozen=True)
class RegionSpec:
    """Violation on this box: for some disjunct k, every row r with ``disjunct[r] == k`` has
    ``C[r] @ y <= rhs[r]``. Margins ``C y - rhs > 0`` on some row of every disjunct prove it.

    lower, upper: (*input_shape); C: (R, n_out); rhs: (R,); disjunct: (R,) long, K disjuncts.
    A disjunct with no rows is violated everywhere (``empty_disjunct``)."""

    lower: Tensor
    upper: Tensor
    C: Tensor
    rhs: Tensor
    disjunct: Tensor
    n_disjuncts: int
    empty_disjunct: bool

    def margins(self, y: Tensor) -> Tensor:
        """y: (N, n_out) -> (N, R) margins; a disjunct is violated where all its margins are <= 0."""
        return y.flatten(1) @ self.C.T - self.rhs

    def per_disjunct(self, margins: Tensor) -> Tensor:
        """margins (N, R) -> (N, K): the largest margin among each disjunct's rows. A disjunct is
        violated at a point where this is <= 0, and impossible where its lower bound is > 0."""
        N = margins.shape[0]
        best = margins.new_full((N, self.n_disjuncts), -float("inf"))
        return best.scatter_reduce(1, self.disjunct.expand(N, -1), margins, reduce="amax")

    def violated(self, margins: Tensor) -> Tensor:
        """margins (N, R) at concrete points -> (N, K) bool: all rows of disjunct k are <= 0."""
        return self.per_disjunct(margins) <= 0

    def proven(self, lower_margins: Tensor) -> Tensor:
        """lower_margins (N, R) -> (N,) bool: every disjunct has a row whose lower bound is > 0."""
        return (self.per_disjunct(lower_margins) > 0).all(1) & (not self.empty_disjunct)

    def worst(self, lower_margins: Tensor) -> Tensor:
        """(N, R) -> (N,): the lowest per-disjunct bound; the region is proven where it is > 0."""
        return self.per_disjunct(lower_margins).amin(1)

    def select(self, k: int) -> "RegionSpec":
        """The region restricted to disjunct k (one branch-and-bound runs per disjunct)."""
        rows = self.disjunct == k
        return RegionSpec(self.lower, self.upper, self.C[rows], self.rhs[rows],
                          torch.zeros(int(rows.sum()), dtype=torch.long, device=self.disjunct.device), 1,
                          bool(rows.sum() == 0))


def region_specs(prop: Property, input_shape: tuple[int, ...], device, dtype) -> list[RegionSpec]:
    specs = []
    for region in prop.regions:
        rows, rhs, index = [], [], []
        empty = False
        for k, d in enumerate(region.disjuncts):
            if d.matrix.shape[0] == 0:
                empty = True
            rows.append(d.matrix)
            rhs.append(d.rhs)
            index.extend([k] * d.matrix.shape[0])
        as_t = lambda a: torch.as_tensor(np.asarray(a), device=device, dtype=dtype)
        specs.append(RegionSpec(
            lower=as_t(region.lower).reshape(input_shape), upper=as_t(region.upper).reshape(input_shape),
            C=as_t(np.concatenate(rows, 0)), rhs=as_t(np.concatenate(rhs, 0)),
            disjunct=torch.as_tensor(index, device=device, dtype=torch.long),
            n_disjuncts=len(region.disjuncts), empty_disjunct=empty))
    return specs
