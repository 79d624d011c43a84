"""Masks through ``torch.nn.utils.prune``: apply scores at an exact sparsity, report, rewind.

A pruning method produces importance scores (one tensor per prunable weight, larger = keep);
``prune_by_scores`` turns them into ``weight_mask`` buffers with ``prune.global_unstructured``
(one threshold over all layers) or ``prune.l1_unstructured`` per layer. Masks only shrink:
weights pruned before stay pruned, and the count of new zeros is computed so that the
requested sparsity is met exactly (``round(sparsity · n)`` zeros, globally or per layer).

Structured methods (``methods.structured``) mask biases and BatchNorm γ/β too; the helpers
below that save, restore and remove masks therefore handle every pruned parameter of every
module, keyed ``"<module>.<parameter>"`` (a bare prunable-layer name still means its weight).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.nn.utils import prune

from pruning.errors import PruningError
from pruning.models import effective_weight, prunable_layers, scoped_layers

SCOPES = ("global", "layer")

Scores = dict[str, torch.Tensor]  # layer name -> scores, shaped like that layer's weight


def _current_mask(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "weight_mask"):
        return module.weight_mask
    return torch.ones_like(module.weight)


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity must be in [0, 1), got {sparsity}")


def prune_by_scores(model: nn.Module, scores: Scores, sparsity: float, scope: str,
                    layers: str = "all") -> None:
    """Mask the lowest-|score| weights of ``model`` so that exactly ``round(sparsity · n)``
    weights are zero (``n``: all weights of the layers in scope ``layers`` — "all" prunable
    layers or the "conv" ones — for ``scope="global"``, each such layer's for
    ``scope="layer"``). Positions already masked stay masked and count towards the target;
    a target below the current sparsity is an error. Layers outside ``layers`` are untouched.
    """
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise PruningError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
    layers = scoped_layers(model, layers)
    missing = [name for name, _ in layers if name not in scores]
    if missing:
        raise PruningError(f"no scores for layer(s) {', '.join(missing)}")
    groups = [layers] if scope == "global" else [[layer] for layer in layers]
    for group in groups:
        n_total = sum(module.weight_orig.numel() if hasattr(module, "weight_orig")
                      else module.weight.numel() for _, module in group)
        n_zero = sum(int((_current_mask(module) == 0).sum()) for _, module in group)
        target = round(sparsity * n_total)
        if target < n_zero:
            names = ", ".join(name for name, _ in group)
            raise PruningError(
                f"layer(s) {names} already have {n_zero} of {n_total} weights pruned, more "
                f"than the requested sparsity {sparsity} allows ({target})"
            )
        importance = {(module, "weight"): scores[name].detach().abs() for name, module in group}
        # prune's container prunes `amount` weights among those not yet masked; an int
        # amount is exact, whereas a fraction of the remainder would round a second time.
        prune.global_unstructured(
            [(module, "weight") for _, module in group],
            pruning_method=prune.L1Unstructured,
            importance_scores=importance,
            amount=target - n_zero,
        )


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works while it is pruned.

    Prune keeps ``module.weight`` as a plain attribute holding ``weight_orig * weight_mask``,
    a non-leaf tensor that ``copy.deepcopy`` refuses; the copy gets a detached clone instead
    (prune's hook recomputes it from the copied ``weight_orig`` and mask on the next forward).
    """
    memo = {}
    for module in model.modules():
        for name in pruned_parameters(module):
            if isinstance(getattr(module, name, None), torch.Tensor):
                memo[id(getattr(module, name))] = getattr(module, name).detach().clone()
    return copy.deepcopy(model, memo)


def pruned_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters reparametrised by ``torch.nn.utils.prune``."""
    return [hook._tensor_name for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)]


def effective_parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    """``<name>_orig * <name>_mask`` when pruned (always current), else the parameter."""
    if hasattr(module, name + "_mask"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name, None)


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` on every pruned parameter of every module (weights, biases, BatchNorm
    γ/β): the zeros become plain values."""
    for module in model.modules():
        for name in pruned_parameters(module):
            prune.remove(module, name)


def all_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``"<module>.<parameter>"`` -> copy of its mask, for every pruned parameter."""
    return {f"{module_name}.{name}": getattr(module, name + "_mask").detach().clone()
            for module_name, module in model.named_modules() for name in pruned_parameters(module)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Reinstate saved masks (e.g. when loading a pruned checkpoint) with
    ``prune.custom_from_mask``. Keys: a prunable layer's name (its weight) or
    ``"<module>.<parameter>"``; a key naming nothing in ``model`` is an error."""
    modules = dict(model.named_modules())
    layers = dict(prunable_layers(model))
    for key, mask in masks.items():
        module_name, name = (key, "weight") if key in layers else (
            key.rsplit(".", 1) if "." in key else ("", key))
        module = modules.get(module_name)
        if module is None or not hasattr(module, name):
            raise PruningError(f"a mask for {key!r} names no parameter of the model")
        if tuple(mask.shape) != tuple(getattr(module, name).shape):
            raise PruningError(f"the mask for {key!r} has shape {tuple(mask.shape)}, the "
                               f"parameter {tuple(getattr(module, name).shape)}")
        prune.custom_from_mask(module, name, mask.to(getattr(module, name).device))


def masks_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``"<module>.<parameter>"`` -> mask for every ``*_mask`` entry of a saved state dict."""
    suffix = "_mask"
    return {key[: -len(suffix)]: value for key, value in state_dict.items()
            if key.endswith(suffix)}


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> copy of its current mask (ones for unpruned layers)."""
    return {name: _current_mask(module).detach().clone() for name, module in prunable_layers(model)}


def rewind(model: nn.Module, early_weights: dict[str, torch.Tensor],
           early_biases: dict[str, torch.Tensor]) -> None:
    """Lottery-ticket rewinding: put the early-training weights (and biases) back into every
    layer, keeping its mask, so unpruned positions hold exactly their early values.

    early_weights / early_biases: layer name -> tensor shaped like the layer's weight / bias.
    """
    with torch.no_grad():
        for name, module in prunable_layers(model):
            if name not in early_weights:
                raise PruningError(f"the early weights have no layer {name!r}")
            for param, early in (("weight", early_weights[name]), ("bias", early_biases.get(name))):
                target = getattr(module, param + "_orig", getattr(module, param))
                if early is None or target is None:
                    continue
                if tuple(early.shape) != tuple(target.shape):
                    raise PruningError(
                        f"cannot rewind layer {name}: early {param} {tuple(early.shape)} does "
                        f"not match the model's {tuple(target.shape)} (another model's weights?)")
                target.copy_(early)


def rewind_full(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rewind the *whole* state of ``model`` to ``state`` (a ``state_dict`` saved early in
    training): every weight and bias (into ``<name>_orig`` where pruned, so masks stay), every
    BatchNorm's γ/β and running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``), as the paper's code does with ``model.load_state_dict``. Masks in
    ``state`` are ignored (the current masks are kept); a key of ``model`` missing from
    ``state`` or a shape that differs is an error."""
    own = model.state_dict()
    with torch.no_grad():
        for key, value in own.items():
            if key.endswith("_mask"):
                continue
            source = key[: -len("_orig")] if key.endswith("_orig") else key
            early = state.get(source, state.get(key))
            if early is None:
                raise PruningError(f"cannot rewind: the early state has no {source!r}")
            if tuple(early.shape) != tuple(value.shape):
                raise PruningError(f"cannot rewind {source}: early shape {tuple(early.shape)}, "
                                   f"model {tuple(value.shape)} (another model's weights?)")
            value.copy_(early)


def layer_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copies of every prunable layer's effective weight and bias (for later rewinding)."""
    weights, biases = {}, {}
    for name, module in prunable_layers(model):
        weights[name] = effective_weight(module).detach().clone()
        bias = effective_parameter(module, "bias")
        if bias is not None:
            biases[name] = bias.detach().clone()
    return weights, biases


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    name: str
    kind: str  # "Linear" or "Conv2d"
    shape: tuple[int, ...]
    n_weights: int
    n_zero: int

    @property
    def sparsity(self) -> float:
        return self.n_zero / max(self.n_weights, 1)


def sparsity_report(model: nn.Module) -> list[LayerSparsity]:
    """Zeros of each prunable layer's effective weight (mask zeros and exact zeros alike)."""
    return [
        LayerSparsity(name, type(module).__name__, tuple(weight.shape), weight.numel(),
                      int((weight == 0).sum()))
        for name, module in prunable_layers(model)
        for weight in [effective_weight(module).detach()]
    ]


def scoped_sparsity(model: nn.Module, layers: str = "all") -> float:
    """Fraction of zero effective weights over the layers in scope ``layers``."""
    names = {name for name, _ in scoped_layers(model, layers)}
    return overall_sparsity([r for r in sparsity_report(model) if r.name in names])


def overall_sparsity(report: list[LayerSparsity]) -> float:
    return sum(r.n_zero for r in report) / max(sum(r.n_weights for r in report), 1)


def format_report(report: list[LayerSparsity]) -> str:
    """A plain-text table of the per-layer sparsity report."""
    lines = [f"{'layer':<12} {'kind':<7} {'shape':<18} {'weights':>9} {'zeros':>9} {'sparsity':>9}"]
    for r in report:
        lines.append(f"{r.name:<12} {r.kind:<7} {str(r.shape):<18} {r.n_weights:>9} "
                     f"{r.n_zero:>9} {r.sparsity:>9.4f}")
    total = sum(r.n_weights for r in report)
    lines.append(f"{'total':<12} {'':<7} {'':<18} {total:>9} "
                 f"{sum(r.n_zero for r in report):>9} {overall_sparsity(report):>9.4f}")
    return "\n".join(lines)
