"""HYDRA (Sehwag et al., NeurIPS 2020): learn which weights to keep, with the weights frozen.

Every prunable weight ``w`` (of the layers in ``ctx.layers``' scope) gets a score ``s``,
initialised as HYDRA's ``initialize_scaled_score`` (and the paper's code, ``hydra.py``):
``s = sqrt(6 / fan_in) · w / max|w|`` per layer, so learning starts from the magnitude mask
with every layer's scores on the Kaiming-uniform scale of that layer. ``hydra`` keeps the top
``(1 − sparsity)`` *per layer* (HYDRA's ``GetSubnet`` is per layer); ``stability`` keeps the
``|w|`` initialisation and the schedule's threshold. The layer computes with ``w · m``, where ``m`` keeps the weights whose
``|s|`` is among the top ``(1 - sparsity)`` (globally or per layer) and is 0 elsewhere. The
top-k is not differentiable, so the backward pass treats ``m`` as ``|s|`` (straight-through
estimator, as in HYDRA's ``GetSubnet``): ``∂L/∂s = ∂L/∂(w·m) · w · sign(s)``. Only the
scores are optimised, on the pruning objective (the regime's loss — PGD when training
adversarially, as HYDRA does — or the stability-regularised loss); the final scores then go to
``prune_by_scores`` and the kept weights are fine-tuned by the schedule.

Score learning runs on a deep copy whose weights are reparametrised with
``torch.nn.utils.parametrize``, so the caller's model and its prune masks are untouched.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from pruning.data import ImageData
from pruning.models import effective_weight, prunable_layers, scoped_layers
from pruning.objectives import Objective
from pruning.sparsity import Scores, clone_model, make_permanent
from pruning.train import TrainConfig, train


class SuperMask(nn.Module):
    """Parametrisation ``weight -> weight · m(scores)`` with a straight-through top-k mask.

    scores: learnable, shaped like the weight; threshold: scalar buffer refreshed after each
    optimiser step; keep: 0/1 buffer of positions an earlier mask already pruned (stay 0).
    """

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, initial: torch.Tensor | None = None):
        super().__init__()
        start = weight.detach().abs() if initial is None else initial.detach()
        self.scores = nn.Parameter(start.clone())
        self.register_buffer("threshold", weight.new_zeros(()))
        self.register_buffer("keep", keep.detach().to(weight.dtype).clone())

    def mask(self) -> torch.Tensor:
        magnitude = self.scores.abs()
        hard = (magnitude >= self.threshold).to(magnitude.dtype) * self.keep
        return hard.detach() + magnitude - magnitude.detach()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


def _refresh_thresholds(masks: list[SuperMask], sparsity: float, scope: str) -> None:
    """Set each threshold so the top ``1 - sparsity`` of scores (among kept positions) pass."""
    groups = [masks] if scope == "global" else [[m] for m in masks]
    with torch.no_grad():
        for group in groups:
            flat = torch.cat([(m.scores.abs() * m.keep).flatten() for m in group])
            n_keep = flat.numel() - round(sparsity * flat.numel())
            threshold = torch.topk(flat, n_keep).values[-1] if n_keep > 0 else flat.max() + 1
            for m in group:
                m.threshold.fill_(threshold)


def scaled_scores(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's initial scores of one layer: ``sqrt(6 / fan_in) · w / max|w|`` (shaped like w)."""
    fan_in = weight[0].numel()
    return math.sqrt(6 / fan_in) * weight.detach() / weight.detach().abs().max().clamp_min(1e-12)


def learn_scores(
    model: nn.Module,
    sparsity: float,
    scope: str,
    objective_for: Callable[[nn.Module], Objective],
    data: ImageData,
    config: TrainConfig,
    progress: bool = False,
    layers: str = "all",
    scaled: bool = False,
) -> Scores:
    """HYDRA score learning on a copy of ``model``; returns the learned scores of the layers
    in scope ``layers`` ("all" / "conv"; the others stay dense and frozen).

    objective_for(copy) -> Objective: the loss to minimise, built for the reparametrised copy
    (so a ``BoundedModel`` inside it reads the masked weights). scaled: HYDRA's scaled initial
    scores (``scaled_scores``) instead of ``|w|``.
    """
    student = clone_model(model)
    chosen = {name for name, _ in scoped_layers(student, layers)}
    keep = {name: (module.weight_mask if hasattr(module, "weight_mask")
                   else torch.ones_like(module.weight)).detach().clone()
            for name, module in prunable_layers(student) if name in chosen}
    make_permanent(student)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    masks: dict[str, SuperMask] = {}
    for name, module in prunable_layers(student):
        if name not in chosen:
            continue
        weight = effective_weight(module)
        masks[name] = SuperMask(weight, keep[name], scaled_scores(weight) if scaled else None)
        parametrize.register_parametrization(module, "weight", masks[name])
    ordered = list(masks.values())
    _refresh_thresholds(ordered, sparsity, scope)
    objective: Objective = objective_for(student)
    train(student, objective, data, config, after_step=lambda: _refresh_thresholds(
        ordered, sparsity, scope), progress=progress, desc="scores")
    return {name: mask.scores.detach().abs() * mask.keep for name, mask in masks.items()}


def hydra_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """HYDRA scores learned on the training regime's objective: per-layer top-k (whatever
    ``scope`` says; the method's ``threshold`` is "layer") from scaled initial scores."""
    return learn_scores(model, sparsity, "layer", lambda student: ctx.objective, ctx.data,
                        ctx.score_training, ctx.progress, layers=ctx.layers, scaled=True)
