"""Structured compaction: physically shrink a pruned model without changing its function.

First every BatchNorm that directly follows a Linear / Conv2d is folded into it (eval-mode
statistics; ``s = γ / sqrt(var + eps)``, ``W' = s·W`` per output unit, ``b' = s·(b − μ) + β``,
computed in float64), so a channel removed by a structured method (filter, bias, γ and β all
zero) becomes a unit with no incoming weight and bias 0. Then, after structured or
unstructured pruning, the hidden units ``k`` of an affine layer (Linear row or Conv output
channel) followed by a ReLU can be removed exactly:

- no outgoing weight: every weight of the next affine layer that reads ``k`` is zero;
- no incoming weight: row / filter ``k`` is all zero, so the unit outputs the constant
  ``c = relu(b_k)``. If ``c = 0`` it is removed; if ``c > 0`` and the next affine layer is a
  Linear (possibly after a Flatten) its constant contribution ``W_next[:, k] · c`` is folded into
  the next bias first. (Before a Conv with zero padding a constant channel is not constant at
  the borders, so it is kept.)

Max / average pooling may lie between the ReLU and the next layer (they act per channel and
keep a zero channel zero; constant channels are then not folded). The next layer's inputs are
sliced: Conv2d input channels, Linear columns (one block of H·W columns per channel after a
Flatten). Removals repeat until nothing changes. BatchNorms that do not follow an affine layer,
and grouped convolutions, are left alone. Outputs agree with the masked model to float32
rounding (the tests check 1e-5 absolute on logits of order 1–10).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.models import flat_layers
from pruning.sparsity import clone_model, make_permanent


def _ungrouped_affine(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _fold(layer: nn.Module, batch_norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` computing ``batch_norm(layer(x))`` in eval mode."""
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    n = batch_norm.num_features
    gamma = f64(batch_norm.weight) if batch_norm.affine else torch.ones(n, dtype=torch.float64)
    beta = f64(batch_norm.bias) if batch_norm.affine else torch.zeros(n, dtype=torch.float64)
    scale = gamma / torch.sqrt(f64(batch_norm.running_var) + batch_norm.eps)
    bias = f64(layer.bias) if layer.bias is not None else torch.zeros(n, dtype=torch.float64)
    weight = f64(layer.weight) * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    folded = copy.deepcopy(layer)
    dtype = layer.weight.dtype
    folded.weight = nn.Parameter(weight.to(dtype))
    folded.bias = nn.Parameter(((bias - f64(batch_norm.running_mean)) * scale + beta).to(dtype))
    return folded


def fold_batch_norms(layers: list[nn.Module]) -> tuple[list[nn.Module], int]:
    """Fold every BatchNorm directly after an ungrouped Linear / Conv2d (with running
    statistics and matching width) into it; returns the new layer list and how many folded."""
    result: list[nn.Module] = []
    folded = 0
    for layer in layers:
        previous = result[-1] if result else None
        if (isinstance(layer, nn.modules.batchnorm._BatchNorm) and previous is not None
                and _ungrouped_affine(previous) and layer.running_mean is not None
                and layer.num_features == previous.weight.shape[0]):
            result[-1] = _fold(previous, layer)
            folded += 1
        else:
            result.append(layer)
    return result, folded


def _pairs(layers: list[nn.Module]) -> list[tuple[int, int, bool, bool]]:
    """``(i, j, flatten_between, pooled)`` for affine layer i → ReLU → [pools] → [Flatten] →
    affine layer j, where j is a Conv2d only if i is one and no Flatten lies between them."""
    pairs = []
    for i, layer in enumerate(layers[:-2]):
        if not _ungrouped_affine(layer) or not isinstance(layers[i + 1], nn.ReLU):
            continue
        j = i + 2
        while j < len(layers) and isinstance(layers[j], _POOLS):
            j += 1
        pooled = j > i + 2
        if j >= len(layers):
            continue
        flatten = isinstance(layers[j], nn.Flatten)
        j += int(flatten)
        if j >= len(layers) or not _ungrouped_affine(layers[j]):
            continue
        if isinstance(layers[j], nn.Conv2d) and (flatten or not isinstance(layer, nn.Conv2d)):
            continue
        if isinstance(layers[j], nn.Linear) and isinstance(layer, nn.Conv2d) and not flatten:
            continue
        pairs.append((i, j, flatten, pooled))
    return pairs


def _input_slices(first: nn.Module, second: nn.Module, flatten: bool) -> torch.Tensor:
    """For each unit of ``first``, the weights of ``second`` that read it.

    Returns (n_units, out_second, k) with k = 1 (Linear → Linear), kh·kw (Conv → Conv) or
    H·W (Conv → Flatten → Linear, channel-major as Flatten orders it).
    """
    weight = second.weight.detach()
    n_units = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    if isinstance(second, nn.Conv2d):
        return weight.transpose(0, 1).reshape(n_units, weight.shape[0], -1)
    per_unit = weight.shape[1] // n_units
    if per_unit * n_units != weight.shape[1]:
        raise PruningError(f"cannot match {n_units} units to a Linear of {weight.shape[1]} inputs")
    return weight.reshape(weight.shape[0], n_units, per_unit).transpose(0, 1)


def _shrink(first: nn.Module, second: nn.Module, keep: torch.Tensor, flatten: bool):
    """New (first, second) keeping only the units where ``keep`` (bool (n_units,)) is True."""
    idx = keep.nonzero().flatten()
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            new_first = nn.Linear(first.in_features, len(idx), bias=first.bias is not None)
        else:
            new_first = nn.Conv2d(first.in_channels, len(idx), first.kernel_size, first.stride,
                                  first.padding, first.dilation, bias=first.bias is not None)
        new_first.weight = nn.Parameter(first.weight.detach()[idx].clone())
        if first.bias is not None:
            new_first.bias = nn.Parameter(first.bias.detach()[idx].clone())
        slices = _input_slices(first, second, flatten)[idx]  # (kept, out, k)
        if isinstance(second, nn.Conv2d):
            new_second = nn.Conv2d(len(idx), second.out_channels, second.kernel_size,
                                   second.stride, second.padding, second.dilation,
                                   bias=second.bias is not None)
            weight = slices.transpose(0, 1).reshape(second.out_channels, len(idx),
                                                    *second.kernel_size)
        else:
            new_second = nn.Linear(len(idx) * slices.shape[2], second.out_features,
                                   bias=second.bias is not None)
            weight = slices.transpose(0, 1).reshape(second.out_features, -1)
        new_second.weight = nn.Parameter(weight.clone())
        if second.bias is not None:
            new_second.bias = nn.Parameter(second.bias.detach().clone())
    return new_first.to(first.weight.dtype), new_second.to(second.weight.dtype)


def _compact_pair(first: nn.Module, second: nn.Module, flatten: bool, pooled: bool):
    """One pass over the units between ``first`` and ``second``; returns the new pair and how
    many units were removed. Constant units are folded only into a Linear with no pooling
    in between (a pool or a padded conv does not see a constant channel as constant)."""
    n_units = first.weight.shape[0]
    outgoing = _input_slices(first, second, flatten).flatten(1).ne(0).any(1)
    incoming = first.weight.detach().flatten(1).ne(0).any(1)
    bias = first.bias.detach() if first.bias is not None else first.weight.new_zeros(n_units)
    constant = torch.relu(bias)
    foldable = isinstance(second, nn.Linear) and not pooled
    dead_constant = ~incoming & ((constant == 0) | foldable)
    keep = outgoing & ~dead_constant
    if bool(keep.all()):
        return first, second, 0
    if foldable and second.bias is not None:
        slices = _input_slices(first, second, flatten)  # (n_units, out, k)
        fold = (~incoming & (constant > 0)).to(slices.dtype) * constant
        with torch.no_grad():
            second.bias += torch.einsum("uok,u->o", slices, fold)
    elif foldable and bool((~incoming & (constant > 0) & outgoing).any()):
        keep = keep | (~incoming & (constant > 0) & outgoing)  # no bias to fold into
    inert = not bool(keep.any())
    if inert:
        keep[0] = True  # every layer keeps a shape: one unit, silenced below
    new_first, new_second = _shrink(first, second, keep, flatten)
    if inert:
        with torch.no_grad():
            new_first.weight.zero_()
            if new_first.bias is not None:
                new_first.bias.zero_()
    return new_first, new_second, int((~keep).sum())


def compact(model: nn.Module) -> tuple[nn.Sequential, dict[str, int]]:
    """A copy of ``model`` (an ``nn.Sequential``) in eval mode with pruning made permanent,
    BatchNorms folded into the preceding affine layers, and dead hidden units removed.

    Returns the new model and, per affine layer index *of the returned model*, how many units of
    its output were removed. The function is unchanged up to float rounding (folded biases and
    BatchNorms).
    """
    if not isinstance(model, nn.Sequential):
        raise PruningError(f"compaction needs an nn.Sequential model, got {type(model).__name__}")
    model = clone_model(model)
    make_permanent(model)
    layers, _ = fold_batch_norms(flat_layers(model))
    removed: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for i, j, flatten, pooled in _pairs(layers):
            layers[i], layers[j], n_removed = _compact_pair(layers[i], layers[j], flatten, pooled)
            if n_removed:
                removed[str(i)] = removed.get(str(i), 0) + n_removed
                changed = True
    return nn.Sequential(*layers).eval(), removed
