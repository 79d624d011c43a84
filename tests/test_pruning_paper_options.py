"""The paper's pruning options (issue 25): conv-only layer scope (exact counts, fc layers
untouched), both ladders exact per round, global vs per-layer thresholds (weights and
channels), rewinding of the whole state (weights, BatchNorm statistics, lr schedule position),
HYDRA's scaled per-layer scores, slimming's mean-|γ| penalty, cifar_model_deep's shapes."""
import math

import pytest
import torch
from torch import nn

from conftest import synthetic_images
from pruning.data import dataset_info
from pruning.errors import PruningError
from pruning.methods import PruneContext, get_method
from pruning.methods.hydra import scaled_scores
from pruning.methods.structured import SlimPenalty, alive_units, channel_groups, prune_channels
from pruning.models import build_model, effective_weight, prunable_layers, scoped_layers
from pruning.objectives import AttackConfig, Standard
from pruning.schedule import (
    CHANNEL_LADDER, UNSTRUCTURED_LADDER, Ladder, ScheduleConfig, run_schedule,
)
from pruning.sparsity import prune_by_scores, rewind_full
from pruning.train import TrainConfig, train

DATA = synthetic_images(64, (1, 8, 8))
ATTACK = AttackConfig(eps=0.05, steps=2)


def _cnn() -> nn.Sequential:
    """conv 4 (BN) -> conv 6 (BN) -> fc 16 -> fc 3 on 1x8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 4, 2, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 16), nn.ReLU(), nn.Linear(16, 3))


def _context(**overrides) -> PruneContext:
    fields = dict(data=DATA, objective=Standard(), attack=ATTACK,
                  score_training=TrainConfig(epochs=1, batch_size=16), layers="conv")
    fields.update(overrides)
    return PruneContext(**fields)


def _zeros(module) -> int:
    return int((effective_weight(module) == 0).sum())


def test_ladders_are_the_papers():
    assert UNSTRUCTURED_LADDER.targets()[-1] == pytest.approx(0.9719, abs=1e-4)
    assert CHANNEL_LADDER.targets()[-1] == pytest.approx(0.7530, abs=1e-4)
    assert len(UNSTRUCTURED_LADDER.targets()) == 16 and len(CHANNEL_LADDER.targets()) == 12
    with pytest.raises(PruningError):
        Ladder(1.2, 3)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_conv_scope_prunes_exactly_the_conv_weights_and_leaves_fc_dense(scope):
    model = _cnn()
    scores = {name: effective_weight(m).detach().abs() for name, m in prunable_layers(model)}
    prune_by_scores(model, scores, 0.6, scope, layers="conv")
    convs = [m for _, m in scoped_layers(model, "conv")]
    n_conv = sum(m.weight.numel() for m in convs)
    if scope == "global":
        assert sum(_zeros(m) for m in convs) == round(0.6 * n_conv)
    else:
        assert [_zeros(m) for m in convs] == [round(0.6 * m.weight.numel()) for m in convs]
    assert [_zeros(m) for m in (model[7], model[9])] == [0, 0]  # fc layers untouched
    with pytest.raises(PruningError, match="selects no layer"):
        scoped_layers(nn.Sequential(nn.Linear(3, 2)), "conv")


def test_global_threshold_differs_from_per_layer_and_both_are_exact():
    # layer 0's weights are all small: one global threshold prunes it far more than 50 %
    model = _cnn()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    scores = {name: effective_weight(m).detach().abs() for name, m in prunable_layers(model)}
    prune_by_scores(model, scores, 0.5, "global", layers="conv")
    assert _zeros(model[0]) == model[0].weight.numel()
    assert _zeros(model[0]) + _zeros(model[3]) == round(0.5 * (36 + 384))


@pytest.mark.parametrize("threshold", ["global", "layer"])
def test_channel_thresholds_global_and_per_layer(threshold):
    model = _cnn()
    scores = {g.name: torch.arange(g.n_units, dtype=torch.float64) * (10 if g.name == "3" else 1)
              for g in channel_groups(model)}
    prune_channels(model, scores, 0.4, threshold, layers="conv")
    dead = {g.name: int((~alive_units(g)).sum()) for g in channel_groups(model)}
    if threshold == "layer":
        assert (dead["0"], dead["3"]) == (round(0.4 * 4), round(0.4 * 6))
    else:  # one ranking over the 10 conv channels: 4 go, the 4 lowest are layer 0's 0..3 -> no
        assert dead["0"] + dead["3"] == 4 and dead["0"] == 3  # layer 0 keeps one unit
    assert dead["7"] == 0  # the fc layer is outside the conv scope


def test_global_channel_threshold_refuses_to_empty_a_layer():
    model = _cnn()
    scores = {g.name: torch.arange(g.n_units, dtype=torch.float64) + (100 if g.name == "3" else 0)
              for g in channel_groups(model)}
    with pytest.raises(PruningError, match="every unit of layer 0"):
        prune_channels(model, scores, 0.5, "global", layers="conv")


@pytest.mark.parametrize("method,ladder", [("imp", Ladder(0.2, 4)), ("slim", Ladder(0.11, 3))])
def test_ladder_sparsities_are_exact_every_round(method, ladder, tmp_path):
    model = _cnn()
    early = {k: v.clone() for k, v in model.state_dict().items()}
    structured = get_method(method).structured
    schedule = ScheduleConfig("iterative", ladder.rounds, "rewind_lt",
                              "layer" if structured else "global")
    targets = ladder.targets()
    summaries = run_schedule(model, get_method(method), targets[-1], schedule, _context(),
                             TrainConfig(epochs=1, batch_size=16), tmp_path, early_state=early,
                             targets=targets)
    n_conv = 36 + 384
    for summary, target in zip(summaries, targets):
        assert summary["target_sparsity"] == target
        if structured:
            kept = summary["channels"]
            assert (kept["0"]["kept"], kept["3"]["kept"]) == (4 - round(target * 4),
                                                              6 - round(target * 6))
        else:
            assert summary["scoped_sparsity"] == round(target * n_conv) / n_conv
    # one round at a time: stop_after, then the rest resumes from the round files
    again = _cnn()
    part = run_schedule(again, get_method(method), targets[-1], schedule, _context(),
                        TrainConfig(epochs=1, batch_size=16), tmp_path, early_state=early,
                        targets=targets, stop_after=2)
    assert len(part) == 2 and part == summaries[:2]


def test_rewind_restores_weights_batchnorm_statistics_and_keeps_masks():
    model = _cnn()
    early = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, Standard(), DATA, TrainConfig(epochs=1, batch_size=16), progress=False)
    assert not torch.equal(model[1].running_mean, early["1.running_mean"])
    scores = {name: effective_weight(m).detach().abs() for name, m in prunable_layers(model)}
    prune_by_scores(model, scores, 0.5, "global", layers="conv")
    mask = model[3].weight_mask.clone()
    rewind_full(model, early)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "1.weight",
                "4.bias", "7.weight", "9.bias", "0.bias"):
        assert torch.equal(model.state_dict()[key], early[key]), key
    assert torch.equal(model[3].weight_orig, early["3.weight"])
    assert torch.equal(model[3].weight_mask, mask)
    assert torch.equal(effective_weight(model[3]), early["3.weight"] * mask)
    with pytest.raises(PruningError, match="no '1.running_var'"):
        rewind_full(model, {k: v for k, v in early.items() if k != "1.running_var"})


def test_lr_after_a_rewind_starts_at_the_rewind_epochs_schedule_position():
    dense = TrainConfig(epochs=4, lr=0.01, optimizer="sgd", lr_schedule="step",
                        lr_milestones=(2, 3))
    rewound = TrainConfig(epochs=3, lr=0.01, optimizer="sgd", lr_schedule="step",
                          lr_milestones=(2, 3), lr_offset_epochs=1)
    steps = 10
    for step in range(3 * steps):
        assert rewound.lr_at(step, steps) == dense.lr_at(step + steps, steps)
    cosine = TrainConfig(epochs=3, lr_offset_epochs=1)
    assert cosine.lr_at(0, steps) == pytest.approx(TrainConfig(epochs=4).lr_at(steps, steps))


def test_hydra_scores_start_scaled_per_layer_and_keep_the_top_per_layer():
    weight = torch.tensor([[0.5, -1.0, 0.25, 2.0]])
    assert torch.allclose(scaled_scores(weight), math.sqrt(6 / 4) * weight / 2.0)
    model = _cnn()
    scores = get_method("hydra").scores(model, 0.5, "global", _context())
    assert set(scores) == {"0", "3"}  # conv scope: no scores for the fc layers
    assert get_method("hydra").threshold == "layer"


def test_slim_penalty_is_the_mean_of_gamma_magnitudes():
    model = _cnn()
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[4].weight.fill_(-0.5)

    class NoLoss:  # isolates the penalty from the regime's loss
        def loss(self, model, x, y, generator):
            return x.new_zeros(())

    penalty = SlimPenalty(NoLoss(), (model[1], model[4]), 1e-4)
    x, y = DATA.images[:8], DATA.labels[:8]
    expected = 1e-4 * (4 * 2.0 + 6 * 0.5) / 10  # mean over all 10 γ, not the sum
    assert float(penalty.loss(model, x, y, None).detach()) == pytest.approx(expected, rel=1e-6)


def test_methods_that_regularise_from_pretraining_and_snip_on_the_regime_loss():
    assert get_method("imp-nrs").regulariser == "nrs" and get_method("nrs").regulariser == "nrs"
    assert get_method("slim").regulariser == "slim" and get_method("imp").regulariser is None
    assert get_method("imp-nrs").schedule == "iterative"


def test_cifar_model_deep_greyscale_ends_3x3_stride_2():
    model = build_model("cifar_model_deep", dataset_info("fashion-mnist"))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (128, 4, 2)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(128 * 3 * 3, 100), (100, 10)]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == 5
