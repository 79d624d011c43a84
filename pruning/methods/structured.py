"""Structured pruning: remove whole output channels (Conv2d) / neurons (Linear).

A structured method scores the output *units* of every hidden prunable layer (never the
classifier's outputs, which are the classes); ``prune_channels`` then removes, in every scored
layer, exactly ``round(fraction · n_units)`` units (the lowest scores), with
``torch.nn.utils.prune.custom_from_mask`` on

- the layer's weight (the unit's whole filter / row) and its bias entry,
- the γ (``weight``) and β (``bias``) entries of the BatchNorm that normalises the layer's
  outputs (the first BatchNorm of matching width before the next prunable layer), and
- the weights of the next prunable layer that read the unit (its input channel of a Conv2d,
  its block of H·W columns of a Linear after a Flatten, its column of a Linear),

so a removed unit is exactly dead: its pre-activation is ``0·x + 0 = 0`` and, with BatchNorm,
``γ·(0 − μ)/σ + β = 0·(…) + 0 = 0`` in eval mode and in training mode alike (the batch of a
constant-zero channel has mean 0, and γ = β = 0 anyway), so the ReLU outputs 0 and the next
layer reads nothing from it. ``pruning.compact`` then deletes such units physically. Masking
the reading weights changes no output (they multiply an exact 0); it makes the reported
sparsity count every weight the compacted model loses, so that a method pruning only some
layers (``slim``, ``nrs``: those with a BatchNorm) and one pruning every hidden layer are
measured alike.

Methods (``scores(model, fraction, scope, ctx) -> {layer name: (n_units,)}``, larger = keep):

- ``slim`` (Liu et al., ICCV 2017, network slimming): train for ``ctx.score_training`` epochs
  on the regime's loss + ``λ·mean|γ|`` over every BatchNorm γ (λ = ``ctx.slim_penalty``, 1e-4
  as in the paper's code; ``SlimPenalty``, also the fine-tuning objective), **in place** (the sparsity-inducing training is part of the method), then
  score each unit by its ``|γ|``. Only layers followed by a BatchNorm are pruned; a model with
  no BatchNorm is an error.
- ``l1-channel`` (Li et al., ICLR 2017, pruning filters): the L1 norm of the unit's filter.
- ``refill`` (IMP-refill, Chen et al. 2022): unstructured magnitude pruning at sparsity
  ``fraction`` (global or per layer, by ``scope``) is simulated; units are ranked by how many of
  their weights survive it (ties by the surviving L1 mass); the kept units are kept *whole*,
  i.e. refilled densely with their trained weights.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import prune

from pruning.errors import PruningError
from pruning.models import effective_weight, prunable_layers, scoped_layers
from pruning.sparsity import check_sparsity, effective_parameter, pruned_parameters
from pruning.train import train

_BatchNorm = nn.modules.batchnorm._BatchNorm

ChannelScores = dict[str, torch.Tensor]  # layer name -> (n_units,) scores, larger = keep


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A hidden prunable layer's output units and the BatchNorm (if any) normalising them."""

    name: str
    layer: nn.Module
    batch_norm: nn.Module | None = None

    @property
    def n_units(self) -> int:
        return self.layer.weight_orig.shape[0] if hasattr(self.layer, "weight_orig") \
            else self.layer.weight.shape[0]

    def members(self) -> list[tuple[nn.Module, str]]:
        """The ``(module, parameter)`` pairs indexed by unit along their first dimension."""
        members = [(self.layer, "weight")]
        if effective_parameter(self.layer, "bias") is not None:
            members.append((self.layer, "bias"))
        if self.batch_norm is not None and self.batch_norm.affine:
            members += [(self.batch_norm, "weight"), (self.batch_norm, "bias")]
        return members


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every prunable layer except the last (the classifier), in module order, each with the
    first BatchNorm of matching width between it and the next prunable layer."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    prunable = {name for name, _ in prunable_layers(model)}
    groups: list[ChannelGroup] = []
    current: tuple[str, nn.Module, nn.Module | None] | None = None
    for name, module in leaves:
        if name in prunable:
            if current is not None:
                groups.append(ChannelGroup(*current))
            current = (name, module, None)
        elif isinstance(module, _BatchNorm) and current is not None and current[2] is None:
            if module.num_features == ChannelGroup(current[0], current[1]).n_units:
                current = (current[0], current[1], module)
    return groups  # the last prunable layer (the classifier) is never appended


def alive_units(group: ChannelGroup) -> torch.Tensor:
    """(n_units,) bool: units whose filter / row has a non-zero effective weight."""
    return effective_weight(group.layer).detach().flatten(1).ne(0).any(1)


def channel_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per hidden prunable layer: ``{"kept": alive units, "total": units}``."""
    return {g.name: {"kept": int(alive_units(g).sum()), "total": g.n_units}
            for g in channel_groups(model)}


def _mask_units(group: ChannelGroup, keep: torch.Tensor) -> None:
    """Mask every member parameter of the units where ``keep`` (bool (n_units,)) is False."""
    for module, name in group.members():
        value = effective_parameter(module, name)
        shape = (-1,) + (1,) * (value.dim() - 1)
        mask = keep.view(shape).expand_as(value).to(value.dtype)
        prune.custom_from_mask(module, name, mask)


def _mask_readers(reader: nn.Module, keep: torch.Tensor) -> None:
    """Mask the weights of ``reader`` (the next prunable layer) that read the units where
    ``keep`` (bool (n_units,)) is False: input channels of a Conv2d; for a Linear, the units'
    equal blocks of columns (one column each, or H·W each after a Flatten, channel-major).
    A reader whose inputs do not split evenly into the units is left alone."""
    weight = effective_weight(reader)
    n_units = keep.numel()
    if isinstance(reader, nn.Conv2d):
        if weight.shape[1] != n_units:
            return
        mask = keep.view(1, -1, 1, 1).expand_as(weight)
    else:
        per_unit, rest = divmod(weight.shape[1], n_units)
        if rest:
            return
        mask = keep.repeat_interleave(per_unit).view(1, -1).expand_as(weight)
    prune.custom_from_mask(reader, "weight", mask.to(weight.dtype))


def check_channel_fraction(model: nn.Module, fraction: float) -> None:
    """A channel fraction must be in [0, 1) and leave every hidden layer at least one unit."""
    check_sparsity(fraction)
    for group in channel_groups(model):
        if round(fraction * group.n_units) >= group.n_units:
            raise PruningError(
                f"channel fraction {fraction} would remove all {group.n_units} units of layer "
                f"{group.name}; use a fraction below "
                f"{(group.n_units - 0.5) / group.n_units:.4g}")


def prune_channels(model: nn.Module, scores: ChannelScores, fraction: float,
                   threshold: str = "layer", layers: str = "all") -> None:
    """Remove units of the layers named in ``scores`` (the lowest-scored; units already dead
    count towards the target and go first), restricted to the layer scope ``layers``
    ("all" or "conv": scores of other layers are ignored).

    threshold "layer": exactly ``round(fraction · n_units)`` units in every scored layer.
    threshold "global": one ranking over the units of all scored layers together (the paper's
    ``prune_model_structured(local=False)``: one threshold over every BatchNorm2d channel), so
    exactly ``round(fraction · Σ n_units)`` units go in all, unevenly between layers; a
    ranking that would empty a layer is an error.

    scores: layer name -> (n_units,). A fraction below what is already removed is an error.
    """
    check_sparsity(fraction)
    if threshold not in ("layer", "global"):
        raise PruningError(f"unknown threshold {threshold!r}; choose 'global' or 'layer'")
    groups = {g.name: g for g in channel_groups(model)}
    layers_list = prunable_layers(model)
    reader_of = {name: layers_list[i + 1][1] for i, (name, _) in enumerate(layers_list[:-1])}
    in_scope = {name for name, _ in scoped_layers(model, layers)}
    chosen = {}
    for name, score in scores.items():
        if name not in groups:
            raise PruningError(f"layer {name!r} has no prunable output channels (unknown "
                               "layer or the classifier)")
        if name not in in_scope:
            continue
        if tuple(score.shape) != (groups[name].n_units,):
            raise PruningError(f"channel scores of layer {name} have shape "
                               f"{tuple(score.shape)}, expected ({groups[name].n_units},)")
        alive = alive_units(groups[name])
        chosen[name] = torch.where(alive.cpu(), score.detach().to(torch.float64).cpu(),
                                   -torch.inf)
    if not chosen:
        raise PruningError(f"no scored layer is in the layer scope {layers!r}")
    if threshold == "layer":
        check_channel_fraction(model, fraction)
        keeps = {name: _lowest_removed(ranked, round(fraction * ranked.numel()), name)
                 for name, ranked in chosen.items()}
    else:
        keeps = _global_keep(chosen, fraction)
    for name, keep in keeps.items():
        device = effective_weight(groups[name].layer).device
        _mask_units(groups[name], keep.to(device))
        _mask_readers(reader_of[name], keep.to(device))


def _lowest_removed(ranked: torch.Tensor, n_remove: int, name: str) -> torch.Tensor:
    """(n,) bool keep-mask removing the ``n_remove`` lowest of ``ranked`` (dead = -inf)."""
    n_dead = int(torch.isinf(ranked).sum())
    if n_remove < n_dead:
        raise PruningError(f"layer {name} already has {n_dead} of {ranked.numel()} units "
                           f"removed, more than the target allows ({n_remove})")
    keep = torch.ones(ranked.numel(), dtype=torch.bool)
    keep[torch.argsort(ranked, stable=True)[:n_remove]] = False
    return keep


def _global_keep(chosen: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Keep-masks from one ranking of all units of all layers in ``chosen``."""
    names = list(chosen)
    flat = torch.cat([chosen[n] for n in names])
    keep = _lowest_removed(flat, round(fraction * flat.numel()), ", ".join(names))
    out, start = {}, 0
    for name in names:
        part = keep[start:start + chosen[name].numel()]
        start += chosen[name].numel()
        if not part.any():
            raise PruningError(f"a global channel threshold at fraction {fraction} would remove "
                               f"every unit of layer {name}; use threshold = \"layer\" or a "
                               "smaller fraction")
        out[name] = part
    return out


def mask_existing_zeros(model: nn.Module) -> None:
    """Mask the zeros of an already pruned, ``prune.remove``d model so that pruning and
    fine-tuning it again keeps them: every zero weight of a prunable layer and, for units whose
    filter is all zero, their zero bias and zero BatchNorm γ/β entries."""
    for _, module in prunable_layers(model):
        prune.custom_from_mask(module, "weight", (effective_weight(module) != 0)
                               .to(effective_weight(module).dtype))
    for group in channel_groups(model):
        dead = ~alive_units(group)
        for module, name in group.members()[1:]:
            if name in pruned_parameters(module):
                continue
            value = getattr(module, name).detach()
            prune.custom_from_mask(module, name, (~(dead & (value == 0))).to(value.dtype))


# ------------------------------------------------------------------ methods

def l1_channel_scores(model: nn.Module, fraction: float, scope: str, ctx) -> ChannelScores:
    """The L1 norm of each unit's filter / row (Li et al. 2017)."""
    return {g.name: effective_weight(g.layer).detach().flatten(1).abs().sum(1)
            for g in channel_groups(model)}


def refill_scores(model: nn.Module, fraction: float, scope: str, ctx) -> ChannelScores:
    """Units ranked by how many of their weights survive magnitude pruning at ``fraction``."""
    groups = channel_groups(model)
    magnitudes = {name: effective_weight(m).detach().abs() for name, m in prunable_layers(model)}
    scoped = [list(magnitudes)] if scope == "global" else [[name] for name in magnitudes]
    survives = {}
    for names in scoped:
        flat = torch.cat([magnitudes[n].flatten() for n in names])
        n_keep = flat.numel() - round(fraction * flat.numel())
        threshold = torch.topk(flat, n_keep).values[-1] if n_keep > 0 else flat.max() + 1
        for n in names:
            survives[n] = (magnitudes[n] >= threshold) & (magnitudes[n] > 0)
    scores = {}
    for g in groups:
        # The fraction of the unit's weights that survive (the count, normalised by the unit's
        # size so that one global threshold compares units of different layers), with the
        # surviving L1 mass only breaking ties.
        share = survives[g.name].flatten(1).to(torch.float64).mean(1)
        mass = (magnitudes[g.name] * survives[g.name]).flatten(1).sum(1).to(torch.float64)
        scores[g.name] = share + 0.5 * mass / (mass.max() + 1e-12) / survives[g.name][0].numel()
    return scores


@dataclasses.dataclass(frozen=True)
class SlimPenalty:
    """The regime's loss + ``penalty · mean|γ|`` over the given BatchNorms, at every step: the
    paper's weighting (VITA-Group/CertifiedPruning ``utils.compute_slim_loss``: Σ|γ| divided by
    the number of γ, times ``slim_weight`` 1e-4, added in every training step, pre-training
    included), rather than Liu et al.'s un-normalised ``λ·Σ|γ|``."""

    base: object
    batch_norms: tuple[nn.Module, ...]
    penalty: float

    def scheduled(self, epochs_done: float) -> "SlimPenalty":
        from pruning.objectives import scheduled

        return dataclasses.replace(self, base=scheduled(self.base, epochs_done))

    def loss(self, model, x, y, generator):
        gammas = torch.cat([effective_parameter(bn, "weight").abs().flatten()
                            for bn in self.batch_norms])
        return self.base.loss(model, x, y, generator) + self.penalty * gammas.mean()


def slim_batch_norms(model: nn.Module) -> tuple[nn.Module, ...]:
    """The affine BatchNorms that normalise a hidden layer's units (what slim ranks)."""
    return tuple(g.batch_norm for g in channel_groups(model)
                 if g.batch_norm is not None and g.batch_norm.affine)


def slim_objective(model: nn.Module, ctx) -> "SlimPenalty":
    """Fine-tuning objective of slim: the regime's loss + the γ penalty at every step."""
    norms = slim_batch_norms(model)
    if not norms:
        raise PruningError("method slim needs BatchNorm layers (it ranks channels by their BN "
                           "scale γ); this model has none after its hidden layers")
    return SlimPenalty(ctx.objective, norms, ctx.slim_penalty)


def slim_scores(model: nn.Module, fraction: float, scope: str, ctx) -> ChannelScores:
    """Network slimming: L1-on-γ training of ``model`` itself, then ``|γ|`` per unit."""
    groups = [g for g in channel_groups(model) if g.batch_norm is not None
              and g.batch_norm.affine]
    if not groups:
        raise PruningError("method slim needs BatchNorm layers (it ranks channels by their BN "
                           "scale γ); this model has none after its hidden layers")
    if ctx.score_training.epochs > 0:
        objective = SlimPenalty(ctx.objective, tuple(g.batch_norm for g in groups),
                                ctx.slim_penalty)
        train(model, objective, ctx.data, ctx.score_training, progress=ctx.progress,
              desc="slim")
    return {g.name: effective_parameter(g.batch_norm, "weight").detach().abs() for g in groups}
