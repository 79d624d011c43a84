"""Hand-over to verifiers: ONNX written directly with ``onnx.helper``, and VNN-LIB specs.

Why not ``torch.onnx.export``: in torch 2.14 the default (dynamo) exporter needs
``onnxscript``, which the project does not depend on, and the TorchScript exporter
(``dynamo=False``) is deprecated. The zoo's layers map one-to-one onto ONNX operators, so writing
the graph ourselves is short, dependency-free, and keeps the exported graph exactly the one the
verifier expects:

    Normalize → Sub, Div     Flatten → Flatten(axis=1)   Linear → Gemm(transB=1)
    Conv2d → Conv            ReLU → Relu                 BatchNorm1d/2d → BatchNormalization
    AvgPool2d → AveragePool  MaxPool2d → MaxPool

The input is ``input`` of shape ``(N, C, H, W)`` with ``N`` symbolic; the output ``output`` is
``(N, n_classes)``. Weights are the effective (masked) ones, so the zeros are in the file.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pruning.errors import PruningError
from pruning.models import Normalize, effective_weight, flat_layers

OPSET = 13


class _GraphWriter:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counter = 0

    def constant(self, name: str, value: torch.Tensor) -> str:
        array = value.detach().cpu().to(torch.float32).numpy()
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs) -> str:
        self.counter += 1
        output = f"{prefix}_{op.lower()}_{self.counter}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _emit(writer: _GraphWriter, layer: nn.Module, x: str, prefix: str) -> str:
    if isinstance(layer, Normalize):
        x = writer.node("Sub", [x, writer.constant(f"{prefix}.mean", layer.mean)], prefix)
        return writer.node("Div", [x, writer.constant(f"{prefix}.std", layer.std)], prefix)
    if isinstance(layer, nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise PruningError(f"layer {prefix}: only Flatten(start_dim=1, end_dim=-1) exports")
        return writer.node("Flatten", [x], prefix, axis=1)
    if isinstance(layer, nn.ReLU):
        return writer.node("Relu", [x], prefix)
    if isinstance(layer, nn.Linear):
        inputs = [x, writer.constant(f"{prefix}.weight", effective_weight(layer))]
        if layer.bias is not None:
            inputs.append(writer.constant(f"{prefix}.bias", layer.bias))
        return writer.node("Gemm", inputs, prefix, transB=1)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise PruningError(f"layer {prefix}: only explicit zero padding exports")
        inputs = [x, writer.constant(f"{prefix}.weight", effective_weight(layer))]
        if layer.bias is not None:
            inputs.append(writer.constant(f"{prefix}.bias", layer.bias))
        pads = _pair(layer.padding)
        return writer.node("Conv", inputs, prefix, kernel_shape=_pair(layer.kernel_size),
                           strides=_pair(layer.stride), pads=pads + pads,
                           dilations=_pair(layer.dilation), group=layer.groups)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = layer.num_features
        scale = layer.weight if layer.affine else torch.ones(n)
        shift = layer.bias if layer.affine else torch.zeros(n)
        inputs = [x] + [writer.constant(f"{prefix}.{key}", value) for key, value in
                        (("scale", scale), ("shift", shift), ("running_mean", layer.running_mean),
                         ("running_var", layer.running_var))]
        return writer.node("BatchNormalization", inputs, prefix, epsilon=layer.eps)
    if isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d)):
        stride = layer.stride if layer.stride is not None else layer.kernel_size
        pads = _pair(layer.padding)
        attrs = dict(kernel_shape=_pair(layer.kernel_size), strides=_pair(stride),
                     pads=pads + pads, ceil_mode=int(layer.ceil_mode))
        if isinstance(layer, nn.AvgPool2d):
            if layer.divisor_override is not None:
                raise PruningError(f"layer {prefix}: AvgPool2d divisor_override does not export")
            return writer.node("AveragePool", [x], prefix,
                               count_include_pad=int(layer.count_include_pad), **attrs)
        if _pair(layer.dilation) != [1, 1]:
            raise PruningError(f"layer {prefix}: dilated MaxPool2d does not export")
        return writer.node("MaxPool", [x], prefix, **attrs)
    raise PruningError(f"layer {prefix} ({type(layer).__name__}) has no ONNX export")


def to_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The ONNX graph of ``model`` (an ``nn.Sequential`` of zoo layers).

    input_shape: (C, H, W) (or (F,)) without the batch dimension.
    """
    writer = _GraphWriter()
    x = "input"
    for index, layer in enumerate(flat_layers(model)):
        x = _emit(writer, layer, x, f"l{index}")
    with torch.no_grad():
        was_training = model.training
        model.eval()
        probe = torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype,
                            device=next(model.parameters()).device)
        n_out = model(probe).shape[1]
        model.train(was_training)
    writer.nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        writer.nodes, "certiprune",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", n_out])],
        writer.initializers,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="certiprune")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    return onnx_model


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Write ``to_onnx(model, input_shape)`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(model, input_shape), str(path))
    return path


def _number(value: float) -> str:
    text = repr(float(value))
    if "e" in text or "inf" in text or "nan" in text:
        if not math.isfinite(value):
            raise PruningError(f"non-finite bound {value} in a VNN-LIB specification")
        text = f"{value:.17f}".rstrip("0")
        text = text + "0" if text.endswith(".") else text
    return text


def vnnlib_robustness(
    image: torch.Tensor, label: int, eps: float, n_classes: int,
    lower: float = 0.0, upper: float = 1.0, comment: str = "",
) -> str:
    """The VNN-LIB text of L∞ robustness of ``image`` (any shape, flattened in C-order as the
    ONNX input ``X_i``) at radius ``eps``, with the box clipped to ``[lower, upper]``.

    The output part asserts the counterexample condition in VNN-COMP form: a disjunction over
    every wrong class ``j`` of ``(<= Y_label Y_j)``; the property holds iff it is unsat.
    """
    if not 0 <= label < n_classes:
        raise PruningError(f"label {label} outside 0..{n_classes - 1}")
    values = image.detach().flatten().to(torch.float64).cpu().tolist()
    lines = [f"; {comment}" if comment else "; L-inf robustness property (certiprune)",
             f"; label {label}, eps {eps!r}, inputs clipped to [{lower!r}, {upper!r}]", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(len(values))]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_classes)]
    lines += ["", "; Input constraints:"]
    for i, value in enumerate(values):
        lines.append(f"(assert (<= X_{i} {_number(min(value + eps, upper))}))")
        lines.append(f"(assert (>= X_{i} {_number(max(value - eps, lower))}))")
    lines += ["", "; Output constraints (a counterexample makes a wrong class at least as large):",
              "(assert (or"]
    lines += [f"\t(and (<= Y_{label} Y_{j}))" for j in range(n_classes) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write_vnnlib(path: Path, image: torch.Tensor, label: int, eps: float, n_classes: int,
                 lower: float = 0.0, upper: float = 1.0, comment: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(vnnlib_robustness(image, label, eps, n_classes, lower, upper, comment))
    return path
