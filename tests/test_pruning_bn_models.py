"""BatchNorm models of the zoo (issue 7): shapes of the paper's CIFAR models and their greyscale
variants, unfolded BatchNorm loaded by the verifier from the nn.Module and from our ONNX export
(BatchNormalization nodes) with onnxruntime agreeing, and CROWN bounds containing samples."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from pruning.data import DatasetInfo, dataset_info
from pruning.export import export_onnx
from pruning.models import build_model, cnn
from verifier import BoundedModel

TOLERANCE = 1e-5  # float32 rounding slack, relative to 1 + |value|



# (model, dataset) -> in_features of every Linear
FC_SHAPES = {
    ("cifar_base", "cifar10"): [(8192, 250), (250, 10)],
    ("cifar_model", "cifar10"): [(1024, 100), (100, 10)],
    ("deep", "cifar10"): [(8192, 100), (100, 10)],
    ("cnn_7layer_bn", "cifar10"): [(32768, 512), (512, 10)],
    ("cifar_base", "mnist"): [(6272, 250), (250, 10)],
    ("cifar_model", "mnist"): [(784, 100), (100, 10)],
    ("deep", "mnist"): [(6272, 100), (100, 10)],
    ("cnn_7layer_bn", "mnist"): [(25088, 512), (512, 10)],
}
N_BATCH_NORMS = {"cifar_base": 2, "cifar_model": 2, "deep": 5, "cnn_7layer_bn": 6}


@pytest.mark.parametrize("name,dataset", sorted(FC_SHAPES))
def test_bn_zoo_models_have_the_papers_shapes(name, dataset):
    info = dataset_info(dataset)
    torch.manual_seed(0)
    model = build_model(name, info).eval()
    fcs = [(m.in_features, m.out_features) for m in model if isinstance(m, torch.nn.Linear)]
    assert fcs == FC_SHAPES[(name, dataset)]
    norms = [m for m in model if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == N_BATCH_NORMS[name]
    with torch.no_grad():
        assert model(torch.rand(2, *info.input_shape)).shape == (2, 10)


TINY = DatasetInfo("tiny", "tiny", (2, 8, 8), 3, (0.5, 0.4), (0.25, 0.3))


def _tiny_bn_cnn() -> torch.nn.Sequential:
    """Normalize → conv(2→4, k4 s2)+BN2d → ReLU → conv(4→6, k3 s1)+BN2d → ReLU → flatten →
    fc(96→8)+BN1d → ReLU → fc(8→3): every BatchNorm kind the zoo uses, with non-trivial
    running statistics and affine parameters."""
    torch.manual_seed(0)
    model = cnn(TINY, ((4, 4, 2, 1), (6, 3, 1, 1)), (8,), batch_norm=True, fc_batch_norm=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _samples(lower, upper, n, generator):
    """n points of the box [lower, upper] (lower: (1, *shape)): uniform, plus its two corners."""
    u = torch.rand(n, *lower.shape[1:], generator=generator)
    return torch.cat([lower + u * (upper - lower), lower, upper])


def _assert_contains(lb, ub, outputs):
    slack = TOLERANCE * (1 + outputs.abs())
    assert bool((outputs >= lb - slack).all()), float((lb - outputs).max())
    assert bool((outputs <= ub + slack).all()), float((outputs - ub).max())


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_bounds_of_unfolded_bn_cnn_contain_samples(method):
    model = _tiny_bn_cnn()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, *TINY.input_shape, generator=generator)
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    lb, ub = BoundedModel(model).compute_bounds(lower, upper, method=method)
    with torch.no_grad():
        outputs = model(_samples(lower, upper, 2000, generator))
    _assert_contains(lb, ub, outputs)
    assert bool((ub - lb > 0).all())


def test_bn_cnn_onnx_export_loads_in_verifier_and_matches_onnxruntime(tmp_path):
    model = _tiny_bn_cnn()
    path = export_onnx(model, TINY.input_shape, tmp_path / "model.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 3  # unfolded: two BN2d, one BN1d
    generator = torch.Generator().manual_seed(2)
    probe = torch.rand(16, *TINY.input_shape, generator=generator)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {"input": probe.numpy().astype(np.float32)})[0])
    with torch.no_grad():
        torch_out = model(probe)
    bounded = BoundedModel(str(path))
    assert float((onnx_out - torch_out).abs().max()) < 1e-5
    assert float((bounded.forward(probe) - torch_out).abs().max()) < 1e-5
    x = probe[:1]
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    lb, ub = bounded.compute_bounds(lower, upper, method="crown")
    module_lb, module_ub = BoundedModel(model).compute_bounds(lower, upper, method="crown")
    assert torch.allclose(lb, module_lb, atol=1e-4) and torch.allclose(ub, module_ub, atol=1e-4)
    samples = _samples(lower, upper, 2000, generator)
    outputs = torch.from_numpy(
        session.run(None, {"input": samples.numpy().astype(np.float32)})[0])
    _assert_contains(lb, ub, outputs)
