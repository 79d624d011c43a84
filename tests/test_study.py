"""``certiprune study``: a --quick run end to end on the committed 400-image Fashion-MNIST slice
(every round of both ladders verified, controls, intervals and paired tests in the tables,
plots), stages callable one at a time in a dependency order, resumption without repeated work,
and one-line config errors."""
import csv
import json
from pathlib import Path

import pytest

from pruning.errors import PruningError
from pruning.study import ModelJob, Study, load_config, parse_config
from pruning.study.cli import main
from pruning.study.report import COLUMNS

DATA = str(Path(__file__).parent / "data" / "pruning")

TINY = f"""
name = "tiny"
dataset = "fashion-mnist"
model = "mlp3x100"
data_dir = "{DATA}"
threads = 1
test_limit = 100

[train]
regimes = ["standard"]
epochs = 1

[prune]
methods = ["imp", "random"]
layers = "all"
unstructured_rate = 0.5
unstructured_rounds = 3
finetune_epochs = 1

[verify]
images = 3
timeout = 2.0
eps = 0.01
pgd_steps = 2

[quick]
train_limit = 400
test_limit = 100
images = 3
unstructured_rounds = 2
"""


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One --quick run through the CLI: (config path, output root, exit code)."""
    folder = tmp_path_factory.mktemp("study")
    config = folder / "tiny.toml"
    config.write_text(TINY)
    code = main([str(config), "--quick", "--out", str(folder / "out"), "--threads", "1"])
    return config, folder / "out", code


def test_quick_study_verifies_every_round_and_tabulates_intervals_and_tests(quick_study):
    _, out, code = quick_study
    assert code == 0
    root = out / "tiny-quick"
    with open(root / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["method"], int(r["round"])) for r in rows] == [
        ("dense", 0), ("imp", 1), ("imp", 2), ("random", 1), ("random", 2),
        ("control", 1), ("control", 2)]
    for row in rows:
        assert row["status"] == "done" and int(row["n_images"]) == 3
        counts = sum(int(row[k]) for k in ("verified", "falsified", "timeout", "unknown"))
        assert counts == int(row["n_correct"]) <= 3
        certified = float(row["certified_accuracy"])
        assert certified == pytest.approx(int(row["verified"]) / 3)
        assert float(row["ci_low"]) <= certified <= float(row["ci_high"])
        assert 0 <= float(row["pgd_accuracy"]) <= float(row["clean_accuracy"]) <= 1
    # the ladder: 1 - 0.5^r of all weights, exactly per round; controls prune nothing
    for row in rows:
        expected = 0.0 if row["method"] in ("dense", "control") else 1 - 0.5 ** int(row["round"])
        assert float(row["target_sparsity"]) == pytest.approx(expected)
        assert float(row["sparsity"]) == pytest.approx(expected, abs=1e-4)
    for row in rows[1:5]:  # each pruned round against the control of the same round
        assert row["control"] == "control"
        assert 0 < float(row["p_control"]) <= float(row["p_holm"]) <= 1
    summary = list(csv.DictReader(open(root / "summary.csv")))
    assert len(summary) == 7 and all(int(s["n_seeds"]) == 1 for s in summary)
    assert "## Over seeds" in (root / "results.md").read_text()
    assert (root / "certified_standard.png").stat().st_size > 1000
    assert (root / "unstable_standard.png").stat().st_size > 1000
    metrics = json.loads((root / "standard" / "seed0" / "imp" / "r2" / "metrics.json").read_text())
    assert len(metrics["unstable_per_layer_ibp"]) == 3  # absolute counts per ReLU layer
    verified = [json.loads(p.read_text()) for p in root.glob("standard/seed0/*/r*/verify/*.json")]
    verified = [r for r in verified if r["verdict"] != "misclassified"]
    assert verified and all(len(r["root_unstable_per_layer"]["crown"]) == 3 for r in verified)
    assert all(r["root_gap"]["alpha"] is None or r["root_gap"]["alpha"] >= -1e-6
               for r in verified)  # the attack margin is never below a sound lower bound


def test_stages_are_ordered_by_their_dependencies():
    config = parse_config({"name": "p", "seeds": [0, 1], "model": "cnn_base_bn",
                           "prune": {"methods": ["imp", "nrs"], "unstructured_rounds": 3,
                                     "channel_rounds": 2},
                           "verify": {"other_seed_rounds": [2]}})
    stages = Study(config, Path("/nonexistent")).stages()
    seen = set()
    for stage in stages:
        assert all(need in seen for need in stage.needs), stage
        seen.add(stage.name)
    names = {s.name for s in stages}
    assert "train:standard/seed0/dense-nrs/r0" in names  # nrs is on from pre-training
    assert "prune:standard/seed1/imp/r1" in names  # pruned though not verified
    assert "verify:standard/seed1/imp/r1" not in names
    assert "reverify:standard/seed1/imp/r2" in names
    assert "verify:standard/seed0/control/r3" in names  # control as long as the longest ladder
    assert "verify:standard/seed0/control-nrs/r2" in names


def test_rerun_does_no_work_and_a_half_verified_model_resumes_at_its_next_image(quick_study):
    config_path, out, _ = quick_study
    root = out / "tiny-quick"
    log_before = (root / "stages.log").read_text()
    config = load_config(config_path).quick()
    study = Study(config, out)
    study.run()
    assert sum(study.work.values()) == 0
    assert (root / "stages.log").read_text() == log_before

    image = root / "standard" / "seed0" / "imp" / "r1" / "verify" / "img2.json"
    image.unlink()
    study = Study(config, out)
    study.run()
    assert study.work["verify"] == 1 and sum(study.work.values()) == 1
    assert json.loads(image.read_text())["image"] == 2


def test_one_stage_runs_alone(quick_study):
    config_path, out, _ = quick_study
    study = Study(load_config(config_path).quick(), out)
    job = ModelJob("standard", 0, "random", 2)
    metrics = study.layout.eval_dir(job) / "metrics.json"
    metrics.unlink()
    stage = next(s for s in study.stages() if s.name == "measure:standard/seed0/random/r2")
    assert study.run_stage(stage) is True and metrics.is_file()
    assert study.run_stage(stage) is None


def test_changed_configuration_is_refused(quick_study, tmp_path):
    config_path, out, _ = quick_study
    changed = tmp_path / "tiny.toml"
    changed.write_text(config_path.read_text().replace("eps = 0.01", "eps = 0.02"))
    with pytest.raises(PruningError, match=r"another configuration \(verify.eps differ\)"):
        Study(load_config(changed).quick(), out).run()


@pytest.mark.parametrize("text,message", [
    ('name = "x"\nbogus = 1\n', "unknown key 'bogus'"),
    ('name = "x"\n[prune]\nmethods = ["imp", "pruneall"]\n',
     "prune.methods: unknown 'pruneall'"),
    ('name = "x"\n[verify]\ntimeout = "long"\n', "timeout must be a float, got 'long'"),
    ('name = "x"\n[prune]\nlayers = "fc"\n', "prune.layers: unknown 'fc'"),
    ('name = "x"\n[prune]\nunstructured_rate = 1.5\n', "prune.unstructured_rate must be"),
    ('name = "x"\n[verify]\ntimeout = 90.0\nretry_timeout = 60.0\n', "retry_timeout"),
    ('name = "x"\n[quick]\nwarp = 9\n', "[quick]: unknown key 'warp'"),
])
def test_config_errors_are_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2  # usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0], err
    assert not (tmp_path / "out").exists()


def test_unreadable_config_is_an_input_file_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[train\n')
    assert main([str(path), "--out", str(tmp_path / "out")]) == 3
    assert main([str(tmp_path / "none.toml"), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not valid TOML" in err[0] and "config not found" in err[1], err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "cifar.toml"
    path.write_text(f'dataset = "cifar10"\nmodel = "cnn_base"\ndata_dir = "{tmp_path}"\n')
    assert main([str(path), "--out", str(tmp_path / "out")]) == 3  # input file error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar-10-batches-py/data_batch_1" in err[0]
    assert not (tmp_path / "out").exists()


def test_defaults_follow_the_paper_and_quick_shrinks():
    config = parse_config({"name": "p"})
    prune = config.prune
    assert (prune.layers, prune.scope, prune.rewind) == ("conv", "global", "rewind_lt")
    assert prune.ladder(False).targets()[-1] == pytest.approx(1 - 0.8 ** 16)  # 0.9719
    assert prune.ladder(True).targets()[-1] == pytest.approx(1 - 0.89 ** 12)  # 0.7530
    assert config.verify.retry_timeout >= 60 and config.verify.images == 200
    quick = config.quick()
    assert quick.name == "p-quick" and quick.train.epochs == 1 and quick.verify.images == 5
    assert quick.prune.unstructured_rounds == 2 and prune.unstructured_rounds == 16


def test_a_method_that_cannot_prune_leaves_error_rows(tmp_path):
    config = parse_config({
        "name": "slim", "model": "mlp3x100", "data_dir": DATA, "test_limit": 50,
        "train_limit": 200, "train": {"epochs": 1},
        "prune": {"methods": ["slim"], "layers": "all", "channel_rounds": 1,
                  "finetune_epochs": 1, "control": False},
        "verify": {"images": 2, "timeout": 1.0, "retry_timeout": 1.0, "pgd_steps": 1}})
    study = Study(config, tmp_path)
    rows = study.run()
    assert [(r["method"], r["round"]) for r in rows] == [
        ("dense", 0), ("dense-slim", 0), ("slim", 1)]
    assert rows[0]["status"] == "done"
    assert all(r["status"].startswith("error: ") and "BatchNorm" in r["status"]
               for r in rows[1:])
    assert Study(config, tmp_path).run() == rows
