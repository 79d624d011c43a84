"""The ONNX front end on tiny models written by ``tests/data/models/make_models.py``
(onnx.helper, opset 13): per-sample input shapes for batch-1, symbolic-batch, NHWC and
batch-less inputs; ``bm.forward`` equals onnxruntime; bounds of every method contain
onnxruntime's outputs at >= 10^4 sampled points per box (identity and random specs, float32 and
float64 bound computation); and bad files raise the verifier's errors, naming the node.

onnxruntime computes in float32, so the float32 tolerance judges every comparison with it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import (DTYPES, METHODS, apply_spec, assert_close, assert_contains, assert_le, dtype_id,
                      generator, onnx_model_path, random_box, random_spec, sample_box)
from verifier import BoundedModel
from verifier.errors import DimensionMismatchError, InputFileError, ModelValueError, UnsupportedOperatorError

REFERENCE_DTYPE = torch.float32   # onnxruntime's precision

# file -> (per-sample input shape, layout of the ONNX input: "batch1", "symbolic" or "none")
ONNX_MODELS = {
    "gemm_mlp_symbolic_batch.onnx": ((5,), "symbolic"),
    "matmul_add_normalised_batch1.onnx": ((4,), "batch1"),
    "sigmoid_no_batch.onnx": ((4,), "none"),
    "tanh_symbolic_batch.onnx": ((4,), "symbolic"),
    "conv_batchnorm_symbolic_batch.onnx": ((2, 5, 5), "symbolic"),
    "conv_pool_nhwc_batch1.onnx": ((6, 6, 2), "batch1"),
    "residual_add_sub_batch1.onnx": ((6,), "batch1"),
    "concat_constant_batch1.onnx": ((6,), "batch1"),
    "identity_dropout_batch1.onnx": ((4,), "batch1"),
    "opset9_conv_pad_flatten_batch1.onnx": ((1, 5, 5), "batch1"),
    "pruned_mlp_symbolic_batch.onnx": ((5,), "symbolic"),
    "squeeze_transpose_matmul_batch1.onnx": ((1, 3, 4), "batch1"),
}



def onnxruntime_outputs(name: str, points: torch.Tensor) -> torch.Tensor:
    """onnxruntime's outputs at points (B, m, *shape) -> (B, m, n_out), float64."""
    _, layout = ONNX_MODELS[name]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_model_path(name)), options, providers=["CPUExecutionProvider"])
    B, m = points.shape[:2]
    flat = points.reshape(B * m, *points.shape[2:]).numpy().astype(np.float32)
    if layout == "symbolic":
        out = session.run(None, {"x": flat})[0]
    elif layout == "batch1":
        out = np.stack([session.run(None, {"x": flat[i:i + 1]})[0][0] for i in range(B * m)])
    else:
        out = np.stack([session.run(None, {"x": flat[i]})[0] for i in range(B * m)])
    return torch.from_numpy(out.astype(np.float64)).reshape(B, m, -1)


@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_onnx_input_shape_is_per_sample_shape(name):
    shape, _ = ONNX_MODELS[name]
    assert BoundedModel(onnx_model_path(name)).input_shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_onnx_forward_equals_onnxruntime(name, dtype):
    shape, _ = ONNX_MODELS[name]
    x = torch.randn(1, 64, *shape, generator=generator(60), dtype=torch.float64)
    want = onnxruntime_outputs(name, x)[0]
    got = BoundedModel(onnx_model_path(name), dtype=dtype).forward(x[0].to(dtype))
    assert got.dtype == dtype
    assert_close(got.detach().reshape(64, -1).double(), want, REFERENCE_DTYPE, f"{name} forward")


@lru_cache(maxsize=None)
def onnx_samples(name: str):
    """Two random boxes of the model's input, >= 10^4 points each with onnxruntime's outputs, and
    a random spec: lower, upper (2, *shape), outputs (2, m, n_out), spec (2, 3, n_out); float64."""
    shape, _ = ONNX_MODELS[name]
    rng = generator(61)
    lower, upper = random_box(shape, 2, rng, radius=(0.02, 0.3))
    outputs = onnxruntime_outputs(name, sample_box(lower, upper, rng))
    return lower, upper, outputs, random_spec(2, 3, outputs.shape[-1], rng)


@lru_cache(maxsize=None)
def onnx_bounds(name: str, dtype: torch.dtype, method: str):
    """((lb, ub) without a spec, (lb, ub) with the random spec) of the model on onnx_samples' boxes."""
    lower, upper, _, spec = onnx_samples(name)
    bm = BoundedModel(onnx_model_path(name), dtype=dtype)
    plain = bm.compute_bounds(lower.to(dtype), upper.to(dtype), method=method)
    with_spec = bm.compute_bounds(lower.to(dtype), upper.to(dtype), spec.to(dtype), method=method)
    return tuple(t.detach() for t in plain), tuple(t.detach() for t in with_spec)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_onnx_bounds_contain_onnxruntime_samples(name, dtype, method):
    _, _, outputs, spec = onnx_samples(name)
    (lb, ub), (spec_lb, spec_ub) = onnx_bounds(name, dtype, method)
    assert lb.shape == ub.shape == (2, outputs.shape[-1])
    assert spec_lb.shape == spec_ub.shape == (2, 3)
    assert_contains(lb, ub, outputs, REFERENCE_DTYPE, f"{name} {method}")
    assert_contains(spec_lb, spec_ub, apply_spec(spec, outputs), REFERENCE_DTYPE, f"{name} {method} with spec")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_onnx_bounds_ordered_crown_within_ibp_alpha_within_crown(name, dtype):
    bounds = {m: onnx_bounds(name, dtype, m) for m in METHODS}
    for k, label in ((0, ""), (1, " with spec")):
        for tight, loose in (("crown", "ibp"), ("alpha-crown", "crown"), ("crown-ibp", "ibp")):
            what = f"{name}{label}"
            assert_le(bounds[loose][k][0], bounds[tight][k][0], dtype, f"{what}: {tight} lower >= {loose} lower")
            assert_le(bounds[tight][k][1], bounds[loose][k][1], dtype, f"{what}: {tight} upper <= {loose} upper")


@pytest.mark.parametrize("method", METHODS)
def test_onnx_zero_batch_dim_is_a_batch_dim(method):
    """An input whose batch dimension is written as 0 bounds like the same model with batch "N"."""
    zero = BoundedModel(onnx_model_path("gemm_mlp_zero_batch.onnx"), dtype=torch.float64)
    symbolic = BoundedModel(onnx_model_path("gemm_mlp_symbolic_batch.onnx"), dtype=torch.float64)
    assert zero.input_shape == symbolic.input_shape == (5,)
    lower, upper = random_box((5,), 3, generator(62))
    for got, want in zip(zero.compute_bounds(lower, upper, method=method),
                         symbolic.compute_bounds(lower, upper, method=method)):
        assert_close(got.detach(), want.detach(), torch.float64, f"zero batch {method}")


def _pruned_mlp_as_module() -> torch.nn.Sequential:
    """The MLP of pruned_mlp_symbolic_batch.onnx as an nn.Module, zeros and all."""
    model = onnx.load(str(onnx_model_path("pruned_mlp_symbolic_batch.onnx")))
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    module = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.ReLU(),
                                 torch.nn.Linear(6, 3))
    with torch.no_grad():
        for layer, (w, b) in zip((module[0], module[2], module[4]), (("w1", "b1"), ("w2", "b2"), ("w3", "b3"))):
            layer.weight.copy_(weights[w].T if w == "w1" else weights[w])
            layer.bias.copy_(weights[b])
    return module


@pytest.mark.parametrize("method", METHODS)
def test_onnx_pruned_neurons_change_no_bound(method):
    """Dead neurons of a pruned ONNX model (all-zero incoming or outgoing weights) may be removed,
    but the bounds must equal those of the same network with the zeros kept."""
    onnx_bm = BoundedModel(onnx_model_path("pruned_mlp_symbolic_batch.onnx"), dtype=torch.float64)
    module_bm = BoundedModel(_pruned_mlp_as_module(), dtype=torch.float64)
    lower, upper = random_box((5,), 3, generator(63), radius=(0.2, 0.8))
    spec = random_spec(3, 4, 3, generator(64))
    for got, want in zip(onnx_bm.compute_bounds(lower, upper, spec, method=method),
                         module_bm.compute_bounds(lower, upper, spec, method=method)):
        assert_close(got.detach(), want.detach(), torch.float64, f"pruned ONNX vs module, {method}")


def test_onnx_relu_bounds_have_the_shape_of_each_relu_layer():
    bm = BoundedModel(onnx_model_path("pruned_mlp_symbolic_batch.onnx"), dtype=torch.float64)
    lower, upper = random_box((5,), 2, generator(65))
    for method in ("ibp", "crown"):
        shapes = [(tuple(l.shape), tuple(u.shape)) for l, u in bm.relu_bounds(lower, upper, method=method)]
        assert shapes == [((2, 8), (2, 8)), ((2, 6), (2, 6))], f"{method}: {shapes}"


def test_onnx_relu_bounds_of_removed_dead_neurons_contain_samples_and_equal_unsimplified_ibp():
    from verifier.bounds.ibp import ibp_bounds
    from verifier.io.convert import build_graph
    from verifier.ops.base import Bounds
    bm = BoundedModel(onnx_model_path("pruned_mlp_symbolic_batch.onnx"), dtype=torch.float64)
    assert bm.graph().removed, "the pruned test model should lose dead neurons in simplification"
    m = bm.onnx
    full = build_graph(m.graph_module, m.input_layout, m.batched, torch.device("cpu"), torch.float64, "full",
                       live_params=False)
    lower, upper = random_box((5,), 2, generator(66))
    full_ibp = ibp_bounds(full, Bounds(lower, upper))
    relus = full.relu_nodes()
    points = sample_box(lower, upper, generator(67))                  # (2, m, 5)
    m_points = points.shape[1]
    values = full.forward(points.flatten(0, 1), keep=True)
    for method in ("ibp", "crown"):
        for r, (l, u) in zip(relus, bm.relu_bounds(lower, upper, method=method)):
            pre = values[full.nodes[r].inputs[0]].reshape(2, m_points, -1)
            assert_le(l.unsqueeze(1).expand_as(pre), pre, torch.float64, f"{method} lower")
            assert_le(pre, u.unsqueeze(1).expand_as(pre), torch.float64, f"{method} upper")
            if method == "ibp":
                ref = full_ibp[full.nodes[r].inputs[0]]
                torch.testing.assert_close(l, ref.lower, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(u, ref.upper, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["gemm_mlp_symbolic_batch.onnx", "conv_pool_nhwc_batch1.onnx",
                                  "sigmoid_no_batch.onnx"])
def test_onnx_wrong_input_shape_raises_dimension_mismatch(name):
    shape, _ = ONNX_MODELS[name]
    bm = BoundedModel(onnx_model_path(name))
    wrong = (*shape[:-1], shape[-1] + 1)
    with pytest.raises(DimensionMismatchError):
        bm.compute_bounds(torch.zeros(1, *wrong), torch.ones(1, *wrong))
    with pytest.raises(DimensionMismatchError):   # the ONNX layout, batch dim included, is not per-sample
        bm.compute_bounds(torch.zeros(1, 1, *shape), torch.ones(1, 1, *shape))


# ---- bad files --------------------------------------------------------------------------------
def test_missing_onnx_file_raises_input_file_error(tmp_path):
    with pytest.raises(InputFileError, match="missing.onnx"):
        BoundedModel(tmp_path / "missing.onnx")


@pytest.mark.parametrize("content", [b"this is not an onnx model\n", bytes(range(256)) * 4, b""],
                         ids=["text", "binary", "empty"])
def test_non_onnx_bytes_raise_input_file_error(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match="model.onnx"):
        BoundedModel(path)


def test_directory_instead_of_onnx_file_raises_input_file_error(tmp_path):
    with pytest.raises(InputFileError):
        BoundedModel(tmp_path)


# (Softmax and Exp, the operators these models used before issue 22, are supported now: see
# tests/test_graphs_nonlinear.py::test_onnx_models_once_refused_now_bound_soundly)
@pytest.mark.parametrize("name, op, node", [("bad_erf_output.onnx", "Erf", "Erf_"),
                                            ("bad_hardsigmoid_hidden.onnx", "HardSigmoid", "HardSigmoid_")])
def test_unsupported_onnx_operator_raises_naming_node(name, op, node):
    with pytest.raises(UnsupportedOperatorError, match=f"{node}.*{op}|{op}.*{node}"):
        BoundedModel(onnx_model_path(name))


@pytest.mark.parametrize("name", ["bad_nonfinite_weight.onnx", "bad_nonfinite_bias.onnx",
                                  "bad_nonfinite_conv_weight.onnx"])
def test_non_finite_onnx_weights_raise_model_value_error(name):
    with pytest.raises(ModelValueError):
        bm = BoundedModel(onnx_model_path(name))
        bm.compute_bounds(torch.zeros(1, 4), torch.ones(1, 4))


def test_cli_process_converts_onnx_without_importing_torchvision():
    """The CLI skips torchvision's import (half of its start-up): conversion and bounds still
    work, and the real package is never loaded in that process."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "from verifier.io.onnx import skip_torchvision_import\n"
            "skip_torchvision_import()\n"
            "from verifier import BoundedModel\n"
            f"bm = BoundedModel({str(onnx_model_path('gemm_mlp_symbolic_batch.onnx'))!r})\n"
            "x = torch.zeros(1, *bm.input_shape)\n"
            "lb, ub = bm.compute_bounds(x, x + 0.1)\n"
            "assert torch.all(lb <= ub)\n"
            "assert sys.modules['torchvision'].__path__ == [], 'the real torchvision was imported'\n"
            "assert 'torch._dynamo' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
