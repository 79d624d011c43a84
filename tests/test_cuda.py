"""The same code on CUDA: bounds, the complete verifier, the CLI and the pruning layer.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``. Every case compares against the CPU answer of the same code or
against sampled points evaluated on the CPU in float64, so a tensor left on the wrong device, a
CPU-only op or a device-dependent result fails here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from verifier import BoundedModel

from conftest import assert_contains
from test_bab import check_bab_against_milp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
DEMO = Path(__file__).parent.parent / "benchmarks" / "data"
PRUNING_DATA = str(Path(__file__).parent / "data" / "pruning")


def conv_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 3),
    ).eval()


def _randomise_bn(net: nn.Sequential) -> nn.Sequential:
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_bounds_on_cuda_equal_cpu_bounds(method):
    net = _randomise_bn(conv_net(0)).double()
    gen = torch.Generator().manual_seed(1)
    centre = torch.rand(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    lower, upper = centre - 0.05, centre + 0.05
    C = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    cpu = BoundedModel(net, dtype=torch.float64)
    gpu = BoundedModel(net, device=CUDA, dtype=torch.float64)
    lb_cpu, ub_cpu = cpu.compute_bounds(lower, upper, C, method=method)
    lb_gpu, ub_gpu = gpu.compute_bounds(lower.to(CUDA), upper.to(CUDA), C.to(CUDA), method=method)
    assert lb_gpu.device.type == "cuda" and ub_gpu.device.type == "cuda"
    # float64 on both devices: only summation order differs, far below any bound's looseness
    torch.testing.assert_close(lb_gpu.cpu(), lb_cpu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ub_gpu.cpu(), ub_cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha-crown"])
def test_bounds_on_cuda_contain_sampled_outputs(method):
    net = _randomise_bn(conv_net(2))
    gen = torch.Generator().manual_seed(3)
    centre = torch.rand(3, 1, 8, 8, generator=gen)
    lower, upper = centre - 0.03, centre + 0.03
    model = BoundedModel(net, device=CUDA, dtype=torch.float32)
    with torch.set_grad_enabled(method == "alpha-crown"):
        lb, ub = model.compute_bounds(lower.to(CUDA), upper.to(CUDA), method=method)
    x = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(3, 4000, 1, 8, 8, generator=gen)
    with torch.no_grad():
        values = net.double()(x.reshape(-1, 1, 8, 8).double()).reshape(3, 4000, 3)
    assert_contains(lb.cpu(), ub.cpu(), values, torch.float32, f"{method} on cuda")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("split", ["on", "off"])
def test_bab_on_cuda_matches_milp(seed, split):
    check_bab_against_milp(seed, split, device="cuda")


def _demo_instances() -> list:
    """The demo instances with a sat / unsat reference answer, as (instance, answer)."""
    from benchmarks.instances import read_instances, read_reference
    reference = read_reference(DEMO / "REFERENCE.csv")
    return [(inst, reference[inst.key]) for inst in read_instances(DEMO / "demo.csv", root=DEMO)
            if reference.get(inst.key) in ("sat", "unsat")]


@pytest.mark.parametrize("instance,expected", _demo_instances(), ids=lambda v: getattr(v, "vnnlib", v))
def test_cli_verify_on_cuda_gives_the_reference_answer(instance, expected, tmp_path, capsys):
    from verifier.cli import main
    out = tmp_path / "result.txt"
    code = main(["verify", instance.onnx_path, instance.vnnlib_path, "--device", "cuda", "--timeout", "60",
                 "--result-file", str(out)])
    assert code == 0
    assert out.read_text().splitlines()[0] == expected


def test_pruning_train_prune_export_on_cuda(tmp_path):
    from pruning import cli
    fast = ["--data-dir", PRUNING_DATA, "--test-limit", "50", "--quiet", "--pgd-steps", "2", "--device", "cuda"]
    trained, pruned, export = tmp_path / "train", tmp_path / "pruned", tmp_path / "export"
    assert cli.main(["train", "--model", "mlp3x100", "--epochs", "1", "--regime", "crown-ibp",
                     "--out", str(trained), *fast]) == 0
    assert cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method", "stability",
                     "--sparsity", "0.8", "--finetune-epochs", "1", "--score-epochs", "1",
                     "--count-unstable", "crown", "--out", str(pruned), *fast]) == 0
    summary = json.loads((pruned / "prune.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert cli.main(["export", "--checkpoint", str(pruned / "model.pt"), "--out", str(export),
                     "--specs", "2", "--data-dir", PRUNING_DATA]) == 0
    assert json.loads((export / "export.json").read_text())["onnxruntime_max_abs_diff"] < 1e-5
