"""The paper's NRS method (issue 7): the BN-normalised neuron-stability loss against a hand
computation, its gradient (γ detached in the normaliser), channel scoring and the exact channel
fraction, masks surviving training, and ``certiprune prune --method nrs`` end to end."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import prune_context, synthetic_images
from pruning import cli
from pruning.methods import METHOD_NAMES, PruneContext, get_method
from pruning.methods.nrs import (
    NRSConfig, channel_nrs, default_rs_weight, nrs_loss, nrs_objective, nrs_scores, nrs_terms,
    relu_sites,
)
from pruning.methods.structured import alive_units, channel_groups, prune_channels
from pruning.errors import PruningError
from pruning.objectives import AttackConfig, CrownIBPTraining, PGDTraining, Standard
from pruning.sparsity import effective_parameter
from pruning.train import TrainConfig, train
from verifier import BoundedModel

DATA = str(Path(__file__).parent / "data" / "pruning")
GAMMA_EPS = NRSConfig().gamma_eps



def _hand_net() -> nn.Sequential:
    """x (2) → Linear W1 → BN1d (γ = [2, 0.5], β = [0, 0.25], mean 0, var 1, eps 0) → ReLU →
    Linear W2 → ReLU (no BN) → Linear(2 → 1)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, eps=0.0), nn.ReLU(),
                          nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, -0.5]))
        model[1].weight.copy_(torch.tensor([2.0, 0.5]))
        model[1].bias.copy_(torch.tensor([0.0, 0.25]))
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
        model[3].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        model[3].bias.copy_(torch.tensor([-0.5, 0.0]))
        model[5].weight.fill_(1.0)
        model[5].bias.zero_()
    return model.eval()


X = torch.tensor([[0.5, 0.5]])  # the ball: [0.25, 0.75]² at eps 0.25


def test_nrs_loss_matches_hand_computation():
    # Layer 1 on [0.25, 0.75]²: z1 = x1 − x2 ∈ [−0.5, 0.5], z2 = 0.5·x1 + x2 − 0.5 ∈
    # [−0.125, 0.625]; after BN (γz + β): a1 ∈ [−1, 1], a2 ∈ [0.1875, 0.5625].
    # ReLUs: h1 ∈ [0, 1], h2 ∈ [0.1875, 0.5625]; layer 2: y1 = h1 + h2 − 0.5 ∈ [−0.3125, 1.0625],
    # y2 = h1 − h2 ∈ [−0.5625, 0.8125].
    expected = [
        -math.tanh(1 + (-1.0 * 1.0) / (2.0 ** 2 + GAMMA_EPS)),
        -math.tanh(1 + (0.1875 * 0.5625) / (0.5 ** 2 + GAMMA_EPS)),
        -math.tanh(1 + (-0.3125 * 1.0625)),
        -math.tanh(1 + (-0.5625 * 0.8125)),
    ]
    model = _hand_net()
    loss = nrs_loss(model, BoundedModel(model), X, eps=0.25)
    assert float(loss.detach()) == pytest.approx(sum(expected) / 4, abs=1e-6)
    terms = nrs_terms(model, BoundedModel(model), X, eps=0.25)
    assert [site.batch_norm for site, _ in terms] == [model[1], None]
    assert torch.cat([t.flatten() for _, t in terms]).tolist() == pytest.approx(expected, abs=1e-6)
    cubed = nrs_loss(model, BoundedModel(model), X, eps=0.25, config=NRSConfig(gamma_pow=3))
    assert float(cubed.detach()) == pytest.approx(
        (-math.tanh(1 - 1 / (8 + GAMMA_EPS)) - math.tanh(1 + 0.10546875 / (0.125 + GAMMA_EPS))
         + sum(expected[2:])) / 4, abs=1e-6)


def test_nrs_gradient_reaches_weights_but_not_gamma_through_the_normaliser():
    model = _hand_net()
    bounded = BoundedModel(model)
    gamma = model[1].weight
    loss = nrs_loss(model, bounded, X, eps=0.25)
    weights = [model[0].weight, model[3].weight, gamma]
    grad_w1, grad_w2, grad_gamma = torch.autograd.grad(loss, weights)
    assert bool(grad_w1.abs().sum() > 0) and bool(grad_w2.abs().sum() > 0)

    def by_hand(normaliser_of_gamma):
        (l1, u1), (l2, u2) = bounded.relu_bounds(X - 0.25, X + 0.25, method="ibp")
        terms = [-torch.tanh(1 + l1 * u1 / normaliser_of_gamma), -torch.tanh(1 + l2 * u2)]
        return torch.cat([t.flatten(1) for t in terms], 1).mean()

    # γ still acts through the BN forward (the bounds l, u); the normaliser adds nothing.
    (through_bounds,) = torch.autograd.grad(by_hand(gamma.detach() ** 2 + GAMMA_EPS), gamma)
    (with_normaliser,) = torch.autograd.grad(by_hand(gamma ** 2 + GAMMA_EPS), gamma)
    assert torch.allclose(grad_gamma, through_bounds, atol=1e-7)
    assert not torch.allclose(grad_gamma, with_normaliser, atol=1e-4)


def _bn_cnn() -> nn.Sequential:
    """conv(1→8)→BN→ReLU→conv(8→6)→BN→ReLU→flatten→linear(54→10)→ReLU→linear(10→3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 3))


SYNTHETIC = synthetic_images()


def _context(**overrides) -> PruneContext:
    return prune_context(SYNTHETIC, **overrides)


@pytest.fixture(scope="module")
def trained_cnn():
    model = _bn_cnn()
    train(model, Standard(), SYNTHETIC, TrainConfig(epochs=2, batch_size=16), progress=False)
    return model


def test_nrs_is_a_registered_structured_method_with_the_regimes_weight():
    assert "nrs" in METHOD_NAMES and get_method("nrs").structured
    attack = AttackConfig(eps=0.1)
    assert default_rs_weight(Standard()) == 0.01
    assert default_rs_weight(PGDTraining(attack)) == 0.01
    assert default_rs_weight(CrownIBPTraining(0.1)) == 0.001
    objective = nrs_objective(_bn_cnn(), _context(objective=CrownIBPTraining(0.05)))
    assert objective.weight == 0.001 and default_rs_weight(objective) == 0.001


def test_relu_sites_pair_each_relu_with_its_bn_and_layer(trained_cnn):
    sites = relu_sites(trained_cnn)
    assert [(s.batch_norm, s.layer) for s in sites] == [
        (trained_cnn[1], "0"), (trained_cnn[4], "3"), (None, "7")]


def test_nrs_removes_the_least_stable_channels_at_the_exact_fraction(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    ctx = _context(score_training=TrainConfig(epochs=0, batch_size=16))
    mean_nrs = channel_nrs(model, BoundedModel(model), SYNTHETIC, ctx.attack.eps)
    scores = nrs_scores(model, 0.5, "global", ctx)
    assert set(scores) == {"0", "3"}  # the BatchNorm-normalised layers, as in the paper
    prune_channels(model, scores, 0.5)
    for group in channel_groups(model)[:2]:
        alive = alive_units(group)
        assert int((~alive).sum()) == round(0.5 * group.n_units)
        assert float(mean_nrs[group.name][~alive].min()) >= float(mean_nrs[group.name][alive].max())


def test_nrs_masks_survive_training_and_the_regulariser_sees_current_gamma(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    ctx = _context()
    method = get_method("nrs")
    prune_channels(model, method.scores(model, 0.4, "global", ctx), 0.4)
    dead = {g.name: ~alive_units(g) for g in channel_groups(model)}
    train(model, method.finetune_objective(model, ctx), SYNTHETIC,
          TrainConfig(epochs=1, batch_size=16, lr=1e-2), progress=False)
    for group in channel_groups(model):
        assert torch.equal(~alive_units(group), dead[group.name])
        expected = round(0.4 * group.n_units) if group.batch_norm is not None else 0
        assert int(dead[group.name].sum()) == expected
        if group.batch_norm is not None:
            gamma = effective_parameter(group.batch_norm, "weight")
            assert bool((gamma[dead[group.name]] == 0).all())
    # After the optimiser step γ has changed; at eps 0 the bounds are the point itself, so the
    # NRS terms of the first ReLU must equal −tanh(1 + a²/(γ² + ε)) for the current a and γ.
    model.eval()
    x = SYNTHETIC.images[:4]
    with torch.no_grad():
        pre_activation = model[1](model[0](x))
        gamma = effective_parameter(model[1], "weight")
    expected = -torch.tanh(1 + pre_activation ** 2 / (gamma ** 2 + GAMMA_EPS).view(-1, 1, 1))
    (_, first), *_ = nrs_terms(model, BoundedModel(model), x, eps=0.0)
    assert torch.allclose(first.detach(), expected, atol=1e-5)


def test_prune_command_nrs_on_a_crown_ibp_bn_checkpoint(tmp_path):
    fast = ["--data-dir", DATA, "--train-limit", "64", "--test-limit", "16", "--quiet",
            "--pgd-steps", "1", "--batch-size", "32"]
    trained = tmp_path / "train"
    assert cli.main(["train", "--model", "cnn_base_bn", "--regime", "crown-ibp", "--epochs", "1",
                     "--out", str(trained), *fast]) == 0
    out = tmp_path / "prune"
    assert cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method", "nrs",
                     "--sparsity", "0.25", "--finetune-epochs", "1", "--score-epochs", "1",
                     "--bound-images", "4", "--out", str(out), *fast]) == 0
    summary = json.loads((out / "prune.json").read_text())
    assert summary["regime"] == "crown-ibp" and summary["structured"]
    assert summary["channels"] == {"1": {"kept": 6, "total": 8}, "4": {"kept": 12, "total": 16},
                                   "8": {"kept": 100, "total": 100}}


def test_nrs_never_ranks_units_without_batch_norm_so_dead_fc_units_are_not_kept(trained_cnn):
    """Issue 7 regression (the paper study's nrs fell to chance): without the BN normaliser a
    unit inactive on the whole ball (l ≤ u < 0, l·u > 0) has NRS ≈ −1 like a stably active
    one, so ranking the fc layer kept its dead units. The paper's code scores only BatchNorm
    channels; the fc layer must keep all its units, dead or not."""
    model = copy.deepcopy(trained_cnn)
    with torch.no_grad():  # fc units 0..4 dead on every input, 5..9 working
        model[7].bias[:5] = -1e3
    ctx = _context(score_training=TrainConfig(epochs=0, batch_size=16))
    mean_nrs = channel_nrs(model, BoundedModel(model), SYNTHETIC, ctx.attack.eps)
    assert "7" not in mean_nrs
    prune_channels(model, nrs_scores(model, 0.5, "global", ctx), 0.5)
    fc = channel_groups(model)[2]
    assert bool(alive_units(fc).all())
    assert model(SYNTHETIC.images[:16]).std(0).max() > 0  # the output still depends on x


def test_nrs_without_batch_norm_is_an_error_naming_the_method():
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 3))
    ctx = _context(score_training=TrainConfig(epochs=0, batch_size=16))
    with pytest.raises(PruningError, match="method nrs needs BatchNorm"):
        nrs_scores(model, 0.5, "global", ctx)
