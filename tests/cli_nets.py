"""Small ONNX networks and VNN-LIB properties written by the command-line tests (generated, so
the tests read nothing outside the project)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_mlp(path: Path, layers: list[tuple[np.ndarray, np.ndarray]], op_after_first: str | None = None) -> Path:
    """An ONNX MLP: x (1, n_in) -> Gemm, Relu, ..., Gemm -> y (1, n_out). ``layers``: (W (out, in),
    b (out,)) each; ReLU between consecutive layers. ``op_after_first`` inserts that unary
    operator after the first Gemm instead of ReLU (to build unsupported models)."""
    nodes, inits = [], []
    current = "x"
    for k, (W, b) in enumerate(layers):
        inits += [numpy_helper.from_array(W.astype(np.float32), f"W{k}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
        nodes.append(helper.make_node("Gemm", [current, f"W{k}", f"b{k}"], [f"z{k}"], transB=1, name=f"gemm{k}"))
        current = f"z{k}"
        if k < len(layers) - 1:
            op = op_after_first if (k == 0 and op_after_first) else "Relu"
            nodes.append(helper.make_node(op, [current], [f"h{k}"], name=f"act{k}"))
            current = f"h{k}"
    nodes[-1].output[0] = "y"
    n_in, n_out = layers[0][0].shape[1], layers[-1][0].shape[0]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def random_mlp(path: Path, sizes: list[int], seed: int = 0, scale: float = 1.0, bias: float = 0.0) -> Path:
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(0, scale / np.sqrt(a), (b, a)), np.full(b, bias)) for a, b in zip(sizes, sizes[1:])]
    return write_mlp(path, layers)


def box_spec(path: Path, n_in: int, n_out: int, low: float, high: float, output_terms: str) -> Path:
    """VNN-LIB text: X in [low, high]^n_in and the given output assertion (the violation)."""
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    text += "".join(f"(assert (>= X_{i} {low}))\n(assert (<= X_{i} {high}))\n" for i in range(n_in))
    path.write_text(text + output_terms + "\n")
    return path


def not_argmax_spec(path: Path, n_in: int, n_out: int, low: float, high: float, label: int = 0) -> Path:
    """The violation "some other output is at least Y_label": n_out - 1 disjuncts."""
    terms = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_out) if j != label)
    return box_spec(path, n_in, n_out, low, high, f"(assert (or {terms}))")


def ibp_provable_classifier(folder: Path, n_in: int = 20, hidden: int = 32, n_out: int = 20) -> tuple[Path, Path]:
    """A classifier whose output 0 exceeds every other by a bias of 100 while the weights are
    small: interval propagation alone proves that no input of [-1, 1]^n makes another output
    reach it, while a PGD attack on its n_out - 1 disjuncts has nothing to find."""
    rng = np.random.default_rng(3)
    W0, b0 = rng.normal(0, 0.1, (hidden, n_in)), np.zeros(hidden)
    W1, b1 = rng.normal(0, 0.1, (n_out, hidden)), np.zeros(n_out)
    b1[0] = 100.0
    model = write_mlp(folder / "ibp_provable.onnx", [(W0, b0), (W1, b1)])
    return model, not_argmax_spec(folder / "ibp_provable.vnnlib", n_in, n_out, -1, 1)


def hard_unsat(folder: Path, n_in: int = 24, hidden: int = 48) -> tuple[Path, Path]:
    """y = sum_i relu(z_i) - relu(z'_i) with z' = z = W relu(V x) computed twice: y is 0 for every
    input, so "y >= 1e-4" has no solution and no attack finds one, while no relaxation sees the
    cancellation (the upper triangle of relu(z) against the lower line of relu(z')): the
    ReLU-splitting search must split both copies of every unstable neuron, far beyond a second."""
    rng = np.random.default_rng(5)
    V = rng.normal(0, 1 / np.sqrt(n_in), (hidden, n_in))
    W = rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden))
    layers = [(V, np.zeros(hidden)), (np.vstack([W, W]), np.zeros(2 * hidden)),
              (np.hstack([np.ones((1, hidden)), -np.ones((1, hidden))]), np.zeros(1))]
    model = write_mlp(folder / "hard_unsat.onnx", layers)
    return model, box_spec(folder / "hard_unsat.vnnlib", n_in, 1, -1, 1, "(assert (>= Y_0 0.0001))")
