"""The statistics of a study: interval, paired test and multiplicity correction.

- ``wilson_interval(k, n)``: the Wilson score interval of a binomial proportion (Wilson 1927),
  the interval ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` gives; at
  n = 200 and p = 0.5 it is about ±7 points, at n = 100 about ±10.
- ``mcnemar_exact(b, c)``: the exact (binomial) McNemar test of two classifiers on the same
  images: ``b`` images certified by the first only, ``c`` by the second only; under the null
  each discordant image goes either way with probability 1/2, so the two-sided p-value is
  ``min(1, 2 · P[Bin(b + c, 1/2) ≤ min(b, c)])``. Four discordant images all one way give
  p = 0.125.
- ``holm(p_values)``: Holm's step-down adjusted p-values (family-wise error), for readings
  that pick the best of many comparisons.
- ``mean_sd(values)``: mean and sample standard deviation (n − 1) over seeds.

Pure functions of counts; no dependence on the rest of the study.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for ``k`` successes of ``n``; (0, 1) at n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} successes is not in 0..{n}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends, not rounding residue
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _binom_cdf_half(k: int, n: int) -> float:
    """P[Bin(n, 1/2) ≤ k], exactly summed in integers."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2 ** n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be ≥ 0")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binom_cdf_half(min(b, c), n))


def discordant(first: list[bool], second: list[bool]) -> tuple[int, int]:
    """(b, c): images where only ``first`` / only ``second`` holds (paired, same order)."""
    if len(first) != len(second):
        raise ValueError(f"paired lists differ in length: {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    return b, c


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order: the i-th smallest p (from 0) is multiplied
    by (m − i), the running maximum taken, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        raise ValueError("mean of no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
