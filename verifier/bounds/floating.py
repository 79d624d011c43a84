"""Float soundness (issue 26): bounds that hold for the network as a float32 runtime computes it,
computed soundly in our own floating-point arithmetic.

Model. The runtime (onnxruntime) evaluates node k as ``z'_k = f_k(z'_inputs) + d_k`` with a
local rounding error |d_k| <= e_k, where e_k depends only on bounds of the inputs' runtime values
(``Op.float_error`` with a "forward" Rounding; Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., ch. 3: a dot product of length n in any order, with or without FMA, has
``|fl(w . x) - w . x| <= gamma_n |w| . |x|``, ``gamma_n = n u / (1 - n u)``, u = 2^-24; ReLU and
max are exact on floats; sigmoid and tanh within ``function_error``; a BatchNorm, folded into the
layer before by the runtime or not, rounds constants of at most the model's |mean scale| + |beta|).
The real-valued network is the case d = 0. Jia and Rinard ("Exploiting Verified Neural Networks
via Floating Point Numerical Error", SAS 2021) show that a verifier that bounds only d = 0 can be
made to prove false properties; benchmarks/data/float_exploit holds such instances.

Every bound of node i that we compute holds for both, z_i and z'_i, by induction over the nodes:
- IBP (``widen_ibp``): the interval of f_k over the inputs' intervals (which hold for both), each
  end widened by our own rounding of that IBP step ("ibp" Rounding) and by e_k.
- A backward pass (CROWN, alpha, beta; ``PassSlack``): at node k it holds computed coefficients
  A_k and bias, meaning ``objective >= A_k . z_k + bias`` for every admissible value. One step
  through node k replaces z_k by f_k(inputs) + d_k (valid for z' and, with d = 0, for z) and the
  relaxation of f_k, computed in floating point; the computed results differ from the exact
  image of the computed A_k by at most ``|A_k| . v_k`` over the inputs' ranges (``Op.float_error``
  with a "backward" Rounding: coefficient products, the bias sums over the node, the rounded
  ReLU chord's shortfall; the lower lines a y, a in [0, 1], hold exactly), and d_k costs at most
  ``|A_k| . e_k``. So the proven bound is the computed one minus ``sum_k |A_k| . (v_k + e_k)``,
  which the pass accumulates as it runs, with the A_k it has (``step``), plus the final
  concretisation over the box (centre and radius rounded, two dot products of length d:
  ``2 gamma_{d+4} |A_0| . |x|_max``). Coefficients added at a node with several consumers, and
  beta-CROWN's ``beta z`` term, round once more (``weight``). The relaxations are built from the
  intermediate bounds, which hold for both networks, so they hold for both.
- From the output node, room for the specification's rounding (C and rhs of the VNN-LIB file
  stored in our dtype): ``3 u |C| . |y|_max``.
The slack is computed in floating point too: every gamma's length has ``Rounding.extra`` (nodes
+ 8) added (the bias terms of a pass are summed over the nodes; the slack's own few roundings),
the total is multiplied by ``1 + 2 gamma`` of the largest node, and the subtraction from the
bound carries a pad of ``4 u (|bound| + slack)``.

Assumptions (stated, not proven): the runtime rounds to nearest in IEEE float32 with dot products
and direct or im2col + GEMM convolutions (MLAS; no Winograd/FFT convolution), and its sigmoid and
tanh are within ``function_error``; our torch arithmetic rounds to nearest in the graph's dtype
(TF32 or a reduced-precision matmul is detected and taken as such).

Cost: K-RESULTS / RESULTS.md (benchmarks/float_cost.py). Mode "fast" attaches nothing of this.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..errors import UnsupportedOperatorError
from ..ops import Bounds
from ..ops.base import contract, magnitude
from ..ops.rounding import Rounding

MODES = ("sound", "fast")
# Absolute error allowed to a runtime's sigmoid / tanh (MLAS uses polynomial approximations):
# 2^-18, measured above the worst we found on a dense grid (tests/test_float_soundness.py).
RUNTIME_FUNCTION_ERROR = 2.0 ** -18


@dataclass(frozen=True)
class FloatModel:
    """What the float-soundness pass assumes of one graph: ``mode`` ("sound" widens every bound,
    "fast" does nothing), our own rounding and the runtime's."""

    mode: str
    own: Rounding        # our backward steps (step "backward")
    runtime: Rounding    # the runtime's forward evaluation (step "forward")

    @property
    def own_ibp(self) -> Rounding:
        return replace(self.own, step="ibp")


def unit_roundoff(dtype: torch.dtype, device: torch.device, has_conv: bool = False) -> float:
    """Unit roundoff of torch arithmetic in ``dtype`` on ``device``: float32 is 2^-24 unless a
    reduced-precision matmul is allowed (TF32 on CUDA: 2^-11; bfloat16 on CPU: 2^-8)."""
    if dtype == torch.float64:
        return 2.0 ** -53
    if dtype == torch.float16:
        return 2.0 ** -11
    if dtype == torch.bfloat16:
        return 2.0 ** -8
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0 ** -8
    if torch.device(device).type == "cuda" and (precision == "high" or torch.backends.cuda.matmul.allow_tf32
                                                or (has_conv and torch.backends.cudnn.allow_tf32)):
        return 2.0 ** -11
    return 2.0 ** -24


def make_float_model(graph, mode: str, device, dtype, runtime_dtype: torch.dtype = torch.float32,
                     constant_magnitude: float = 0.0) -> FloatModel:
    """The FloatModel of a graph whose bounds we compute in ``dtype`` on ``device``, for a runtime
    in ``runtime_dtype`` (the ONNX file's float type)."""
    from ..ops import Conv2d
    if mode not in MODES:
        from ..errors import UsageError
        raise UsageError(f"float mode must be one of {MODES}, got {mode!r}")
    has_conv = any(isinstance(n.op, Conv2d) for n in graph.nodes[1:])
    extra = len(graph.nodes) + 8
    own = Rounding(unit_roundoff(dtype, device, has_conv), extra, "backward")
    runtime_unit = 2.0 ** -53 if runtime_dtype == torch.float64 else 2.0 ** -24
    runtime = Rounding(runtime_unit, 8, "forward", RUNTIME_FUNCTION_ERROR, constant_magnitude)
    return FloatModel(mode, own, runtime)


def float_model_for(model, mode: str) -> FloatModel:
    """The FloatModel of a BoundedModel's graph: our dtype and device, the runtime's float type
    (an ONNX file's weights' type; float32 for a module) and the model's BatchNorm constants."""
    import torch.nn as nn
    graph = model.graph()
    module = model.onnx.graph_module if model.onnx is not None else model.module
    runtime_dtype, constant = torch.float32, 0.0
    if module is not None:
        floats = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
        runtime_dtype = floats[0].dtype if floats else torch.float32
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                with torch.no_grad():
                    f64 = lambda t: t.detach().double().cpu()
                    scale = (f64(m.weight) if m.weight is not None else 1.0) / torch.sqrt(f64(m.running_var) + m.eps)
                    beta = f64(m.bias).abs() if m.bias is not None else 0.0
                    constant = max(constant, float((f64(m.running_mean) * scale).abs().add(beta).max()))
    return make_float_model(graph, mode, model.device, model.dtype, runtime_dtype, constant)


def attach(graph, float_model: Optional[FloatModel]) -> None:
    """Make the bound passes over ``graph`` (IBP, CROWN, alpha, beta) apply ``float_model``
    (None: neither widening nor checks, the passes as they were before issue 26)."""
    graph.float_model = float_model


def float_model_of(graph) -> Optional[FloatModel]:
    fm = getattr(graph, "float_model", None)
    return fm if fm is not None and fm.mode == "sound" else None


def unsupported_ops(graph) -> list[str]:
    """Names of the nodes whose op has no rounding rule (``Op.float_error`` returns None)."""
    missing = []
    for node in graph.nodes[1:]:
        if type(node.op).float_error is _base_float_error():
            missing.append(f"{node.name} ({node.source or type(node.op).__name__})")
    return missing


def _base_float_error():
    from ..ops import Op
    return Op.float_error


# ---- widening ---------------------------------------------------------------------------------
def _down(value: Tensor, slack: Tensor, unit: float) -> Tensor:
    """A float <= value - slack (exact): the subtraction's rounding is covered by a pad."""
    pad = 4 * unit * (value.detach().abs() + slack) + torch.finfo(value.dtype).tiny
    return value - (slack + pad)


def _up(value: Tensor, slack: Tensor, unit: float) -> Tensor:
    pad = 4 * unit * (value.detach().abs() + slack) + torch.finfo(value.dtype).tiny
    return value + (slack + pad)


def _widen(b: Bounds, slack: Tensor, unit: float) -> Bounds:
    return Bounds(_down(b.lower, slack, unit), _up(b.upper, slack, unit))


# ---- local errors ---------------------------------------------------------------------------------
def local_error(graph, fm: FloatModel, index: int, inputs: list, step: str = "backward") -> Tensor:
    """The error bound of one step at node ``index`` (N, *shape): our own (``step`` "ibp": an
    IBP end, "backward": a backward step per unit of |A|) plus the runtime's forward step, given
    Bounds ``inputs`` of its inputs that hold for the real-valued and for the runtime's values.
    An op without rounding rules raises UnsupportedOperatorError (``verify`` answers unknown
    before it bounds anything: ``verifier.float_check``)."""
    op = graph.nodes[index].op
    own = op.float_error(inputs, fm.own if step == "backward" else fm.own_ibp)
    runtime = op.float_error(inputs, fm.runtime)
    if own is None or runtime is None:
        node = graph.nodes[index]
        raise UnsupportedOperatorError(f"node '{node.name}' ({node.source or type(op).__name__}): no rounding "
                                       "rule for float mode sound (Op.float_error); use float mode fast")
    return own + runtime


class PassSlack:
    """The slack of one backward pass from node ``start``, accumulated as the pass runs:
    ``sum_k |A_k| . w_k`` over the steps it takes (``step``), with ``w_k`` the local error of
    node k (ours and the runtime's, ``local_error``), plus the concretisation over the box
    (``finish``). ``bounds``: per node, Bounds (N, *shape) that hold for real and runtime values
    (None where a pass never needs them: then IBP from the inputs, widened)."""

    def __init__(self, graph, fm: FloatModel, start: int, bounds: list, box: Bounds, splits=None):
        self.graph, self.fm, self.start = graph, fm, start
        self.values = {0: box}
        self.bounds = bounds
        self.betas = {} if splits is None else splits.betas
        self.lower: Tensor | float = 0.0
        self.upper: Tensor | float = 0.0

    def value(self, i: int) -> Bounds:
        if i not in self.values:
            b = self.bounds[i] if i < len(self.bounds) else None
            if b is None:
                node = self.graph.nodes[i]
                inputs = [self.value(j) for j in node.inputs]
                b = _widen(node.op.ibp(*inputs), local_error(self.graph, self.fm, i, inputs, "ibp"), self.fm.own.unit)
            self.values[i] = b
        return self.values[i]

    def weight(self, i: int) -> Tensor:
        """w_i (N, *shape_i): the error per unit of |A_i| of the step through node i."""
        graph, fm, own = self.graph, self.fm, self.fm.own
        node = graph.nodes[i]
        w = local_error(graph, fm, i, [self.value(j) for j in node.inputs])
        consumers = len(graph.consumers[i])
        extra = 0.0
        if consumers > 1:          # the coefficients of several consumers are added at this node
            extra += own.gamma(consumers)
        if i in self.betas:        # beta-CROWN's term added to the coefficients here
            extra += 2 * own.unit
        if i == graph.output == self.start:   # the specification's rounding (C, rhs)
            extra += 3 * own.unit
        return w + extra * magnitude(self.value(i)) if extra else w

    def _add(self, lA: Optional[Tensor], uA: Optional[Tensor], w: Tensor) -> None:
        w = w.unsqueeze(1)
        if lA is not None:
            self.lower = self.lower + contract(lA.detach().abs(), w)
        if uA is not None:
            self.upper = self.upper + contract(uA.detach().abs(), w)

    @torch.no_grad()
    def step(self, i: int, lA: Optional[Tensor], uA: Optional[Tensor]) -> None:
        """Account for the step of the pass through node i with coefficients lA, uA
        (N, S, *shape_i) on its output."""
        self._add(lA, uA, self.weight(i))

    @torch.no_grad()
    def linear_then_box_step(self, i: int, lA: Optional[Tensor], uA: Optional[Tensor]) -> None:
        """The step through a Linear on the input fused with the concretisation: w_i, and the
        box's own term through |W| (``|A W| v_0 <= |A| |W| v_0``)."""
        W = self.graph.nodes[i].op.weight()
        self._add(lA, uA, self.weight(i) + (self._box_weight() @ W.abs().t().double()).to(W.dtype))

    def _box_rounding(self) -> Rounding:
        """The concretisation runs in float64 (``concretize``): its rounding."""
        return Rounding(2.0 ** -53, self.fm.own.extra)

    def _box_weight(self) -> Tensor:
        """Per unit of |A_0|: centre and radius rounded, two dot products of length d (N, d)."""
        box = self.values[0]
        return 2 * self._box_rounding().gamma(box.lower[0].numel() + 4) * magnitude(box).flatten(1).double()

    def concretize(self, lA0: Optional[Tensor], uA0: Optional[Tensor], lbias, ubias, box: Bounds):
        """``crown.concretize`` in float64: the sums over the d inputs are the longest of a pass
        (their float32 error bound, gamma_d |A| |x|, dominated the slack of CROWN on an image).
        Returns lb, ub (N, S) in float64; ``finish`` rounds them back outward."""
        centre = ((box.upper.double() + box.lower.double()) / 2).flatten(1)
        radius = ((box.upper.double() - box.lower.double()) / 2).flatten(1)

        def bound(A: Tensor, bias, sign: float) -> Tensor:
            A = A.flatten(2)
            if A.shape[0] > 1 and A.stride(0) == 0:
                A0 = A[0].double()
                value = centre @ A0.t() + sign * (radius @ A0.abs().t())
            else:
                A = A.double()
                value = (A * centre.unsqueeze(1)).sum(-1) + sign * (A.abs() * radius.unsqueeze(1)).sum(-1)
            return value + bias
        return (None if lA0 is None else bound(lA0, lbias, -1.0)), (None if uA0 is None else bound(uA0, ubias, 1.0))

    def linear_then_box(self, lA: Optional[Tensor], uA: Optional[Tensor], op, box: Bounds):
        """``crown._linear_then_box`` with the concretisation in float64 (``A W`` in our dtype,
        a chunk of samples at a time). lA, uA (N, S, out) -> lb, ub (N, S) float64 or None."""
        W = op.weight()
        bias = op.bias() if op.bias is not None else None
        centre = ((box.upper.double() + box.lower.double()) / 2).flatten(1)
        radius = ((box.upper.double() - box.lower.double()) / 2).flatten(1)

        def bound(A: Tensor, sign: float) -> Tensor:
            offset = 0.0 if bias is None else A.matmul(bias)
            N, S = A.shape[:2]
            if N > 1 and A.stride(0) == 0:
                AW = (A[0] @ W).double()
                return centre @ AW.t() + sign * (radius @ AW.abs().t()) + offset
            step = max(1, (1 << 20) // max(1, S * W.shape[1]))
            parts = []
            for n in range(0, N, step):
                AW = A[n:n + step].matmul(W).double()                             # (n_c, S, d)
                parts.append((AW * centre[n:n + step].unsqueeze(1)).sum(-1)
                             + sign * (AW.abs() * radius[n:n + step].unsqueeze(1)).sum(-1))
            return torch.cat(parts) + offset
        return (None if lA is None else bound(lA, -1.0)), (None if uA is None else bound(uA, 1.0))

    def finish(self, lA0: Optional[Tensor], uA0: Optional[Tensor], lb: Optional[Tensor], ub: Optional[Tensor],
               start_rows: Optional[Tensor] = None):
        """lb, ub (N, S) of the pass, widened by its slack; lA0, uA0 (N, S, *in): the
        coefficients on the input. ``start_rows`` with a Linear start node whose rows the pass
        copied (exactly): the runtime's error of that node's own step is added."""
        with torch.no_grad():
            if lA0 is not None or uA0 is not None:
                w0 = self._box_weight().reshape(self.values[0].lower.shape)
                self._add(lA0, uA0, w0)
            if start_rows is not None and isinstance(self.graph.nodes[self.start].op, _linear_type()) \
                    and len(self.graph.nodes[self.start].shape) == 1:
                node = self.graph.nodes[self.start]
                runtime = node.op.float_error([self.value(j) for j in node.inputs], self.fm.runtime)
                rows = runtime if runtime is not None else torch.full_like(self.value(node.inputs[0]).lower, float("inf"))
                term = rows[:, start_rows] if start_rows.dim() == 1 else rows.gather(1, start_rows)
                self.lower, self.upper = self.lower + term, self.upper + term
            grow = 1 + 2 * self.fm.own.gamma(max(self.graph.nodes[i].numel for i in range(len(self.graph.nodes))))
            slack_l, slack_u = self.lower * grow, self.upper * grow
        # in float64 (``concretize``), then rounded to our dtype: the pad covers that rounding
        unit, dtype = self.fm.own.unit, self.values[0].lower.dtype
        return (None if lb is None else _down(lb, _as_tensor(slack_l, lb), unit).to(dtype)), \
            (None if ub is None else _up(ub, _as_tensor(slack_u, ub), unit).to(dtype))


def _as_tensor(slack, like: Tensor) -> Tensor:
    return slack if isinstance(slack, Tensor) else torch.full_like(like.detach(), float(slack))


def _linear_type():
    from ..ops import Linear
    return Linear


def pass_slack(graph, start: int, bounds: list, box: Bounds, splits=None) -> Optional[PassSlack]:
    """The PassSlack of a backward pass over ``graph``, or None without a "sound" FloatModel."""
    fm = float_model_of(graph)
    return None if fm is None else PassSlack(graph, fm, start, bounds, box, splits)


def widen_ibp(graph, index: int, b: Bounds, bounds: list) -> Bounds:
    """The IBP bounds ``b`` of node ``index`` computed from ``bounds`` (bounds of the nodes
    before it, holding for real and runtime values), widened by the step's own rounding and the
    runtime's error, so that they hold for both; the output node's also by room for a
    specification's rounding (C and rhs stored in our dtype, an interval product of length n).
    Unchanged without a "sound" FloatModel."""
    fm = float_model_of(graph)
    if fm is None:
        return b
    with torch.no_grad():
        node = graph.nodes[index]
        b = _widen(b, local_error(graph, fm, index, [bounds[j] for j in node.inputs], "ibp"), fm.own.unit)
        if index == graph.output:
            b = _widen(b, (fm.own.gamma(node.numel + 4) + 3 * fm.own.unit) * magnitude(b), fm.own.unit)
    return b
