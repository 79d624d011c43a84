"""The one registry from source operators to bound ops.

A source operator is an ONNX op type (checked when a file loads), a torch module class, a torch
function, or the name of either (onnx2torch's module classes, ``x.relu()`` methods). Each entry
says how to turn one call of that operator into bound-graph nodes: a converter
``convert(builder, call) -> Ref`` (``verifier.io.convert``'s builder: ``builder.unary(op, ref)``,
``builder.add(op, inputs, shape)``, ``builder.fail(message)``, ...).

The converter of this package registers the built-in operators; a user registers their own::

    from verifier.ops import Op, register

    @register(modules=[MyActivation])            # or functions=[my_fn], onnx=["MyOnnxOp"]
    class MyActivationBound(Op):
        nonlinear = True
        def forward(self, x): ...
        def ibp(self, b): ...
        def backward(self, lA, uA, b): ...

Registered this way (no ``convert``), the op is elementwise on its one perturbed input: one
node of the input's shape, the op built by ``cls.from_source(module_or_function, args,
kwargs)`` where the class defines it, else ``cls()``. A torch module class registered here is
also kept whole when a PyTorch model is traced (torch.fx treats it as a leaf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional


class Call(NamedTuple):
    """One call of a source operator that depends on the perturbed input.

    ``kind``: the module instance, function, or method name called; ``args``, ``kwargs``: its
    arguments with perturbed values as the converter's ``Ref`` and constants as tensors;
    ``refs``: the perturbed arguments; ``fn``: the call as a function of its first perturbed
    argument (the others fixed), in the source layout ``(1, *shape)`` or ``shape``."""

    name: str
    kind: Any
    args: tuple
    kwargs: dict
    refs: list
    fn: Callable


@dataclass(frozen=True)
class Conversion:
    convert: Callable          # (builder, Call) -> Ref
    many_inputs: bool          # whether it takes more than one perturbed argument
    label: str                 # for messages


_ENTRIES: dict[Any, Conversion] = {}
_ONNX_TYPES: set[str] = set()
_LEAF_MODULES: set[type] = set()


def register(op: Optional[type] = None, *, onnx: Iterable[str] = (), modules: Iterable[Any] = (),
             functions: Iterable[Any] = (), convert: Optional[Callable] = None, many_inputs: bool = False):
    """Register how source operators convert: ``onnx`` op types, torch ``modules`` (classes or
    class names), torch ``functions`` (callables or names, methods included). With ``convert``
    (builder, Call) -> Ref, that converter; else ``op`` (an ``Op`` subclass) as an elementwise op
    (see the module docstring). Returns ``op`` (or a decorator when called without it), so it
    serves as a class decorator. A later registration of the same key replaces the earlier."""
    if op is None and convert is None:
        return lambda cls: register(cls, onnx=onnx, modules=modules, functions=functions, many_inputs=many_inputs)
    if convert is None:
        convert = _elementwise(op)
    entry = Conversion(convert, many_inputs, getattr(op, "__name__", getattr(convert, "__name__", "converter")))
    for key in (*modules, *functions):
        _ENTRIES[key] = entry
        if isinstance(key, type):
            _LEAF_MODULES.add(key)
    _ONNX_TYPES.update(onnx)
    return op


def _elementwise(cls: type) -> Callable:
    def convert(builder, call: Call):
        if len(set(call.refs)) != 1:
            raise builder.fail(f"{cls.__name__} takes one perturbed input")
        source = getattr(cls, "from_source", None)
        op = cls() if source is None else source(call.kind, call.args, call.kwargs)
        return builder.unary(op, call.refs[0])
    return convert


def lookup(kind: Any) -> Optional[Conversion]:
    """The entry for a module instance, function or method name: by the exact class or
    function, then its name; for onnx2torch's wrappers, by the torch function they wrap."""
    candidates = []
    if isinstance(kind, str):
        candidates.append(kind)
    elif isinstance(kind, type) or callable(kind) and not hasattr(kind, "forward"):
        candidates += [kind, getattr(kind, "__name__", None)]
    else:   # a module instance
        candidates += [*type(kind).__mro__[:-1], type(kind).__name__]
        for attribute in ("function", "math_op_function", "round_function"):
            wrapped = getattr(kind, attribute, None)
            if wrapped is not None:
                candidates += [wrapped, getattr(wrapped, "__name__", None)]
    for key in candidates:
        try:
            entry = _ENTRIES.get(key)
        except TypeError:   # unhashable
            entry = None
        if entry is not None:
            return entry
    return None


def onnx_supported(op_type: str) -> bool:
    """Whether an ONNX op type converts (or folds when it acts on constants only)."""
    return op_type in _ONNX_TYPES


def onnx_types() -> frozenset[str]:
    return frozenset(_ONNX_TYPES)


def is_leaf_module(module: Any) -> bool:
    """Whether tracing should keep this module whole (a registered class)."""
    return any(isinstance(module, cls) for cls in _LEAF_MODULES)
