"""Structured methods (slim, l1-channel, refill): the exact channel fraction per hidden layer,
removed channels exactly dead (filter, bias, BN γ/β masked) through training, one-line errors,
and the prune command end to end on a BatchNorm CNN."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import prune_context, synthetic_images
from pruning import cli
from pruning.errors import PruningError
from pruning.methods import PruneContext, get_method
from pruning.methods.structured import (
    alive_units, channel_groups, channel_report, mask_existing_zeros, prune_channels,
)
from pruning.objectives import Standard
from pruning.sparsity import clone_model, effective_parameter, make_permanent
from pruning.train import TrainConfig, train

STRUCTURED = ("slim", "l1-channel", "refill")
DATA = str(Path(__file__).parent / "data" / "pruning")
FAST = ["--data-dir", DATA, "--train-limit", "200", "--test-limit", "50", "--quiet",
        "--pgd-steps", "2", "--bound-images", "8"]


def _bn_cnn() -> nn.Sequential:
    """conv(1→8)→BN→ReLU→conv(8→6)→BN→ReLU→flatten→linear(54→10)→ReLU→linear(10→3)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 3))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 12), nn.ReLU(), nn.Linear(12, 9),
                         nn.ReLU(), nn.Linear(9, 3))


SYNTHETIC = synthetic_images()


def _context(**overrides) -> PruneContext:
    return prune_context(SYNTHETIC, **overrides)


@pytest.fixture(scope="module")
def trained_cnn():
    torch.manual_seed(0)
    model = _bn_cnn()
    train(model, Standard(), SYNTHETIC, TrainConfig(epochs=2, batch_size=16), progress=False)
    return model


def _prune(model, name: str, fraction: float, **context):
    method = get_method(name)
    assert method.structured
    prune_channels(model, method.scores(model, fraction, "global", _context(**context)),
                   fraction)
    return model


@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_structured_methods_remove_the_requested_channel_fraction_per_layer(
        trained_cnn, name, fraction):
    model = _prune(clone_model(trained_cnn), name, fraction)
    report = channel_report(model)
    scored = ("0", "3") if name == "slim" else ("0", "3", "7")  # slim: layers with a BN only
    for layer, counts in report.items():
        expected = counts["total"] - round(fraction * counts["total"]) if layer in scored \
            else counts["total"]
        assert counts["kept"] == expected, (layer, counts)
    assert "9" not in report  # the classifier's outputs are never pruned


@pytest.mark.parametrize("name", ["l1-channel", "refill"])
def test_structured_methods_prune_mlp_neurons_exactly(name):
    torch.manual_seed(1)
    model = _prune(_mlp(), name, 0.4)
    assert channel_report(model) == {"1": {"kept": 12 - 5, "total": 12},
                                     "3": {"kept": 9 - 4, "total": 9}}


def _dead_activations(model, x) -> list[torch.Tensor]:
    """Post-ReLU activations of the removed units of every hidden layer, for input x."""
    groups = channel_groups(model)
    relus = [m for m in model if isinstance(m, nn.ReLU)]
    captured = []
    hooks = [relu.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for relu in relus]
    model(x)
    for hook in hooks:
        hook.remove()
    return [out[:, ~alive_units(g)] for g, out in zip(groups, captured)]


@pytest.mark.parametrize("name", STRUCTURED)
def test_removed_channels_are_exactly_dead_and_stay_so_through_training(trained_cnn, name):
    model = _prune(clone_model(trained_cnn), name, 0.5)
    dead = {g.name: ~alive_units(g) for g in channel_groups(model)}
    train(model, Standard(), SYNTHETIC, TrainConfig(epochs=2, batch_size=16, optimizer="sgd",
                                                    lr=0.05, weight_decay=1e-3),
          progress=False)
    for group in channel_groups(model):
        assert torch.equal(~alive_units(group), dead[group.name])  # no channel revived
        for module, param in group.members():
            value = effective_parameter(module, param).detach()
            assert bool((value[dead[group.name]] == 0).all()), (group.name, param)
    x = SYNTHETIC.images[:8]
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            assert all(bool((out == 0).all()) for out in _dead_activations(model, x))


def test_slim_penalty_drives_batch_norm_scales_down(trained_cnn):
    def total_gamma(penalty):
        model = clone_model(trained_cnn)
        get_method("slim").scores(model, 0.5, "global", _context(
            slim_penalty=penalty, score_training=TrainConfig(epochs=4, batch_size=16, lr=0.1)))
        return sum(float(g.batch_norm.weight.detach().abs().sum()) for g in channel_groups(model)
                   if g.batch_norm is not None)

    assert total_gamma(1.0) < 0.5 * total_gamma(0.0)


def test_slim_without_batch_norm_is_an_error_naming_the_method():
    with pytest.raises(PruningError, match="method slim needs BatchNorm layers"):
        get_method("slim").scores(_mlp(), 0.5, "global", _context())


def test_l1_channel_removes_the_smallest_filters():
    model = _mlp()
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(12.0).view(12, 1).expand(12, 100) / 100)
    _prune(model, "l1-channel", 0.25)
    assert alive_units(channel_groups(model)[0]).tolist() == [False] * 3 + [True] * 9


def test_refill_keeps_the_channels_with_most_surviving_magnitude_weights():
    model = _mlp()
    with torch.no_grad():
        for layer in (model[1], model[3], model[5]):
            layer.weight.fill_(0.01)
        model[1].weight[[2, 5, 7], :60] = 1.0  # 60 large weights in rows 2, 5, 7
        model[1].weight[4, :30] = 1.0  # 30 in row 4
    _prune(model, "refill", 0.5)
    kept = alive_units(channel_groups(model)[0]).nonzero().flatten().tolist()
    assert {2, 5, 7, 4} <= set(kept) and len(kept) == 6
    # kept channels are refilled whole: their small weights survive too
    assert bool((effective_parameter(model[1], "weight")[kept] != 0).all())


@pytest.mark.parametrize("fraction,message", [
    (0.92, "would remove all 6 units of layer 3"),
    (1.0, r"sparsity must be in \[0, 1\), got 1.0"),
    (-0.1, r"sparsity must be in \[0, 1\), got -0.1"),
])
def test_impossible_channel_fractions_are_errors(trained_cnn, fraction, message):
    model = clone_model(trained_cnn)
    scores = get_method("l1-channel").scores(model, 0.5, "global", _context())
    with pytest.raises(PruningError, match=message):
        prune_channels(model, scores, fraction)


def test_channel_masks_only_grow_and_a_lower_fraction_is_an_error(trained_cnn):
    model = _prune(clone_model(trained_cnn), "l1-channel", 0.25)
    first = {g.name: alive_units(g) for g in channel_groups(model)}
    _prune(model, "refill", 0.5)
    for group in channel_groups(model):
        assert bool((alive_units(group) <= first[group.name]).all())
    with pytest.raises(PruningError, match="already has 4 of 8 units removed"):
        _prune(model, "l1-channel", 0.25)


def test_a_permanent_structured_model_keeps_its_dead_channels_when_pruned_again(trained_cnn):
    model = _prune(clone_model(trained_cnn), "l1-channel", 0.5)
    make_permanent(model)
    dead = {g.name: ~alive_units(g) for g in channel_groups(model)}
    mask_existing_zeros(model)
    train(model, Standard(), SYNTHETIC, TrainConfig(epochs=1, batch_size=16, lr=1e-2),
          progress=False)
    for group in channel_groups(model):
        assert torch.equal(~alive_units(group), dead[group.name])
        for module, param in group.members():
            assert bool((effective_parameter(module, param)[dead[group.name]] == 0).all())


# ------------------------------------------------------------------ the prune command

@pytest.fixture(scope="module")
def trained_bn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_bn")
    assert cli.main(["train", "--model", "cnn_base_bn", "--epochs", "1", "--out", str(out),
                     *FAST[:-2]]) == 0
    return out


@pytest.mark.parametrize("method", STRUCTURED)
def test_prune_command_removes_channels_and_exports_a_smaller_onnx(trained_bn, tmp_path,
                                                                    method):
    out = tmp_path / "pruned"
    assert cli.main(["prune", "--checkpoint", str(trained_bn / "model.pt"), "--method", method,
                     "--sparsity", "0.5", "--finetune-epochs", "1", "--score-epochs", "1",
                     "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "prune.json").read_text())
    assert summary["structured"] and summary["target_sparsity"] == 0.5
    convs = {"1": 8, "4": 16}  # cnn_base_bn: Normalize, conv, BN, ReLU, conv, BN, ...
    for layer, total in convs.items():
        assert summary["channels"][layer] == {"kept": total // 2, "total": total}
    assert summary["channels"]["8"]["kept"] == (100 if method == "slim" else 50)
    round_summary = summary["rounds"][0]
    assert "mean_unstable_relus_crown" in round_summary and round_summary["channels"]
    dense, small = tmp_path / "dense", tmp_path / "small"
    for target, flags in ((dense, []), (small, ["--compact"])):
        assert cli.main(["export", "--checkpoint", str(out / "model.pt"), "--out", str(target),
                         *flags]) == 0
    assert (small / "model.onnx").stat().st_size < 0.6 * (dense / "model.onnx").stat().st_size
    assert json.loads((small / "export.json").read_text())["onnxruntime_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("name", STRUCTURED + ("nrs",))
def test_structured_sparsity_counts_every_weight_the_compacted_model_loses(trained_cnn, name):
    """Issue 7 regression (slim reported sparsity 0.020 at target 0.753): the weights that read
    a removed unit (the next conv's input channel, the fc's H·W block after Flatten) are masked
    too, so the reported sparsity is the fraction of weights the compacted export drops,
    whether a method prunes every hidden layer or only those with a BatchNorm — and masking
    them changes no output."""
    from pruning.compact import compact
    from pruning.sparsity import overall_sparsity, sparsity_report

    model = clone_model(trained_cnn).eval()
    x = SYNTHETIC.images[:16]
    _prune(model, name, 0.5, score_training=TrainConfig(epochs=0, batch_size=16))
    model.eval()
    with torch.no_grad():
        before = model(x)
    dense_weights = sum(m.weight.numel() for m in trained_cnn.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear)))
    compacted, _ = compact(model)
    kept_weights = sum(int(m.weight.ne(0).sum()) for m in compacted.modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert overall_sparsity(sparsity_report(model)) == pytest.approx(1 - kept_weights / dense_weights)
    kept_rows = alive_units(channel_groups(model)[1])
    readers = model[3].weight_mask[kept_rows]  # the kept filters of conv 8→6
    removed = ~alive_units(channel_groups(model)[0])
    assert bool((readers[:, removed] == 0).all()) and bool((readers[:, ~removed] == 1).all())
    fc_mask = model[7].weight_mask.view(10, 6, 9)  # Flatten is channel-major: 9 columns each
    removed = ~alive_units(channel_groups(model)[1])
    assert bool((fc_mask[:, removed] == 0).all())
    with torch.no_grad():
        assert torch.allclose(compacted(x), before, atol=1e-5)
