"""The discrete ops (verifier/ops/discrete.py: IsMax, ArgMax, OneHot, Equal, Trunc) and the
selection converters (verifier/io/converters_selection.py: ArgMax -> OneHot, Equal, Cast,
ScatterND).

Soundness by sampling: >= 10^4 points of each box (plus points where entries tie, the jumps of
these step functions) lie within the IBP and CROWN bounds, in float32 and float64, on boxes
straddling ties. Exactness: ONNX semantics on ties (first index, ``select_last_index``), the
converted graphs equal onnxruntime, ScatterND's bounds equal the exact image of a linear map.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier.api import BoundedModel
from verifier.bounds.crown import backward_bound, crown_bounds
from verifier.graph import BoundGraph, Node
from verifier.ops import Bounds, Linear, constant
from verifier.ops.discrete import ArgMax, Equal, IsMax, OneHot, Trunc

DTYPES = [torch.float32, torch.float64]
SAMPLES = 10_000
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}   # on bounds of magnitude <= ~10


def _box_with_ties(gen, shape, dtype):
    """(lower, upper) (8, *shape) on an integer-ish grid, so that ends coincide often: ties of
    bounds, degenerate boxes and boxes touching each other."""
    a = torch.randint(-3, 4, (8, *shape), generator=gen).to(torch.float64) / 2
    b = a + torch.randint(0, 4, (8, *shape), generator=gen).to(torch.float64) / 2
    return a.to(dtype), b.to(dtype)


def _samples(gen, lower, upper, n=SAMPLES):
    """(n, B, *shape): uniform points, box corners, and points on the half-integer grid (where
    entries tie)."""
    u = torch.rand(n, *lower.shape, generator=gen, dtype=torch.float64).to(lower.dtype)
    x = lower + u * (upper - lower)
    grid = torch.ceil(lower * 2) / 2 + torch.randint(0, 4, (n, *lower.shape), generator=gen).to(lower.dtype) / 2
    on_grid = torch.rand(n, *lower.shape, generator=gen) < 0.5
    x = torch.where(on_grid & (grid <= upper), grid, x)
    corner = torch.rand(n, *lower.shape, generator=gen) < 0.1
    return torch.where(corner, torch.where(torch.rand(n, *lower.shape, generator=gen) < 0.5, lower, upper), x)


def _inside(values, b: Bounds, tol):
    return bool(((values >= b.lower - tol) & (values <= b.upper + tol)).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select_last", [False, True])
def test_ismax_and_argmax_ibp_contain_samples_on_boxes_with_ties(dtype, select_last):
    gen = torch.Generator().manual_seed(1)
    lower, upper = _box_with_ties(gen, (4, 3), dtype)
    xs = _samples(gen, lower, upper)
    for op in (IsMax(0, select_last), ArgMax(0, False, select_last), ArgMax(1, True, select_last)):
        b = op.ibp(Bounds(lower, upper))
        values = torch.stack([op.forward(x) for x in xs])
        assert _inside(values, b, 0.0), op.describe()


def test_ismax_follows_onnx_tie_breaking_and_decides_separated_boxes():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert IsMax(0).forward(x).tolist() == [[0, 1, 0, 0]]
    assert IsMax(0, select_last=True).forward(x).tolist() == [[0, 0, 1, 0]]
    # x1 in [2, 3], x0 in [1, 2]: a tie at 2 goes to x0 (first index), so x0 may win
    b = IsMax(0).ibp(Bounds(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 3.0]])))
    assert b.lower.tolist() == [[0, 0]] and b.upper.tolist() == [[1, 1]]
    # with the last index taking ties, x1 always wins
    b = IsMax(0, select_last=True).ibp(Bounds(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 3.0]])))
    assert b.lower.tolist() == [[0, 1]] and b.upper.tolist() == [[0, 1]]
    a = ArgMax(0).ibp(Bounds(torch.tensor([[0.0, 5.0, 1.0, 4.5]]), torch.tensor([[1.0, 6.0, 2.0, 5.5]])))
    assert a.lower.tolist() == [1.0] and a.upper.tolist() == [3.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_onehot_equal_trunc_ibp_contain_samples(dtype):
    gen = torch.Generator().manual_seed(2)
    lower, upper = _box_with_ties(gen, (5,), dtype)
    lower, upper = lower * 2, upper * 2          # indices in [-6, 12]: negative and out of range
    xs = _samples(gen, lower, upper)
    other_l, other_u = _box_with_ties(gen, (5,), dtype)
    ys = _samples(gen, other_l, other_u)
    constant_other = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0], dtype=dtype)
    cases = [(OneHot(4, 2), [Bounds(lower, upper)], [xs]), (OneHot(3, 1, off=2.0, on=-1.0), [Bounds(lower, upper)], [xs]),
             (Equal(), [Bounds(lower, upper), Bounds(other_l, other_u)], [xs, ys]),
             (Equal(constant_other), [Bounds(lower, upper)], [xs]), (Trunc(), [Bounds(lower, upper)], [xs])]
    for op, bounds, points in cases:
        b = op.ibp(*bounds)
        values = torch.stack([op.forward(*p) for p in zip(*points)])
        assert _inside(values, b, 0.0), op.describe()


def _chain(op, n_in, n_mid, n_out, dtype, gen, mid_shape=None):
    """input (n_in,) -> Linear -> (reshape) op -> Linear: a BoundGraph."""
    W1 = torch.randn(n_mid, n_in, generator=gen, dtype=torch.float64).to(dtype)
    W2 = torch.randn(n_out, n_mid, generator=gen, dtype=torch.float64).to(dtype)
    nodes = [Node("x", None, (), (n_in,)), Node("fc1", Linear(constant(W1), None), (0,), (n_mid,)),
             Node("op", op, (1,), (n_mid,)), Node("fc2", Linear(constant(W2), None), (2,), (n_out,))]
    return BoundGraph(nodes, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_crown_bounds_contain_samples_through_discrete_ops(dtype):
    gen = torch.Generator().manual_seed(3)
    for op in (IsMax(0), Trunc(), Equal(torch.zeros(6, dtype=dtype))):
        graph = _chain(op, 4, 6, 3, dtype, gen)
        center = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype)
        radius = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0], dtype=dtype).unsqueeze(1)
        box = Bounds(center - radius, center + radius)
        bounds = crown_bounds(graph, box)
        C = torch.eye(3, dtype=dtype).expand(5, 3, 3)
        lb, ub = backward_bound(graph, graph.output, C, C, bounds, box)
        xs = _samples(gen, box.lower, box.upper)
        values = torch.stack([graph.forward(x) for x in xs])
        assert _inside(values, Bounds(lb, ub), TOL[dtype] * 10), op.describe()


# ---- ONNX models through the converter -------------------------------------------------------
def _save(tmp_path, name, nodes, inputs, outputs, initializers=(), opset=13):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(model, path)
    return path


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _segmentation_count(tmp_path, depth, axis=-1, select_last=0):
    """x (1, 3, 4, 5): channels 0..1 -> 1x1 conv to 3 class scores -> the batch dim dropped
    (as carvana_unet does) -> ArgMax over classes -> OneHot -> class 1 -> Cast int32 == Cast int32
    of channel 2 (a mask, (1, 4, 5): Equal broadcasts) -> Cast -> ReduceSum: the number of pixels
    whose predicted class is 1 exactly where the mask is 1."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Slice", ["x", "s0", "s2", "ax1"], ["img"]),
        helper.make_node("Conv", ["img", "w"], ["scores"]),
        helper.make_node("Gather", ["scores", "zero"], ["scores0"], axis=0),
        helper.make_node("ArgMax", ["scores0"], ["cls"], axis=0, keepdims=0, select_last_index=select_last),
        helper.make_node("OneHot", ["cls", "depth", "values"], ["hot"], axis=axis),
        helper.make_node("Gather", ["hot", "one"], ["hot1"], axis=axis if axis >= 0 else 2),
        helper.make_node("Cast", ["hot1"], ["hot32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["x", "two"], ["mask"], axis=1),
        helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32),
        helper.make_node("Equal", ["hot32", "mask32"], ["same"]),
        helper.make_node("Cast", ["same"], ["same64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["same64"], ["count"], keepdims=0),
        helper.make_node("Cast", ["count"], ["total"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["total", "shape1"], ["y"]),
    ]
    inits = [_const("w", weight), _const("s0", [0]), _const("s2", [2]), _const("ax1", [1]),
             _const("depth", np.array(depth, dtype=np.int64)), _const("values", np.array([0, 1], dtype=np.int64)),
             _const("one", np.array(1, dtype=np.int64)), _const("zero", np.array(0, dtype=np.int64)), _const("two", np.array(2, dtype=np.int64)), _const("shape1", np.array([1]))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return _save(tmp_path, f"segcount_{depth}_{axis}_{select_last}", nodes, [x], [y], inits, opset=13)


def _points(gen, lower, upper, n):
    u = torch.rand(n, *lower.shape[1:], generator=gen, dtype=torch.float64)
    return lower + u * (upper - lower)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth,axis,select_last", [(3, -1, 0), (3, 0, 1), (4, -1, 0)])
def test_argmax_onehot_count_matches_onnxruntime_and_bounds_contain_samples(tmp_path, dtype, depth, axis, select_last):
    path = _segmentation_count(tmp_path, depth, axis, select_last)
    model = BoundedModel(path, dtype=dtype)
    fused = any(isinstance(n.op, IsMax) for n in model.graph().nodes)
    assert fused == (depth == 3)     # OneHot of an ArgMax over 3 classes: the one-hot of the maximum
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(4)
    center = torch.rand(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    center[:, 2] = (center[:, 2] > 0.5).double()          # the mask: fixed 0 / 1 entries
    x = _points(gen, center - 0.5, center + 0.5, 64)
    x[:, 2] = center[:, 2]
    x[:8, 1] = x[:8, 0]                                   # ties between the scores' inputs
    x = x.float().double()                                # points both runtimes read alike
    for point in x:
        ours = model.forward(point.unsqueeze(0).to(dtype))
        theirs = session.run(None, {"x": point.unsqueeze(0).float().numpy()})[0]
        assert ours.flatten().tolist() == theirs.flatten().tolist()
    for radius in (0.0, 0.02, 0.2, 1.0):
        lower, upper = center.clone(), center.clone()
        lower[:, :2] -= radius
        upper[:, :2] += radius
        lower, upper = lower.to(dtype), upper.to(dtype)
        samples = _points(gen, lower.double(), upper.double(), SAMPLES // 4).to(dtype)
        values = model.forward(samples)
        for method in ("ibp", "crown"):
            lb, ub = model.compute_bounds(lower, upper, method=method)
            assert bool((values >= lb).all() and (values <= ub).all()), (method, radius)
        if radius == 0.0:
            assert float(lb) == float(ub) == float(values[0])     # a point: the count itself


def _scatter_model(tmp_path, both_perturbed: bool):
    """x (1, 10) -> data = x[0:6] reshaped (2, 3), updates = x[6:9] (or a constant row) written at
    row 1 (constant indices) -> y (1, 6). A linear map of x: a rearrangement with constants."""
    nodes = [helper.make_node("Slice", ["x", "z0", "z6", "ax1"], ["d"]),
             helper.make_node("Reshape", ["d", "shape23"], ["data"]),
             helper.make_node("ScatterND", ["data", "indices", "updates"], ["s"]),
             helper.make_node("Reshape", ["s", "shape16"], ["y"])]
    inits = [_const("z0", [0]), _const("z6", [6]), _const("ax1", [1]), _const("shape23", np.array([2, 3])),
             _const("shape16", np.array([1, 6])), _const("indices", np.array([[1]], dtype=np.int64))]
    if both_perturbed:
        nodes.insert(0, helper.make_node("Slice", ["x", "z6", "z9", "ax1"], ["updates"]))
        inits += [_const("z9", [9])]
    else:
        inits += [_const("updates", np.array([[0.5, -2.0, 7.0]], dtype=np.float32))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])
    return _save(tmp_path, f"scatter_{both_perturbed}", nodes, [x], [y], inits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("both_perturbed", [False, True])
def test_scatter_nd_bounds_equal_the_exact_image(tmp_path, dtype, both_perturbed):
    path = _scatter_model(tmp_path, both_perturbed)
    model = BoundedModel(path, dtype=dtype)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(5)
    lower = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    upper = lower + torch.rand(3, 10, generator=gen, dtype=torch.float64) * 2
    x = _points(gen, lower[:1], upper[:1], SAMPLES)
    for point in x[:16].float():
        theirs = session.run(None, {"x": point.unsqueeze(0).numpy()})[0]
        assert model.forward(point.unsqueeze(0).to(dtype)).flatten().tolist() == theirs.flatten().tolist()
    # the exact image of each output entry: the bounds of the entry it copies, or the constant
    take = [0, 1, 2, 6, 7, 8] if both_perturbed else [0, 1, 2]
    for method in ("ibp", "crown"):
        lb, ub = model.compute_bounds(lower.to(dtype), upper.to(dtype), method=method)
        exact_l, exact_u = lower[:, take].to(dtype).double(), upper[:, take].to(dtype).double()
        got_l, got_u = lb[:, :len(take)].double(), ub[:, :len(take)].double()
        # equal up to the rounding of the concretisation (centre +- radius: an ulp either way)
        ulps = 2 * torch.finfo(dtype).eps * torch.maximum(exact_l.abs(), exact_u.abs())
        assert bool(((got_l - exact_l).abs() <= ulps).all() and ((got_u - exact_u).abs() <= ulps).all())
        if not both_perturbed:
            assert lb[:, 3:].tolist() == ub[:, 3:].tolist() == [[0.5, -2.0, 7.0]] * 3
    spec = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64)
    lb, ub = model.compute_bounds(lower.to(dtype), upper.to(dtype), spec.to(dtype), method="crown")
    values = torch.einsum("sk,nk->ns", spec[0], model.forward(x.to(dtype)).double().reshape(len(x), 6))
    assert bool((values >= lb[0].double() - TOL[dtype] * 10).all() and (values <= ub[0].double() + TOL[dtype] * 10).all())


def test_scatter_nd_with_indices_from_the_input_is_refused_in_one_line(tmp_path):
    nodes = [helper.make_node("Slice", ["x", "z0", "z1", "ax1"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["index"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["index", "ax1"], ["indices"]),
             helper.make_node("ScatterND", ["zeros", "indices", "row"], ["y"])]
    inits = [_const("z0", [0]), _const("z1", [1]), _const("ax1", [1]),
             _const("zeros", np.zeros((4, 2), dtype=np.float32)), _const("row", np.ones((1, 1, 2), dtype=np.float32))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])
    path = _save(tmp_path, "scatter_dynamic", nodes, [x], [y], inits)
    from verifier.errors import UnsupportedOperatorError
    with pytest.raises(UnsupportedOperatorError, match="ScatterND with indices that depend on the input"):
        BoundedModel(path)


def test_clip_with_an_empty_optional_limit_converts(tmp_path):
    """``Clip(x, min, "")`` (an empty name for the absent max, as cctsdb_yolo writes it)."""
    nodes = [helper.make_node("Clip", ["x", "low", ""], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = _save(tmp_path, "clip_empty", nodes, [x], [y], [_const("low", np.array(0.25, dtype=np.float32))])
    model = BoundedModel(path)
    point = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    assert model.forward(point).flatten().tolist() == [0.25, 0.25, 0.5, 3.0]
    lb, ub = model.compute_bounds(point - 1, point + 1, method="crown")
    assert lb.flatten().tolist() == [0.25, 0.25, 0.25, 2.0] and ub.flatten().tolist() == [0.25, 1.0, 1.5, 4.0]


def test_a_scalar_output_becomes_one_entry(tmp_path):
    """A model whose output is a scalar (carvana_unet's pixel count) has the per-sample output
    shape (1,) of VNN-LIB's Y_0: batches and specs work on it."""
    nodes = [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = BoundedModel(_save(tmp_path, "scalar", nodes, [x], [y]))
    assert model.graph().output_shape == (1,)
    points = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    assert model.forward(points).tolist() == [[6.0], [-0.5]]
    lb, ub = model.compute_bounds(points - 1, points + 1, method="crown")
    assert lb.flatten().tolist() == [3.0, -3.5] and ub.flatten().tolist() == [9.0, 2.5]
