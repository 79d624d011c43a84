"""Pruning methods and schedules: exact sparsity, masks that survive training, IMP rewinding,
and the ReLU-stability objective measured by the verifier's own bounds."""
from pathlib import Path

import pytest
import torch

from pruning.data import dataset_info, load_dataset
from pruning.methods import METHOD_NAMES, PruneContext, get_method
from pruning.models import effective_weight, mlp, prunable_layers
from pruning.objectives import AttackConfig, Standard
from pruning.schedule import ScheduleConfig, round_targets, run_schedule
from pruning.sparsity import (
    clone_model, layer_weights, make_permanent, masks_of, prune_by_scores, rewind, sparsity_report,
)
from pruning.errors import PruningError
from pruning.train import TrainConfig, train

DATA = Path(__file__).parent / "data" / "pruning"
INFO = dataset_info("fashion-mnist")
TRAIN = load_dataset("fashion-mnist", DATA, "train")
TEST = load_dataset("fashion-mnist", DATA, "test")
ATTACK = AttackConfig(eps=0.05, steps=3)


def _context(**overrides) -> PruneContext:
    fields = dict(data=TRAIN, objective=Standard(), attack=ATTACK,
                  score_training=TrainConfig(epochs=1, batch_size=100), seed=0)
    fields.update(overrides)
    return PruneContext(**fields)


@pytest.fixture(scope="module")
def trained():
    """A 784-32-32-10 MLP trained for 2 epochs on the 400-image slice, and its epoch-0 state."""
    torch.manual_seed(0)
    model = mlp(INFO, (32, 32))
    initial = layer_weights(model)
    train(model, Standard(), TRAIN, TrainConfig(epochs=2, batch_size=100), progress=False)
    return model, initial


def _mask_zeros(model) -> dict[str, int]:
    return {name: int((masks_of(model)[name] == 0).sum()) for name, _ in prunable_layers(model)}


@pytest.mark.parametrize("name", [m for m in METHOD_NAMES
                                  if m != "imp" and not get_method(m).structured])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_each_method_reaches_the_requested_sparsity_exactly(trained, name, scope):
    model = clone_model(trained[0])
    sparsity = 0.83
    scores = get_method(name).scores(model, sparsity, scope, _context())
    prune_by_scores(model, scores, sparsity, scope)
    zeros = _mask_zeros(model)
    sizes = {n: m.weight_orig.numel() for n, m in prunable_layers(model)}
    if scope == "global":
        assert sum(zeros.values()) == round(sparsity * sum(sizes.values()))
    else:
        assert zeros == {n: round(sparsity * size) for n, size in sizes.items()}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_schedule_reaches_the_requested_sparsity_exactly(trained, tmp_path, scope):
    model = clone_model(trained[0])
    schedule = ScheduleConfig(kind="iterative", rounds=3, rewind="rewind_lt", scope=scope)
    summaries = run_schedule(model, get_method("imp"), 0.9, schedule, _context(),
                             TrainConfig(epochs=1, batch_size=100), tmp_path,
                             early_state=trained[1])
    zeros = _mask_zeros(model)
    sizes = {n: m.weight_orig.numel() for n, m in prunable_layers(model)}
    if scope == "global":
        assert sum(zeros.values()) == round(0.9 * sum(sizes.values()))
    else:
        assert zeros == {n: round(0.9 * size) for n, size in sizes.items()}
    assert [s["target_sparsity"] for s in summaries] == pytest.approx(round_targets(0.9, 3))
    assert round_targets(0.9, 3)[0] == pytest.approx(1 - 0.1 ** (1 / 3))


def test_unknown_method_and_schedule_names_are_pruning_errors():
    with pytest.raises(PruningError, match="unknown pruning method 'obd'; choose one of random"):
        get_method("obd")
    with pytest.raises(PruningError, match="unknown rewind 'late'"):
        ScheduleConfig(kind="iterative", rewind="late")


def test_masks_survive_fine_tuning_and_prune_remove(trained):
    model = clone_model(trained[0])
    prune_by_scores(model, get_method("magnitude").scores(model, 0.8, "global", _context()),
                    0.8, "global")
    before = masks_of(model)
    train(model, Standard(), TRAIN, TrainConfig(epochs=2, batch_size=100, weight_decay=1e-3),
          progress=False)
    after = masks_of(model)
    for name, module in prunable_layers(model):
        assert torch.equal(before[name], after[name])
        assert bool((effective_weight(module)[before[name] == 0] == 0).all())
    zeros_masked = sum(r.n_zero for r in sparsity_report(model))
    make_permanent(model)
    assert not any(hasattr(m, "weight_mask") for _, m in prunable_layers(model))
    assert sum(r.n_zero for r in sparsity_report(model)) == zeros_masked


def test_masks_only_shrink_and_lower_target_is_an_error(trained):
    model = clone_model(trained[0])
    magnitude = get_method("magnitude")
    prune_by_scores(model, magnitude.scores(model, 0.5, "global", _context()), 0.5, "global")
    first = masks_of(model)
    random_scores = get_method("random").scores(model, 0.7, "global", _context())
    prune_by_scores(model, random_scores, 0.7, "global")
    for name, mask in masks_of(model).items():
        assert bool((mask <= first[name]).all())
    with pytest.raises(PruningError, match="already have"):
        prune_by_scores(model, random_scores, 0.6, "global")
    with pytest.raises(PruningError, match=r"sparsity must be in \[0, 1\)"):
        prune_by_scores(model, random_scores, 1.0, "global")


@pytest.mark.parametrize("rounds", [1, 2])
def test_imp_rewinding_restores_early_weights_at_unpruned_positions(trained, tmp_path, rounds):
    model, initial = clone_model(trained[0]), trained[1]
    early_weights, early_biases = initial
    schedule = ScheduleConfig(kind="iterative", rounds=rounds, rewind="rewind_lt")
    no_retraining = TrainConfig(epochs=0)
    run_schedule(model, get_method("imp"), 0.75, schedule, _context(), no_retraining, tmp_path,
                 early_state=initial)
    for name, module in prunable_layers(model):
        mask = module.weight_mask
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.equal(effective_weight(module), early_weights[name] * mask)
        assert torch.equal(module.bias, early_biases[name])
    if rounds > 1:
        return  # later rounds rank the rewound weights (no retraining here)
    # the mask is the magnitude mask of the *trained* weights, not of the early ones
    trained_weights = layer_weights(trained[0])[0]
    kept = torch.cat([trained_weights[n].abs()[m.weight_mask == 1] for n, m in
                      prunable_layers(model)])
    dropped = torch.cat([trained_weights[n].abs()[m.weight_mask == 0] for n, m in
                         prunable_layers(model)])
    assert float(kept.min()) >= float(dropped.max())


def test_rewind_keeps_the_mask(trained):
    model = clone_model(trained[0])
    prune_by_scores(model, get_method("random").scores(model, 0.5, "layer", _context()), 0.5,
                    "layer")
    early_weights, early_biases = trained[1]
    rewind(model, early_weights, early_biases)
    for name, module in prunable_layers(model):
        assert torch.equal(module.weight_orig, early_weights[name])
        assert int((effective_weight(module) == 0).sum()) >= int((module.weight_mask == 0).sum())


def test_schedule_resumes_finished_rounds_without_recomputing(trained, tmp_path):
    schedule = ScheduleConfig(kind="iterative", rounds=2, rewind="pt")
    finetune = TrainConfig(epochs=1, batch_size=100)
    first = clone_model(trained[0])
    summaries = run_schedule(first, get_method("imp"), 0.6, schedule, _context(), finetune,
                             tmp_path)

    def forbidden(*args):
        raise AssertionError("a finished round was recomputed")

    second = clone_model(trained[0])
    method = get_method("imp")
    resumed = run_schedule(second, type(method)("imp", forbidden, schedule="iterative"), 0.6,
                           schedule, _context(), finetune, tmp_path)
    assert [s["sparsity"] for s in resumed] == [s["sparsity"] for s in summaries]
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_hydra_learns_scores_that_differ_from_magnitude(trained):
    model = trained[0]
    context = _context(score_training=TrainConfig(epochs=3, batch_size=50, lr=1e-2))
    learned = get_method("hydra").scores(model, 0.9, "global", context)
    magnitude = get_method("magnitude").scores(model, 0.9, "global", context)
    assert any(not torch.allclose(learned[n], magnitude[n]) for n in learned)
    for name, module in prunable_layers(model):  # the caller's model is untouched
        assert not hasattr(module, "weight_mask") and not hasattr(module, "parametrizations")


def _unstable(model, method):
    from pruning.bounds import bounded_model
    from pruning.evaluate import unstable_relus

    bounded = bounded_model(model, "cpu", torch.float32)
    return float(unstable_relus(bounded, TEST, ATTACK.eps, method=method).float().mean())


def test_stability_objective_lowers_unstable_relus_under_ibp_and_crown(trained):
    """Fine-tuning the same pruned model with and without the ReLU-stability term: the
    regularised one has fewer unstable ReLUs by the verifier's IBP and CROWN bounds."""
    from pruning.methods.stability import stability_objective

    base = clone_model(trained[0])
    prune_by_scores(base, get_method("magnitude").scores(base, 0.5, "global", _context()), 0.5,
                    "global")
    config = TrainConfig(epochs=4, batch_size=50)
    plain, stable = clone_model(base), clone_model(base)
    train(plain, Standard(), TRAIN, config, progress=False)
    context = _context(stability_weight=0.5)
    train(stable, stability_objective(stable, context), TRAIN, config, progress=False)
    for method in ("ibp", "crown"):
        assert _unstable(stable, method) < 0.8 * _unstable(plain, method), method


def test_stability_pruning_yields_fewer_unstable_relus_than_hydra(trained, tmp_path):
    schedule = ScheduleConfig(kind="one-shot")
    finetune = TrainConfig(epochs=2, batch_size=50)
    context = _context(score_training=TrainConfig(epochs=2, batch_size=50), stability_weight=0.5)
    results = {}
    for name in ("hydra", "stability"):
        model = clone_model(trained[0])
        run_schedule(model, get_method(name), 0.8, schedule, context, finetune, tmp_path / name)
        results[name] = _unstable(model, "crown")
    assert results["stability"] < results["hydra"]
