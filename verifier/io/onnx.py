"""Loading an ONNX file: checks, opset upgrade, onnx2torch conversion, then the bound graph."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import torch

from ..errors import InputFileError, UnsupportedOperatorError
from ..graph import BoundGraph
from ..ops.registry import onnx_supported
from .convert import build_graph

def skip_torchvision_import() -> None:
    """Let onnx2torch load without torchvision, for a process that only verifies.

    onnx2torch imports torchvision at import time, for its NonMaxSuppression and RoiAlign
    converters only; torchvision pulls in torch._dynamo, which makes up half of the start-up of
    every `certiprune verify` (about 1.3 s). Those operators are not registered (``verifier.ops.registry``), so a model
    using them is rejected before conversion and the converters never run. Called by the CLI
    before its first ONNX load (not by the library: a user's own torchvision import must get the
    real package); does nothing if torchvision is already imported."""
    import sys
    import types
    if "torchvision" in sys.modules or "onnx2torch" in sys.modules:
        return

    def unavailable(*args, **kwargs):
        raise UnsupportedOperatorError("torchvision operators are not supported by the verifier")

    package, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.batched_nms = ops.box_convert = ops.roi_align = unavailable
    package.ops, package.__path__ = ops, []
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = package, ops


@dataclass(frozen=True)
class OnnxModel:
    path: str
    graph_module: torch.nn.Module
    input_name: str
    input_layout: tuple[int, ...]   # input shape with a symbolic/zero batch dim set to 1
    batched: bool


def read_onnx(path: str):
    import onnx
    if not os.path.isfile(path):
        raise InputFileError(f"{path}: no such file")
    try:   # .onnx.gz as VNN-COMP distributes some models (like .vnnlib.gz): onnx.load reads a file object
        model = onnx.load(gzip.open(path, "rb") if path.endswith(".gz") else path)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes; gzip BadGzipFile
        raise InputFileError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise InputFileError(f"{path}: not an ONNX model (empty graph)")
    return model


def graph_input(model, path: str) -> tuple[str, tuple[int, ...], bool]:
    """The one non-initializer input: name, shape with the batch dim set to 1, batched flag."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedOperatorError(f"{path}: models with {len(inputs)} inputs are not supported (need 1)")
    dims = inputs[0].type.tensor_type.shape.dim
    raw = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    batched = len(raw) >= 2 and (raw[0] in (None, 0, 1) or isinstance(raw[0], str))
    shape = [1 if (i == 0 and batched) else d for i, d in enumerate(raw)]
    if any(not isinstance(d, int) or d <= 0 for d in shape):
        raise UnsupportedOperatorError(f"{path}: input '{inputs[0].name}' has a non-batch dimension that is "
                                       f"symbolic or zero: {raw}")
    return inputs[0].name, tuple(shape), batched


def load_onnx(path: str) -> OnnxModel:
    import onnx
    import onnx.shape_inference
    import onnx.version_converter
    from onnx2torch import convert

    from .converters_selection import add_onnx2torch_converters
    add_onnx2torch_converters()   # OneHot, which onnx2torch lacks
    model = read_onnx(path)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not onnx_supported(node.op_type):
            raise UnsupportedOperatorError(
                f"{path}: node '{node.name or node.output[0]}': operator {node.op_type} is not supported")
    name, layout, batched = graph_input(model, path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    if opset < 11:
        # onnx2torch lacks converters for some old versions (e.g. Flatten-1); upgrading is exact
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception as exc:
            raise UnsupportedOperatorError(f"{path}: cannot upgrade opset {opset} to 13: {exc}") from None
    try:   # shapes of intermediate values, which some onnx2torch converters read (BatchNorm's rank)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:   # a model whose shapes cannot be inferred converts as it is, or fails below
        pass
    try:
        try:
            gm = convert(model)
        except NotImplementedError:
            # onnx2torch reads some shapes (BatchNorm's rank) that static inference could not
            # find (a Reshape to a computed shape): take them from one onnxruntime run
            gm = convert(_with_runtime_shapes(model, name, layout))
    except NotImplementedError as exc:
        raise UnsupportedOperatorError(f"{path}: {exc}") from None
    except Exception as exc:
        raise InputFileError(f"{path}: conversion failed: {type(exc).__name__}: {exc}") from None
    return OnnxModel(path, gm.eval(), name, layout, batched)


def _with_runtime_shapes(model, input_name: str, layout: tuple[int, ...]):
    """The model with the shape of every intermediate value recorded in its value_info, as
    onnxruntime computes them on a zero input of ``layout`` (float32 inputs only)."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import helper
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = [out for node in probe.graph.node for out in node.output if out and out not in known]
    for out in names:
        probe.graph.output.append(helper.ValueInfoProto(name=out))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(names, {input_name: np.zeros(layout, dtype=np.float32)})
    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    del shaped.graph.value_info[:]
    for out, value in zip(names, values):
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            shaped.graph.value_info.append(helper.make_tensor_value_info(out, elem, list(value.shape)))
    return shaped


def onnx_bound_graph(onnx_model: OnnxModel, device: torch.device, dtype: torch.dtype) -> BoundGraph:
    from ..simplify import simplify
    graph = build_graph(onnx_model.graph_module, onnx_model.input_layout, onnx_model.batched, device, dtype,
                        os.path.basename(onnx_model.path), live_params=False)
    if graph.output_shape == ():   # a scalar output (carvana_unet's pixel count) as VNN-LIB's Y_0: shape (1,)
        from ..graph import Node
        from ..ops import Rearrange
        last = graph.nodes[graph.output]
        scalar = Node(last.name, Rearrange(torch.arange(1), (), (1,)), (graph.output,), (1,), "Reshape")
        graph = BoundGraph(graph.nodes + [scalar], len(graph.nodes))
    return simplify(graph)
