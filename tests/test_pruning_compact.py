"""Structured compaction: BatchNorm folded, removed channels / neurons physically deleted, the
function kept; the exported ONNX is smaller, equals onnxruntime and is bounded by the verifier.

Tolerance: ``ATOL`` = 1e-5 max absolute difference on float32 logits of order 1–10 (the only
differences are summation order and the float64 → float32 rounding of folded BatchNorms).
"""
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from conftest import init_
from pruning.compact import compact, fold_batch_norms
from pruning.export import export_onnx
from pruning.methods import get_method
from pruning.methods.structured import channel_report, prune_channels

ATOL = 1e-5


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so folding is exercised away from identity."""
    return init_(model, torch.Generator().manual_seed(seed), scale=2.0)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def _bn_cnn() -> nn.Sequential:
    """conv→BN→ReLU→conv→BN→ReLU→flatten→linear→ReLU→linear on (1, 12, 12)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU(), nn.Flatten(),
                         nn.Linear(12 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 5))


def _pooled_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 6, 3, 1, 1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, 1, 1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


CASES = {"mlp": (_mlp, (1, 6, 6)), "bn_cnn": (_bn_cnn, (1, 12, 12)),
         "pooled_cnn": (_pooled_cnn, (1, 12, 12))}


def _structured(name: str, fraction: float = 0.5):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = _randomise(build())
    scores = get_method("l1-channel").scores(model, fraction, "global", None)
    prune_channels(model, scores, fraction)
    return model.eval(), shape


def _max_diff(a: nn.Module, b: nn.Module, shape, n: int = 16) -> float:
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def test_batch_norm_folding_keeps_the_function():
    torch.manual_seed(0)
    model = _randomise(_bn_cnn())
    layers, folded = fold_batch_norms(list(model))
    assert folded == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in layers)
    assert _max_diff(nn.Sequential(*layers), model, (1, 12, 12)) < ATOL


@pytest.mark.parametrize("name", sorted(CASES))
def test_compaction_of_a_structured_model_removes_the_channels_and_keeps_outputs(name):
    model, shape = _structured(name)
    small, removed = compact(model)
    kept = {layer: counts["kept"] for layer, counts in channel_report(model).items()}
    widths = [m.weight.shape[0] for m in small if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert widths[:-1] == list(kept.values())  # every hidden layer shrunk to its kept units
    assert sum(removed.values()) == sum(c["total"] - c["kept"]
                                        for c in channel_report(model).values())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small)
    assert _max_diff(small, model, shape) < ATOL


def _onnxruntime(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("name", ["mlp", "bn_cnn"])
def test_compact_onnx_is_smaller_matches_onnxruntime_and_the_verifier_bounds_it(tmp_path,
                                                                                  name):
    from verifier import BoundedModel

    model, shape = _structured(name)
    dense = export_onnx(model, shape, tmp_path / "dense.onnx")
    small_model, _ = compact(model)
    small = export_onnx(small_model, shape, tmp_path / "model.onnx")
    assert small.stat().st_size < 0.7 * dense.stat().st_size
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_onnxruntime(small, x), expected, atol=ATOL, rtol=0)

    bounded = BoundedModel(str(small))
    lower, upper = x[:2] - 0.02, x[:2] + 0.02
    lb, ub = (t.detach() for t in bounded.compute_bounds(lower, upper, method="crown"))
    assert lb.shape == ub.shape == (2, 5) and bool(torch.isfinite(lb).all())
    samples = lower + (upper - lower) * torch.rand(200, *lower.shape,
                                                   generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = model(samples.reshape(-1, *shape)).reshape(200, 2, 5)
    slack = ATOL * (1 + outputs.abs())
    assert bool((outputs >= lb - slack).all()) and bool((outputs <= ub + slack).all())
