"""Gradient-based scores (snip, taylor): equal to |w·∂L/∂w| computed by hand, on the right loss
and number of batches; exact sparsity; masks survive training; the prune command end to end
(snip at initialisation included)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import synthetic_images
from pruning import cli
from pruning.data import batches
from pruning.methods import PruneContext, get_method
from pruning.methods.gradient import SNIP_BATCHES
from pruning.models import effective_weight, prunable_layers
from pruning.objectives import AttackConfig, Standard
from pruning.sparsity import clone_model, masks_of, prune_by_scores
from pruning.train import TrainConfig, train

DATA = str(Path(__file__).parent / "data" / "pruning")
FAST = ["--data-dir", DATA, "--train-limit", "200", "--test-limit", "50", "--quiet",
        "--pgd-steps", "2", "--bound-images", "8"]
SYNTHETIC = synthetic_images(96, (1, 6, 6))
BATCH = 16


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def _context(**overrides) -> PruneContext:
    fields = dict(data=SYNTHETIC, objective=Standard(), attack=AttackConfig(eps=0.05, steps=2),
                  score_training=TrainConfig(epochs=1, batch_size=BATCH), seed=3)
    fields.update(overrides)
    return PruneContext(**fields)


@dataclasses.dataclass
class CountingLoss:
    """Cross-entropy scaled by 2 (so it differs from the clean loss); counts its calls."""

    calls: int = 0

    def loss(self, model, x, y, generator):
        self.calls += 1
        return 2 * F.cross_entropy(model(x), y)


def _by_hand(model, loss_fn, n_batches: int, per_batch_abs: bool) -> dict:
    chosen = batches(SYNTHETIC, BATCH, torch.Generator().manual_seed(3))[:n_batches]
    layers = prunable_layers(model)
    totals = {name: torch.zeros_like(m.weight) for name, m in layers}
    for x, y in chosen:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        for name, module in layers:
            product = module.weight.detach() * module.weight.grad
            totals[name] += product.abs() if per_batch_abs else module.weight.grad
    if not per_batch_abs:
        totals = {name: (m.weight.detach() * totals[name]).abs() for name, m in layers}
    return totals


def test_snip_is_the_connection_sensitivity_of_the_regime_loss_over_a_few_batches():
    # issue 25: the paper scores SNIP on the regime's own loss, not the clean cross-entropy
    model = _mlp()
    objective = CountingLoss()
    scores = get_method("snip").scores(model, 0.5, "global", _context(objective=objective))
    assert objective.calls == min(SNIP_BATCHES, 96 // BATCH)
    expected = _by_hand(clone_model(model), lambda out, y: 2 * F.cross_entropy(out, y),
                        SNIP_BATCHES, per_batch_abs=False)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name])
    assert all(m.weight.grad is None for _, m in prunable_layers(model))  # caller untouched


@pytest.mark.parametrize("score_batches,expected_calls", [(None, 96 // BATCH), (2, 2)])
def test_taylor_accumulates_per_batch_importance_on_the_regime_loss(score_batches,
                                                                     expected_calls):
    model = _mlp()
    objective = CountingLoss()
    scores = get_method("taylor").scores(model, 0.5, "global", _context(
        objective=objective, score_batches=score_batches))
    assert objective.calls == expected_calls  # one epoch by default
    expected = _by_hand(clone_model(model), lambda out, y: 2 * F.cross_entropy(out, y),
                        expected_calls, per_batch_abs=True)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name])


@pytest.mark.parametrize("name", ["snip", "taylor"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradient_methods_reach_the_sparsity_and_masks_survive_training(name, scope):
    model = _mlp()
    prune_by_scores(model, get_method(name).scores(model, 0.7, scope, _context()), 0.7, scope)
    masks = masks_of(model)
    sizes = {n: m.weight_orig.numel() for n, m in prunable_layers(model)}
    zeros = {n: int((mask == 0).sum()) for n, mask in masks.items()}
    if scope == "global":
        assert sum(zeros.values()) == round(0.7 * sum(sizes.values()))
    else:
        assert zeros == {n: round(0.7 * size) for n, size in sizes.items()}
    train(model, Standard(), SYNTHETIC, TrainConfig(epochs=2, batch_size=BATCH,
                                                    weight_decay=1e-2), progress=False)
    for layer, module in prunable_layers(model):
        assert torch.equal(masks_of(model)[layer], masks[layer])
        assert bool((effective_weight(module)[masks[layer] == 0] == 0).all())


def test_already_pruned_weights_score_zero():
    model = _mlp()
    prune_by_scores(model, get_method("magnitude").scores(model, 0.5, "global", _context()),
                    0.5, "global")
    for name in ("snip", "taylor"):
        scores = get_method(name).scores(model, 0.6, "global", _context())
        for layer, module in prunable_layers(model):
            assert bool((scores[layer][module.weight_mask == 0] == 0).all())


# ------------------------------------------------------------------ the prune command

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    assert cli.main(["train", "--model", "mlp3x100", "--epochs", "1", "--regime", "pgd",
                     "--out", str(out), *FAST[:-2]]) == 0
    return out


@pytest.mark.parametrize("method,flags", [("snip", []), ("taylor", ["--score-batches", "2"]),
                                          ("snip", ["--at-init"])])
def test_prune_command_with_gradient_methods(trained, tmp_path, method, flags):
    assert cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method", method,
                     "--sparsity", "0.8", "--finetune-epochs", "1", "--out", str(tmp_path),
                     *flags, *FAST]) == 0
    summary = json.loads((tmp_path / "prune.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["at_init"] == ("--at-init" in flags)
    assert summary["rounds"][0]["method"] == method
