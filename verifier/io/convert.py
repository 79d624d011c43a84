"""torch.fx graph (from onnx2torch or from tracing an nn.Module) -> BoundGraph.

Every fx node whose arguments are all constant is evaluated once (constant folding); every node
that depends on the perturbed input becomes one bound op. Shapes are per sample: the source
tensor of "ONNX layout" shape ``(1, *shape)`` (batched) or ``shape`` (no batch dimension)
becomes ``(N, *shape)`` inside the verifier, so the source model's batch-1 semantics are
reproduced for every one of the N samples.

Which conversion a call gets is looked up in ``verifier.ops.registry`` (built-in entries:
``verifier.io.converters``). Ops that only move entries (Reshape, Flatten, Transpose, Squeeze,
Slice, Pad, ...) are not modelled one by one: the source module is run once on an index tensor and the resulting map
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
from torch import Tensor

from ..errors import DimensionMismatchError, ModelValueError, UnsupportedOperatorError
from ..graph import BoundGraph, Node
from ..ops import AffineMap, ElementwiseAffine, Rearrange
from ..ops.base import Param
from ..ops.registry import Call, lookup


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

    def linear_map(self, fn: Callable[[Tensor], Tensor], ref: Ref, max_entries: int = 1 << 24) -> Ref:
        """fn is affine in its perturbed input (ReduceSum, ReduceMean, linear Resize, ...): its
        matrix (out_numel, in_numel) is found by probing fn at 0 and at every unit vector, checked
        on random points, and becomes one AffineMap op."""
        numel = self.nodes[ref.index].numel
        offset = self.probe(fn, ref, torch.zeros(numel, dtype=torch.float64))
        out_layout = tuple(offset.shape)
        if offset.numel() * numel > max_entries:
            raise self.fail(f"a linear map of {numel} -> {offset.numel()} entries is too large to form densely")
        columns = [(self.probe(fn, ref, unit) - offset).reshape(-1)
                   for unit in torch.eye(numel, dtype=torch.float64)]
        matrix = torch.stack(columns, dim=1)                                  # (out, in)
        for _ in range(2):
            x = torch.randn(numel, dtype=torch.float64) * 3
            expected = self.probe(fn, ref, x).reshape(-1)
            if not torch.allclose(matrix @ x + offset.reshape(-1), expected, rtol=1e-7, atol=1e-7):
                raise self.fail("is not linear in its perturbed input")
        batched = self.out_ref(0, out_layout, ref.batched).batched
        shape = self.per_sample(out_layout, batched)
        op = AffineMap(self.const(matrix), self.const(offset.reshape(-1)), self.nodes[ref.index].shape, shape)
        return Ref(self.add(op, (ref,), shape), batched)

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
        """One call that depends on the perturbed input, by the registry's converter for it."""
        kind = self.modules[node.target] if node.op == "call_module" else node.target
        if kind is operator.getitem and isinstance(args[0], (tuple, list)):
            return args[0][args[1]]   # one output of a multi-output op (Split): already a node
        fn = self.callable_of(node, args, kwargs, refs[0])
        if len(set(refs)) == 1 and _is_shape_query(node, args):
            # x.size(0), x.shape, x.dim(): static per layout, so a constant of the graph.
            return fn(torch.zeros(self.layout(refs[0])))
        entry = lookup(kind)
        if entry is None:
            raise self.fail("unsupported operator")
        if len(set(refs)) > 1 and not entry.many_inputs:
            raise self.fail("unsupported operator on two perturbed inputs")
        return entry.convert(self, Call(self.op_name(node), kind, args, kwargs, refs, fn))

    def unary(self, op, ref: Ref) -> Ref:
        return Ref(self.add(op, (ref,), self.nodes[ref.index].shape), ref.batched)

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


def build_graph(gm: fx.GraphModule, input_layout: tuple[int, ...], batched: bool, device: torch.device,
                dtype: torch.dtype, source: str, live_params: bool = True) -> BoundGraph:
    """Convert an fx graph whose single input has the given source-layout shape.
    With live_params, weights of nn.Linear/Conv2d/BatchNorm are read from the modules at every
    call (differentiable, follows training); otherwise they are copied once as constants."""
    return _Builder(gm, tuple(input_layout), batched, device, dtype, source, live_params).run()


# The built-in conversions register themselves; they import this module's helpers, so they load
# once this module is complete.
from . import converters  # noqa: E402,F401
