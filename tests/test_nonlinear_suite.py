"""The committed sigmoid / tanh / max-pool suite (benchmarks/data/nonlinear, issue 23): the
models load in the verifier and agree with onnxruntime, the properties parse into the boxes the
instances promise, every recorded sat answer's counterexample is confirmed by onnxruntime, and
the exact MILP cross-check's own bounds and encoding are sound (benchmarks/nonlinear/crosscheck)."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from benchmarks.instances import read_instances
from benchmarks.nonlinear.crosscheck import conv_matrix, encode, margin_lower_bounds, read_cnn, second_conv_bounds
from benchmarks.nonlinear.models import to_onnx_nonlinear
from pruning.data import DatasetInfo
from verifier import BoundedModel
from verifier.io.vnnlib import load_vnnlib

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "nonlinear"
MODELS = {"mnist_sigmoid_6x200.onnx": "Sigmoid", "mnist_tanh_6x100.onnx": "Tanh", "mnist_convmaxpool.onnx": "MaxPool"}
# float32 agreement of two engines whose summation orders differ over 784 + 6 x 200 terms (the
# largest difference seen on uniform-random inputs was 1.4e-5, on logits of magnitude ~10)
ATOL = 5e-5


def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(SUITE / name), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """x: (n, 784) -> (n, 10) float64."""
    out = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32).reshape(-1, 1, 28, 28)})[0]
    return out.astype(np.float64)


def label_and_eps(path: str) -> tuple[int, float]:
    head = Path(path).read_text()[:400]
    match = re.search(r"; label (\d+), eps ([0-9.e-]+),", head)
    assert match, f"{path}: no label / eps comment"
    return int(match.group(1)), float(match.group(2))


def test_instances_list_every_model_and_property_with_60_s():
    instances = read_instances(SUITE / "instances.csv")
    assert {i.benchmark for i in instances} == {"nonlinear"}
    assert {i.onnx for i in instances} == set(MODELS)
    assert all(i.timeout == 60 for i in instances)
    assert len({(i.onnx, i.vnnlib) for i in instances}) == len(instances)
    for inst in instances:
        assert Path(inst.onnx_path).is_file() and Path(inst.vnnlib_path).is_file()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_has_its_nonlinearity_and_matches_onnxruntime(name):
    ops = {node.op_type for node in onnx.load(str(SUITE / name)).graph.node}
    assert MODELS[name] in ops
    model = BoundedModel(str(SUITE / name))
    graph = model.graph()
    x = np.random.default_rng(0).random((16, 784)).astype(np.float32)
    with torch.no_grad():
        ours = graph.forward(torch.from_numpy(x).reshape(16, 1, 28, 28)).double().numpy().reshape(16, -1)
    np.testing.assert_allclose(ours, run(session(name), x), atol=ATOL, rtol=ATOL)


def test_properties_are_clipped_eps_boxes_around_correctly_classified_images():
    sessions = {name: session(name) for name in MODELS}
    for inst in read_instances(SUITE / "instances.csv"):
        label, eps = label_and_eps(inst.vnnlib_path)
        prop = load_vnnlib(inst.vnnlib_path, n_inputs=784, n_outputs=10)
        assert len(prop.regions) == 1
        region = prop.regions[0]
        assert np.all(region.lower >= 0) and np.all(region.upper <= 1)
        width = region.upper - region.lower
        assert np.all(width <= 2 * eps + 1e-12) and np.any(width >= 2 * eps - 1e-12)
        assert len(region.disjuncts) == 9
        for disjunct in region.disjuncts:       # Y_label - Y_j <= 0 for one wrong class j
            (row,), (rhs,) = disjunct.matrix, disjunct.rhs
            assert rhs == 0 and row[label] == 1 and sorted(row) == [-1] + [0] * 8 + [1]
        # the image: the box's centre where no clipping happened, and the model classifies it
        image = np.where(region.lower > 0, region.lower + eps, region.upper - eps)
        assert run(sessions[inst.onnx], image[None])[0].argmax() == label


def test_every_sat_answer_has_a_counterexample_confirmed_by_onnxruntime():
    with open(SUITE / "answers.csv", newline="") as f:
        answers = list(csv.DictReader(f))
    assert {(a["onnx"], a["vnnlib"]) for a in answers} == \
        {(i.onnx, i.vnnlib) for i in read_instances(SUITE / "instances.csv")}
    assert {a["answer"] for a in answers} <= {"sat", "unsat", "unknown"}
    for row in (a for a in answers if a["answer"] == "sat"):
        label, _ = label_and_eps(str(SUITE / row["vnnlib"]))
        region = load_vnnlib(str(SUITE / row["vnnlib"]), n_inputs=784, n_outputs=10).regions[0]
        x = np.load(SUITE / "counterexamples" / (Path(row["vnnlib"]).stem + ".npy"))
        assert x.dtype == np.float32 and np.all(x >= region.lower) and np.all(x <= region.upper)
        y = run(session(row["onnx"]), x[None])[0]
        margin = np.delete(y, label).max() - y[label]
        assert margin >= 0
        assert margin == pytest.approx(float(row["counterexample_margin"]), rel=1e-4)


def test_sigmoid_and_tanh_export_matches_torch():
    info = DatasetInfo("tiny", "-", (1, 3, 3), 4, (0.5,), (0.25,))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.Tanh(),
                        nn.Linear(5, 4)).eval()
    proto = to_onnx_nonlinear(net, info.input_shape)
    assert [n.op_type for n in proto.graph.node] == ["Flatten", "Gemm", "Sigmoid", "Gemm", "Tanh", "Gemm"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(32, 1, 3, 3)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], expected, atol=ATOL, rtol=ATOL)


def cnn_box(eps: float) -> tuple[np.ndarray, np.ndarray]:
    inst = next(i for i in read_instances(SUITE / "instances.csv") if i.onnx == "mnist_convmaxpool.onnx")
    region = load_vnnlib(inst.vnnlib_path, n_inputs=784, n_outputs=10).regions[0]
    centre = (region.lower + region.upper) / 2
    return np.clip(centre - eps, 0, 1), np.clip(centre + eps, 0, 1)


def cnn_layers(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: (n, 784) -> (conv 2 outputs (n, 1936), logits (n, 10)), in float64 with torch."""
    t = (torch.from_numpy(x).reshape(-1, 1, 28, 28) - params["mean"][0]) / params["std"][0]
    t = torch.nn.functional.conv2d(t, torch.from_numpy(params["w1"]), torch.from_numpy(params["b1"]))
    t = torch.nn.functional.max_pool2d(torch.relu(t), 2)
    z2 = torch.nn.functional.conv2d(t, torch.from_numpy(params["w2"]), torch.from_numpy(params["b2"]))
    t = torch.nn.functional.max_pool2d(torch.relu(z2), 2).flatten(1)
    logits = t @ torch.from_numpy(params["w3"]).T + torch.from_numpy(params["b3"])
    return z2.flatten(1).numpy(), logits.numpy()


def test_crosscheck_second_conv_bounds_contain_sampled_points():
    params = read_cnn(str(SUITE / "mnist_convmaxpool.onnx"))
    lower, upper = cnn_box(0.05)
    scale = 1 / params["std"][0]
    w1 = conv_matrix(params["w1"], (1, 28, 28)) * scale
    b1 = np.repeat(params["b1"], 26 * 26) - w1 @ np.full(784, params["mean"][0])
    l1 = w1.maximum(0) @ lower + w1.minimum(0) @ upper + b1
    u1 = w1.maximum(0) @ upper + w1.minimum(0) @ lower + b1
    low, up, _ = second_conv_bounds(w1, b1, l1, u1, lower, upper, conv_matrix(params["w2"], (8, 13, 13)),
                                 np.repeat(params["b2"], 11 * 11))
    rng = np.random.default_rng(0)
    x = lower + rng.random((2000, 784)) * (upper - lower)
    x = np.vstack([x, np.where(rng.random((500, 784)) < 0.5, lower, upper)])      # vertices too
    z2, _ = cnn_layers(params, x)
    slack = 1e-9 * (1 + np.abs(z2))
    assert np.all(z2 >= low - slack) and np.all(z2 <= up + slack)
    assert np.mean((low < 0) & (up > 0)) < 0.5          # tighter than no bounds at all


def test_crosscheck_encoding_is_exact_at_sampled_points_of_a_box():
    """The MILP over a box, with the input fixed to a sampled point of it, has exactly the network's
    values as its solution (so the encoding neither cuts off nor adds points)."""
    from scipy.optimize import Bounds, milp
    params = read_cnn(str(SUITE / "mnist_convmaxpool.onnx"))
    lower, upper = cnn_box(0.01)
    enc, x_vars, y_vars, _ = encode(params, lower, upper)
    var_lower, var_upper = np.concatenate(enc.lower), np.concatenate(enc.upper)
    rng = np.random.default_rng(2)
    for point in lower + rng.random((2, 784)) * (upper - lower):
        var_lower[x_vars], var_upper[x_vars] = point, point
        result = milp(np.zeros(enc.n), constraints=enc.constraints(), bounds=Bounds(var_lower, var_upper),
                      integrality=np.concatenate(enc.integer), options=dict(time_limit=60))
        assert result.status == 0, result.message
        _, logits = cnn_layers(params, point[None])
        np.testing.assert_allclose(result.x[y_vars], logits[0], atol=1e-5)


def test_crosscheck_margin_lower_bounds_are_below_sampled_margins():
    params = read_cnn(str(SUITE / "mnist_convmaxpool.onnx"))
    lower, upper = cnn_box(0.03)
    rng = np.random.default_rng(3)
    x = np.vstack([lower + rng.random((2000, 784)) * (upper - lower),
                   np.where(rng.random((500, 784)) < 0.5, lower, upper)])
    _, logits = cnn_layers(params, x)
    label = int(logits[0].argmax())
    bounds = margin_lower_bounds(params, lower, upper, label)
    margins = logits[:, [label]] - logits                            # (n, 10)
    assert np.all(margins >= bounds - 1e-9 * (1 + np.abs(margins)))
    assert bounds[label] == pytest.approx(0, abs=1e-9)
