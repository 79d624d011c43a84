"""The iterative schedule (a fixed fraction of the remaining weights per round): final sparsity
1 − (1 − r)^R, per-round JSON summaries with every field, the PNG, resuming; the prune command's
--rate / --rounds / --sparsity rules, --config TOML files and one-line errors."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import synthetic_images
from pruning import cli
from pruning.errors import PruningError
from pruning.methods import Method, PruneContext, get_method
from pruning.methods.structured import channel_report
from pruning.models import prunable_layers
from pruning.objectives import AttackConfig, Standard
from pruning.schedule import (
    DEFAULT_RATE, DEFAULT_ROUNDS, RoundEvaluator, ScheduleConfig, iterative_target, run_schedule,
)
from pruning.sparsity import clone_model, masks_of
from pruning.train import TrainConfig, train

DATA = str(Path(__file__).parent / "data" / "pruning")
FAST = ["--data-dir", DATA, "--train-limit", "200", "--test-limit", "50", "--quiet",
        "--pgd-steps", "2", "--bound-images", "8"]
SYNTHETIC = synthetic_images(64, (1, 6, 6))
ATTACK = AttackConfig(eps=0.05, steps=2)
ROUND_FIELDS = {"method", "round", "target_sparsity", "sparsity", "layers", "channels",
                "finetune", "clean_accuracy", "pgd_accuracy", "eps", "n_test",
                "mean_unstable_relus_ibp", "mean_unstable_relus_crown", "unstable_ratio_ibp",
                "unstable_ratio_crown", "n_relus", "n_bound_images", "seconds"}


def _context() -> PruneContext:
    return PruneContext(data=SYNTHETIC, objective=Standard(), attack=ATTACK,
                        score_training=TrainConfig(epochs=1, batch_size=16))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 12),
                          nn.ReLU(), nn.Linear(12, 3))
    train(model, Standard(), SYNTHETIC, TrainConfig(epochs=2, batch_size=16), progress=False)
    return model


def _run(model, method, workdir, rounds=3, rate=0.3, scope="global"):
    schedule = ScheduleConfig(kind="iterative", rounds=rounds, rewind="pt", scope=scope)
    return run_schedule(model, method, iterative_target(rounds, rate), schedule, _context(),
                        TrainConfig(epochs=1, batch_size=16), workdir,
                        evaluate=RoundEvaluator(SYNTHETIC.head(32), ATTACK, n_bound_images=8))


def test_iterative_target_is_one_minus_the_kept_fraction_to_the_rounds():
    assert iterative_target(12, 0.11) == pytest.approx(1 - 0.89 ** 12)
    assert iterative_target(DEFAULT_ROUNDS) == pytest.approx(1 - (1 - DEFAULT_RATE) ** 12)
    assert iterative_target(3, sparsity=0.5) == 0.5
    assert iterative_target(2, rate=0.5, sparsity=0.75) == pytest.approx(0.75)
    with pytest.raises(PruningError, match="--sparsity 0.9 disagrees with --rate 0.5 over 2"):
        iterative_target(2, rate=0.5, sparsity=0.9)
    with pytest.raises(PruningError, match=r"rate must be in \(0, 1\), got 1.0"):
        iterative_target(2, rate=1.0)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_r_rounds_at_rate_r_reach_one_minus_one_minus_r_to_the_r(trained, tmp_path, scope):
    model = clone_model(trained)
    summaries = _run(model, get_method("imp"), tmp_path, rounds=3, rate=0.3, scope=scope)
    sizes = {n: m.weight_orig.numel() for n, m in prunable_layers(model)}
    zeros = {n: int((mask == 0).sum()) for n, mask in masks_of(model).items()}
    final = 1 - 0.7 ** 3
    if scope == "global":
        assert sum(zeros.values()) == round(final * sum(sizes.values()))
    else:
        assert zeros == {n: round(final * size) for n, size in sizes.items()}
    assert [s["target_sparsity"] for s in summaries] == pytest.approx(
        [1 - 0.7 ** r for r in (1, 2, 3)])
    for summary in summaries:
        assert ROUND_FIELDS <= set(summary), ROUND_FIELDS - set(summary)
        assert summary["mean_unstable_relus_crown"] <= summary["mean_unstable_relus_ibp"]
        assert 0 <= summary["unstable_ratio_crown"] <= 1 and summary["n_relus"] == 32
        assert {k: c["total"] for k, c in summary["channels"].items()} == {"1": 20, "3": 12}
        assert json.loads((tmp_path / f"round_{summary['round']}.json").read_text()) == summary
    assert (tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_rounds_and_recomputes_only_missing_ones(trained, tmp_path):
    first = clone_model(trained)
    summaries = _run(first, get_method("imp"), tmp_path)
    for suffix in (".pt", ".json"):
        (tmp_path / f"round_3{suffix}").unlink()
    calls = []

    def counting(model, sparsity, scope, ctx):
        calls.append(sparsity)
        return get_method("imp").scores(model, sparsity, scope, ctx)

    second = clone_model(trained)
    resumed = _run(second, Method("imp", counting, schedule="iterative"), tmp_path)
    assert calls == [pytest.approx(1 - 0.7 ** 3)]  # rounds 1 and 2 were loaded
    assert [s["sparsity"] for s in resumed] == [s["sparsity"] for s in summaries]
    assert masks_of(second).keys() == masks_of(first).keys()
    for name, mask in masks_of(second).items():
        assert torch.equal(mask, masks_of(first)[name])


def test_a_rounds_directory_of_another_run_is_an_error(trained, tmp_path):
    _run(clone_model(trained), get_method("imp"), tmp_path, rounds=2, rate=0.3)
    with pytest.raises(PruningError, match="round_1.json is round 1 of method 'imp' at sparsity"):
        _run(clone_model(trained), get_method("imp"), tmp_path, rounds=2, rate=0.4)


def test_structured_iterative_rounds_prune_a_fraction_of_the_remaining_channels(trained,
                                                                                tmp_path):
    model = clone_model(trained)
    summaries = _run(model, get_method("l1-channel"), tmp_path, rounds=2, rate=0.25)
    kept = [s["channels"] for s in summaries]
    assert [k["1"]["kept"] for k in kept] == [20 - 5, 20 - round((1 - 0.75 ** 2) * 20)]
    assert [k["3"]["kept"] for k in kept] == [12 - 3, 12 - round((1 - 0.75 ** 2) * 12)]
    assert channel_report(model) == kept[-1]


# ------------------------------------------------------------------ the prune command

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    assert cli.main(["train", "--model", "mlp3x100", "--epochs", "1", "--out", str(out),
                     *FAST[:-2]]) == 0
    return out / "model.pt"


def _prune(checkpoint, out, *flags) -> int:
    return cli.main(["prune", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--finetune-epochs", "0", *flags, *FAST])


def test_prune_command_iterative_rate_and_rounds(checkpoint, tmp_path):
    assert _prune(checkpoint, tmp_path, "--method", "imp", "--rounds", "2", "--rate",
                  "0.5") == 0
    summary = json.loads((tmp_path / "prune.json").read_text())
    assert summary["target_sparsity"] == pytest.approx(0.75)
    assert summary["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert (tmp_path / "rounds" / "rounds.png").is_file()


def test_config_file_gives_flags_and_the_command_line_overrides_it(checkpoint, tmp_path):
    config = tmp_path / "prune.toml"
    config.write_text(f'checkpoint = "{checkpoint}"\nmethod = "magnitude"\nsparsity = 0.6\n'
                      'finetune_epochs = 0\nscope = "layer"\nquiet = true\n')
    out = tmp_path / "out"
    assert cli.main(["prune", "--config", str(config), "--sparsity", "0.7", "--out", str(out),
                     *FAST]) == 0
    summary = json.loads((out / "prune.json").read_text())
    assert summary["method"] == "magnitude" and summary["schedule"]["scope"] == "layer"
    assert summary["target_sparsity"] == 0.7  # the command line wins over the file


@pytest.mark.parametrize("text,message", [
    ('methd = "snip"\n', "unknown key 'methd' for `certiprune prune`"),
    ('rounds = 2.5\n', "key 'rounds' must be an integer, got 2.5"),
    ('scope = "everywhere"\n', "key 'scope': 'everywhere' is not one of global, layer"),
    ('quiet = "yes"\n', "key 'quiet' must be true or false"),
    ('sparsity = [0.5]\n', "key 'sparsity' must be a single float value"),
    ('method = \n', "is not a readable TOML file"),
])
def test_bad_config_files_are_one_line_errors(checkpoint, tmp_path, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code = cli.main(["prune", "--config", str(config), "--checkpoint", str(checkpoint),
                     "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_export_reads_a_config_file_too(checkpoint, tmp_path):
    config = tmp_path / "export.toml"
    config.write_text(f'checkpoint = "{checkpoint}"\nout = "{tmp_path / "export"}"\n'
                      'compact = true\n')
    assert cli.main(["export", "--config", str(config)]) == 0
    assert json.loads((tmp_path / "export" / "export.json").read_text())["compacted"] is True


@pytest.mark.parametrize("flags,message", [
    (["--method", "obd", "--sparsity", "0.5"], "unknown pruning method 'obd'; choose one of"),
    (["--method", "imp", "--sparsity", "0.9", "--rate", "0.11", "--rounds", "12"],
     "--sparsity 0.9 disagrees with --rate 0.11 over 12 rounds"),
    (["--method", "magnitude", "--rate", "0.2"], "--rate sets the per-round fraction"),
    (["--method", "magnitude"], "--sparsity is required for the one-shot schedule"),
    (["--method", "l1-channel", "--sparsity", "0.999"], "would remove all 100 units of layer"),
    (["--method", "refill", "--sparsity", "-0.5"], r"sparsity must be in [0, 1), got -0.5"),
    (["--method", "slim", "--sparsity", "0.5"], "method slim needs BatchNorm layers"),
])
def test_prune_user_errors_are_one_line(checkpoint, tmp_path, capsys, flags, message):
    code = _prune(checkpoint, tmp_path, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_missing_required_flag_and_mismatched_checkpoints_are_one_line(checkpoint, tmp_path,
                                                                       capsys):
    assert cli.main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--out",
                     str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--checkpoint required (on the command line or in --config)")
    other = tmp_path / "other"
    assert cli.main(["train", "--model", "mlp2x256", "--epochs", "0", "--rewind-epoch", "0",
                     "--out", str(other),
                     *FAST[:-2]]) == 0
    capsys.readouterr()
    state = torch.load(checkpoint, weights_only=False)
    state["meta"]["model"] = "mlp2x256"  # mlp3x100 weights under another model's name
    torch.save(state, tmp_path / "bad.pt")
    assert _prune(tmp_path / "bad.pt", tmp_path / "x", "--method", "magnitude", "--sparsity",
                  "0.5") == 3  # a malformed checkpoint: an input file error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights do not fit model 'mlp2x256'" in err[0]
    # an iterative run whose rewind.pt belongs to another model
    (other / "model.pt").unlink()
    torch.save(torch.load(checkpoint, weights_only=False), other / "model.pt")
    assert _prune(other / "model.pt", tmp_path / "y", "--method", "imp", "--rounds", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewind.pt holds mlp2x256" in err[0], err


@pytest.mark.parametrize("rewind_kind, ramp", [("rewind_lt", 1.0), ("lt", 1.0), ("pt", 0.0)])
def test_fine_tuning_after_a_rewind_restarts_the_crown_ibp_eps_ramp(trained, tmp_path,
                                                                     monkeypatch, rewind_kind,
                                                                     ramp):
    """Issue 7 regression (crown-ibp imp fell to clean 0.097): after rewinding to early weights
    the fine-tuning must ramp eps up again (over half its epochs), not start at full eps; a
    schedule that keeps the trained weights ("pt") fine-tunes at full eps."""
    import pruning.schedule as schedule_module
    from pruning.objectives import CrownIBPTraining
    from pruning.sparsity import layer_weights

    seen = []

    def fake_train(model, objective, data, config, **kwargs):
        seen.append(objective)
        return []

    monkeypatch.setattr(schedule_module, "train", fake_train)
    model = clone_model(trained)
    ctx = PruneContext(data=SYNTHETIC, objective=CrownIBPTraining(0.05), attack=ATTACK,
                       score_training=TrainConfig(epochs=1, batch_size=16))
    schedule = ScheduleConfig(kind="iterative", rounds=2, rewind=rewind_kind)
    run_schedule(model, get_method("imp"), 0.5, schedule, ctx,
                 TrainConfig(epochs=2, batch_size=16), tmp_path / "rounds",
                 early_state=layer_weights(trained))
    assert len(seen) == 2
    assert all(isinstance(o, CrownIBPTraining) and o.ramp_epochs == ramp for o in seen)
