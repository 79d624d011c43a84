"""The networks of the non-linear suite, and their ONNX export.

Three MNIST models, inputs ``(N, 1, 28, 28)`` pixels in [0, 1] with the normalisation inside the
model (ONNX Sub/Div), outputs ``(N, 10)`` logits:

- ``mnist_sigmoid_6x200``: six hidden Linear(200) + Sigmoid layers (the ERAN ``ffnnSIGMOID``
  shape of VNN-COMP 2021's ``eran`` suite);
- ``mnist_tanh_6x100``: six hidden Linear(100) + Tanh layers;
- ``mnist_convmaxpool``: Conv(8, 3x3) ReLU MaxPool(2) Conv(16, 3x3) ReLU MaxPool(2) Linear(10),
  a small network of the kind of VeriVital's ``Convnet_maxpool``.

``pruning.export.to_onnx`` writes the zoo's layers (Relu, MaxPool, Gemm, Conv, ...) but not
Sigmoid / Tanh; ``to_onnx_nonlinear`` exports a copy whose S-shaped layers are ReLU placeholders
and renames those nodes' operator, so the graph is otherwise the pruning layer's own.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import onnx
from torch import nn

from pruning.data import DatasetInfo
from pruning.export import to_onnx
from pruning.models import Normalize, flat_layers

S_SHAPED = {nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh"}


def s_shaped_mlp(info: DatasetInfo, hidden: tuple[int, ...], activation: type[nn.Module]) -> nn.Sequential:
    """Normalize, Flatten, ``Linear + activation`` per hidden width, Linear classifier."""
    c, h, w = info.input_shape
    layers: list[nn.Module] = [Normalize(info.mean, info.std), nn.Flatten()]
    width = c * h * w
    for units in hidden:
        layers += [nn.Linear(width, units), activation()]
        width = units
    layers.append(nn.Linear(width, info.n_classes))
    return nn.Sequential(*layers)


def conv_maxpool(info: DatasetInfo) -> nn.Sequential:
    """28x28 -> conv3 26x26x8 -> pool 13x13x8 -> conv3 11x11x16 -> pool 5x5x16 -> 10."""
    c, h, _ = info.input_shape
    side = ((h - 2) // 2 - 2) // 2
    return nn.Sequential(
        Normalize(info.mean, info.std),
        nn.Conv2d(c, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * side * side, info.n_classes),
    )


@dataclasses.dataclass(frozen=True)
class SuiteModel:
    """One network of the suite: how it is built and trained, and which boxes it is checked on.

    ``eps``: L-inf radii (pixel units) of the properties; ``n_images``: the first test images the
    model classifies correctly.
    """

    name: str
    build: Callable[[DatasetInfo], nn.Sequential]
    epochs: int
    eps: tuple[float, ...]
    n_images: int = 10
    lr: float = 1e-3


SUITE: tuple[SuiteModel, ...] = (
    SuiteModel("mnist_sigmoid_6x200", lambda info: s_shaped_mlp(info, (200,) * 6, nn.Sigmoid),
               epochs=10, eps=(0.012, 0.015), n_images=12),
    SuiteModel("mnist_tanh_6x100", lambda info: s_shaped_mlp(info, (100,) * 6, nn.Tanh),
               epochs=10, eps=(0.012, 0.015), n_images=12),
    # eps from the pilot (README): at 0.03 the root bounds decide most boxes, at 0.05 few
    SuiteModel("mnist_convmaxpool", conv_maxpool, epochs=5, eps=(0.03, 0.05), n_images=10),
)


def suite_model(name: str) -> SuiteModel:
    for entry in SUITE:
        if entry.name == name:
            return entry
    raise KeyError(f"no suite model {name!r}; choose one of {', '.join(m.name for m in SUITE)}")


def to_onnx_nonlinear(model: nn.Sequential, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """``pruning.export.to_onnx`` extended to Sigmoid and Tanh layers (opset 13 ops)."""
    layers = flat_layers(model)
    placeholders = nn.Sequential(*[nn.ReLU() if type(layer) in S_SHAPED else layer for layer in layers])
    proto = to_onnx(placeholders, input_shape)
    for node in proto.graph.node:
        index = int(node.name.split("_", 1)[0][1:])      # nodes are named l<layer index>_<op>_<n>
        op = S_SHAPED.get(type(layers[index]))
        if op is not None:
            assert node.op_type == "Relu", node.name
            node.op_type = op
    onnx.checker.check_model(proto)
    return proto
