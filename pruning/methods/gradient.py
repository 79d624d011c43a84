"""Gradient-based unstructured scores: SNIP and first-order Taylor importance.

Both score a weight by how much the loss would change if it were removed, to first order:
removing ``w`` changes the loss by about ``−w · ∂L/∂w``. They differ in the loss and in how
batches are combined:

- ``snip`` (Lee et al., ICLR 2019, connection sensitivity): ``|w · Σ_b ∂L_b/∂w|`` with ``L`` the
  regime's training loss (``ctx.objective``, as the paper's code scores the FGSM+GradAlign or
  CROWN-IBP loss: ``pruner.prune_model_score_based``), the gradient summed over ``ctx.score_batches`` mini-batches (default
  ``SNIP_BATCHES``) before taking the magnitude — the sensitivity of the loss over those
  batches. SNIP prunes at initialisation; ``certiprune prune --at-init`` hands it the initial
  weights, otherwise it scores the trained model it is given.
- ``taylor`` (Molchanov et al., CVPR 2019, first-order criterion): ``Σ_b |w · ∂L_b/∂w|`` with
  ``L`` the regime's training loss (``ctx.objective``: PGD / FGSM / CROWN-IBP when the model was
  trained that way), accumulated per batch over ``ctx.score_batches`` batches (default: one
  epoch).

Gradients are taken on a copy with the masks made permanent (pruned weights are 0 and score 0),
in training mode, so the caller's model (and its BatchNorm statistics) is untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from pruning.data import batches
from pruning.models import prunable_layers
from pruning.sparsity import Scores, clone_model, make_permanent

SNIP_BATCHES = 8


def _score_batches(ctx, default: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``ctx.score_batches`` (else ``default``, None = all) shuffled mini-batches."""
    generator = torch.Generator().manual_seed(ctx.seed)
    chosen = batches(ctx.data, ctx.score_training.batch_size, generator)
    limit = ctx.score_batches if ctx.score_batches is not None else default
    return chosen[:limit] if limit is not None else chosen


def _weight_gradients(model: nn.Module, objective, chosen, per_batch_abs: bool,
                      seed: int) -> Scores:
    """``Σ_b |w·g_b|`` (per_batch_abs) or ``|w·Σ_b g_b|`` per prunable layer, shaped like w."""
    student = clone_model(model)
    make_permanent(student)
    student.train()
    layers = prunable_layers(student)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    weights = [module.weight for _, module in layers]
    for weight in weights:
        weight.requires_grad_(True)
    totals = [torch.zeros_like(w) for w in weights]
    generator = torch.Generator().manual_seed(seed)  # PGD random starts
    for x, y in chosen:
        grads = torch.autograd.grad(objective.loss(student, x, y, generator), weights)
        for total, weight, grad in zip(totals, weights, grads):
            total += (weight.detach() * grad).abs() if per_batch_abs else grad
    if not per_batch_abs:
        totals = [(weight.detach() * total).abs() for weight, total in zip(weights, totals)]
    return {name: total for (name, _), total in zip(layers, totals)}


def snip_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """SNIP connection sensitivity on the regime's training loss."""
    return _weight_gradients(model, ctx.objective, _score_batches(ctx, SNIP_BATCHES),
                             per_batch_abs=False, seed=ctx.seed)


def taylor_scores(model: nn.Module, sparsity: float, scope: str, ctx) -> Scores:
    """First-order Taylor importance accumulated over the regime's training loss."""
    return _weight_gradients(model, ctx.objective, _score_batches(ctx, None),
                             per_batch_abs=True, seed=ctx.seed)

