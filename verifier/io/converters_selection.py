"""Conversions of selection and discrete operators: ArgMax (alone, or with OneHot as the one-hot
of the maximum), OneHot, Equal, Cast to integer or boolean types, and ScatterND with constant
indices (a rearrangement of data and updates), registered in ``verifier.ops.registry``.

onnx2torch has no OneHot; ``add_onnx2torch_converters`` gives it one (called by
``verifier.io.onnx.load_onnx`` before converting, so that importing the verifier does not
import onnx2torch).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..graph import Node
from ..ops.discrete import ArgMax, Equal, IsMax, OneHot, Step, Trunc
from ..ops.registry import Call, register
from ..ops.shape import Concat, Rearrange
from .convert import Ref


class OnnxOneHot(nn.Module):
    """ONNX OneHot (opset 9 / 11): ``indices`` (any shape), ``depth`` (scalar), ``values``
    ``(off, on)``; the classes along ``axis`` of the output (rank + 1)."""

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = int(axis)

    def forward(self, indices: Tensor, depth: Tensor, values: Tensor) -> Tensor:
        n = int(depth.reshape(-1)[0])
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + n, index)
        hit = index.unsqueeze(-1) == torch.arange(n, device=indices.device)   # out of range: no hit
        off, on = values.reshape(-1)[0], values.reshape(-1)[1]
        return torch.where(hit, on, off).movedim(-1, self.axis % (indices.dim() + 1))


def add_onnx2torch_converters() -> None:
    """Give onnx2torch a OneHot converter, and a Clip converter that reads an empty optional
    input name (``Clip(x, min, "")``, as cctsdb_yolo writes it) as an absent limit where
    onnx2torch's looks the empty name up and fails. Once; idempotent."""
    from onnx import defs
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value, onnx_mapping_from_node

    if OperationDescription(defs.ONNX_DOMAIN, "OneHot", 11) in _CONVERTER_REGISTRY:
        return

    def convert(node, graph):
        return OperationConverterResult(torch_module=OnnxOneHot(node.attributes.get("axis", -1)),
                                        onnx_mapping=onnx_mapping_from_node(node=node))
    for version in (9, 11):
        add_converter(operation_type="OneHot", version=version)(convert)

    def clip(node, graph):
        limits = []
        for name in (list(node.input_values[1:3]) + [None, None])[:2]:
            try:
                limits.append(float(get_const_value(name, graph)) if name else None)
            except KeyError:
                raise NotImplementedError("Clip with limits that are not constants is not supported") from None
        return OperationConverterResult(torch_module=_onnx_clip(*limits),
                                        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],),
                                                                 outputs=node.output_values))
    for version in (11, 12, 13):
        _CONVERTER_REGISTRY[OperationDescription(defs.ONNX_DOMAIN, "Clip", version)] = clip


def _onnx_clip(low, high) -> nn.Module:
    """onnx2torch's own choice of module (ReLU for Clip(0), ReLU6, Identity, else OnnxClip)."""
    from onnx2torch.node_converters.clip import _create_torch_module
    return _create_torch_module(min_val=low, max_val=high)


def _tensor_dim(builder, ref: Ref, axis: int, rank: int) -> int:
    """The dim of the verifier's (N, *shape) tensor that is ``axis`` of a source layout of
    ``rank`` dims (the leading 1 of a batched layout is N itself)."""
    axis %= rank
    if ref.batched and axis == 0:
        raise builder.fail("an operation along the batch dimension")
    return axis if ref.batched else axis + 1


def convert_argmax(builder, call: Call) -> Ref:
    """ArgMax along an axis: the index as a float (ArgMin: of -x)."""
    ref = call.refs[0]
    if len(set(call.refs)) != 1:
        raise builder.fail("ArgMax takes one perturbed input")
    kind = call.kind
    if getattr(kind, "extremum_function", torch.argmax) is torch.argmin:
        ref = builder.elementwise_affine(lambda x: -x, ref)
    layout = builder.layout(ref)
    dim = _tensor_dim(builder, ref, getattr(kind, "axis", 0), len(layout))
    op = ArgMax(dim - 1, getattr(kind, "keepdims", True), getattr(kind, "select_last_index", False))
    shape = tuple(op.forward(torch.zeros(1, *builder.nodes[ref.index].shape)).shape[1:])
    return Ref(builder.add(op, (ref,), shape), ref.batched)


def convert_one_hot(builder, call: Call) -> Ref:
    """OneHot of a perturbed index; of an ArgMax over as many entries as classes, the one-hot of
    the maximum (``IsMax``, tighter: it knows which entries can win) moved to OneHot's axis."""
    ref = call.refs[0]
    if len(set(call.refs)) != 1 or call.args[0] is not ref:
        raise builder.fail("OneHot with a perturbed depth or values is not supported")
    depth = int(torch.as_tensor(call.args[1]).reshape(-1)[0])
    values = torch.as_tensor(call.args[2]).reshape(-1).double()
    off, on = float(values[0]), float(values[1])
    rank = len(builder.layout(ref)) + 1
    dim = _tensor_dim(builder, ref, call.kind.axis, rank)
    source: Node = builder.nodes[ref.index]
    if isinstance(source.op, ArgMax) and not source.op.keepdims and \
            builder.nodes[source.inputs[0]].shape[source.op.axis] == depth:
        scores = Ref(source.inputs[0], ref.batched)
        hot = builder.unary(IsMax(source.op.axis, source.op.select_last), scores)
        lead = 0 if ref.batched else 1   # layout axis = tensor dim - lead
        if source.op.axis + 1 != dim:
            hot = builder.rearrange(lambda x: x.movedim(source.op.axis + 1 - lead, dim - lead), hot)
        if (off, on) != (0.0, 1.0):
            hot = builder.elementwise_affine(lambda x: off + (on - off) * x, hot)
        return hot
    op = OneHot(depth, dim, off, on)
    shape = tuple(op.forward(torch.zeros(1, *source.shape)).shape[1:])
    return Ref(builder.add(op, (ref,), shape), ref.batched)


def convert_equal(builder, call: Call) -> Ref:
    """Equal of two perturbed values, or of one and a constant."""
    fn = getattr(call.kind, "compare_function", call.kind)
    if fn not in (torch.eq, "eq") and getattr(call.kind, "__name__", None) != "eq":
        raise builder.fail("comparisons other than Equal are supported on constants only")
    a, b = call.args[0], call.args[1]
    if isinstance(a, Ref) and isinstance(b, Ref):
        from .converters_nonlinear import _binary
        return _binary(builder, Equal(), [a, b])
    ref, other = (a, b) if isinstance(a, Ref) else (b, a)
    other = torch.as_tensor(other)
    out_layout = tuple(torch.broadcast_shapes(builder.layout(ref), tuple(other.shape)))
    if out_layout != builder.layout(ref):
        ref = builder.rearrange(lambda x: x.expand(out_layout), ref)
    other = other.expand(out_layout)
    other = other[0] if ref.batched else other
    return builder.unary(Equal(other.to(builder.device, builder.dtype).clone()), ref)


def _integral(builder, ref: Ref) -> bool:
    """Whether every value of the node is an integer: a discrete op (integer outputs) seen
    through rearrangements that insert integer constants only."""
    node = builder.nodes[ref.index]
    while isinstance(node.op, Rearrange):
        if node.op.fill is not None and not bool((node.op.fill == node.op.fill.round()).all()):
            return False
        node = builder.nodes[node.inputs[0]]
    op = node.op
    if isinstance(op, OneHot):
        return float(op.on).is_integer() and float(op.off).is_integer()
    return isinstance(op, Step)


def convert_cast(builder, call: Call) -> Ref:
    """Cast of a perturbed value: to a float type a copy, to an integer type truncation toward
    zero (a copy of integer values), to bool ``x != 0``."""
    ref = call.refs[0]
    target = getattr(call.kind, "torch_dtype", None)
    if target is None or target.is_floating_point:
        return builder.rearrange(call.fn, ref)
    if target == torch.bool:
        zero = builder.unary(Equal(torch.zeros((), device=builder.device, dtype=builder.dtype)), ref)
        return builder.elementwise_affine(lambda x: 1 - x, zero)
    if _integral(builder, ref):
        return ref
    return builder.unary(Trunc(), ref)


def convert_scatter_nd(builder, call: Call) -> Ref:
    """ScatterND(data, indices, updates) with constant indices moves entries of data and
    updates: one rearrangement (of the two concatenated where both are perturbed)."""
    data, indices, updates = call.args[:3]
    if isinstance(indices, Ref):
        raise builder.fail("ScatterND with indices that depend on the input is not supported")
    if not (isinstance(data, Ref) and isinstance(updates, Ref)):
        return builder.rearrange(call.fn, call.refs[0])
    layouts = [builder.layout(r) for r in (data, updates)]
    sizes = [builder.nodes[r.index].numel for r in (data, updates)]
    flat = [builder.unbatched(builder.rearrange(lambda x: x.reshape(-1), r)) for r in (data, updates)]
    flat = [builder.rearrange(lambda x: x.reshape(-1), r) for r in flat]
    joined = Ref(builder.add(Concat(0, [None, None], sizes), tuple(flat), (sum(sizes),)), False)
    scatter = lambda z: call.kind(z[:sizes[0]].reshape(layouts[0]), indices.to(z.device),
                                  z[sizes[0]:].reshape(layouts[1]))
    out = builder.rearrange(scatter, joined)
    if data.batched and not out.batched:   # back to the data's layout: (1, *shape) as N
        shape = builder.nodes[out.index].shape
        out = Ref(builder.add(Rearrange(torch.arange(builder.nodes[out.index].numel), shape, shape[1:]), (out,),
                              shape[1:]), True)
    return out


def register_selection() -> None:
    register(convert=convert_argmax, onnx=["ArgMax", "ArgMin"], modules=["OnnxArgExtremumOld", "OnnxArgExtremum"])
    register(convert=convert_one_hot, onnx=["OneHot"], modules=[OnnxOneHot])
    register(convert=convert_equal, many_inputs=True, onnx=["Equal"], modules=["OnnxCompare"],
             functions=[torch.eq, "eq"])
    register(convert=convert_cast, onnx=["Cast"], modules=["OnnxCast"])
    register(convert=convert_scatter_nd, many_inputs=True, onnx=["ScatterND"], modules=["OnnxScatterND"])


register_selection()
