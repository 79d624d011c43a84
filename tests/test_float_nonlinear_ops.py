"""Float soundness (issue 26) of the non-linear ops of issue 22 (verifier/ops/elementwise.py,
piecewise.py, bilinear.py, softmax.py), with ZERO tolerance: in float mode "sound", on boxes of
widths 0 and 1e-7 .. 1e-3 around random points (and on kinks), and on wide boxes, every output at
sampled points and box corners -- of onnxruntime on a one-node ONNX model built with
onnx.helper, of torch in float32, and the float64 value -- lies inside the IBP and CROWN bounds
that the pass (verifier/bounds/floating.py) produces, computed in float32 and in float64; graphs
mixing these ops are no longer refused in mode "sound" and their bounds hold likewise; one
backward step with any alpha holds within its float error; the gains bound perturbations and
coefficients; the per-end errors (``float_error_ends``) hold for the runtime.

The libm rule (relax.LIBM_ERROR = 16 u |f|) was set against these measurements, 2 * 10^6 points
per range, error / (u |y|): onnxruntime 1.32 exp 1.3, log 3.8, sqrt and 1/x 1.0, sin and cos 2.9
(|x| up to 1e7), pow 2.0 (x^3); torch 2.14 (CPU) at most 1.6. Softmax (K = 5, 64, 1000, rows
N(0, s^2), s = 1, 10, 40): up to 67.9 u relative, growing with the row's spread, at most 0.37 of
Softmax's rule 2 (16 + spread) u + gamma_{K+2}. (Scripts: /work/briefs/out/Grelax2-measure_*.py.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.bounds.floating import attach, make_float_model, unsupported_ops
from verifier.bounds.ibp import ibp_bounds
from verifier.graph import BoundGraph, Node
from verifier.ops import Bounds, ElementwiseAffine, Linear, Rearrange, constant
from verifier.ops.bilinear import MatMul, Mul
from verifier.ops.elementwise import Cos, Exp, Log, Pow, Reciprocal, Sin, Sqrt
from verifier.ops.piecewise import Clip, Floor, LeakyReLU, Maximum, Minimum, Sign
from verifier.ops.rounding import Rounding
from verifier.ops.softmax import Softmax

DTYPES = (torch.float32, torch.float64)
WIDTHS = (0.0, 1e-7, 1e-5, 1e-3)
POINTS = 300


def _f(*values):
    return np.asarray(values, dtype=np.float32)


# The ops' constants are the float32 values a loader reads from the ONNX file (0.1 is not one).
# name -> (op factory, ONNX op type, attributes, constant ONNX inputs after x, operand shapes,
#          centres (low, high) of the random boxes, kinks to centre boxes on, wide box width)
CASES = {
    "exp": (Exp, "Exp", {}, [], [(6,)], (-20.0, 20.0), [0.0], 4.0),
    "log": (Log, "Log", {}, [], [(6,)], (0.05, 50.0), [1.0], 0.04),
    "sqrt": (Sqrt, "Sqrt", {}, [], [(6,)], (0.05, 50.0), [1.0], 0.04),
    "reciprocal": (Reciprocal, "Reciprocal", {}, [], [(6,)], (0.05, 50.0), [-1.0], 0.04),
    "pow3": (lambda: Pow(3), "Pow", {}, [_f(3.0)], [(6,)], (-10.0, 10.0), [0.0], 3.0),
    "pow2": (lambda: Pow(2), "Pow", {}, [_f(2.0)], [(6,)], (-10.0, 10.0), [0.0], 3.0),
    "pow_minus2": (lambda: Pow(-2), "Pow", {}, [_f(-2.0)], [(6,)], (0.2, 10.0), [1.0], 0.1),
    "pow_1.5": (lambda: Pow(1.5), "Pow", {}, [_f(1.5)], [(6,)], (0.2, 10.0), [1.0], 0.1),
    "sin": (Sin, "Sin", {}, [], [(6,)], (-100.0, 100.0), [0.0, math.pi / 2, 1000.0], 3.0),
    "cos": (Cos, "Cos", {}, [], [(6,)], (-100.0, 100.0), [0.0, math.pi, 1000.0], 3.0),
    "sin_far": (Sin, "Sin", {}, [], [(6,)], (1e8, 1e9), [3e8], 10.0),
    "leaky_relu": (lambda: LeakyReLU(float(_f(0.1)[0])), "LeakyRelu", {"alpha": 0.1}, [], [(6,)], (-5.0, 5.0),
                   [0.0], 4.0),
    "clip": (lambda: Clip(-1.0, 2.0), "Clip", {}, [_f(-1.0), _f(2.0)], [(6,)], (-4.0, 4.0), [-1.0, 2.0], 4.0),
    "sign": (Sign, "Sign", {}, [], [(6,)], (-2.0, 2.0), [0.0], 2.0),
    "floor": (Floor, "Floor", {}, [], [(6,)], (-5.0, 5.0), [1.0, -2.0], 3.0),
    "mul": (Mul, "Mul", {}, [], [(6,), (6,)], (-10.0, 10.0), [0.0], 2.0),
    "max": (Maximum, "Max", {}, [], [(6,), (6,)], (-3.0, 3.0), [0.0], 2.0),
    "min": (Minimum, "Min", {}, [], [(6,), (6,)], (-3.0, 3.0), [0.0], 2.0),
    "matmul": (MatMul, "MatMul", {}, [], [(3, 4), (4, 2)], (-3.0, 3.0), [0.0], 1.0),
    "softmax": (lambda: Softmax(-1), "Softmax", {"axis": -1}, [], [(3, 5)], (-8.0, 8.0), [0.0], 2.0),
}


def _numel(shape) -> int:
    return int(np.prod(shape))


def _out_shape(name: str) -> tuple[int, ...]:
    factory, shapes = CASES[name][0], CASES[name][4]
    return tuple(factory().forward(*[torch.ones(1, *s) for s in shapes]).shape[1:])


def _graph(name: str, dtype: torch.dtype) -> BoundGraph:
    """The op on slices of one flat input (Rearrange: exact), in ``dtype``, float mode sound."""
    factory, _, _, _, shapes, _, _, _ = CASES[name]
    total = sum(_numel(s) for s in shapes)
    nodes, start = [Node("x", None, (), (total,))], 0
    for k, shape in enumerate(shapes):
        index = torch.arange(start, start + _numel(shape))
        nodes.append(Node(f"operand{k}", Rearrange(index, (total,), shape), (0,), tuple(shape), "Slice"))
        start += _numel(shape)
    nodes.append(Node("op", factory(), tuple(range(1, len(shapes) + 1)), _out_shape(name), CASES[name][1]))
    graph = BoundGraph(nodes, len(nodes) - 1).cast(torch.device("cpu"), dtype)
    attach(graph, make_float_model(graph, "sound", torch.device("cpu"), dtype))
    return graph


def _session(name: str):
    """onnxruntime on a one-node ONNX model of the op (opset 13), one thread, float32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    _, op_type, attrs, constants, shapes, _, _, _ = CASES[name]
    names = [f"in{k}" for k in range(len(shapes))]
    inits = [helper.make_tensor(f"c{k}", TensorProto.FLOAT, list(c.shape), c.reshape(-1).tolist())
             for k, c in enumerate(constants)]
    node = helper.make_node(op_type, names + [f"c{k}" for k in range(len(constants))], ["y"], **attrs)
    graph = helper.make_graph(
        [node], name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", *s]) for n, s in zip(names, shapes)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", *_out_shape(name)])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), names


@pytest.fixture(scope="module")
def sessions():
    return {name: _session(name) for name in CASES}


def _boxes(name: str, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """float32 boxes (total,): every width of WIDTHS around 3 random centres and around a kink,
    and a wide box around a random centre."""
    _, _, _, _, shapes, (low, high), kinks, wide = CASES[name]
    total = sum(_numel(s) for s in shapes)
    out = []
    centres = [low + (high - low) * torch.rand(total, generator=gen, dtype=torch.float64) for _ in range(3)]
    kink = torch.tensor(kinks, dtype=torch.float64)[torch.randint(len(kinks), (total,), generator=gen)]
    for c, where in [(c, "random") for c in centres] + [(kink, "kink")]:
        for width in WIDTHS:
            out.append(((c - width / 2).float(), (c + width / 2).float(), f"{where} width {width:g}"))
    c = low + wide / 2 + (high - low - wide) * torch.rand(total, generator=gen, dtype=torch.float64)
    out.append(((c - wide / 2).float(), (c + wide / 2).float(), f"wide {wide:g}"))
    return out


def _points(lower: torch.Tensor, upper: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """float32 points (M, total): both ends, random corners, uniform points."""
    signs = torch.rand((POINTS, *lower.shape), generator=gen) < 0.5
    corners = torch.where(signs, lower, upper)
    uniform = lower + (upper - lower) * torch.rand((POINTS, *lower.shape), generator=gen)
    uniform = torch.minimum(torch.maximum(uniform, lower), upper)
    return torch.cat([lower[None], upper[None], corners, uniform]).float()


def _values(name: str, graph32: BoundGraph, graph64: BoundGraph, session, points: torch.Tensor) -> dict:
    """(M, n_out) float64 outputs: onnxruntime's, torch's in float32, float64's."""
    ort_session, names = session
    shapes = CASES[name][4]
    feeds, start = {}, 0
    for n, shape in zip(names, shapes):
        feeds[n] = points[:, start:start + _numel(shape)].reshape(-1, *shape).numpy()
        start += _numel(shape)
    M = len(points)
    with torch.no_grad():
        return {"onnxruntime": torch.as_tensor(ort_session.run(None, feeds)[0], dtype=torch.float64).reshape(M, -1),
                "torch float32": graph32.forward(points).double().reshape(M, -1),
                "float64": graph64.forward(points.double()).reshape(M, -1)}


def _assert_inside(lower, upper, values: dict, what: str) -> None:
    lower, upper = lower.detach().double().reshape(1, -1), upper.detach().double().reshape(1, -1)
    assert bool((lower <= upper).all()), f"{what}: bounds cross"
    for who, y in values.items():
        below, above = float((lower - y).max()), float((y - upper).max())
        assert below <= 0 and above <= 0, f"{what}: {who} output outside the bounds by {max(below, above):.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", list(CASES))
def test_runtime_and_real_outputs_inside_sound_bounds(sessions, name, dtype):
    graph = _graph(name, dtype)
    graph32, graph64 = _graph(name, torch.float32), _graph(name, torch.float64)
    assert unsupported_ops(graph) == []
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    n_out = graph.nodes[graph.output].numel
    C = torch.eye(n_out, dtype=dtype).reshape(1, n_out, *graph.nodes[graph.output].shape)
    for lower, upper, where in _boxes(name, gen):
        values = _values(name, graph32, graph64, sessions[name], _points(lower, upper, gen))
        box = Bounds(lower.unsqueeze(0).to(dtype), upper.unsqueeze(0).to(dtype))
        what = f"{name} {dtype} {where}"
        with torch.no_grad():
            ibp = ibp_bounds(graph, box)[graph.output]
            bounds = crown_bounds(graph, box)
            lb, ub = output_bounds(graph, box, C, bounds)
        _assert_inside(ibp.lower, ibp.upper, values, what + " IBP")
        _assert_inside(lb, ub, values, what + " CROWN")
        if "wide" not in where:   # tiny boxes: the widening is a rounding error, not a collapse
            assert bool(torch.isfinite(lb).all() & torch.isfinite(ub).all()), f"{what}: CROWN bounds not finite"


# ---- graphs mixing the ops, through the project's own passes ---------------------------------------
def _shift(c: float, dtype) -> ElementwiseAffine:
    return ElementwiseAffine(constant(torch.tensor(1.0, dtype=dtype)), constant(torch.tensor(c, dtype=dtype)))


def _linear(gen, n_in, n_out, dtype, scale=1.0) -> Linear:
    W = scale * torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5
    b = 0.1 * torch.randn(n_out, generator=gen, dtype=torch.float64)
    return Linear(constant(W.to(dtype)), constant(b.to(dtype)))


def _transpose(rows: int, cols: int) -> Rearrange:
    return Rearrange(torch.arange(rows * cols).reshape(rows, cols).t().reshape(-1), (rows, cols), (cols, rows))


def _attention(dtype):
    """x (4, 3) -> softmax(q k^T) v -> Linear (tests/test_ops_nonlinear_graphs.py's block)."""
    gen = torch.Generator().manual_seed(22)
    ops = [(_linear(gen, 3, 3, dtype, 2.0), (0,), (4, 3)), (_linear(gen, 3, 3, dtype, 2.0), (0,), (4, 3)),
           (_linear(gen, 3, 3, dtype), (0,), (4, 3)), (_transpose(4, 3), (2,), (3, 4)), (MatMul(), (1, 4), (4, 4)),
           (Softmax(-1), (5,), (4, 4)), (MatMul(), (6, 3), (4, 3)), (_linear(gen, 3, 2, dtype), (7,), (4, 2))]
    return ops, (4, 3)


def _elementwise_mix(dtype):
    """x (6,) through every elementwise op, recombined by Mul, Maximum, Minimum, Softmax."""
    gen = torch.Generator().manual_seed(26)
    ops = [(_linear(gen, 6, 6, dtype), (0,)), (Exp(), (1,)), (Sin(), (0,)), (Mul(), (2, 3)), (Clip(-1.0, 1.0), (4,)),
           (LeakyReLU(0.25), (5,)), (Sign(), (1,)), (Maximum(), (6, 7)), (Pow(2), (8,)), (_shift(0.25, dtype), (9,)),
           (Sqrt(), (10,)), (_shift(1.5, dtype), (11,)), (Log(), (12,)), (Reciprocal(), (12,)), (Floor(), (0,)),
           (Cos(), (15,)), (Mul(), (13, 16)), (Pow(3), (14,)), (Minimum(), (17, 18)), (Softmax(-1), (19,)),
           (_linear(gen, 6, 3, dtype), (20,))]
    return [(op, ins, (3,) if i == len(ops) - 1 else (6,)) for i, (op, ins) in enumerate(ops)], (6,)


def _bound_graph(builder, dtype) -> BoundGraph:
    ops, shape = builder(dtype)
    nodes = [Node("x", None, (), shape)]
    nodes += [Node(f"n{i}", op.cast(torch.device("cpu"), dtype), ins, out, type(op).__name__)
              for i, (op, ins, out) in enumerate(ops, start=1)]
    graph = BoundGraph(nodes, len(nodes) - 1)
    attach(graph, make_float_model(graph, "sound", torch.device("cpu"), dtype))
    return graph


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("radius", [0.0, 1e-6, 1e-3, 0.2])
@pytest.mark.parametrize("builder", [_attention, _elementwise_mix], ids=["attention", "elementwise_mix"])
def test_graphs_of_the_new_ops_are_bounded_in_mode_sound(builder, radius, dtype):
    """No op of these graphs lacks a rounding rule (``verify`` would refuse it), and the sound
    IBP and CROWN bounds of the project's passes contain torch's float32 and float64 outputs."""
    graph = _bound_graph(builder, dtype)
    assert unsupported_ops(graph) == []
    graph32, graph64 = _bound_graph(builder, torch.float32), _bound_graph(builder, torch.float64)
    gen = torch.Generator().manual_seed(int(radius * 1e6) + 7)
    shape = graph.input_shape
    centre = torch.randn(shape, generator=gen, dtype=torch.float64)
    lower, upper = (centre - radius).float(), (centre + radius).float()
    points = _points(lower, upper, gen)
    with torch.no_grad():
        values = {"torch float32": graph32.forward(points).double().flatten(1),
                  "float64": graph64.forward(points.double()).flatten(1)}
        box = Bounds(lower.unsqueeze(0).to(dtype), upper.unsqueeze(0).to(dtype))
        n_out = graph.nodes[graph.output].numel
        C = torch.eye(n_out, dtype=dtype).reshape(1, n_out, *graph.nodes[graph.output].shape)
        ibp = ibp_bounds(graph, box)[graph.output]
        bounds = crown_bounds(graph, box)
        lb, ub = output_bounds(graph, box, C, bounds)
    what = f"{builder.__name__} {dtype} radius {radius:g}"
    _assert_inside(ibp.lower, ibp.upper, values, what + " IBP")
    _assert_inside(lb, ub, values, what + " CROWN")
    for i, b in enumerate(bounds):
        assert b is None or bool((b.lower <= b.upper).all()), f"{what}: node {i} has lower > upper"
    if radius <= 1e-3:
        assert bool(torch.isfinite(lb).all() & torch.isfinite(ub).all()), f"{what}: CROWN bounds not finite"


# ---- one backward step with any alpha -----------------------------------------------------------
STEP_CASES = {
    "exp": (Exp, [(6,)], (-5.0, 5.0)), "log": (Log, [(6,)], (0.1, 20.0)), "sqrt": (Sqrt, [(6,)], (0.1, 20.0)),
    "reciprocal": (Reciprocal, [(6,)], (0.1, 20.0)), "pow3": (lambda: Pow(3), [(6,)], (-4.0, 4.0)),
    "sin": (Sin, [(6,)], (-20.0, 20.0)), "cos": (Cos, [(6,)], (-20.0, 20.0)),
    "leaky_relu": (lambda: LeakyReLU(0.25), [(6,)], (-3.0, 3.0)),
    "clip": (lambda: Clip(-1.0, 2.0), [(6,)], (-4.0, 4.0)),
    "sign": (Sign, [(6,)], (-2.0, 2.0)), "floor": (Floor, [(6,)], (-5.0, 5.0)),
    "mul": (Mul, [(6,), (1,)], (-3.0, 3.0)), "max": (Maximum, [(6,), (6,)], (-3.0, 3.0)),
    "min": (Minimum, [(1,), (6,)], (-3.0, 3.0)), "matmul": (MatMul, [(3, 4), (4, 2)], (-3.0, 3.0)),
    "softmax": (lambda: Softmax(-1), [(3, 5)], (-4.0, 4.0)),
}


@pytest.mark.parametrize("width", [1e-6, 1e-3, 1.0])
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_one_backward_step_holds_within_its_float_error_for_any_alpha(name, width):
    """A bound pushed through the op in float32 with random A and random alpha (the default
    lines for ops without alpha), less ``|A| . float_error`` of a "backward" Rounding, holds for
    the op's real value (float64) at every sampled point of the box: the rule covers our own
    rounding of the step for every relaxation alpha-CROWN may pick. (The check itself runs in
    float64, whose rounding is ~1e-9 of the slack tested.)"""
    factory, shapes, (low, high) = STEP_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + int(width * 1e6))
    op = factory()
    centres = [low + width + (high - low - 2 * width) * torch.rand((2, *s), generator=gen, dtype=torch.float64)
               for s in shapes]
    bs = [Bounds((c - width).float(), (c + width).float()) for c in centres]
    out = op.forward(*[b.lower for b in bs])
    A = torch.randn((2, 8, *out.shape[1:]), generator=gen)
    kwargs = {}
    if getattr(op, "optimisable", False):
        kwargs = {"alpha_l": torch.rand(A.shape, generator=gen), "alpha_u": torch.rand(A.shape, generator=gen)}
    with torch.no_grad():
        result = op.backward(A, A, *bs, **kwargs)
        w = op.float_error(bs, Rounding(2.0 ** -24, 8, "backward"))
    slack = (A.double().abs() * w.double().unsqueeze(1)).flatten(2).sum(-1)                      # (N, S)
    t = [torch.rand((400, *b.lower.shape), generator=gen, dtype=torch.float64) for b in bs]
    t = [torch.cat([torch.zeros_like(ti[:1]), torch.ones_like(ti[:1]), ti.round()[:100], ti[100:]]) for ti in t]
    xs = [(b.lower.double() + ti * (b.upper - b.lower).double()).float().double() for b, ti in zip(bs, t)]
    xs = [torch.minimum(torch.maximum(x, b.lower.double()), b.upper.double()) for x, b in zip(xs, bs)]
    f = op.forward(*[x.flatten(0, 1) for x in xs]).reshape(len(xs[0]), *out.shape)                # (P, N, *out)
    objective = (A.double().unsqueeze(0) * f.unsqueeze(2)).flatten(3).sum(-1)                       # (P, N, S)
    sides = []
    for k, (A_in_l, A_in_u) in enumerate(result.input_A):
        x = xs[k].unsqueeze(2)
        sides.append([(A_in.double().unsqueeze(0) * x).flatten(3).sum(-1) for A_in in (A_in_l, A_in_u)])
    lower = sum(s[0] for s in sides) + torch.as_tensor(result.lbias).double() - slack
    upper = sum(s[1] for s in sides) + torch.as_tensor(result.ubias).double() + slack
    assert bool((lower <= objective).all()), f"{name} width {width}: a lower bound exceeds A . f(x) by " \
        f"{float((lower - objective).max()):.3g}"
    assert bool((objective <= upper).all()), f"{name} width {width}: an upper bound is below A . f(x) by " \
        f"{float((objective - upper).max()):.3g}"


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_float_gains_bound_perturbations_and_coefficients(name):
    """``float_gain``: |f(x + d) - f(x)| <= gain(|d|) for x in the box and |d| <= e (the box
    widened by e within the domain); ``float_coefficient_gain``: sum |A_in| . m <= |A| . G(m) for
    the coefficients of a backward step with random alpha. Both given the input bounds; float64."""
    factory, shapes, (low, high) = STEP_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    op = factory().cast(torch.device("cpu"), torch.float64)
    width = 0.05 * (high - low)
    centres = [low + 2 * width + (high - low - 4 * width) * torch.rand((2, *s), generator=gen, dtype=torch.float64)
               for s in shapes]
    bs = [Bounds(c - width, c + width) for c in centres]
    errors = [width * torch.rand(c.shape, generator=gen, dtype=torch.float64) for c in centres]
    gain = op.float_gain(*errors, inputs=bs)
    for _ in range(200):
        xs = [b.lower + (b.upper - b.lower) * torch.rand(b.lower.shape, generator=gen, dtype=torch.float64) for b in bs]
        ds = [e * (2 * torch.rand(e.shape, generator=gen, dtype=torch.float64) - 1) for e in errors]
        moved = op.forward(*[x + d for x, d in zip(xs, ds)]) - op.forward(*xs)
        assert bool((moved.abs() <= gain).all()), f"{name}: |f(x + d) - f(x)| above float_gain"
    out = op.forward(*[b.lower for b in bs])
    A = torch.randn((2, 8, *out.shape[1:]), generator=gen, dtype=torch.float64)
    kwargs = {}
    if getattr(op, "optimisable", False):
        kwargs = {"alpha_l": torch.rand(A.shape, generator=gen, dtype=torch.float64),
                  "alpha_u": torch.rand(A.shape, generator=gen, dtype=torch.float64)}
    magnitudes = [torch.rand(c.shape, generator=gen, dtype=torch.float64) for c in centres]
    G = op.float_coefficient_gain(*magnitudes, inputs=bs)
    result = op.backward(A, A, *bs, **kwargs)
    for side in range(2):
        reached = sum((A_in[side].abs() * m.unsqueeze(1)).flatten(2).sum(-1)
                      for A_in, m in zip(result.input_A, magnitudes))
        allowed = (A.abs() * G.unsqueeze(1)).flatten(2).sum(-1)
        assert bool((reached <= allowed).all()), f"{name}: |A_in| . m above |A| . float_coefficient_gain(m)"


ENDS_CASES = ["exp", "log", "sqrt", "reciprocal", "pow3", "pow2", "pow_minus2", "pow_1.5", "sin", "cos",
              "leaky_relu", "mul", "softmax"]


@pytest.mark.parametrize("name", ENDS_CASES)
def test_per_end_errors_hold_for_the_runtime(sessions, name):
    """``float_error_ends`` (errors relative to each end of the IBP bounds, for a widening that
    keeps a small positive end positive, e.g. exp before log): the op's IBP ends, in float32,
    moved out by our IBP's and the runtime's error at that end, contain onnxruntime's, torch's
    float32 and float64 outputs, with zero tolerance; each is at most ``float_error``."""
    op = CASES[name][0]()
    graph32, graph64 = _graph(name, torch.float32), _graph(name, torch.float64)
    fm = graph32.float_model
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + 1)
    shapes = CASES[name][4]
    for lower, upper, where in _boxes(name, gen):
        values = _values(name, graph32, graph64, sessions[name], _points(lower, upper, gen))
        inputs, start = [], 0
        for s in shapes:
            n = _numel(s)
            inputs.append(Bounds(lower[start:start + n].reshape(1, *s), upper[start:start + n].reshape(1, *s)))
            start += n
        with torch.no_grad():
            out = op.ibp(*inputs)
            own, runtime = op.float_error_ends(inputs, fm.own_ibp), op.float_error_ends(inputs, fm.runtime)
            for ends, rounding in ((own, fm.own_ibp), (runtime, fm.runtime)):
                symmetric = op.float_error(inputs, rounding)
                assert bool((ends.lower <= symmetric).all() & (ends.upper <= symmetric).all())
            # moved out in float64 (exact enough: 1e-16 of the float32 widening tested)
            low = out.lower.double() - own.lower.double() - runtime.lower.double()
            high = out.upper.double() + own.upper.double() + runtime.upper.double()
        _assert_inside(low, high, values, f"{name} {where} per-end IBP")
