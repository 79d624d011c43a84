"""Conversions of the nonlinear operators of VNN-COMP 2022-2025 models to the ops of
``verifier.ops.elementwise``, ``piecewise``, ``bilinear`` and ``softmax``, registered in
``verifier.ops.registry`` (the table at the end)."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bilinear import MatMul, Mul
from ..ops.elementwise import Cos, Exp, Log, Pow, Reciprocal, Sin, Sqrt
from ..ops.piecewise import Clip, Floor, LeakyReLU, Maximum, Minimum, Sign
from ..ops.registry import Call, register
from ..ops.softmax import Softmax
from .convert import Ref


def _unary(op_class):
    def convert(builder, call: Call) -> Ref:
        if len(set(call.refs)) != 1:
            raise builder.fail(f"{op_class.__name__} takes one perturbed input")
        return builder.unary(op_class(), call.refs[0])
    convert.__name__ = f"convert_{op_class.__name__.lower()}"
    return convert


def _constant_arg(builder, value, what: str):
    if isinstance(value, Ref):
        raise builder.fail(f"{what} must be a constant")
    return value


def convert_pow(builder, call: Call) -> Ref:
    """x ** p, p a constant scalar: p = 1 is the identity, others the Pow relaxation."""
    ref = call.refs[0]
    if len(set(call.refs)) != 1 or call.args[0] is not ref:
        raise builder.fail("Pow with a perturbed exponent is not supported")
    exponent = call.args[1] if len(call.args) > 1 else call.kwargs.get("exponent")
    value = _float64(_constant_arg(builder, exponent, "Pow's exponent"))
    if value.numel() != 1 and not bool((value == value.flatten()[0]).all()):
        raise builder.fail("Pow with an exponent that varies across entries is not supported")
    p = float(value.flatten()[0])
    if p == 1.0:
        return builder.elementwise_affine(call.fn, ref)
    return builder.unary(Pow(p), ref)


def convert_leaky_relu(builder, call: Call) -> Ref:
    slope = getattr(call.kind, "negative_slope", None)
    if slope is None:
        slope = call.args[1] if len(call.args) > 1 else call.kwargs.get("negative_slope", 0.01)
    return builder.unary(LeakyReLU(float(slope)), call.refs[0])


def convert_clip(builder, call: Call) -> Ref:
    """Clip / clamp with constant limits (onnx2torch's OnnxClip holds them as arguments or
    attributes; torch.clamp as min / max)."""
    ref = call.refs[0]
    if len(set(call.refs)) != 1:
        raise builder.fail("Clip with perturbed limits is not supported")
    rest = [a for a in call.args[1:]] + [call.kwargs.get(k) for k in ("min", "max") if k in call.kwargs]
    low = getattr(call.kind, "min_val", None)
    high = getattr(call.kind, "max_val", None)
    if low is None and high is None and rest:
        low = rest[0] if len(rest) > 0 else None
        high = rest[1] if len(rest) > 1 else None
    low, high = (None if v is None else _float64(_constant_arg(builder, v, "a Clip limit")) for v in (low, high))
    return builder.unary(_exact_clip(low, high), ref)


def _float64(value) -> torch.Tensor:
    """A constant in float64 (a Python number directly, not through float32)."""
    return value.to(torch.float64) if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)


def _exact_clip(low, high) -> Clip:
    """Clip with its limits kept in float64 (the constructor rounds them to the default dtype,
    float32: a float64 graph would clamp at a limit an ulp of float32 away)."""
    op = Clip(low, high)
    op.low = torch.as_tensor(float("-inf") if low is None else low, dtype=torch.float64)
    op.high = torch.as_tensor(float("inf") if high is None else high, dtype=torch.float64)
    return op


def convert_min_max(builder, call: Call) -> Ref:
    """Max / Min: of a perturbed value and constants a Clip, of two perturbed values the
    Maximum / Minimum relaxation."""
    kind = call.kind
    name = getattr(kind, "_op_type", None) or getattr(kind, "__name__", str(kind))
    is_max = "max" in str(name).lower()
    values = [a for a in call.args]
    refs = [v for v in values if isinstance(v, Ref)]
    constants = [v for v in values if not isinstance(v, Ref)]
    if len(refs) == 1:
        bound = constants[0]
        for c in constants[1:]:
            bound = torch.maximum(bound, c) if is_max else torch.minimum(bound, c)
        bound = _float64(bound)
        return builder.unary(_exact_clip(bound, None) if is_max else _exact_clip(None, bound), refs[0])
    if len(refs) == 2 and not constants:
        return _binary(builder, Maximum() if is_max else Minimum(), refs)
    raise builder.fail("Max / Min of more than two perturbed values is not supported")


def _binary(builder, op, refs) -> Ref:
    """A two-input op on perturbed values with the same batch layout; the output's per-sample
    shape from the op's own forward on per-sample shapes."""
    a, b = refs
    if a.batched != b.batched:   # mixed: both as source layouts
        a, b = builder.unbatched(a), builder.unbatched(b)
    with torch.no_grad():
        shape = tuple(op.forward(torch.zeros(1, *builder.nodes[a.index].shape),
                                 torch.zeros(1, *builder.nodes[b.index].shape)).shape[1:])
    return Ref(builder.add(op, (a, b), shape), a.batched)


def convert_product(builder, call: Call) -> Ref:
    """x * y and x / y of two perturbed values (x / y as x * (1 / y))."""
    fn = getattr(call.kind, "math_op_function", call.kind)
    a, b = call.args[0], call.args[1]
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        raise builder.fail("products of more than two operands are not supported")
    divide = fn in (torch.div, operator.truediv, operator.itruediv) or call.name in ("div", "div_", "truediv") \
        or getattr(fn, "__name__", "") == "_onnx_div"
    if a == b and not divide:   # x * x: the square's own relaxation is tighter than McCormick's
        return builder.unary(Pow(2.0), a)
    if divide:
        b = builder.unary(Reciprocal(), b)
    return _binary(builder, Mul(), [a, b])


def convert_matmul(builder, call: Call) -> Ref:
    a, b = call.args[0], call.args[1]
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        raise builder.fail("MatMul of a perturbed value with itself and a constant is not supported")
    return _binary(builder, MatMul(), [a, b])


def convert_softmax(builder, call: Call) -> Ref:
    ref = call.refs[0]
    if getattr(call.kind, "is_log", False):
        raise builder.fail("LogSoftmax is not supported")
    dim = getattr(call.kind, "dim", None)
    if dim is None:
        dim = getattr(call.kind, "axis", None)
    if dim is None:
        dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", -1)
    dim = int(dim)
    if dim >= 0 and not ref.batched:   # our tensors carry N in front of the source layout
        dim += 1
    op = Softmax(dim)
    layout = builder.layout(ref)
    with torch.no_grad():
        expected = call.fn(torch.linspace(-2, 3, int(torch.tensor(layout).prod())).reshape(layout))
        got = op.forward(torch.linspace(-2, 3, int(torch.tensor(layout).prod())).reshape(1, *builder.nodes[ref.index].shape))
    if not torch.allclose(expected.reshape(-1).double(), got.reshape(-1).double(), atol=1e-6):
        raise builder.fail("Softmax over this axis does not map to the verifier's Softmax")
    return builder.unary(op, ref)


def register_nonlinear() -> None:
    for op_class, onnx_type, functions in (
            (Exp, "Exp", [torch.exp, "exp"]), (Log, "Log", [torch.log, "log"]),
            (Sqrt, "Sqrt", [torch.sqrt, "sqrt", "OnnxSqrt"]),
            (Reciprocal, "Reciprocal", [torch.reciprocal, "reciprocal", "OnnxReciprocal"]),
            (Sin, "Sin", [torch.sin, "sin"]), (Cos, "Cos", [torch.cos, "cos"]),
            (Sign, "Sign", [torch.sign, "sign"]), (Floor, "Floor", [torch.floor, "floor"])):
        register(convert=_unary(op_class), onnx=[onnx_type], functions=functions)
    register(convert=convert_pow, onnx=["Pow"], modules=["OnnxPow"], functions=[torch.pow, operator.pow, "pow"])
    register(convert=convert_leaky_relu, onnx=["LeakyRelu"], modules=[nn.LeakyReLU],
             functions=[F.leaky_relu, "leaky_relu"])
    register(convert=convert_clip, onnx=["Clip"], modules=["OnnxClip", nn.Hardtanh, nn.ReLU6],
             functions=[torch.clamp, torch.clip, "clamp", "clip"])
    register(convert=convert_min_max, many_inputs=True, onnx=["Min", "Max"], modules=["OnnxMinMax"],
             functions=[torch.maximum, torch.minimum, "maximum", "minimum"])
    register(convert=convert_softmax, onnx=["Softmax"], modules=[nn.Softmax, "OnnxSoftmaxV1V11"],
             functions=[torch.softmax, F.softmax, "softmax"])


register_nonlinear()
