"""A strong targeted PGD attack for the suite's robustness properties, confirmed by onnxruntime.

Independent of ``verifier.attack``: the property's answer is ``sat`` only if a point of the box
(read back from the VNN-LIB file by the verifier's parser, float32 and inside the float64 bounds)
makes onnxruntime's output of some wrong class at least that of the true class.

The attack maximises ``y_j - y_label`` for every wrong class ``j`` at once (one batch row per
target and restart), with signed-gradient steps whose size decays from ``0.5·eps`` (cosine), from
random starts plus the centre; the best point per target is kept.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class StrongPGD:
    restarts: int = 10
    steps: int = 300
    first_step: float = 0.5      # step size at the start, in units of the box's half width
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Counterexample:
    x: np.ndarray        # (n_inputs,) float32, inside the box
    y: np.ndarray        # (n_outputs,) float64, onnxruntime's output
    target: int          # the wrong class j with y_j >= y_label
    margin: float        # y_j - y_label >= 0 (onnxruntime)


def best_points(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, label: int,
                n_classes: int, config: StrongPGD = StrongPGD()) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD maximising ``y_j - y_label`` per wrong class ``j`` over the box.

    lower, upper: (C, H, W). Returns (points: (n_classes - 1, C, H, W), margins: (n_classes - 1,))
    of the best point found for each target (torch's forward pass; confirm elsewhere).
    """
    targets = torch.tensor([j for j in range(n_classes) if j != label])
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.restarts, len(targets), *lower.shape)
    lo, hi = lower.expand(shape), upper.expand(shape)
    x = lo + torch.rand(shape, generator=generator) * (hi - lo)
    x[0] = (lower + upper) / 2
    half_width = (upper - lower).max() / 2
    best_margin = torch.full((len(targets),), -math.inf)
    best_x = x[0].clone()
    model.eval()
    for step in range(config.steps + 1):
        x.requires_grad_(True)
        logits = model(x.reshape(-1, *lower.shape)).reshape(config.restarts, len(targets), n_classes)
        margin = logits.gather(2, targets.view(1, -1, 1).expand(config.restarts, -1, 1))[..., 0] - logits[..., label]
        (grad,) = torch.autograd.grad(margin.sum(), x)
        with torch.no_grad():
            value, restart = margin.max(0)
            better = value > best_margin
            best_margin = torch.where(better, value, best_margin)
            best_x[better] = x[restart[better], better]
            size = config.first_step * half_width * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            x = torch.minimum(torch.maximum(x.detach() + size * grad.sign(), lo), hi)
    return best_x.detach(), best_margin


def inside_box(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """x rounded to float32 and nudged by one ulp where rounding left the float64 box."""
    x32 = np.clip(x.astype(np.float64), lower, upper).astype(np.float32)
    low, high = x32.astype(np.float64) < lower, x32.astype(np.float64) > upper
    x32[low] = np.nextafter(x32[low], np.float32(np.inf))
    x32[high] = np.nextafter(x32[high], np.float32(-np.inf))
    return x32


def find_counterexample(model: nn.Module, session, lower: np.ndarray, upper: np.ndarray, label: int,
                        input_shape: tuple[int, ...], n_classes: int,
                        config: StrongPGD = StrongPGD()) -> tuple[Counterexample | None, float]:
    """Attack ``model`` on the box and confirm with ``session`` (onnxruntime).

    lower, upper: (n_inputs,) float64 (the VNN-LIB box). Returns (the confirmed counterexample
    with the largest onnxruntime margin, or None; the best margin torch's pass saw).
    """
    lo = torch.as_tensor(lower, dtype=torch.float32).reshape(input_shape)
    hi = torch.as_tensor(upper, dtype=torch.float32).reshape(input_shape)
    points, margins = best_points(model, lo, hi, label, n_classes, config)
    best = None
    name = session.get_inputs()[0].name
    for point in points:
        x32 = inside_box(point.numpy().reshape(-1), lower, upper)
        assert np.all(x32 >= lower) and np.all(x32 <= upper)
        y = session.run(None, {name: x32.reshape(1, *input_shape)})[0].astype(np.float64).reshape(-1)
        wrong = [j for j in range(n_classes) if j != label]
        target = max(wrong, key=lambda j: y[j])
        margin = float(y[target] - y[label])
        if margin >= 0 and (best is None or margin > best.margin):
            best = Counterexample(x32, y, target, margin)
    return best, float(margins.max())
