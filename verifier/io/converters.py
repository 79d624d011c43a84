"""The built-in conversions from source operators to bound ops, registered in
``verifier.ops.registry`` (the table at the end of this file). Each converter takes the graph
builder (``verifier.io.convert``) and one ``Call`` and returns the ``Ref`` of the value it adds.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import DimensionMismatchError, UnsupportedOperatorError
from ..ops import Concat, Conv2d, ConvTranspose2d, ElementwiseAffine, Linear, MaxPool2d, ReLU, Sigmoid, Sum, Tanh
from ..ops.base import Param
from ..ops.registry import Call, register
from .convert import Ref, _check_finite, _pair, name_of


def linear(builder, weight: Param, bias: Optional[Param], ref: Ref) -> Ref:
    shape = builder.nodes[ref.index].shape
    W = weight()
    if not shape or shape[-1] != W.shape[1]:
        raise DimensionMismatchError(f"{builder.source}: node '{builder.fx_node.name}': input of shape {shape} "
                                     f"does not fit a weight of shape {tuple(W.shape)}")
    _check_finite(builder, W)
    if bias is not None:
        _check_finite(builder, bias())
    out = (*shape[:-1], W.shape[0])
    return Ref(builder.add(Linear(weight, bias), (ref,), out), ref.batched)

def conv(builder, m: nn.Conv2d, ref: Ref) -> Ref:
    shape = builder.nodes[ref.index].shape
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise builder.fail(f"padding {m.padding!r} / mode {m.padding_mode!r} is not supported")
    if len(shape) != 3 or shape[0] != m.in_channels:
        raise DimensionMismatchError(f"{builder.source}: node '{builder.fx_node.name}': Conv2d needs a "
                                     f"({m.in_channels}, H, W) input per sample, got {shape}")
    _check_finite(builder, m.weight)
    if m.bias is not None:
        _check_finite(builder, m.bias)
    op = Conv2d(builder.live(m, "weight"), builder.live(m, "bias"), m.stride, m.padding, m.dilation, m.groups, shape)
    out = tuple(op.forward(torch.zeros(1, *shape, device=builder.device, dtype=builder.dtype)).shape[1:])
    return Ref(builder.add(op, (ref,), out), ref.batched)

def batchnorm(builder, m: nn.modules.batchnorm._BatchNorm, ref: Ref) -> Ref:
    shape = builder.nodes[ref.index].shape
    if m.running_mean is None or not ref.batched:
        raise builder.fail("BatchNorm needs running statistics and a batched (N, C, ...) input")
    if not shape or shape[0] != m.num_features:
        raise DimensionMismatchError(f"{builder.source}: node '{builder.fx_node.name}': BatchNorm of "
                                     f"{m.num_features} channels applied to a per-sample shape {shape}")
    for t in (m.weight, m.bias, m.running_mean, m.running_var):
        if t is not None:
            _check_finite(builder, t)
    view = (-1,) + (1,) * (len(shape) - 1)
    device, dtype = builder.device, builder.dtype
    if not builder.live_params:
        with torch.no_grad():
            f64 = lambda t: t.detach().to(torch.float64)
            w = f64(m.weight) if m.weight is not None else torch.ones_like(f64(m.running_var))
            b = f64(m.bias) if m.bias is not None else torch.zeros_like(f64(m.running_mean))
            s = w / torch.sqrt(f64(m.running_var) + m.eps)
            op = ElementwiseAffine(builder.const(s.view(view)), builder.const((b - f64(m.running_mean) * s).view(view)))
        return Ref(builder.add(op, (ref,), shape), ref.batched)

    weight, bias = builder.live(m, "weight"), builder.live(m, "bias")   # pruned gamma/beta too

    def scale():
        var = m.running_var.to(device, dtype)
        w = weight() if weight is not None else torch.ones_like(var)
        return (w / torch.sqrt(var + m.eps)).view(view)

    def shift():
        mean = m.running_mean.to(device, dtype)
        b = bias() if bias is not None else torch.zeros_like(mean)
        return b.view(view) - mean.view(view) * scale()
    return Ref(builder.add(ElementwiseAffine(scale, shift), (ref,), shape), ref.batched)

def avgpool(builder, m: nn.AvgPool2d, ref: Ref) -> Ref:
    """Average pooling is a depthwise convolution with weight 1/(kh*kw); without
    count_include_pad the border windows are rescaled by an elementwise factor."""
    shape = builder.nodes[ref.index].shape
    if m.ceil_mode or len(shape) != 3:
        raise builder.fail("AveragePool with ceil_mode or a non-(C,H,W) input is not supported")
    k, s, p = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding))
    C = shape[0]
    weight = torch.full((C, 1, *k), 1.0 / (k[0] * k[1]), dtype=builder.dtype, device=builder.device)
    op = Conv2d(builder.const(weight), None, s, p, (1, 1), C, shape)
    out = tuple(op.forward(torch.zeros(1, *shape, device=builder.device, dtype=builder.dtype)).shape[1:])
    conv = Ref(builder.add(op, (ref,), out), ref.batched)
    if m.count_include_pad or p == (0, 0) or m.divisor_override:
        if m.divisor_override:
            raise builder.fail("AveragePool divisor_override is not supported")
        return conv
    counts = F.avg_pool2d(torch.ones(1, 1, *shape[1:], dtype=torch.float64), k, s, p, count_include_pad=True)
    counts = counts / F.avg_pool2d(torch.ones(1, 1, *shape[1:], dtype=torch.float64), k, s, p,
                                   count_include_pad=False)
    scale = (1.0 / counts)[0]
    return Ref(builder.add(ElementwiseAffine(builder.const(scale), builder.const(torch.zeros(()))), (conv,), out),
               ref.batched)

def maxpool(builder, m: nn.MaxPool2d, ref: Ref) -> Ref:
    shape = builder.nodes[ref.index].shape
    if m.ceil_mode or m.return_indices or len(shape) != 3:
        raise builder.fail("MaxPool with ceil_mode, indices or a non-(C,H,W) input is not supported")
    op = MaxPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                   _pair(m.dilation), shape)
    out = tuple(op.forward(torch.zeros(1, *shape, device=builder.device, dtype=builder.dtype)).shape[1:])
    return Ref(builder.add(op, (ref,), out), ref.batched)

def matmul(builder, node: fx.Node, args, ref: Ref) -> Ref:
    left, right = args[0], args[1]
    if isinstance(left, Ref) and isinstance(right, Tensor) and right.dim() == 2:
        W = right.detach().t()
        return linear(builder, builder.const(W), None, ref)
    if isinstance(right, Ref) and isinstance(left, Tensor) and left.dim() == 2:
        if len(builder.layout(ref)) == 1:
            return linear(builder, builder.const(left.detach()), None, ref)
        swap = lambda x: x.transpose(-1, -2)
        moved = builder.rearrange(swap, ref)
        out = linear(builder, builder.const(left.detach()), None, moved)
        return builder.rearrange(swap, out)
    raise builder.fail("MatMul is supported with one constant 2-D operand only")

def gemm(builder, m, args, ref: Ref) -> Ref:
    a, b = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    if not isinstance(a, Ref) or not isinstance(b, Tensor) or m.trans_a or (c is not None and not isinstance(c, Tensor)):
        raise builder.fail("Gemm is supported as x @ B (+ C) with constant B, C")
    W = (b if m.trans_b else b.t()) * m.alpha
    bias = None if c is None else builder.const((c * m.beta).reshape(-1).expand(W.shape[0]).clone())
    return linear(builder, builder.const(W.detach()), bias, ref)

def branch_sum(builder, name: str, kind, args) -> Ref:
    """x + y or x - y of two perturbed branches of equal shape."""
    fn = getattr(kind, "math_op_function", kind)
    if len(args) != 2 or not all(isinstance(a, Ref) for a in args):
        raise builder.fail("only sums and differences of two perturbed branches are supported")
    if fn in (torch.add, operator.add, operator.iadd) or name in ("add", "add_"):
        signs = (1.0, 1.0)
    elif fn in (torch.sub, operator.sub, operator.isub) or name in ("sub", "sub_"):
        signs = (1.0, -1.0)
    else:
        raise builder.fail("products and quotients of two perturbed values are not supported")
    a, b = args
    if a.batched != b.batched:   # the same source layout, the batched one's leading 1 as a dim
        a, b = builder.unbatched(a), builder.unbatched(b)
    if builder.nodes[a.index].shape != builder.nodes[b.index].shape:
        # broadcasting: each branch expanded to the common layout first (a rearrangement)
        try:
            out_layout = tuple(torch.broadcast_shapes(builder.layout(a), builder.layout(b)))
        except RuntimeError:
            raise builder.fail("branches of shapes that do not broadcast cannot be added") from None
        a, b = (r if builder.layout(r) == out_layout else builder.rearrange(lambda x: x.expand(out_layout), r)
                for r in (a, b))
    return Ref(builder.add(Sum(signs), (a, b), builder.nodes[a.index].shape), a.batched)


def concat(builder, node, kind, args, kwargs) -> Ref:
    tensors = args if name_of(kind) == "OnnxConcat" else args[0]
    axis = getattr(kind, "axis", None)
    if axis is None:
        axis = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if len({t.batched for t in tensors if isinstance(t, Ref)}) > 1:   # mixed: all as source layouts
        tensors = [builder.unbatched(t) if isinstance(t, Ref) else t for t in tensors]
    refs = [t for t in tensors if isinstance(t, Ref)]
    batched = refs[0].batched
    layouts = [builder.layout(t) if isinstance(t, Ref) else tuple(t.shape) for t in tensors]
    rank = len(layouts[0])
    axis = axis % rank
    if batched and axis == 0:
        raise builder.fail("concatenation along the batch dimension")
    sample_axis = axis - 1 if batched else axis
    parts = [None if isinstance(t, Ref) else (t[0] if batched else t).detach().to(builder.device, builder.dtype)
             for t in tensors]
    sizes = [layout[axis] for layout in layouts]
    shape = list(builder.nodes[refs[0].index].shape)
    shape[sample_axis] = sum(sizes)
    op = Concat(sample_axis, parts, sizes)
    return Ref(builder.add(op, tuple(refs), tuple(shape)), batched)



# ---- adapters from a Call to the converters above -------------------------------------------
def _one(builder, call: Call) -> Ref:
    if len(set(call.refs)) != 1:
        raise builder.fail("unsupported operator on two perturbed inputs")
    return call.refs[0]


def _activation(op_class):
    def convert(builder, call: Call) -> Ref:
        return builder.unary(op_class(), _one(builder, call))
    convert.__name__ = f"convert_{op_class.__name__.lower()}"
    return convert


def _convert_linear(builder, call: Call) -> Ref:
    return linear(builder, builder.live(call.kind, "weight"), builder.live(call.kind, "bias"), _one(builder, call))


def _convert_module(fn):
    def convert(builder, call: Call) -> Ref:
        return fn(builder, call.kind, _one(builder, call))
    convert.__name__ = f"convert_{fn.__name__}"
    return convert


def _convert_batchnorm(builder, call: Call) -> Ref:
    """Eval-mode BatchNorm: per channel of a batched (N, C, ...) value, with the module's live
    statistics; of a value without a batch dim (its channel dim elsewhere), an elementwise affine
    map found by probing (constant weights only)."""
    ref = _one(builder, call)
    if not ref.batched and not builder.live_params and call.kind.running_mean is not None:
        return builder.elementwise_affine(call.fn, ref)
    return batchnorm(builder, call.kind, ref)


def _convert_matmul(builder, call: Call) -> Ref:
    if len(call.refs) > 1:   # of two perturbed values (attention): the bilinear relaxation
        from .converters_nonlinear import convert_matmul
        return convert_matmul(builder, call)
    ref = _one(builder, call)
    try:
        return matmul(builder, None, call.args, ref)
    except UnsupportedOperatorError:   # a constant of another rank: a linear map all the same
        return builder.linear_map(call.fn, ref)


def _convert_gemm(builder, call: Call) -> Ref:
    return gemm(builder, call.kind, call.args, _one(builder, call))


def _convert_affine(builder, call: Call) -> Ref:
    """Add/Sub/Mul/Div/Neg: by constants an elementwise affine map, of two perturbed branches a
    sum or difference."""
    if len(call.refs) > 1:
        fn = getattr(call.kind, "math_op_function", call.kind)
        product = fn in (torch.mul, torch.div, operator.mul, operator.truediv, operator.imul, operator.itruediv) \
            or call.name in ("mul", "mul_", "div", "div_", "truediv") or getattr(fn, "__name__", "") == "_onnx_div"
        if product:   # of two perturbed values: the bilinear relaxation (verifier.ops.bilinear)
            from .converters_nonlinear import convert_product
            return convert_product(builder, call)
        return branch_sum(builder, call.name, call.kind, call.args)
    ref = call.refs[0]
    with torch.no_grad():
        out_layout = tuple(call.fn(torch.zeros(builder.layout(ref), device=builder.module_device)).shape)
    if out_layout != builder.layout(ref):
        # a constant broadcasts the perturbed value to a larger shape: expand it first (a
        # rearrangement), then the same elementwise map applies to the expanded copy
        ref = builder.rearrange(lambda x: x.expand(out_layout), ref)
    return builder.elementwise_affine(call.fn, ref)


def _convert_concat(builder, call: Call) -> Ref:
    return concat(builder, None, call.kind, call.args, call.kwargs)


def _convert_rearrange(builder, call: Call) -> Ref:
    return builder.rearrange(call.fn, _one(builder, call))


def conv_transpose(builder, m: nn.ConvTranspose2d, ref: Ref) -> Ref:
    shape = builder.nodes[ref.index].shape
    if m.padding_mode != "zeros" or len(shape) != 3 or shape[0] != m.in_channels:
        raise builder.fail(f"ConvTranspose2d needs zero padding and a ({m.in_channels}, H, W) input, got {shape}")
    _check_finite(builder, m.weight)
    op = ConvTranspose2d(builder.live(m, "weight"), builder.live(m, "bias"), m.stride, m.padding, m.output_padding,
                         m.dilation, m.groups)
    out = tuple(op.forward(torch.zeros(1, *shape, device=builder.device, dtype=builder.dtype)).shape[1:])
    return Ref(builder.add(op, (ref,), out), ref.batched)


def conv1d(builder, m: nn.Conv1d, ref: Ref) -> Ref:
    """Conv1d on (..., C, L) (leading dims of size 1) as a Conv2d on (C, 1, L) between two
    reshapes."""
    layout = builder.layout(ref)
    if isinstance(m.padding, str) or m.padding_mode != "zeros" or len(layout) < 2 or layout[-2] != m.in_channels \
            or any(d != 1 for d in layout[:-2]):
        raise builder.fail(f"Conv1d needs zero padding and a ({m.in_channels}, L) input, got layout {layout}")
    _check_finite(builder, m.weight)
    C, L = layout[-2:]
    weight, bias = builder.live(m, "weight"), builder.live(m, "bias")
    lead = (1,) if ref.batched else ()
    planar = builder.rearrange(lambda x: x.reshape(*lead, C, 1, L), ref)
    op = Conv2d(lambda: weight().unsqueeze(2), bias, (1, m.stride[0]), (0, m.padding[0]), (1, m.dilation[0]),
                m.groups, (C, 1, L))
    out = tuple(op.forward(torch.zeros(1, C, 1, L, device=builder.device, dtype=builder.dtype)).shape[1:])
    conv = Ref(builder.add(op, (planar,), out), planar.batched)
    return builder.rearrange(lambda x: x.reshape(*layout[:-2], out[0], out[2]), conv)


def _convert_split(builder, call: Call):
    """Split: one rearrangement per output (a tuple of Refs; getitem picks one)."""
    ref = _one(builder, call)
    with torch.no_grad():
        outputs = call.fn(torch.zeros(builder.layout(ref), device=builder.module_device))
    if not isinstance(outputs, (tuple, list)):
        raise builder.fail("Split did not return a tuple")
    return tuple(builder.rearrange(lambda x, k=k: call.fn(x)[k], ref) for k in range(len(outputs)))


def _convert_linear_map(builder, call: Call) -> Ref:
    return builder.linear_map(call.fn, _one(builder, call))


def _convert_resize(builder, call: Call) -> Ref:
    """Resize: nearest is a rearrangement, linear interpolation an affine map."""
    ref = _one(builder, call)
    try:
        return builder.rearrange(call.fn, ref)
    except UnsupportedOperatorError:
        return builder.linear_map(call.fn, ref)


def register_builtins() -> None:
    """The operators the verifier supports out of the box (ONNX types through onnx2torch's
    modules, PyTorch modules and functions through torch.fx)."""
    register(convert=_activation(ReLU), onnx=["Relu"], modules=[nn.ReLU], functions=[F.relu, torch.relu, "relu", "relu_"])
    register(convert=_activation(Sigmoid), onnx=["Sigmoid"], modules=[nn.Sigmoid],
             functions=[torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, "sigmoid"])
    register(convert=_activation(Tanh), onnx=["Tanh"], modules=[nn.Tanh],
             functions=[torch.tanh, F.tanh, torch.Tensor.tanh, "tanh"])
    register(convert=_convert_linear, modules=[nn.Linear])
    register(convert=_convert_module(conv), onnx=["Conv"], modules=[nn.Conv2d])
    register(convert=_convert_batchnorm, onnx=["BatchNormalization"], modules=[nn.modules.batchnorm._BatchNorm])
    register(convert=_convert_module(avgpool), onnx=["AveragePool"], modules=[nn.AvgPool2d])
    register(convert=_convert_module(maxpool), onnx=["MaxPool"], modules=[nn.MaxPool2d])
    register(convert=_convert_matmul, many_inputs=True, onnx=["MatMul"], modules=["OnnxMatMul", "OnnxMatMulInteger"],
             functions=[torch.matmul, operator.matmul, "matmul"])
    register(convert=_convert_gemm, onnx=["Gemm"], modules=["OnnxGemm"])
    register(convert=_convert_affine, many_inputs=True, onnx=["Add", "Sub", "Mul", "Div", "Neg"],
             modules=["OnnxBinaryMathOperation", "OnnxNeg"],
             functions=[torch.add, torch.sub, torch.mul, torch.div, torch.neg, operator.add, operator.sub,
                        operator.mul, operator.truediv, operator.neg, operator.iadd, operator.isub, operator.imul,
                        operator.itruediv, "add", "sub", "mul", "div", "neg", "truediv", "add_", "sub_", "mul_",
                        "div_"])
    register(convert=_convert_concat, many_inputs=True, onnx=["Concat"], modules=["OnnxConcat"],
             functions=[torch.cat, torch.concat, "cat", "concat", "concatenate"])
    register(convert=_convert_rearrange,
             onnx=["Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Pad", "Identity", "Dropout", "Gather",
                   "Slice", "Expand"],
             modules=[nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, "OnnxReshape", "OnnxTranspose",
                      "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeStaticAxes",
                      "OnnxUnsqueezeDynamicAxes", "OnnxFlatten", "OnnxSlice", "OnnxSliceV9", "OnnxGather",
                      "OnnxPadStatic", "OnnxPadDynamic", "OnnxIdentity", "OnnxCopyIdentity", "OnnxDropoutDynamic",
                      "OnnxExpand"],
             functions=["flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
                        "getitem", "unflatten", "pad", "narrow", "clone", "detach", "float", "to", "expand"])
    register(convert=_convert_module(conv_transpose), onnx=["ConvTranspose"], modules=[nn.ConvTranspose2d])
    register(convert=_convert_module(conv1d), modules=[nn.Conv1d])
    register(convert=_convert_split, onnx=["Split"], modules=["OnnxSplit", "OnnxSplit13"],
             functions=[torch.split, "split", torch.chunk, "chunk", torch.unbind, "unbind"])
    register(convert=_convert_linear_map, onnx=["ReduceSum", "ReduceMean"],
             modules=["OnnxReduceSumStaticAxes", "OnnxReduceSumDynamicAxes", "OnnxReduceStaticAxes"],
             functions=[torch.sum, torch.mean, "sum", "mean"])
    register(convert=_convert_resize, onnx=["Resize", "Upsample"], modules=["OnnxResize", nn.Upsample],
             functions=[F.interpolate, "interpolate"])
    register(convert=_convert_rearrange, onnx=["Cast", "Where", "Tile"], modules=["OnnxCast", "OnnxWhere", "OnnxTile"],
             functions=[torch.where, "where", "tile", "repeat"])
    register(convert=_convert_shape, onnx=["Shape"], modules=["OnnxShape"])
    # folded when they act on constants only (shape plumbing); refused on a perturbed value
    register(convert=_constant_only, onnx=["Constant", "ConstantOfShape", "Equal", "ArgMax", "Range", "Less", "Greater",
                                           "Not", "And", "Or"],
             modules=["OnnxConstantOfShape", "OnnxRange", "OnnxCompare", "OnnxArgExtremumOld", "OnnxArgExtremum"])


def _convert_shape(builder, call: Call):
    """The shape of a perturbed value is a constant (static per sample)."""
    ref = _one(builder, call)
    with torch.no_grad():
        return call.fn(torch.zeros(builder.layout(ref), device=builder.module_device))


def _constant_only(builder, call: Call) -> Ref:
    raise builder.fail("supported on constants only (shape plumbing), not on a value that depends on the input")


register_builtins()


# the nonlinear operators (their converters import this module's table first)
from . import converters_nonlinear  # noqa: E402,F401
from . import converters_selection  # noqa: E402,F401  (ArgMax, OneHot, Equal, Cast, ScatterND)
