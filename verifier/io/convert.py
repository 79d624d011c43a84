"""torch.fx graph (from onnx2torch or from tracing an nn.Module) -> BoundGraph.

Every fx node whose arguments are all constant is evaluated once (constant folding); every node
that depends on the perturbed input becomes one bound op. Shapes are per sample: the source
tensor of "ONNX layout" shape ``(1, *shape)`` (batched) or ``shape`` (no batch dimension)
becomes ``(N, *shape)`` inside the verifier, so the source model's batch-1 semantics are
reproduced for every one of the N samples.

Ops that only move entries (Reshape, Flatten, Transpose, Squeeze, Slice, Pad, ...) are not
modelled one by one: the source module is run once on an index tensor and the resulting map
becomes a Rearrange op. Elementwise affine maps (Add/Sub/Mul/Div by a constant) are probed the
same way for their scale and shift.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import DimensionMismatchError, ModelValueError, UnsupportedOperatorError
from ..graph import BoundGraph, Node
from ..ops import (Concat, Conv2d, ElementwiseAffine, Linear, MaxPool2d, ReLU, Rearrange, Sigmoid, Sum,
                   Tanh)
from ..ops.base import Param


@dataclass(frozen=True)
class Ref:
    """A value that depends on the perturbed input: node index and whether its source layout
    carries a leading batch dimension."""

    index: int
    batched: bool


class _Builder:
    def __init__(self, gm: fx.GraphModule, input_layout: tuple[int, ...], batched: bool,
                 device: torch.device, dtype: torch.dtype, source: str, live_params: bool):
        self.gm, self.device, self.dtype, self.source = gm, device, dtype, source
        self.live_params = live_params
        self.modules = dict(gm.named_modules())
        # where the module's own tensors live: probes of its functions must be made there
        own = next(itertools.chain(gm.parameters(), gm.buffers()), None)
        self.module_device = own.device if own is not None else torch.device("cpu")
        shape = tuple(input_layout[1:]) if batched else tuple(input_layout)
        self.nodes: list[Node] = [Node("input", None, (), shape, "Input")]
        self.input_batched = batched
        self.fx_node: Optional[fx.Node] = None

    # ---- helpers -------------------------------------------------------------------------
    def fail(self, what: str) -> UnsupportedOperatorError:
        node = self.fx_node
        op = self.op_name(node) if node is not None else "?"
        return UnsupportedOperatorError(f"{self.source}: node '{node.name if node else '?'}' ({op}): {what}")

    def op_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.modules[node.target]).__name__
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return str(node.target)

    def layout(self, ref: Ref) -> tuple[int, ...]:
        shape = self.nodes[ref.index].shape
        return (1, *shape) if ref.batched else shape

    def const(self, t: Tensor) -> Param:
        c = t.detach().to(device=self.device, dtype=self.dtype)
        return lambda: c

    def live(self, module: nn.Module, name: str) -> Optional[Param]:
        """A module parameter read at call time; honours torch.nn.utils.prune's reparametrisation."""
        if getattr(module, name, None) is None and not hasattr(module, name + "_orig"):
            return None
        device, dtype = self.device, self.dtype
        if not self.live_params:
            return self.const(getattr(module, name))
        def read():
            if hasattr(module, name + "_orig") and hasattr(module, name + "_mask"):
                return (getattr(module, name + "_orig") * getattr(module, name + "_mask")).to(device, dtype)
            return getattr(module, name).to(device, dtype)
        return read

    def add(self, op, inputs: tuple[Ref, ...], shape: tuple[int, ...]) -> int:
        node = self.fx_node
        self.nodes.append(Node(node.name, op.cast(self.device, self.dtype), tuple(r.index for r in inputs),
                               tuple(shape), self.op_name(node)))
        return len(self.nodes) - 1

    def out_ref(self, index: int, layout: tuple[int, ...], batched_in: bool) -> Ref:
        return Ref(index, batched_in and len(layout) >= 1 and layout[0] == 1)

    def per_sample(self, layout: tuple[int, ...], batched: bool) -> tuple[int, ...]:
        return tuple(layout[1:]) if batched else tuple(layout)

    def probe(self, fn: Callable[[Tensor], Any], ref: Ref, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = fn(x.reshape(self.layout(ref)).to(self.module_device))
        if not isinstance(out, Tensor):
            raise self.fail("does not produce a single tensor")
        return out.to(device="cpu", dtype=torch.float64)

    # ---- generic conversions by probing ---------------------------------------------------
    def rearrange(self, fn: Callable[[Tensor], Tensor], ref: Ref) -> Ref:
        """fn only moves entries (and may insert constants)."""
        numel = self.nodes[ref.index].numel
        ids = torch.arange(1, numel + 1, dtype=torch.float64)
        once, twice = self.probe(fn, ref, ids), self.probe(fn, ref, 2 * ids)
        is_const = twice == once
        if not torch.all(is_const | ((twice == 2 * once) & (once == once.round()) & (once >= 1))):
            raise self.fail("is not a pure rearrangement of its input")
        out_layout = tuple(once.shape)
        batched = self.out_ref(0, out_layout, ref.batched).batched
        flat_once, flat_const = once.reshape(-1), is_const.reshape(-1)
        index = torch.where(flat_const, torch.full_like(flat_once, numel + 1), flat_once).long() - 1
        fill = torch.where(flat_const, flat_once, torch.zeros_like(flat_once)) if bool(flat_const.any()) else None
        shape = self.per_sample(out_layout, batched)
        op = Rearrange(index, self.nodes[ref.index].shape, shape, fill)
        sample = torch.rand(1, numel, dtype=torch.float64) * 7 - 3
        if not torch.allclose(op.forward(sample.reshape(1, *self.nodes[ref.index].shape)).reshape(-1),
                              self.probe(fn, ref, sample).reshape(-1), rtol=1e-6, atol=1e-6):
            raise self.fail("is not a pure rearrangement of its input")
        return Ref(self.add(op, (ref,), shape), batched)

    def elementwise_affine(self, fn: Callable[[Tensor], Tensor], ref: Ref) -> Ref:
        """fn(x) = x * scale + shift elementwise, scale/shift found by probing at 0 and 1."""
        numel = self.nodes[ref.index].numel
        zero = torch.zeros(numel, dtype=torch.float64)
        shift = self.probe(fn, ref, zero)
        scale = self.probe(fn, ref, zero + 1) - shift
        if tuple(shift.shape) != self.layout(ref):
            raise DimensionMismatchError(
                f"{self.source}: node '{self.fx_node.name}': broadcasting a constant changes the shape "
                f"{self.layout(ref)} -> {tuple(shift.shape)}")
        x = torch.linspace(-3, 5, numel, dtype=torch.float64)
        if not torch.allclose(self.probe(fn, ref, x), x.reshape(shift.shape) * scale + shift, rtol=1e-9, atol=1e-9):
            raise self.fail("is not affine in its perturbed input")
        squeeze = (lambda t: t[0]) if ref.batched else (lambda t: t)
        op = ElementwiseAffine(self.const(squeeze(scale)), self.const(squeeze(shift)))
        return Ref(self.add(op, (ref,), self.nodes[ref.index].shape), ref.batched)

    # ---- the conversion ------------------------------------------------------------------
    def run(self) -> BoundGraph:
        env: dict[fx.Node, Any] = {}
        placeholders = 0
        output_ref = None
        for node in self.gm.graph.nodes:
            self.fx_node = node
            if node.op == "placeholder":
                if placeholders:
                    raise self.fail("models with more than one input are not supported")
                placeholders += 1
                env[node] = Ref(0, self.input_batched)
            elif node.op == "get_attr":
                value = self.gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                env[node] = value
            elif node.op == "output":
                output_ref = fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                refs = _refs_in((args, kwargs))
                if not refs:
                    env[node] = self.evaluate(node, args, kwargs)
                else:
                    env[node] = self.convert(node, args, kwargs, refs)
        if not isinstance(output_ref, Ref):
            raise UnsupportedOperatorError(f"{self.source}: the model must have exactly one output that "
                                           "depends on its input")
        return BoundGraph(self.nodes, output_ref.index)

    def evaluate(self, node: fx.Node, args, kwargs):
        with torch.no_grad():
            if node.op == "call_module":
                return self.modules[node.target](*args, **kwargs)
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            return getattr(args[0], node.target)(*args[1:], **kwargs)

    def callable_of(self, node: fx.Node, args, kwargs, ref: Ref) -> Callable[[Tensor], Tensor]:
        """The node as a function of its one perturbed argument (others fixed)."""
        def substitute(x):
            return _replace_refs((args, kwargs), ref, x)

        def fn(x):
            a, k = substitute(x)
            if node.op == "call_module":
                return self.modules[node.target](*a, **k)
            if node.op == "call_function":
                return node.target(*a, **k)
            return getattr(a[0], node.target)(*a[1:], **k)
        return fn

    def convert(self, node: fx.Node, args, kwargs, refs: list[Ref]) -> Ref:
        kind = self.modules[node.target] if node.op == "call_module" else node.target
        key = type(kind) if node.op == "call_module" else kind
        name = type(kind).__name__ if node.op == "call_module" else getattr(kind, "__name__", str(kind))
        if len(set(refs)) == 1:
            ref = refs[0]
            fn = self.callable_of(node, args, kwargs, ref)
            if _is_shape_query(node, args):
                # x.size(0), x.shape, x.dim(): static per layout, so a constant of the graph.
                return fn(torch.zeros(self.layout(ref)))
            if key in _RELU or name in ("relu", "relu_"):
                return self.unary(ReLU(), ref)
            if key in _SIGMOID or name == "sigmoid" or getattr(kind, "function", None) in (torch.sigmoid,):
                return self.unary(Sigmoid(), ref)
            function = getattr(kind, "function", None)
            if key in _TANH or name == "tanh" or function in (torch.tanh, torch.Tensor.tanh):
                return self.unary(Tanh(), ref)
            if isinstance(kind, nn.Linear):
                return self.linear(self.live(kind, "weight"), self.live(kind, "bias"), ref)
            if isinstance(kind, nn.Conv2d):
                return self.conv(kind, ref)
            if isinstance(kind, nn.modules.batchnorm._BatchNorm):
                return self.batchnorm(kind, ref)
            if isinstance(kind, nn.AvgPool2d):
                return self.avgpool(kind, ref)
            if isinstance(kind, nn.MaxPool2d):
                return self.maxpool(kind, ref)
            if name in _MATMUL_NAMES:
                return self.matmul(node, args, ref)
            if name == "OnnxGemm":
                return self.gemm(kind, args, ref)
            if name in _AFFINE_NAMES or _is_affine_math(kind):
                if sum(1 for a in _flatten_args((args, kwargs)) if isinstance(a, Ref)) > 1:
                    return self.branch_sum(name, kind, args)
                return self.elementwise_affine(fn, ref)
            if name in _CONCAT_NAMES:
                return self.concat(node, kind, args, kwargs)
            if name in _REARRANGE_NAMES or isinstance(kind, (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)):
                return self.rearrange(fn, ref)
            raise self.fail("unsupported operator")
        if name in _AFFINE_NAMES or _is_affine_math(kind):
            return self.branch_sum(name, kind, args)
        if name in _CONCAT_NAMES:
            return self.concat(node, kind, args, kwargs)
        raise self.fail("unsupported operator on two perturbed inputs")

    def unary(self, op, ref: Ref) -> Ref:
        return Ref(self.add(op, (ref,), self.nodes[ref.index].shape), ref.batched)

    def linear(self, weight: Param, bias: Optional[Param], ref: Ref) -> Ref:
        shape = self.nodes[ref.index].shape
        W = weight()
        if not shape or shape[-1] != W.shape[1]:
            raise DimensionMismatchError(f"{self.source}: node '{self.fx_node.name}': input of shape {shape} "
                                         f"does not fit a weight of shape {tuple(W.shape)}")
        _check_finite(self, W)
        if bias is not None:
            _check_finite(self, bias())
        out = (*shape[:-1], W.shape[0])
        return Ref(self.add(Linear(weight, bias), (ref,), out), ref.batched)

    def conv(self, m: nn.Conv2d, ref: Ref) -> Ref:
        shape = self.nodes[ref.index].shape
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise self.fail(f"padding {m.padding!r} / mode {m.padding_mode!r} is not supported")
        if len(shape) != 3 or shape[0] != m.in_channels:
            raise DimensionMismatchError(f"{self.source}: node '{self.fx_node.name}': Conv2d needs a "
                                         f"({m.in_channels}, H, W) input per sample, got {shape}")
        _check_finite(self, m.weight)
        if m.bias is not None:
            _check_finite(self, m.bias)
        op = Conv2d(self.live(m, "weight"), self.live(m, "bias"), m.stride, m.padding, m.dilation, m.groups, shape)
        out = tuple(op.forward(torch.zeros(1, *shape, device=self.device, dtype=self.dtype)).shape[1:])
        return Ref(self.add(op, (ref,), out), ref.batched)

    def batchnorm(self, m: nn.modules.batchnorm._BatchNorm, ref: Ref) -> Ref:
        shape = self.nodes[ref.index].shape
        if m.running_mean is None or not ref.batched:
            raise self.fail("BatchNorm needs running statistics and a batched (N, C, ...) input")
        if not shape or shape[0] != m.num_features:
            raise DimensionMismatchError(f"{self.source}: node '{self.fx_node.name}': BatchNorm of "
                                         f"{m.num_features} channels applied to a per-sample shape {shape}")
        for t in (m.weight, m.bias, m.running_mean, m.running_var):
            if t is not None:
                _check_finite(self, t)
        view = (-1,) + (1,) * (len(shape) - 1)
        device, dtype = self.device, self.dtype
        if not self.live_params:
            with torch.no_grad():
                f64 = lambda t: t.detach().to(torch.float64)
                w = f64(m.weight) if m.weight is not None else torch.ones_like(f64(m.running_var))
                b = f64(m.bias) if m.bias is not None else torch.zeros_like(f64(m.running_mean))
                s = w / torch.sqrt(f64(m.running_var) + m.eps)
                op = ElementwiseAffine(self.const(s.view(view)), self.const((b - f64(m.running_mean) * s).view(view)))
            return Ref(self.add(op, (ref,), shape), ref.batched)

        weight, bias = self.live(m, "weight"), self.live(m, "bias")   # pruned gamma/beta too

        def scale():
            var = m.running_var.to(device, dtype)
            w = weight() if weight is not None else torch.ones_like(var)
            return (w / torch.sqrt(var + m.eps)).view(view)

        def shift():
            mean = m.running_mean.to(device, dtype)
            b = bias() if bias is not None else torch.zeros_like(mean)
            return b.view(view) - mean.view(view) * scale()
        return Ref(self.add(ElementwiseAffine(scale, shift), (ref,), shape), ref.batched)

    def avgpool(self, m: nn.AvgPool2d, ref: Ref) -> Ref:
        """Average pooling is a depthwise convolution with weight 1/(kh*kw); without
        count_include_pad the border windows are rescaled by an elementwise factor."""
        shape = self.nodes[ref.index].shape
        if m.ceil_mode or len(shape) != 3:
            raise self.fail("AveragePool with ceil_mode or a non-(C,H,W) input is not supported")
        k, s, p = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding))
        C = shape[0]
        weight = torch.full((C, 1, *k), 1.0 / (k[0] * k[1]), dtype=self.dtype, device=self.device)
        op = Conv2d(self.const(weight), None, s, p, (1, 1), C, shape)
        out = tuple(op.forward(torch.zeros(1, *shape, device=self.device, dtype=self.dtype)).shape[1:])
        conv = Ref(self.add(op, (ref,), out), ref.batched)
        if m.count_include_pad or p == (0, 0) or m.divisor_override:
            if m.divisor_override:
                raise self.fail("AveragePool divisor_override is not supported")
            return conv
        counts = F.avg_pool2d(torch.ones(1, 1, *shape[1:], dtype=torch.float64), k, s, p, count_include_pad=True)
        counts = counts / F.avg_pool2d(torch.ones(1, 1, *shape[1:], dtype=torch.float64), k, s, p,
                                       count_include_pad=False)
        scale = (1.0 / counts)[0]
        return Ref(self.add(ElementwiseAffine(self.const(scale), self.const(torch.zeros(()))), (conv,), out),
                   ref.batched)

    def maxpool(self, m: nn.MaxPool2d, ref: Ref) -> Ref:
        shape = self.nodes[ref.index].shape
        if m.ceil_mode or m.return_indices or len(shape) != 3:
            raise self.fail("MaxPool with ceil_mode, indices or a non-(C,H,W) input is not supported")
        op = MaxPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                       _pair(m.dilation), shape)
        out = tuple(op.forward(torch.zeros(1, *shape, device=self.device, dtype=self.dtype)).shape[1:])
        return Ref(self.add(op, (ref,), out), ref.batched)

    def matmul(self, node: fx.Node, args, ref: Ref) -> Ref:
        left, right = args[0], args[1]
        if isinstance(left, Ref) and isinstance(right, Tensor) and right.dim() == 2:
            W = right.detach().t()
            return self.linear(self.const(W), None, ref)
        if isinstance(right, Ref) and isinstance(left, Tensor) and left.dim() == 2:
            if len(self.layout(ref)) == 1:
                return self.linear(self.const(left.detach()), None, ref)
            swap = lambda x: x.transpose(-1, -2)
            moved = self.rearrange(swap, ref)
            out = self.linear(self.const(left.detach()), None, moved)
            return self.rearrange(swap, out)
        raise self.fail("MatMul is supported with one constant 2-D operand only")

    def gemm(self, m, args, ref: Ref) -> Ref:
        a, b = args[0], args[1]
        c = args[2] if len(args) > 2 else None
        if not isinstance(a, Ref) or not isinstance(b, Tensor) or m.trans_a or (c is not None and not isinstance(c, Tensor)):
            raise self.fail("Gemm is supported as x @ B (+ C) with constant B, C")
        W = (b if m.trans_b else b.t()) * m.alpha
        bias = None if c is None else self.const((c * m.beta).reshape(-1).expand(W.shape[0]).clone())
        return self.linear(self.const(W.detach()), bias, ref)

    def branch_sum(self, name: str, kind, args) -> Ref:
        """x + y or x - y of two perturbed branches of equal shape."""
        fn = getattr(kind, "math_op_function", kind)
        if len(args) != 2 or not all(isinstance(a, Ref) for a in args):
            raise self.fail("only sums and differences of two perturbed branches are supported")
        if fn in (torch.add, operator.add, operator.iadd) or name in ("add", "add_"):
            signs = (1.0, 1.0)
        elif fn in (torch.sub, operator.sub, operator.isub) or name in ("sub", "sub_"):
            signs = (1.0, -1.0)
        else:
            raise self.fail("products and quotients of two perturbed values are not supported")
        a, b = args
        if self.nodes[a.index].shape != self.nodes[b.index].shape or a.batched != b.batched:
            raise self.fail("branches of different shapes cannot be added")
        return Ref(self.add(Sum(signs), (a, b), self.nodes[a.index].shape), a.batched)

    def concat(self, node, kind, args, kwargs) -> Ref:
        tensors = args if name_of(kind) == "OnnxConcat" else args[0]
        axis = getattr(kind, "axis", None)
        if axis is None:
            axis = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        refs = [t for t in tensors if isinstance(t, Ref)]
        batched = refs[0].batched
        if any(r.batched != batched for r in refs):
            raise self.fail("concatenating batched and unbatched tensors")
        layouts = [self.layout(t) if isinstance(t, Ref) else tuple(t.shape) for t in tensors]
        rank = len(layouts[0])
        axis = axis % rank
        if batched and axis == 0:
            raise self.fail("concatenation along the batch dimension")
        sample_axis = axis - 1 if batched else axis
        parts = [None if isinstance(t, Ref) else (t[0] if batched else t).detach().to(self.device, self.dtype)
                 for t in tensors]
        sizes = [layout[axis] for layout in layouts]
        shape = list(self.nodes[refs[0].index].shape)
        shape[sample_axis] = sum(sizes)
        op = Concat(sample_axis, parts, sizes)
        return Ref(self.add(op, tuple(refs), tuple(shape)), batched)


def name_of(kind) -> str:
    return type(kind).__name__ if isinstance(kind, nn.Module) else getattr(kind, "__name__", str(kind))


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_finite(builder: _Builder, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ModelValueError(f"{builder.source}: node '{builder.fx_node.name}': non-finite weights")


def _flatten_args(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten_args(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten_args(o)
    else:
        yield obj


def _refs_in(obj) -> list[Ref]:
    return [o for o in _flatten_args(obj) if isinstance(o, Ref)]


def _replace_refs(obj, ref: Ref, x: Tensor):
    if isinstance(obj, Ref):
        return x
    if isinstance(obj, tuple):
        return tuple(_replace_refs(o, ref, x) for o in obj)
    if isinstance(obj, list):
        return [_replace_refs(o, ref, x) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace_refs(v, ref, x) for k, v in obj.items()}
    return obj


def _is_shape_query(node: fx.Node, args) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.target is getattr and len(args) == 2 and args[1] in ("shape", "ndim")


def _is_affine_math(kind) -> bool:
    fn = getattr(kind, "math_op_function", kind)
    return fn in (torch.add, torch.sub, torch.mul, torch.div, operator.add, operator.sub, operator.mul,
                  operator.truediv, operator.neg, torch.neg, operator.iadd, operator.isub, operator.imul,
                  operator.itruediv)


_RELU = (nn.ReLU, F.relu, torch.relu)
_SIGMOID = (nn.Sigmoid, torch.sigmoid, F.sigmoid)
_TANH = (nn.Tanh, torch.tanh, F.tanh)
_MATMUL_NAMES = {"OnnxMatMul", "matmul", "OnnxMatMulInteger"}
_AFFINE_NAMES = {"OnnxBinaryMathOperation", "OnnxNeg", "add", "sub", "mul", "div", "neg", "truediv"}
_CONCAT_NAMES = {"OnnxConcat", "cat", "concat", "concatenate"}
_REARRANGE_NAMES = {
    "OnnxReshape", "OnnxTranspose", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeStaticAxes",
    "OnnxUnsqueezeDynamicAxes", "OnnxFlatten", "OnnxSlice", "OnnxSliceV9", "OnnxGather", "OnnxPadStatic",
    "OnnxPadDynamic", "OnnxIdentity", "OnnxCopyIdentity", "OnnxDropoutDynamic", "OnnxExpand",
    "flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "getitem",
    "unflatten", "pad", "narrow", "clone", "detach", "float", "to", "expand",
}


def build_graph(gm: fx.GraphModule, input_layout: tuple[int, ...], batched: bool, device: torch.device,
                dtype: torch.dtype, source: str, live_params: bool = True) -> BoundGraph:
    """Convert an fx graph whose single input has the given source-layout shape.
    With live_params, weights of nn.Linear/Conv2d/BatchNorm are read from the modules at every
    call (differentiable, follows training); otherwise they are copied once as constants."""
    return _Builder(gm, tuple(input_layout), batched, device, dtype, source, live_params).run()
