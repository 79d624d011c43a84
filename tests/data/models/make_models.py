"""Write the tiny ONNX models of tests/test_onnx_frontend.py into this directory.

Built node by node with ``onnx.helper`` (no exporter involved), from a fixed seed, so the files
are reproducible: ``.venv/bin/python tests/data/models/make_models.py``. Each model exercises
one input layout (batch 1, symbolic batch "N", no batch dimension, NHWC) and a set of operators;
the ``bad_*`` models must be rejected with the verifier's errors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
HERE = Path(__file__).parent


class Graph:
    """A small builder: constants become initializers, nodes get readable unique names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value, name: str | None = None, dtype=np.float32) -> str:
        self.count += 1
        name = name or f"c{self.count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, *shape) -> str:
        """N(0, 1 / fan_in) entries; fan_in = the product of all dimensions but the first."""
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return self.const(self.rng.normal(size=shape) / np.sqrt(fan_in))

    def bias(self, *shape) -> str:
        return self.const(self.rng.normal(size=shape) * 0.3)

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.count}", **attrs))
        return out

    def model(self, name: str, input_shape: list, output_shape: list, opset: int = OPSET) -> onnx.ModelProto:
        """The model with input "x" and output "y" (the last node's output); checked."""
        self.nodes[-1].output[0] = "y"
        graph = helper.make_graph(self.nodes, name,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="certiprune-tests")
        model.ir_version = 8   # readable by older onnxruntime releases too
        onnx.checker.check_model(model, full_check=True)
        return model


def gemm_mlp_symbolic_batch() -> onnx.ModelProto:
    """x: (N, 5). Gemm with transB=1 (-> nn.Linear), transB=0 with alpha/beta and a (1, n) bias
    (-> OnnxGemm), Relu."""
    g = Graph(1)
    h = g.node("Relu", [g.node("Gemm", ["x", g.weight(8, 5), g.bias(8)], transB=1)])
    weight, bias = g.const(g.rng.normal(size=(8, 6)) / 3), g.const(g.rng.normal(size=(1, 6)) * 0.3)
    h = g.node("Relu", [g.node("Gemm", [h, weight, bias], alpha=0.7, beta=1.5)])
    g.node("Gemm", [h, g.weight(3, 6), g.bias(3)], transB=1)
    return g.model("gemm_mlp", ["N", 5], ["N", 3])


def gemm_mlp_zero_batch() -> onnx.ModelProto:
    """The model of gemm_mlp_symbolic_batch with its batch dimension written as 0."""
    model = gemm_mlp_symbolic_batch()
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 0
    return model


def matmul_add_normalised_batch1() -> onnx.ModelProto:
    """x: (1, 4). Input normalisation (Sub, Div by constants), MatMul + Add, Relu."""
    g = Graph(2)
    h = g.node("Div", [g.node("Sub", ["x", g.const([0.1, -0.2, 0.3, 0.0])]), g.const([0.5, 2.0, 1.5, 0.8])])
    h = g.node("Relu", [g.node("Add", [g.node("MatMul", [h, g.const(g.rng.normal(size=(4, 6)) / 2)]), g.bias(6)])])
    h = g.node("Relu", [g.node("Add", [g.node("MatMul", [h, g.const(g.rng.normal(size=(6, 6)) / 2.4)]), g.bias(6)])])
    g.node("Add", [g.node("MatMul", [h, g.const(g.rng.normal(size=(6, 2)) / 2.4)]), g.bias(2)])
    return g.model("matmul_add", [1, 4], [1, 2])


def sigmoid_no_batch() -> onnx.ModelProto:
    """x: (4,) with no batch dimension. MatMul + Add, Sigmoid, MatMul."""
    g = Graph(3)
    h = g.node("Sigmoid", [g.node("Add", [g.node("MatMul", ["x", g.const(g.rng.normal(size=(4, 6)))]), g.bias(6)])])
    g.node("MatMul", [h, g.const(g.rng.normal(size=(6, 3)))])
    return g.model("sigmoid", [4], [3])


def tanh_symbolic_batch() -> onnx.ModelProto:
    """x: (N, 4). Gemm, Tanh, Gemm."""
    g = Graph(11)
    h = g.node("Tanh", [g.node("Gemm", ["x", g.const(g.rng.normal(size=(6, 4))), g.bias(6)], transB=1)])
    g.node("Gemm", [h, g.weight(3, 6), g.bias(3)], transB=1)
    return g.model("tanh", ["N", 4], ["N", 3])


def batchnorm(g: Graph, x: str, channels: int) -> str:
    scale = g.const(1 + 0.3 * g.rng.normal(size=channels))
    shift = g.const(0.3 * g.rng.normal(size=channels))
    mean = g.const(0.5 * g.rng.normal(size=channels))
    var = g.const(0.3 + 2 * g.rng.random(size=channels))
    return g.node("BatchNormalization", [x, scale, shift, mean, var], epsilon=1e-5)


def conv_batchnorm_symbolic_batch() -> onnx.ModelProto:
    """x: (N, 2, 5, 5). Per-channel normalisation, Conv (stride 2, pads 1), BatchNormalization,
    Conv (dilation 2, groups 2, pads 2), Relu, Flatten, Gemm."""
    g = Graph(4)
    h = g.node("Div", [g.node("Sub", ["x", g.const(np.array([0.2, -0.1]).reshape(1, 2, 1, 1))]),
                       g.const(np.array([0.6, 1.7]).reshape(1, 2, 1, 1))])
    h = g.node("Conv", [h, g.weight(4, 2, 3, 3), g.bias(4)], strides=[2, 2], pads=[1, 1, 1, 1])    # (4, 3, 3)
    h = g.node("Relu", [batchnorm(g, h, 4)])
    h = g.node("Relu", [g.node("Conv", [h, g.weight(4, 2, 3, 3), g.bias(4)], dilations=[2, 2], group=2,
                                pads=[2, 2, 2, 2])])                                                   # (4, 3, 3)
    g.node("Gemm", [g.node("Flatten", [h], axis=1), g.weight(3, 36), g.bias(3)], transB=1)
    return g.model("conv_batchnorm", ["N", 2, 5, 5], ["N", 3])


def conv_pool_nhwc_batch1() -> onnx.ModelProto:
    """x: (1, 6, 6, 2) NHWC. Transpose to NCHW, Conv, Relu, Pad, AveragePool (with and without
    count_include_pad), MaxPool (pads, strides), Reshape, Gemm."""
    g = Graph(5)
    h = g.node("Transpose", ["x"], perm=[0, 3, 1, 2])
    h = g.node("Relu", [g.node("Conv", [h, g.weight(2, 2, 3, 3), g.bias(2)], pads=[1, 1, 1, 1])])   # (2, 6, 6)
    h = g.node("Pad", [h, g.const([0, 0, 1, 0, 0, 0, 0, 1], dtype=np.int64), g.const(0.25)], mode="constant")
    h = g.node("AveragePool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
    h = g.node("AveragePool", [h], kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)
    h = g.node("Relu", [g.node("Conv", [h, g.weight(2, 2, 2, 2), g.bias(2)])])                       # (2, 4, 4)
    h = g.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])                # (2, 2, 2)
    h = g.node("Reshape", [h, g.const([1, -1], dtype=np.int64)])
    g.node("Gemm", [h, g.weight(2, 8), g.bias(2)], transB=1)
    return g.model("conv_pool_nhwc", [1, 6, 6, 2], [1, 2])


def residual_add_sub_batch1() -> onnx.ModelProto:
    """x: (1, 6). Gemm, Relu, two Gemm branches, their Add (residual) and Sub, Unsqueeze / Squeeze,
    Gemm."""
    g = Graph(6)
    h = g.node("Relu", [g.node("Gemm", ["x", g.weight(6, 6), g.bias(6)], transB=1)])
    a = g.node("Gemm", [h, g.weight(5, 6), g.bias(5)], transB=1)
    b = g.node("Gemm", [h, g.weight(5, 6), g.bias(5)], transB=1)
    added = g.node("Relu", [g.node("Add", [a, b])])
    h = g.node("Add", [g.node("Gemm", [added, g.weight(5, 5)], transB=1), g.node("Sub", [a, b])])    # (1, 5)
    h = g.node("Squeeze", [g.node("Unsqueeze", [h, g.const([1], dtype=np.int64)]), g.const([1], dtype=np.int64)])
    g.node("Gemm", [h, g.weight(3, 5), g.bias(3)], transB=1)
    return g.model("residual_add_sub", [1, 6], [1, 3])


def identity_dropout_batch1() -> onnx.ModelProto:
    """x: (1, 4). Gemm, Identity, Relu, Dropout (inference: identity), Gemm."""
    g = Graph(13)
    h = g.node("Relu", [g.node("Identity", [g.node("Gemm", ["x", g.weight(5, 4), g.bias(5)], transB=1)])])
    h = g.node("Dropout", [h, g.const(0.3)])
    g.node("Gemm", [h, g.weight(2, 5), g.bias(2)], transB=1)
    return g.model("identity_dropout", [1, 4], [1, 2])


def concat_constant_batch1() -> onnx.ModelProto:
    """x: (1, 6). Concat of two perturbed branches and a constant along axis 1, Gemm."""
    g = Graph(12)
    a = g.node("Gemm", ["x", g.weight(4, 6), g.bias(4)], transB=1)
    b = g.node("Relu", [g.node("Gemm", ["x", g.weight(3, 6), g.bias(3)], transB=1)])
    h = g.node("Concat", [a, b, g.const([[0.5, -1.0]])], axis=1)                               # (1, 9)
    g.node("Gemm", [h, g.weight(3, 9), g.bias(3)], transB=1)
    return g.model("concat_constant", [1, 6], [1, 3])


def squeeze_transpose_matmul_batch1() -> onnx.ModelProto:
    """x: (1, 1, 3, 4). Squeeze, Transpose of the last two axes, MatMul on a 3-D tensor, Relu,
    Reshape, MatMul by a constant on the left of a 2-D value, Flatten."""
    g = Graph(7)
    h = g.node("Squeeze", ["x", g.const([1], dtype=np.int64)])                               # (1, 3, 4)
    h = g.node("Transpose", [h], perm=[0, 2, 1])                                              # (1, 4, 3)
    h = g.node("Relu", [g.node("Add", [g.node("MatMul", [h, g.weight(3, 5)]), g.bias(5)])])  # (1, 4, 5)
    h = g.node("Reshape", [h, g.const([1, 4, 5], dtype=np.int64)])
    h = g.node("MatMul", [g.weight(2, 4), h])                                                  # (1, 2, 5)
    g.node("Flatten", [h], axis=1)
    return g.model("squeeze_transpose", [1, 1, 3, 4], [1, 10])


def opset9_conv_pad_flatten_batch1() -> onnx.ModelProto:
    """x: (1, 1, 5, 5) at opset 9 (upgraded on load): Pad-2 and Unsqueeze-1 with attributes,
    BatchNormalization-9, Conv, Relu, Flatten-9, Gemm-9."""
    g = Graph(14)
    h = g.node("Pad", ["x"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.0)            # (1, 1, 7, 7)
    h = g.node("Relu", [batchnorm(g, g.node("Conv", [h, g.weight(2, 1, 3, 3), g.bias(2)], strides=[2, 2]), 2)])
    h = g.node("Flatten", [h], axis=1)                                                           # (1, 18)
    h = g.node("Unsqueeze", [h], axes=[1])                                                       # (1, 1, 18)
    h = g.node("Flatten", [h], axis=1)
    g.node("Gemm", [h, g.weight(3, 18), g.bias(3)], transB=1)
    return g.model("opset9", [1, 1, 5, 5], [1, 3], opset=9)


def pruned_mlp_symbolic_batch() -> onnx.ModelProto:
    """x: (N, 5). A pruned MLP: MatMul + Add, Relu, Gemm, Relu, Gemm, where some hidden neurons
    have all-zero incoming weights (constant activations, positive and negative biases) and
    some all-zero outgoing weights. Initializer names w1, b1, w2, b2, w3, b3."""
    g = Graph(15)
    w1 = g.rng.normal(size=(5, 8)) / 2           # MatMul layout (in, out)
    b1 = g.rng.normal(size=8) * 0.3
    w1[:, [1, 3]] = 0                             # neurons 1, 3 of layer 1: no incoming weights
    b1[1], b1[3] = 0.7, -0.4
    w2 = g.rng.normal(size=(6, 8)) / 2.8         # Gemm transB=1 layout (out, in)
    w2[:, 5] = 0                                  # neuron 5 of layer 1: no outgoing weights
    w2[2, :] = 0                                  # neuron 2 of layer 2: no incoming weights
    b2 = g.rng.normal(size=6) * 0.3
    w3 = g.rng.normal(size=(3, 6)) / 2.4
    w3[:, 4] = 0                                  # neuron 4 of layer 2: no outgoing weights
    h = g.node("Relu", [g.node("Add", [g.node("MatMul", ["x", g.const(w1, "w1")]), g.const(b1, "b1")])])
    h = g.node("Relu", [g.node("Gemm", [h, g.const(w2, "w2"), g.const(b2, "b2")], transB=1)])
    g.node("Gemm", [h, g.const(w3, "w3"), g.const(g.rng.normal(size=3) * 0.3, "b3")], transB=1)
    return g.model("pruned_mlp", ["N", 5], ["N", 3])


def bad_softmax_output() -> onnx.ModelProto:
    g = Graph(8)
    g.node("Softmax", [g.node("Gemm", ["x", g.weight(3, 4), g.bias(3)], transB=1)], axis=1)
    return g.model("bad_softmax", [1, 4], [1, 3])


def bad_exp_hidden() -> onnx.ModelProto:
    g = Graph(9)
    h = g.node("Exp", [g.node("Gemm", ["x", g.weight(3, 4), g.bias(3)], transB=1)])
    g.node("Gemm", [h, g.weight(2, 3), g.bias(2)], transB=1)
    return g.model("bad_exp", [1, 4], [1, 2])


def bad_erf_output() -> onnx.ModelProto:
    g = Graph(10)
    g.node("Erf", [g.node("Gemm", ["x", g.weight(3, 4), g.bias(3)], transB=1)])
    return g.model("bad_erf", [1, 4], [1, 3])


def bad_hardsigmoid_hidden() -> onnx.ModelProto:
    g = Graph(11)
    h = g.node("HardSigmoid", [g.node("Gemm", ["x", g.weight(3, 4), g.bias(3)], transB=1)])
    g.node("Gemm", [h, g.weight(2, 3), g.bias(2)], transB=1)
    return g.model("bad_hardsigmoid", [1, 4], [1, 2])


def bad_nonfinite(where: str) -> onnx.ModelProto:
    g = Graph(10)
    w = g.rng.normal(size=(3, 4))
    b = g.rng.normal(size=3)
    if where == "weight":
        w[1, 2] = np.nan
    elif where == "bias":
        b[0] = np.inf
    h = g.node("Relu", [g.node("Gemm", ["x", g.const(w), g.const(b)], transB=1)])
    if where == "conv":
        h = g.node("Reshape", [h, g.const([1, 3, 1, 1], dtype=np.int64)])
        k = g.rng.normal(size=(2, 3, 1, 1))
        k[0, 0, 0, 0] = -np.inf
        h = g.node("Flatten", [g.node("Conv", [h, g.const(k)])])
    return g.model(f"bad_nonfinite_{where}", [1, 4], [1, 2 if where == "conv" else 3])


MODELS = {
    "gemm_mlp_symbolic_batch.onnx": gemm_mlp_symbolic_batch,
    "gemm_mlp_zero_batch.onnx": gemm_mlp_zero_batch,
    "matmul_add_normalised_batch1.onnx": matmul_add_normalised_batch1,
    "sigmoid_no_batch.onnx": sigmoid_no_batch,
    "tanh_symbolic_batch.onnx": tanh_symbolic_batch,
    "conv_batchnorm_symbolic_batch.onnx": conv_batchnorm_symbolic_batch,
    "conv_pool_nhwc_batch1.onnx": conv_pool_nhwc_batch1,
    "residual_add_sub_batch1.onnx": residual_add_sub_batch1,
    "concat_constant_batch1.onnx": concat_constant_batch1,
    "identity_dropout_batch1.onnx": identity_dropout_batch1,
    "squeeze_transpose_matmul_batch1.onnx": squeeze_transpose_matmul_batch1,
    "opset9_conv_pad_flatten_batch1.onnx": opset9_conv_pad_flatten_batch1,
    "pruned_mlp_symbolic_batch.onnx": pruned_mlp_symbolic_batch,
    "bad_softmax_output.onnx": bad_softmax_output,
    "bad_exp_hidden.onnx": bad_exp_hidden,
    "bad_erf_output.onnx": bad_erf_output,
    "bad_hardsigmoid_hidden.onnx": bad_hardsigmoid_hidden,
    "bad_nonfinite_weight.onnx": lambda: bad_nonfinite("weight"),
    "bad_nonfinite_bias.onnx": lambda: bad_nonfinite("bias"),
    "bad_nonfinite_conv_weight.onnx": lambda: bad_nonfinite("conv"),
}


def main() -> None:
    for name, build in MODELS.items():
        onnx.save(build(), str(HERE / name))
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
