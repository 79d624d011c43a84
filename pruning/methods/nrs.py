"""NRS: the paper's structured, stability-based pruning (Li et al., TMLR 2023, issue 7).

The neuron-stability (NRS) loss of a ReLU with IBP pre-activation bounds ``l ≤ z ≤ u`` over the
clipped eps-ball around an image is

    NRS(z) = −tanh(1 + l·u / (|γ|^p + ε))    when a BatchNorm with scale γ feeds the ReLU,
    NRS(z) = −tanh(1 + l·u)                  otherwise (Xiao et al.'s RS loss),

with γ **detached** (a constant of the gradient: the normaliser only rescales l·u — which
grows like γ² — to the scale of the normalised activation, and must not let the optimiser
"stabilise" a neuron by growing γ), p = ``gamma_pow`` (2) and ε = ``gamma_eps`` (1e-6, only
guarding a pruned γ = 0, where l = u = 0 anyway). It lies in (−1, 1): ≈ −1 for a stable
neuron (l·u > 0), rising as the interval straddles zero.

The method, per round of the schedule:

1. **train** the model in place for ``ctx.score_training`` epochs on
   ``L_regime + w · mean_{images, neurons} NRS`` (like slim's sparsity training, the
   regulariser is part of the method; 0 epochs skips it);
2. **score** the output channels / neurons of every hidden layer *normalised by a BatchNorm*
   by their mean NRS over images and spatial positions (``channel_nrs``;
   ``ctx.score_batches`` mini-batches, default 8) and remove the ``round(fraction · n_units)``
   *least stable* (highest mean NRS) per layer — ``methods.structured.prune_channels`` masks
   the filter, bias and BatchNorm γ/β of each, so a removed channel is exactly dead. Layers
   without a BatchNorm (``cifar_model``'s fc 100) are not pruned, as in the paper's code
   (VITA-Group/CertifiedPruning, ``LTH-training/pruner/pruner.py``,
   ``prune_model_structured(mode='nrs')``: scores ``(γ ≠ 0) · (−mean NRS)`` exist only for
   ``BatchNorm2d`` channels, and those ≤ the k-th smallest score are masked). Without the BN
   normaliser the plain ``−tanh(1 + l·u)`` cannot tell a useful unit from a dead one: a unit
   that is inactive on the whole ball (``l ≤ u < 0``) has ``l·u > 0`` and NRS ≈ −1, exactly
   like a stably active one, and an unnormalised fc layer's working units straddle zero
   (NRS ≈ +1), so ranking them keeps the dead units — on the paper study's fc 100 it kept 39
   units that were all inactive on every test image, and the network fell to chance;
3. **fine-tune** on the same regularised loss (``nrs_objective``).

Where we differ from the paper's code: it removes the fraction with one threshold over all
BatchNorm2d channels together (``--layerwise 0``) and scores on the whole test set after each
epoch; we remove it per layer, like the other structured methods, and score on training
mini-batches.

``w`` = ``rs_weight``: 0.01 on top of standard / PGD / FGSM training, 0.001 on top of
CROWN-IBP (the paper's values; ``default_rs_weight`` picks it from the regime).

How it differs from ``methods.stability``: that one is unstructured (HYDRA scores per weight),
uses the plain RS loss without the BatchNorm normaliser, and weight 0.5.

Known verifier issue worked around here (reported to the lead): ``verifier/io/convert.py``
``_Builder.batchnorm`` reads a BatchNorm's ``m.weight`` / ``m.bias`` directly instead of through
``self.live`` (which honours ``torch.nn.utils.prune``'s ``weight_orig · weight_mask``), so after
an optimiser step the bounds of a structured-pruned BatchNorm use the stale γ/β of the last
forward pass (and a freed autograd graph). ``objectives.refresh_pruned_parameters`` before every
bound computation makes them current.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pruning.data import ImageData, batches
from pruning.errors import PruningError
from pruning.models import prunable_layers
from pruning.objectives import (
    CrownIBPTraining, Objective, refresh_pruned_parameters, relu_stability_terms, scheduled,
)
from pruning.sparsity import effective_parameter

_BatchNorm = nn.modules.batchnorm._BatchNorm

RS_WEIGHT = 0.01  # on top of standard, PGD or FGSM training
RS_WEIGHT_CERTIFIED = 0.001  # on top of CROWN-IBP


@dataclasses.dataclass(frozen=True)
class NRSConfig:
    """The NRS loss's constants: the BatchNorm normaliser ``|γ|^gamma_pow + gamma_eps``."""

    gamma_pow: float = 2.0
    gamma_eps: float = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class ReluSite:
    """A ReLU module of the model: the BatchNorm feeding it (the leaf right before it, if a
    BatchNorm) and the prunable layer whose output units it activates (the last one before it).
    """

    relu: nn.Module
    batch_norm: nn.Module | None
    layer: str | None


def relu_sites(model: nn.Module) -> list[ReluSite]:
    """Every ``nn.ReLU`` of ``model`` in module order (= the verifier's graph order for the
    zoo's ``nn.Sequential`` models)."""
    prunable = {name for name, _ in prunable_layers(model)}
    sites, previous, layer = [], None, None
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        if name in prunable:
            layer = name
        if isinstance(module, nn.ReLU):
            batch_norm = previous if isinstance(previous, _BatchNorm) else None
            sites.append(ReluSite(module, batch_norm, layer))
        previous = module
    return sites


def normaliser(site: ReluSite, config: NRSConfig) -> torch.Tensor | None:
    """``(|γ|^p + ε)``, detached, shaped ``(C, 1, 1)`` after a BatchNorm2d, ``(C,)`` after a
    BatchNorm1d; None without an affine BatchNorm."""
    bn = site.batch_norm
    if bn is None or not bn.affine:
        return None
    gamma = effective_parameter(bn, "weight").detach()
    scale = gamma.abs() ** config.gamma_pow + config.gamma_eps
    return scale.view(-1, 1, 1) if isinstance(bn, nn.BatchNorm2d) else scale


def nrs_terms(model: nn.Module, bounded, x: torch.Tensor, eps: float, lower: float = 0.0,
              upper: float = 1.0, config: NRSConfig = NRSConfig()
              ) -> list[tuple[ReluSite, torch.Tensor]]:
    """Per-neuron NRS of every ReLU over the clipped eps-ball around each image of
    ``x: (b, C, H, W)``; bounded: ``verifier.BoundedModel`` of ``model``. Returns
    ``(site, terms)`` pairs, terms ``(b, *relu_shape)``, differentiable in the weights."""
    sites = relu_sites(model)
    refresh_pruned_parameters(model)
    terms = relu_stability_terms(bounded, x, eps, lower, upper,
                                 normalisers=[normaliser(site, config) for site in sites]
                                 if sites else None)
    if len(terms) != len(sites):
        raise PruningError(f"the verifier sees {len(terms)} ReLUs but the model has "
                           f"{len(sites)} nn.ReLU modules; NRS needs every ReLU as a module")
    return list(zip(sites, terms))


def nrs_loss(model: nn.Module, bounded, x: torch.Tensor, eps: float, lower: float = 0.0,
             upper: float = 1.0, config: NRSConfig = NRSConfig()) -> torch.Tensor:
    """The NRS loss averaged over all neurons and images: a scalar in (−1, 1)."""
    terms = nrs_terms(model, bounded, x, eps, lower, upper, config)
    if not terms:
        return x.new_zeros(())
    return torch.cat([t.flatten(1) for _, t in terms], 1).mean()


@torch.no_grad()
def channel_nrs(model: nn.Module, bounded, data: ImageData, eps: float, lower: float = 0.0,
                upper: float = 1.0, config: NRSConfig = NRSConfig(), batch_size: int = 128,
                max_batches: int | None = 8) -> dict[str, torch.Tensor]:
    """Mean NRS of each output unit of every hidden prunable layer normalised by an affine
    BatchNorm (the layers NRS prunes), over the first ``max_batches`` mini-batches of ``data``
    (all with None) and the unit's spatial positions: layer name -> (n_units,), float64. Every
    such layer must feed a ReLU; a model without one is an error."""
    from pruning.methods.structured import channel_groups

    groups = {g.name: g for g in channel_groups(model)
              if g.batch_norm is not None and g.batch_norm.affine}
    if not groups:
        raise PruningError("method nrs needs BatchNorm layers (it scores the channels a "
                           "BatchNorm normalises, as the paper does); this model has none "
                           "after its hidden layers")
    sums: dict[str, torch.Tensor] = {}
    n_images = 0
    for index, (x, _) in enumerate(batches(data, batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        scored = set()  # the first ReLU after a layer is the one its units feed
        for site, terms in nrs_terms(model, bounded, x, eps, lower, upper, config):
            if site.layer not in groups or site.layer in scored:
                continue
            scored.add(site.layer)
            if terms.shape[1] != groups[site.layer].n_units:
                raise PruningError(f"the ReLU after layer {site.layer} has {terms.shape[1]} "
                                   f"channels, the layer {groups[site.layer].n_units} units")
            per_unit = terms.transpose(0, 1).flatten(1).mean(1).to(torch.float64) * len(x)
            sums[site.layer] = sums.get(site.layer, 0) + per_unit
        n_images += len(x)
    missing = [name for name in groups if name not in sums]
    if missing:
        raise PruningError(f"NRS scores channels by the ReLU they feed; layer(s) "
                           f"{', '.join(missing)} feed no ReLU (or the data set is empty)")
    return {name: total / n_images for name, total in sums.items()}


def default_rs_weight(objective: Objective) -> float:
    """The paper's NRS weight for a regime: 0.001 on CROWN-IBP, 0.01 otherwise (looks
    through wrappers with a ``base`` objective)."""
    while not isinstance(objective, CrownIBPTraining) and hasattr(objective, "base"):
        objective = objective.base
    return RS_WEIGHT_CERTIFIED if isinstance(objective, CrownIBPTraining) else RS_WEIGHT


@dataclasses.dataclass(frozen=True)
class NRSRegularised:
    """``base loss + weight · nrs_loss``; the base runs first (its forward pass also refreshes
    pruned parameters). bounded: ``verifier.BoundedModel`` of the model being trained."""

    base: Objective
    bounded: object
    eps: float
    weight: float
    lower: float = 0.0
    upper: float = 1.0
    config: NRSConfig = NRSConfig()

    def scheduled(self, epochs_done: float) -> "NRSRegularised":
        return dataclasses.replace(self, base=scheduled(self.base, epochs_done))

    def loss(self, model, x, y, generator):
        base = self.base.loss(model, x, y, generator)
        if self.weight == 0:
            return base
        return base + self.weight * nrs_loss(model, self.bounded, x, self.eps, self.lower,
                                             self.upper, self.config)


def nrs_objective(model: nn.Module, ctx, weight: float | None = None) -> NRSRegularised:
    """The regime's loss + the NRS loss of ``model`` over ``ctx.attack``'s eps-ball, weighted
    by ``weight`` (default: ``default_rs_weight`` of the regime)."""
    from pruning.bounds import bounded_model

    return NRSRegularised(
        base=ctx.objective, bounded=bounded_model(model, ctx.device, ctx.dtype),
        eps=ctx.attack.eps,
        weight=default_rs_weight(ctx.objective) if weight is None else weight,
        lower=ctx.attack.lower, upper=ctx.attack.upper,
    )


def nrs_scores(model: nn.Module, fraction: float, scope: str, ctx) -> dict[str, torch.Tensor]:
    """NRS-regularised training of ``model`` in place, then ``−channel_nrs`` per hidden layer
    normalised by a BatchNorm (larger = keep, so the least stable units go; the paper's score).
    ``scope`` is unused: the fraction is removed in every such layer."""
    from pruning.train import train

    objective = nrs_objective(model, ctx)
    if ctx.score_training.epochs > 0:
        train(model, objective, ctx.data, ctx.score_training, progress=ctx.progress, desc="nrs")
    mean = channel_nrs(model, objective.bounded, ctx.data, ctx.attack.eps, ctx.attack.lower,
                       ctx.attack.upper, objective.config, ctx.score_training.batch_size,
                       ctx.score_batches or 8)
    return {name: -score for name, score in mean.items()}
