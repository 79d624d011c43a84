"""Export: ONNX equals PyTorch (onnxruntime and the verifier), compaction keeps the function,
VNN-LIB specs are clipped robustness properties the verifier parses.

Tolerance: outputs agree to ``ATOL`` = 1e-5 absolute in float32 (logits of order 1–10; the only
differences are summation order in Gemm/Conv and the folded biases of compaction).
"""
import re
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from pruning.compact import compact
from pruning.data import dataset_info, load_dataset
from pruning.errors import PruningError
from pruning.export import export_onnx, vnnlib_robustness, write_vnnlib
from pruning.models import Normalize, build_model, mlp, prunable_layers
from pruning.sparsity import prune_by_scores

ATOL = 1e-5
DATA = Path(__file__).parent / "data" / "pruning"
GREY = dataset_info("fashion-mnist")
CIFAR = dataset_info("cifar10")


def _pruned(model: nn.Module, sparsity: float = 0.7, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(m.weight.shape, generator=generator)
              for name, m in prunable_layers(model)}
    prune_by_scores(model, scores, sparsity, "global")
    return model


def _randomise_batch_norm(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def _onnxruntime(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


CASES = [("mlp3x100", GREY), ("cnn_base", GREY), ("cnn_deep", GREY), ("cnn_wide", CIFAR),
         ("cnn_base_bn", CIFAR)]


@pytest.mark.parametrize("name,info", CASES, ids=[c[0] for c in CASES])
def test_onnx_export_equals_pytorch_under_onnxruntime(tmp_path, name, info):
    torch.manual_seed(0)
    model = _pruned(build_model(name, info))
    _randomise_batch_norm(model)
    model.eval()
    path = export_onnx(model, info.input_shape, tmp_path / "model.onnx")
    for batch in (1, 5):  # the batch dimension is symbolic
        x = torch.rand(batch, *info.input_shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_onnxruntime(path, x), expected, atol=ATOL, rtol=0)


def test_onnx_export_keeps_the_zeros_and_exports_pooling(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    _pruned(model, 0.5)
    path = export_onnx(model, (1, 28, 28), tmp_path / "pool.onnx")
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node] == ["Sub", "Div", "Conv", "Relu", "MaxPool", "Conv",
                                               "Relu", "AveragePool", "Flatten", "Gemm"]
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("weight")]
    total = sum(w.size for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(_onnxruntime(path, x), model(x).numpy(), atol=ATOL, rtol=0)


def test_unsupported_layer_is_a_pruning_error(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Sigmoid())
    with pytest.raises(PruningError, match=r"layer l2 \(Sigmoid\) has no ONNX export"):
        export_onnx(model, (4,), tmp_path / "bad.onnx")


def test_exported_model_and_module_load_in_the_verifier_with_equal_outputs(tmp_path):
    from verifier import BoundedModel

    torch.manual_seed(0)
    model = _pruned(build_model("cnn_base", GREY)).eval()
    path = export_onnx(model, GREY.input_shape, tmp_path / "model.onnx")
    x = torch.rand(4, *GREY.input_shape)
    with torch.no_grad():
        expected = model(x)
        from_onnx = BoundedModel(str(path)).forward(x)
        from_module = BoundedModel(model).forward(x)
    torch.testing.assert_close(from_onnx.reshape(expected.shape), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(from_module.reshape(expected.shape), expected, atol=ATOL, rtol=0)


def _dead_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(GREY, (12, 10))
    with torch.no_grad():
        first, second, last = (m for _, m in prunable_layers(model))
        first.weight[0].zero_()
        first.bias[0] = -0.5  # constant 0 -> removed
        first.weight[1].zero_()
        first.bias[1] = 0.7  # constant relu(0.7) -> folded into the next bias, removed
        second.weight[:, 2].zero_()  # no outgoing weight -> removed
        second.weight[3].zero_()
        second.bias[3] = 0.2  # constant, folded into the classifier's bias
    return model


def _dead_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = build_model("cnn_deep", GREY)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        convs[0].weight[0].zero_()
        convs[0].bias[0] = -1.0  # zero channel -> removed
        convs[0].weight[1].zero_()
        convs[0].bias[1] = 0.5  # constant channel before a padded conv -> kept
        convs[1].weight[:, 2].zero_()  # channel 2 of conv 0 unread -> removed
        convs[3].weight[3].zero_()
        convs[3].bias[3] = 0.4  # constant channel before Flatten+Linear -> folded, removed
    return model


@pytest.mark.parametrize("make,removed", [(_dead_mlp, 4), (_dead_cnn, 3)])
def test_compaction_removes_dead_units_and_keeps_outputs(make, removed):
    model = _pruned(make(), 0.3).eval()
    small, report = compact(model)
    assert sum(report.values()) == removed
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in small.parameters())
    assert n_after < n_before
    x = torch.rand(6, *GREY.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=ATOL, rtol=0)


def test_compaction_of_a_heavily_pruned_mlp_keeps_outputs():
    torch.manual_seed(0)
    model = _pruned(mlp(GREY, (64, 64)), 0.98).eval()
    small, report = compact(model)
    assert sum(report.values()) > 0
    x = torch.rand(6, *GREY.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=ATOL, rtol=0)


def _parse_bounds(text: str) -> tuple[dict, dict]:
    upper = {int(i): float(v) for i, v in re.findall(r"\(assert \(<= X_(\d+) (\S+)\)\)", text)}
    lower = {int(i): float(v) for i, v in re.findall(r"\(assert \(>= X_(\d+) (\S+)\)\)", text)}
    return lower, upper


def test_vnnlib_spec_is_the_clipped_ball_with_one_disjunct_per_wrong_class():
    image = torch.tensor([[0.0, 0.05, 0.5], [0.97, 1.0, 0.3]])
    text = vnnlib_robustness(image, label=2, eps=0.1, n_classes=4)
    lower, upper = _parse_bounds(text)
    flat = image.flatten().double().tolist()
    assert sorted(lower) == sorted(upper) == list(range(6))
    for i, v in enumerate(flat):
        assert lower[i] == pytest.approx(max(v - 0.1, 0.0), abs=1e-12)
        assert upper[i] == pytest.approx(min(v + 0.1, 1.0), abs=1e-12)
    assert re.findall(r"\(and \(<= Y_(\d+) Y_(\d+)\)\)", text) == [("2", "0"), ("2", "1"),
                                                                   ("2", "3")]
    assert text.count("(declare-const X_") == 6 and text.count("(declare-const Y_") == 4
    with pytest.raises(PruningError, match="label 4 outside"):
        vnnlib_robustness(image, label=4, eps=0.1, n_classes=4)


def test_generated_vnnlib_parses_in_the_verifier_as_clipped_box_and_wrong_class_disjuncts(
        tmp_path):
    from verifier.io.vnnlib import load_vnnlib

    data = load_dataset("fashion-mnist", DATA, "test").head(2)
    eps = 0.05
    for index in range(2):
        image, label = data.images[index], int(data.labels[index])
        path = write_vnnlib(tmp_path / f"img{index}.vnnlib", image, label, eps, 10)
        prop = load_vnnlib(str(path), n_inputs=784, n_outputs=10)
        (region,) = prop.regions
        pixels = image.flatten().double().numpy()
        np.testing.assert_allclose(region.lower, np.maximum(pixels - eps, 0.0), atol=1e-12)
        np.testing.assert_allclose(region.upper, np.minimum(pixels + eps, 1.0), atol=1e-12)
        rows = set()
        for disjunct in region.disjuncts:  # one row each: y_label - y_wrong <= 0
            assert disjunct.matrix.shape == (1, 10) and disjunct.rhs.tolist() == [0.0]
            rows.add(tuple(disjunct.matrix[0].tolist()))
        expected = set()
        for wrong in (j for j in range(10) if j != label):
            row = [0.0] * 10
            row[label], row[wrong] = 1.0, -1.0
            expected.add(tuple(row))
        assert rows == expected
