"""Measurements of a model: clean accuracy, PGD accuracy, unstable ReLUs under the verifier."""
from __future__ import annotations

import torch
from torch import nn

from pruning.data import ImageData, batches
from pruning.objectives import AttackConfig, input_box, pgd_attack


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, batch_size: int = 500) -> float:
    """Fraction of ``data`` classified correctly (eval mode; the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(data, batch_size))
    model.train(was_training)
    return correct / max(len(data), 1)


def pgd_accuracy(
    model: nn.Module,
    data: ImageData,
    attack: AttackConfig,
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """Fraction of ``data`` still classified correctly after a PGD attack (an upper bound on
    robust accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in batches(data, batch_size):
        x_adv = pgd_attack(model, x, y, attack, generator)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(len(data), 1)


@torch.no_grad()
def unstable_relus(
    bounded,
    data: ImageData,
    eps: float,
    method: str = "crown",
    lower: float = 0.0,
    upper: float = 1.0,
    batch_size: int = 100,
) -> torch.Tensor:
    """Per image, how many ReLUs have pre-activation bounds with ``l < 0 < u`` over the clipped
    eps-ball, by the verifier's own bounds (``method`` "ibp" or "crown").

    bounded: a ``verifier.BoundedModel``. Returns counts: (N,) int64.
    """
    counts = []
    for x, _ in batches(data, batch_size):
        lo, hi = input_box(x, eps, lower, upper)
        pre_bounds = bounded.relu_bounds(lo, hi, method=method)
        per_layer = [((l < 0) & (u > 0)).flatten(1).sum(1) for l, u in pre_bounds]
        counts.append(torch.stack(per_layer, 1).sum(1) if per_layer else x.new_zeros(len(x)))
    return torch.cat(counts).long()
