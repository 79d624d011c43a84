"""The public face: ``BoundedModel`` (bounds of a network over input boxes)."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from .bounds.alpha import AlphaConfig, alpha_crown
from .bounds.crown import backward_bound, crown_bounds
from .bounds.perturbation import LpBall, take_rows
from .bounds.ibp import ibp_bounds
from .errors import DimensionMismatchError, InputFileError, UnsupportedOperatorError
from .graph import BoundGraph
from .io.convert import build_graph
from .ops import Bounds
from .ops.registry import is_leaf_module

METHODS = ("ibp", "crown", "alpha-crown", "crown-ibp")


class BoundedModel:
    """A network prepared for bound computation.

    ``model`` is an ONNX path or an ``nn.Module`` (traced with torch.fx). A module's parameters
    are read at every call, so one BoundedModel follows training and its bounds are
    differentiable with respect to them. BatchNorm is bounded with its running statistics.
    ``cache_dir`` (default: ``$CERTIPRUNE_CACHE_DIR``, none when unset) keeps converted ONNX
    models keyed by the file's hash (``verifier.io.cache``).
    """

    def __init__(self, model: Union[str, os.PathLike, nn.Module], device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, alpha_config: AlphaConfig = AlphaConfig(),
                 cache_dir: Optional[Union[str, os.PathLike]] = None):
        self.device, self.dtype = torch.device(device), dtype
        self.alpha_config = alpha_config
        self.onnx = None
        self.module: Optional[nn.Module] = None
        self._graphs: dict[tuple[int, ...], BoundGraph] = {}
        if isinstance(model, (str, os.PathLike)):
            from .io.cache import ENV_CACHE_DIR, load_onnx_graph   # converted graphs by file hash
            self.onnx, graph, _ = load_onnx_graph(str(model), self.device, dtype,
                                                  cache_dir or os.environ.get(ENV_CACHE_DIR))
            self._graphs[graph.input_shape] = graph
        elif isinstance(model, nn.Module):
            self.module = model
        else:
            raise InputFileError(f"model must be an ONNX path or an nn.Module, got {type(model).__name__}")

    # ---- graph ---------------------------------------------------------------------------
    def graph(self, input_shape: Optional[tuple[int, ...]] = None) -> BoundGraph:
        """The bound graph for per-sample input shape (required for a module before first use)."""
        if self.onnx is not None:
            graph = next(iter(self._graphs.values()))
            if input_shape is not None and tuple(input_shape) != graph.input_shape:
                raise DimensionMismatchError(f"input of per-sample shape {tuple(input_shape)} given, the model "
                                             f"takes {graph.input_shape}")
            return graph
        if input_shape is None:
            if len(self._graphs) == 1:
                return next(iter(self._graphs.values()))
            raise DimensionMismatchError("an nn.Module's bound graph needs the per-sample input shape")
        key = tuple(input_shape)
        if key not in self._graphs:
            try:
                # A bare leaf (nn.Linear, nn.Conv2d, ...) would be traced into F.linear etc.;
                # wrapped, it stays one module whose parameters are read live.
                tracer = _Tracer()
                root = nn.Sequential(self.module) if tracer.is_leaf_module(self.module, "") else self.module
                gm = fx.GraphModule(root, tracer.trace(root))
            except Exception as exc:
                raise UnsupportedOperatorError(f"{type(self.module).__name__}: torch.fx cannot trace the module: "
                                               f"{exc}") from None
            self._graphs[key] = build_graph(gm, (1, *key), True, self.device, self.dtype, type(self.module).__name__)
        return self._graphs[key]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph().input_shape

    def forward(self, x: Tensor) -> Tensor:
        """Concrete output of the bound graph, x: (B, *input_shape) -> (B, *output_shape)."""
        return self.graph(tuple(x.shape[1:])).forward(x.to(self.device, self.dtype))

    # ---- bounds --------------------------------------------------------------------------
    def _box(self, lower: Optional[Tensor], upper: Optional[Tensor], center: Optional[Tensor] = None,
             eps=None, norm: float = float("inf")) -> tuple[BoundGraph, Bounds | LpBall]:
        """The input set: the box [lower, upper], or the Lp ball of radius eps around center
        (clipped to [lower, upper] where given). All (B, *input_shape); eps a number or (B,)."""
        if center is not None:
            if eps is None:
                raise ValueError("a ball needs eps as well as center")
            center = center.to(self.device, self.dtype)
            if center.dim() < 1:
                raise DimensionMismatchError(f"center {tuple(center.shape)} must be (B, *input_shape)")
            graph = self.graph(tuple(center.shape[1:]))
            eps_t = torch.as_tensor(eps, dtype=self.dtype, device=self.device)
            if bool((eps_t < 0).any()):
                raise ValueError("eps must be non-negative")
            clip = [None if t is None else t.to(self.device, self.dtype) for t in (lower, upper)]
            for t in clip:
                if t is not None and t.shape != center.shape:
                    raise DimensionMismatchError(f"box {tuple(t.shape)} and center {tuple(center.shape)} differ")
            if norm == float("inf"):
                radius = eps_t.reshape(-1, *([1] * (center.dim() - 1)))
                lo, hi = center - radius, center + radius
                lo = lo if clip[0] is None else torch.maximum(lo, clip[0])
                hi = hi if clip[1] is None else torch.minimum(hi, clip[1])
                return self._box(lo, hi)
            box = LpBall.around(center, eps_t, float(norm), *clip)
            if bool((box.lower > box.upper).any()):
                raise DimensionMismatchError("the ball does not meet the box [lower, upper]")
            return graph, box
        if lower is None or upper is None:
            raise ValueError("give lower and upper (a box), or center and eps (a ball)")
        if lower.shape != upper.shape or lower.dim() < 1:
            raise DimensionMismatchError(f"lower {tuple(lower.shape)} and upper {tuple(upper.shape)} must be "
                                         "(B, *input_shape) alike")
        graph = self.graph(tuple(lower.shape[1:]))
        box = Bounds(lower.to(self.device, self.dtype), upper.to(self.device, self.dtype))
        if bool((box.lower > box.upper).any()):
            raise DimensionMismatchError("lower exceeds upper somewhere in the input box")
        return graph, box

    def _spec(self, graph: BoundGraph, spec: Optional[Tensor], B: int) -> Tensor:
        n_out = graph.nodes[graph.output].numel
        if spec is None:
            eye = torch.eye(n_out, device=self.device, dtype=self.dtype)
            return eye.unsqueeze(0).expand(B, n_out, n_out).reshape(B, n_out, *graph.output_shape)
        spec = spec.to(self.device, self.dtype)
        if spec.dim() != 3 or spec.shape[0] != B or spec.shape[2] != n_out:
            raise DimensionMismatchError(f"spec must be (B={B}, S, n_outputs={n_out}), got {tuple(spec.shape)}")
        return spec.reshape(B, spec.shape[1], *graph.output_shape)

    def compute_bounds(self, lower: Optional[Tensor] = None, upper: Optional[Tensor] = None,
                       spec: Optional[Tensor] = None, method: str = "crown", *, center: Optional[Tensor] = None,
                       eps=None, norm: float = float("inf"), bound_lower: bool = True,
                       bound_upper: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Bounds of ``spec @ model(x)`` for x in the box [lower, upper], or in the ball
        ``||x - center||_norm <= eps`` (norm 1, 2 or inf; within [lower, upper] where given too).

        lower, upper, center: (B, *input_shape); eps: a number or (B,); spec: (B, S, n_outputs)
        or None (identity); method (any case): "ibp", "crown", "alpha-crown" or "crown-ibp" (IBP
        intermediate bounds, CROWN for the output). Returns lb, ub: (B, S) (or (B, n_outputs)
        without a spec); a side not asked for (``bound_lower`` / ``bound_upper`` False) is None
        and costs nothing (CROWN) or half (alpha-CROWN optimises the side asked for only).
        """
        method = _method(method, METHODS)
        if not (bound_lower or bound_upper):
            raise ValueError("at least one of bound_lower, bound_upper must be true")
        graph, box = self._box(lower, upper, center, eps, norm)
        C = self._spec(graph, spec, box.lower.shape[0])
        if method == "ibp":
            lb, ub = _spec_interval(C, ibp_bounds(graph, Bounds(box.lower, box.upper))[graph.output])
        elif method == "alpha-crown":
            lb, ub, bounds = self._alpha_crown_per_box(graph, box, C, bound_lower, bound_upper)
            lb, ub = _tighten(C, bounds[graph.output], lb, ub)
        else:
            bounds = crown_bounds(graph, box, method="crown" if method == "crown" else "ibp")
            lb, ub = backward_bound(graph, graph.output, C if bound_lower else None, C if bound_upper else None,
                                    bounds, box)
            lb, ub = _tighten(C, bounds[graph.output], lb, ub)
        return (lb if bound_lower else None), (ub if bound_upper else None)

    def _alpha_crown_per_box(self, graph: BoundGraph, box: Bounds | LpBall, C: Tensor, bound_lower: bool = True,
                             bound_upper: bool = True):
        """alpha-CROWN on each box alone: its slopes are optimised for its own unstable neurons and
        it stops on its own objective. Batched, the slopes of every neuron unstable in *any* box
        are optimised and one stopping rule serves all: measured slower and looser (256x4, 64
        boxes: 17.1 s and mean width 0.3947 batched, 5.8 s and 0.3839 per box), and a box's
        bounds depended on its batch. box: (B, *in), C: (B, S, *out) -> lb, ub (B, S) (None for
        a side not asked for) and the tightest bounds of every node it found (B, *shape) (None
        where a node has none). Only the upper side asked for: the lower bound of -C."""
        lbs, ubs, outs = [], [], []
        for k in range(box.lower.shape[0]):
            one = take_rows(box, slice(k, k + 1))
            objective = C[k:k + 1] if bound_lower else -C[k:k + 1]
            lb, ub, bounds, _ = alpha_crown(graph, one, objective, self.alpha_config,
                                            need_upper=bound_lower and bound_upper)
            lbs.append(lb if bound_lower else None)
            ubs.append(ub if bound_lower else -lb)
            outs.append(bounds)
        every = [None if outs[0][i] is None else Bounds(torch.cat([o[i].lower for o in outs]),
                                                        torch.cat([o[i].upper for o in outs]))
                 for i in range(len(outs[0]))]
        lb = torch.cat(lbs) if bound_lower else None
        ub = torch.cat(ubs) if bound_upper else None
        return lb, ub, every

    def relu_bounds(self, lower: Tensor, upper: Tensor, method: str = "ibp") -> list[tuple[Tensor, Tensor]]:
        """Pre-activation bounds of every ReLU, in graph order: list of (l, u), each (B, *shape) with
        the source model's layer shape; method (any case) "ibp", "crown" or "alpha-crown" (the
        intermediate bounds alpha-CROWN optimises for the output's identity rows). Neurons that
        simplification removed from a pruned ONNX model (see ``verifier.simplify``) get interval
        bounds from their layer's input bounds."""
        method = _method(method, ("ibp", "crown", "alpha-crown"))
        graph, box = self._box(lower, upper)
        if method == "ibp":
            bounds = ibp_bounds(graph, box)
        elif method == "crown":
            bounds = crown_bounds(graph, box)
        else:
            bounds = self._alpha_crown_per_box(graph, box, self._spec(graph, None, box.lower.shape[0]))[2]
        result = []
        for r in graph.relu_nodes():
            z = graph.nodes[r].inputs[0]
            lower_z, upper_z = bounds[z]
            if z in graph.removed:   # neurons dropped by simplification: back in the layer's shape
                lower_z, upper_z = graph.removed[z].expand(lower_z, upper_z, *bounds[graph.nodes[z].inputs[0]])
            result.append((lower_z, upper_z))
        return result


def _method(method: str, allowed: tuple[str, ...]) -> str:
    name = method.lower() if isinstance(method, str) else method
    if name not in allowed:
        raise ValueError(f"method must be one of {allowed} (any case), got {method!r}")
    return name


def _tighten(C: Tensor, out: Bounds, lb: Optional[Tensor], ub: Optional[Tensor]):
    """Intersect backward bounds with the interval of C y over the output node's own bounds."""
    ibp_lb, ibp_ub = _spec_interval(C, out)
    return (None if lb is None else torch.maximum(lb, ibp_lb)), (None if ub is None else torch.minimum(ub, ibp_ub))


class _Tracer(fx.Tracer):
    """torch.fx's tracer that also keeps modules of registered classes whole
    (``verifier.ops.register(modules=[...])``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m) or super().is_leaf_module(m, module_qualified_name)


def _spec_interval(C: Tensor, out: Bounds) -> tuple[Tensor, Tensor]:
    """Interval of C y for y in [out.lower, out.upper]; C (B, S, n), out (B, n) -> (B, S) each."""
    C = C.flatten(2)
    lo, hi = out.lower.flatten(1).unsqueeze(-1), out.upper.flatten(1).unsqueeze(-1)
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    mid = torch.bmm(C, center).squeeze(-1)
    rad = torch.bmm(C.abs(), radius).squeeze(-1)
    return mid - rad, mid + rad
