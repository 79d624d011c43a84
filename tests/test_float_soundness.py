"""Float soundness (issue 26), with ZERO tolerance: in float mode "sound" every output that
onnxruntime computes in float32 at a point of the box -- sampled points and box corners, run
batched and one at a time -- lies inside our IBP, CROWN and alpha-CROWN bounds, computed in
float32 and in float64, on random small networks and tiny boxes (widths 1e-3 down to 1e-7);
bounds never cross on any node; ``verify`` never answers unsat on the float-exploit suite
(benchmarks/data/float_exploit, a property onnxruntime violates only through rounding); an op
without rounding rules makes ``verify`` answer unknown, naming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel
from verifier.bounds.alpha import AlphaConfig, alpha_crown
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.bounds.floating import attach, float_model_for, unsupported_ops
from verifier.bounds.ibp import ibp_bounds
from verifier.errors import UnsupportedOperatorError
from verifier.io.vnnlib import load_vnnlib
from verifier.ops import Bounds, Op
from verifier.verify import VerifyConfig, verify

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.onnx's legacy exporter

EXPLOIT_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "float_exploit"
WIDTHS = (1e-3, 1e-5, 1e-7)
DTYPES = (torch.float32, torch.float64)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))) + x)


class Normalised(nn.Module):
    """(x - mean) / std, then conv, BatchNorm, ReLU, max pooling and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        with torch.no_grad():   # statistics with a mean far from zero: the shift cancels
            self.bn.running_mean.uniform_(2, 4)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        x = (x - 0.3) / 0.7
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _networks():
    torch.manual_seed(26)
    return {
        "mlp": (nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)), (8,)),
        "tanh_sigmoid": (nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(),
                                       nn.Linear(16, 3)), (5,)),
        "residual": (Residual(), (6,)),
        "conv_bn_pool": (Normalised().eval(), (1, 6, 6)),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (onnx path, per-sample input shape, onnxruntime sessions): BatchNormalization stays
    a node of the file; one session with onnxruntime's graph optimisations (it folds BatchNorm
    into the Conv), one without (it evaluates BatchNorm on its own)."""
    import onnxruntime as ort
    out = {}
    root = tmp_path_factory.mktemp("float_nets")
    for name, (net, shape) in _networks().items():
        path = str(root / f"{name}.onnx")
        torch.onnx.export(net.eval(), torch.zeros(1, *shape), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=13, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
        sessions = []
        for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.graph_optimization_level = level
            sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
        out[name] = (path, shape, sessions)
    return out


def _points(lower: torch.Tensor, upper: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 points of the box (*shape): both corners, n random corners and n uniform points."""
    shape = lower.shape
    signs = torch.rand((n, *shape), generator=gen) < 0.5
    corners = torch.where(signs, lower, upper)
    uniform = lower + (upper - lower) * torch.rand((n, *shape), generator=gen)
    uniform = torch.minimum(torch.maximum(uniform, lower), upper)
    return torch.cat([lower[None], upper[None], corners, uniform]).float()


def _runtime_outputs(sessions, points: torch.Tensor) -> torch.Tensor:
    """onnxruntime's float32 outputs (M, n_out) as float64, of every session: batched, and the
    first few one by one (a batch of one takes other kernels)."""
    x = points.numpy().astype(np.float32)
    rows = []
    for session in sessions:
        rows.append(session.run(None, {"x": x})[0].reshape(len(x), -1))
        rows += [session.run(None, {"x": x[k:k + 1]})[0].reshape(1, -1) for k in range(4)]
    return torch.as_tensor(np.concatenate(rows), dtype=torch.float64)


def _assert_inside(lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Zero tolerance: lower <= y <= upper for every row of y (M, n_out); lower, upper (1, n_out)."""
    lower, upper = lower.detach().double().reshape(1, -1), upper.detach().double().reshape(1, -1)
    below, above = float((lower - y).max()), float((y - upper).max())
    assert below <= 0 and above <= 0, f"{what}: onnxruntime output outside the bounds by {max(below, above):.3g}"


def _assert_no_crossing(bounds, what: str) -> None:
    for i, b in enumerate(bounds):
        if b is not None:
            assert bool((b.lower <= b.upper).all()), f"{what}: node {i} has lower > upper"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["mlp", "tanh_sigmoid", "residual", "conv_bn_pool"])
def test_runtime_outputs_inside_sound_bounds_on_tiny_boxes(exported, name, dtype):
    path, shape, sessions = exported[name]
    model = BoundedModel(path, dtype=dtype)
    graph = model.graph()
    attach(graph, float_model_for(model, "sound"))
    gen = torch.Generator().manual_seed(7)
    n_out = graph.nodes[graph.output].numel
    C = torch.eye(n_out, dtype=dtype).unsqueeze(0)
    for trial in range(3):
        center = torch.rand(shape, generator=gen) * 2 - 1
        for width in WIDTHS:
            lower, upper = (center - width / 2).float(), (center + width / 2).float()
            y = _runtime_outputs(sessions, _points(lower, upper, 200, gen))
            box = Bounds(lower.unsqueeze(0).to(dtype), upper.unsqueeze(0).to(dtype))
            what = f"{name} {dtype} width {width:g}"
            with torch.no_grad():
                ibp = ibp_bounds(graph, box)
                crown = crown_bounds(graph, box)
                lb, ub = output_bounds(graph, box, C, crown)
            _assert_no_crossing(ibp, what + " IBP")
            _assert_no_crossing(crown, what + " CROWN")
            _assert_inside(ibp[graph.output].lower, ibp[graph.output].upper, y, what + " IBP")
            _assert_inside(lb, ub, y, what + " CROWN")
            assert bool((lb <= ub).all()), f"{what}: CROWN lower > upper"
            alb, aub, alpha_bounds, _ = alpha_crown(graph, box, C, AlphaConfig(iterations=5))
            _assert_no_crossing(alpha_bounds, what + " alpha-CROWN")
            _assert_inside(alb, aub, y, what + " alpha-CROWN")


def test_fast_mode_leaves_bounds_as_before(exported):
    """"fast" attaches nothing that changes a bound: the same numbers as no analysis at all."""
    path, shape, _ = exported["mlp"]
    model = BoundedModel(path)
    graph = model.graph()
    box = Bounds(torch.full((1, *shape), -0.1), torch.full((1, *shape), 0.1))
    C = torch.eye(4).unsqueeze(0)
    attach(graph, None)
    plain = output_bounds(graph, box, C, crown_bounds(graph, box))
    attach(graph, float_model_for(model, "fast"))
    fast = output_bounds(graph, box, C, crown_bounds(graph, box))
    attach(graph, float_model_for(model, "sound"))
    sound = output_bounds(graph, box, C, crown_bounds(graph, box))
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])
    assert bool((sound[0] < plain[0]).all()) and bool((sound[1] > plain[1]).all())


def _exploit_instances():
    rows = (EXPLOIT_DIR / "instances.csv").read_text().split()
    return [tuple(r.split(",")[:2]) for r in rows]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("instance", _exploit_instances(), ids=lambda t: t[0])
def test_verify_never_answers_unsat_on_the_float_exploit_suite(instance, dtype):
    onnx_name, spec_name = instance
    model = BoundedModel(str(EXPLOIT_DIR / onnx_name), dtype=dtype)
    prop = load_vnnlib(str(EXPLOIT_DIR / spec_name))
    result = verify(model, prop, VerifyConfig(timeout=5.0))
    assert result.status != "unsat", f"{onnx_name} ({dtype}): unsat, but onnxruntime violates the property"
    if result.status == "sat":   # the counterexample violates under onnxruntime, not in float64
        assert result.details.get("float64_violates") is False


@pytest.mark.parametrize("name", ["cancel", "order"])
def test_the_exploit_fools_the_fast_mode_in_float64(name):
    """Evidence that the suite exploits rounding: without the analysis, bounds of the real-valued
    network (float64) prove a property that onnxruntime violates in float32."""
    model = BoundedModel(str(EXPLOIT_DIR / f"{name}.onnx"), dtype=torch.float64)
    prop = load_vnnlib(str(EXPLOIT_DIR / f"{name}.vnnlib"))
    assert verify(model, prop, VerifyConfig(timeout=5.0, float_mode="fast")).status == "unsat"


class _NoRule(Op):
    """An op without rounding rules (the base class's default)."""

    def forward(self, x):
        return x

    def ibp(self, b):
        return b

    def backward(self, lA, uA, *_):
        from verifier.ops import BackwardResult
        return BackwardResult([(lA, uA)], 0.0, 0.0)


def test_an_op_without_rounding_rules_makes_verify_answer_unknown_naming_it():
    model = BoundedModel(str(EXPLOIT_DIR / "cancel.onnx"))
    graph = model.graph()
    relu = graph.relu_nodes()[0]
    original = graph.nodes[relu].op
    graph.nodes[relu].op = _NoRule()
    try:
        assert unsupported_ops(graph) == [f"{graph.nodes[relu].name} ({graph.nodes[relu].source})"]
        result = verify(model, load_vnnlib(str(EXPLOIT_DIR / "cancel.vnnlib")), VerifyConfig(timeout=5.0))
        assert result.status == "unknown"
        assert graph.nodes[relu].name in result.details["reason"]
        box = Bounds(torch.full((1, 1), 0.5), torch.full((1, 1), 0.75))
        with pytest.raises(UnsupportedOperatorError, match=graph.nodes[relu].name):
            ibp_bounds(graph, box)     # a bound pass in mode sound refuses it too
    finally:
        graph.nodes[relu].op = original
