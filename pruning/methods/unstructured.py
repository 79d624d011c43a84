"""Data-free unstructured scores: random and weight magnitude (and none, for controls)."""
from __future__ import annotations

import torch
from torch import nn

from pruning.models import effective_weight, prunable_layers
from pruning.sparsity import Scores


def random_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """Uniform random scores from a generator seeded by ``ctx.seed`` (reproducible masks)."""
    generator = torch.Generator().manual_seed(ctx.seed)
    return {
        name: torch.rand(module.weight_orig.shape if hasattr(module, "weight_orig")
                         else module.weight.shape, generator=generator)
        .to(device=effective_weight(module).device)
        for name, module in prunable_layers(model)
    }


def magnitude_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """``|w|`` of the effective weight (Han et al. 2015; the lottery-ticket criterion)."""
    return {name: effective_weight(module).detach().abs()
            for name, module in prunable_layers(model)}


def no_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """Equal scores for a control that prunes nothing (its targets are 0)."""
    return {name: torch.ones_like(effective_weight(module)).detach()
            for name, module in prunable_layers(model)}
