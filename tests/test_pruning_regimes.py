"""Training regimes of issue 7: FGSM + GradAlign and CROWN-IBP (bounds from our own
BoundedModel, differentiable in the weights), the regimes' default optimisers, the step lr
schedule, and ``certiprune train --regime`` end to end. Tiny nets, synthetic data, fixed seeds."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning import cli
from pruning.data import ImageData
from pruning.evaluate import accuracy, pgd_accuracy
from pruning.objectives import (
    AttackConfig, CrownIBPTraining, FGSMTraining, Standard, grad_align_loss, input_box,
    make_regime, margin_spec, scheduled, smoothed_ramp, worst_case_cross_entropy,
)
from pruning.train import TrainConfig, regime_train_config, train
from verifier import BoundedModel

DATA = str(Path(__file__).parent / "data" / "pruning")



def _two_feature_task(n: int, seed: int) -> ImageData:
    """Two classes on 1×6×6 images: 4 'robust' pixels at 0.5 ± 0.25 (noise 0.15) and 32
    'non-robust' pixels at 0.5 ± 0.05 (noise 0.03). Clean training leans on the many precise
    non-robust pixels, which an eps-0.1 attack flips; robust training must use the 4 others."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float().view(n, 1)
    robust = 0.5 + 0.25 * sign + 0.15 * torch.randn(n, 4, generator=g)
    weak = 0.5 + 0.05 * sign + 0.03 * torch.randn(n, 32, generator=g)
    return ImageData(torch.cat([robust, weak], 1).clamp(0, 1).view(n, 1, 6, 6), y)


def _mlp(*hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers, width = [nn.Flatten()], 36
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    return nn.Sequential(*layers, nn.Linear(width, 2))


def verified_error(model: nn.Module, data: ImageData, eps: float) -> float:
    """Fraction of ``data`` not certified by our CROWN over the clipped eps-ball."""
    n_classes = model(data.images[:1]).shape[1]
    lower, upper = input_box(data.images, eps, 0.0, 1.0)
    with torch.no_grad():
        margins, _ = BoundedModel(model).compute_bounds(
            lower, upper, spec=margin_spec(data.labels, n_classes), method="crown")
    return float((margins <= 0).any(1).float().mean())


# ------------------------------------------------------------------ bounds and their gradients

@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_bounded_model_bounds_are_differentiable_in_module_weights(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.rand(2, 1, 5, 5)
    spec = margin_spec(torch.tensor([0, 2]), 3)
    lower, _ = BoundedModel(model).compute_bounds(x - 0.05, x + 0.05, spec=spec, method=method)
    grads = torch.autograd.grad(lower.sum(), list(model.parameters()))
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_margin_spec_rows_are_true_minus_wrong_class():
    spec = margin_spec(torch.tensor([1, 0]), 3)
    assert spec.tolist() == [[[-1, 1, 0], [0, 1, -1]], [[1, -1, 0], [1, 0, -1]]]
    logits = torch.tensor([[0.2, 1.0, -0.5], [2.0, 0.0, 1.0]])
    margins = torch.einsum("bsk,bk->bs", spec, logits)
    clean = nn.functional.cross_entropy(logits, torch.tensor([1, 0]))
    assert torch.allclose(worst_case_cross_entropy(margins), clean)


def test_smoothed_ramp_is_monotone_continuous_and_ends_at_one():
    values = [smoothed_ramp(i / 1000) for i in range(1001)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 0.005  # no jump at the mid point
    assert smoothed_ramp(0.1) < 0.1 * 0.5  # slow polynomial start
    assert smoothed_ramp(-1) == 0.0 and smoothed_ramp(2) == 1.0


def test_crown_ibp_schedule_ramps_eps_beta_kappa():
    objective = CrownIBPTraining(eps=0.1, ramp_epochs=4)
    assert scheduled(objective, 0).coefficients() == (0.0, 1.0, 1.0)
    eps, beta, kappa = scheduled(objective, 2).coefficients()
    assert 0 < eps < 0.05 + 1e-9 and beta == kappa == 0.5
    assert scheduled(objective, 4).coefficients() == pytest.approx((0.1, 0.0, 0.0))
    assert scheduled(objective, 9).coefficients() == pytest.approx((0.1, 0.0, 0.0))
    assert objective.coefficients() == pytest.approx((0.1, 0.0, 0.0))  # unscheduled: the end
    assert CrownIBPTraining(eps=0.1).coefficients() == pytest.approx((0.1, 0.0, 0.0))


def test_crown_ibp_loss_at_zero_eps_is_clean_cross_entropy_and_trains_the_weights():
    data = _two_feature_task(32, 0)
    model = _mlp(8)
    clean = nn.functional.cross_entropy(model(data.images), data.labels)
    at_zero = CrownIBPTraining(eps=0.0).loss(model, data.images, data.labels, None)
    assert float(at_zero.detach()) == pytest.approx(float(clean.detach()), rel=1e-5)
    robust = CrownIBPTraining(eps=0.1).loss(model, data.images, data.labels, None)
    assert float(robust.detach()) > float(clean.detach())
    grads = torch.autograd.grad(robust, list(model.parameters()))
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_crown_ibp_training_lowers_crown_verified_error():
    train_data, test_data = _two_feature_task(256, 0), _two_feature_task(128, 1)
    eps = 0.1
    config = TrainConfig(epochs=6, batch_size=64, lr=1e-2, lr_schedule="constant")
    start = verified_error(_mlp(16, 16), test_data, eps)
    standard, certified = _mlp(16, 16), _mlp(16, 16)
    train(standard, Standard(), train_data, config, progress=False)
    train(certified, CrownIBPTraining(eps, ramp_epochs=2), train_data, config, progress=False)
    standard_error = verified_error(standard, test_data, eps)
    certified_error = verified_error(certified, test_data, eps)
    assert accuracy(certified, test_data) > 0.9
    assert certified_error < start - 0.1
    assert certified_error < standard_error - 0.1


# ------------------------------------------------------------------ FGSM + GradAlign

def test_grad_align_is_zero_for_a_binary_linear_model_and_trains_a_relu_net():
    """For a 2-class linear model the input gradient of CE is ±(w₁ − w₀) scaled, the same
    direction everywhere (cosine 1); a ReLU net's is not, and the term is differentiable."""
    data = _two_feature_task(32, 0)
    generator = torch.Generator().manual_seed(0)
    linear = _mlp()
    assert float(grad_align_loss(linear, data.images, data.labels, 0.1, generator).detach()) < 1e-6
    relu_net = _mlp(16)
    with torch.no_grad():
        relu_net[1].bias.uniform_(-0.5, 0.5)
    align = grad_align_loss(relu_net, data.images, data.labels, 0.3, generator)
    assert float(align.detach()) > 1e-4
    grads = torch.autograd.grad(align, [relu_net[1].weight, relu_net[3].weight])
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_fgsm_step_stays_in_the_clipped_ball():
    data = _two_feature_task(16, 0)
    objective = FGSMTraining(AttackConfig(eps=0.1))
    model = _mlp(8)
    recorded = []
    model.register_forward_pre_hook(lambda module, args: recorded.append(args[0].detach()))
    objective.loss(model, data.images, data.labels, torch.Generator().manual_seed(0))
    lower, upper = input_box(data.images, 0.1, 0.0, 1.0)
    adversarial = recorded[1]  # the random start, the FGSM point, then GradAlign's two
    assert bool((adversarial >= lower - 1e-7).all() and (adversarial <= upper + 1e-7).all())
    assert float((adversarial - data.images).abs().max()) == pytest.approx(0.1, abs=1e-6)


def test_fgsm_grad_align_training_raises_pgd_accuracy_over_standard():
    train_data, test_data = _two_feature_task(512, 0), _two_feature_task(256, 1)
    attack = AttackConfig(eps=0.1, steps=10)
    config = TrainConfig(epochs=10, batch_size=64, lr=1e-2, lr_schedule="constant")
    standard, fast = _mlp(16), _mlp(16)
    train(standard, Standard(), train_data, config, progress=False)
    train(fast, FGSMTraining(attack), train_data, config, progress=False)
    assert accuracy(fast, test_data) > 0.95
    assert pgd_accuracy(fast, test_data, attack) > pgd_accuracy(standard, test_data, attack) + 0.1


# ------------------------------------------------------------------ configuration

def test_regimes_bring_their_optimiser_defaults_and_old_defaults_stay():
    assert regime_train_config("standard") == TrainConfig()
    assert regime_train_config("pgd", epochs=3) == TrainConfig(epochs=3)
    fgsm = regime_train_config("fgsm", lr=None, epochs=4)
    assert (fgsm.optimizer, fgsm.lr, fgsm.momentum, fgsm.weight_decay, fgsm.lr_schedule) == (
        "sgd", 0.01, 0.9, 5e-4, "step")
    assert regime_train_config("crown-ibp", lr=1e-3).lr == 1e-3
    assert isinstance(make_regime("fgsm", AttackConfig()), FGSMTraining)
    assert make_regime("crown-ibp", AttackConfig(eps=0.2), ramp_epochs=3) == CrownIBPTraining(
        0.2, ramp_epochs=3)


def test_step_schedule_decays_at_milestones():
    config = TrainConfig(epochs=8, lr=1.0, lr_schedule="step")
    assert config.milestones() == (4, 6)
    assert [config.lr_at(epoch * 10, 10) for epoch in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert TrainConfig(epochs=8, lr=1.0, lr_schedule="step", lr_milestones=(2,)).lr_at(25, 10) \
        == pytest.approx(0.1)
    cosine = TrainConfig(epochs=2, lr=1.0)
    assert cosine.lr_at(0, 5) == 1.0 and cosine.lr_at(5, 5) == pytest.approx(0.5)
    assert math.isclose(TrainConfig(lr_schedule="constant").lr_at(99, 1), 1e-3)


# ------------------------------------------------------------------ command line

FAST = ["--data-dir", DATA, "--train-limit", "64", "--test-limit", "16", "--quiet",
        "--pgd-steps", "1", "--batch-size", "32", "--epochs", "1"]


@pytest.mark.parametrize("regime,expected", [
    ("fgsm", {"optimizer": "sgd", "lr": 0.01, "lr_schedule": "step", "weight_decay": 5e-4}),
    ("crown-ibp", {"optimizer": "adam", "lr": 5e-4, "lr_schedule": "step"}),
])
def test_train_command_runs_each_regime_with_its_defaults(regime, expected, tmp_path):
    out = tmp_path / regime
    assert cli.main(["train", "--model", "mlp3x100", "--regime", regime, "--out", str(out),
                     *FAST]) == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["regime"] == regime
    assert {key: summary["train_config"][key] for key in expected} == expected


def test_train_command_flags_override_regime_defaults(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "mlp3x100", "--regime", "crown-ibp", "--lr", "0.002",
                     "--ramp-epochs", "0", "--nrs", "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["train_config"]["lr"] == 0.002 and summary["rs_weight"] == 0.001
    assert summary["objective"] == "NRSRegularised"


@pytest.mark.parametrize("argv,message", [
    (["--regime", "trades"], "unknown training regime 'trades'; choose one of standard, pgd, "
                             "fgsm, crown-ibp"),
    (["--model", "resnet"], "unknown model 'resnet'"),
])
def test_unknown_regime_or_model_is_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
