"""The model zoo: ReLU MLPs and small CNNs of the kind verification papers use.

Every model is an ``nn.Sequential`` of ``Normalize``, ``nn.Flatten``, ``nn.Linear``,
``nn.Conv2d``, ``nn.BatchNorm1d/2d`` and ``nn.ReLU`` — the modules the verifier bounds, that
torch.fx traces, and that ``pruning.export`` writes as ONNX (Sub/Div, Flatten, Gemm, Conv,
BatchNormalization, Relu). Inputs are pixels in [0, 1] of shape ``(N, C, H, W)``; outputs are
logits ``(N, n_classes)``.

Zoo (``build_model(name, info)``):

- ``mlp2x256``, ``mlp4x256``, ``mlp6x256``: VNN-COMP mnistfc shapes; ``mlp3x100``.
- ``cnn_base``, ``cnn_wide``, ``cnn_deep``: the oval21 ``cifar_base/wide/deep_kw`` shapes
  (conv k4 s2 p1 layers, then ``fc 100`` and the classifier); on 28×28 greyscale inputs the
  same layers give the greyscale variants (spatial size 28 → 14 → 7).
- BatchNorm models (the paper's CIFAR-10 models; BatchNorm after every conv, before its ReLU):

  ==================  =====================================================  =================
  name                convs (channels kernel/stride/padding)                 fc (on 32×32)
  ==================  =====================================================  =================
  ``cnn_base_bn``     8 k4s2p1, 16 k4s2p1 (``cnn_base`` + BN)                 1024→100→10
  ``cifar_model``     the same layers as ``cnn_base_bn``, under the paper's   1024→100→10
                      name
  ``cifar_base``      32 k5s2p2, 128 k4s2p1                                  8192→250→10
  ``deep``            32 k3s1p1, 64 k4s2p1, 64 k3s1p1, 128 k4s2p1,            8192→100→10
                      128 k3s1p1
  ``cnn_7layer_bn``   64, 64, 128, 128, 128, all k3 p1, strides 1, 1, 2, 1,   32768→512→10,
                      1 (auto_LiRPA / CROWN-IBP's ``cnn_7layer_bn``)          BN1d on the 512
  ==================  =====================================================  =================

  On 28×28 greyscale inputs the same layers give the greyscale variants (the fc input shrinks
  with the spatial size: e.g. ``cifar_base`` 128·7·7 = 6272→250, ``deep`` 128·7·7→100).
  The verifier bounds BatchNorm with its running statistics; ``pruning.export`` writes it as
  BatchNormalization and ``pruning.compact`` can fold it into the conv.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pruning.data import DatasetInfo
from pruning.errors import PruningError


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std``; exports as ONNX Sub then Div.

    mean, std: buffers of shape (1, C, 1, 1).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        return (x - self.mean) / self.std


def mlp(info: DatasetInfo, hidden: tuple[int, ...]) -> nn.Sequential:
    """Normalize, Flatten, then ``Linear+ReLU`` per hidden width and a Linear classifier."""
    c, h, w = info.input_shape
    layers: list[nn.Module] = [Normalize(info.mean, info.std), nn.Flatten()]
    width = c * h * w
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, info.n_classes))
    return nn.Sequential(*layers)


def cnn(
    info: DatasetInfo,
    convs: tuple[tuple[int, int, int, int], ...],
    fc: tuple[int, ...],
    batch_norm: bool = False,
    fc_batch_norm: bool = False,
) -> nn.Sequential:
    """Conv layers ``(out_channels, kernel, stride, padding)`` + ReLU, then Linear layers.

    With ``batch_norm`` a BatchNorm2d follows each conv, with ``fc_batch_norm`` a BatchNorm1d
    each hidden Linear (both before the ReLU).
    """
    c, h, w = info.input_shape
    layers: list[nn.Module] = [Normalize(info.mean, info.std)]
    for out_channels, kernel, stride, padding in convs:
        layers.append(nn.Conv2d(c, out_channels, kernel, stride, padding))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        c = out_channels
        h = (h + 2 * padding - kernel) // stride + 1
        w = (w + 2 * padding - kernel) // stride + 1
        if h < 1 or w < 1:
            raise PruningError(f"input {info.input_shape} is too small for conv stack {convs}")
    layers.append(nn.Flatten())
    width = c * h * w
    for units in fc:
        layers.append(nn.Linear(width, units))
        if fc_batch_norm:
            layers.append(nn.BatchNorm1d(units))
        layers.append(nn.ReLU())
        width = units
    layers.append(nn.Linear(width, info.n_classes))
    return nn.Sequential(*layers)


_K4S2 = (4, 2, 1)
_K3S1 = (3, 1, 1)
_K3S2 = (3, 2, 1)
_K5S2 = (5, 2, 2)

MODELS: dict[str, Callable[[DatasetInfo], nn.Sequential]] = {
    "mlp2x256": lambda info: mlp(info, (256, 256)),
    "mlp4x256": lambda info: mlp(info, (256,) * 4),
    "mlp6x256": lambda info: mlp(info, (256,) * 6),
    "mlp3x100": lambda info: mlp(info, (100,) * 3),
    "cnn_base": lambda info: cnn(info, ((8, *_K4S2), (16, *_K4S2)), (100,)),
    "cnn_wide": lambda info: cnn(info, ((16, *_K4S2), (32, *_K4S2)), (100,)),
    "cnn_deep": lambda info: cnn(
        info, ((8, *_K4S2), (8, *_K3S1), (8, *_K3S1), (8, *_K4S2)), (100,)
    ),
    "cnn_base_bn": lambda info: cnn(info, ((8, *_K4S2), (16, *_K4S2)), (100,), batch_norm=True),
    "cifar_model": lambda info: cnn(info, ((8, *_K4S2), (16, *_K4S2)), (100,), batch_norm=True),
    # The paper's main network (VITA-Group/CertifiedPruning, models/FeedforwardNets.py,
    # cifar_model_deep): 32 k3s1, 64 k4s2, 64 k3s1, 128 k4s2, 128 k4s2 (each + BN), fc 100.
    # The last conv (k4 s2 p1) takes 32x32 -> 4x4 (fc 2048 -> 100) and, in the greyscale
    # variant, 28x28 -> 3x3 (fc 1152 -> 100), as the paper's `greyscale=True`.
    "cifar_model_deep": lambda info: cnn(
        info, ((32, *_K3S1), (64, *_K4S2), (64, *_K3S1), (128, *_K4S2), (128, *_K4S2)), (100,),
        batch_norm=True,
    ),
    "cifar_base": lambda info: cnn(info, ((32, *_K5S2), (128, *_K4S2)), (250,), batch_norm=True),
    "deep": lambda info: cnn(
        info, ((32, *_K3S1), (64, *_K4S2), (64, *_K3S1), (128, *_K4S2), (128, *_K3S1)), (100,),
        batch_norm=True,
    ),
    "cnn_7layer_bn": lambda info: cnn(
        info, ((64, *_K3S1), (64, *_K3S1), (128, *_K3S2), (128, *_K3S1), (128, *_K3S1)), (512,),
        batch_norm=True, fc_batch_norm=True,
    ),
}


def build_model(name: str, info: DatasetInfo) -> nn.Sequential:
    """A freshly initialised zoo model for ``info``'s input shape and classes."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise PruningError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}"
        ) from None
    return builder(info)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` of every Linear and Conv2d, in module order.

    Their ``weight`` is what the pruning methods mask; biases stay dense, as in the paper.
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    ]


LAYER_SCOPES = ("conv", "all")  # which layers unstructured / channel pruning touches


def scoped_layers(model: nn.Module, layers: str = "all") -> list[tuple[str, nn.Module]]:
    """``prunable_layers`` restricted to ``layers``: "all" (every Linear and Conv2d) or "conv"
    (the Conv2d layers only, as the paper's code prunes: VITA-Group/CertifiedPruning
    ``pruner.py`` collects ``nn.Conv2d`` weights only, so the classifier and fc layers stay
    dense). A scope that selects no layer of ``model`` is an error."""
    if layers not in LAYER_SCOPES:
        raise PruningError(f"unknown layer scope {layers!r}; choose one of "
                           f"{', '.join(LAYER_SCOPES)}")
    chosen = [(name, module) for name, module in prunable_layers(model)
              if layers == "all" or isinstance(module, nn.Conv2d)]
    if not chosen:
        raise PruningError(f"layer scope {layers!r} selects no layer of this model (it has no "
                           "Conv2d); use layers = \"all\"")
    return chosen


def flat_layers(model: nn.Module) -> list[nn.Module]:
    """The leaf layers of a (possibly nested) ``nn.Sequential``, in order."""
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in flat_layers(child)]
    return [model]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: ``weight_orig * weight_mask`` when pruned.

    Prune's ``module.weight`` attribute is refreshed only by a forward pass, so after an
    optimiser step it is stale; reading the reparametrisation directly is always current.
    """
    if hasattr(module, "weight_mask"):
        return module.weight_orig * module.weight_mask
    return module.weight
