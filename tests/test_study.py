"""``certiprune study``: a --quick run end to end on the committed 400-image Fashion-MNIST slice
(tables, plots, tightness report), resumption without repeated work, and one-line config
errors."""
import csv
import json
from pathlib import Path

import pytest

from pruning.errors import PruningError
from pruning.study import Study, load_config, parse_config
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
methods = ["magnitude", "imp"]
sparsities = [0.0, 0.5, 0.8]
finetune_epochs = 1
rounds = 2

[verify]
images = 3
timeout = 2.0
eps = 0.01
pgd_steps = 2

[quick]
train_limit = 400
test_limit = 100
images = 3
sparsities = [0.0, 0.5, 0.8]
"""


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One --quick run through the CLI: (config path, output root, exit code)."""
    folder = tmp_path_factory.mktemp("study")
    config = folder / "tiny.toml"
    config.write_text(TINY)
    code = main([str(config), "--quick", "--out", str(folder / "out"), "--threads", "1"])
    return config, folder / "out", code


def test_quick_study_writes_table_plots_and_tightness_report(quick_study):
    _, out, code = quick_study
    assert code == 0
    root = out / "tiny-quick"
    with open(root / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS
    # dense + 2 methods x 2 nonzero sparsities, all finished
    assert [(r["method"], float(r["target_sparsity"])) for r in rows] == [
        ("dense", 0.0), ("magnitude", 0.5), ("imp", 0.5), ("magnitude", 0.8), ("imp", 0.8)]
    for row in rows:
        assert row["status"] == "done" and int(row["n_images"]) == 3
        counts = sum(int(row[k]) for k in ("verified", "falsified", "timeout", "unknown"))
        assert counts == int(row["n_correct"]) <= 3
        assert float(row["certified_accuracy"]) == pytest.approx(int(row["verified"]) / 3)
        assert 0 <= float(row["pgd_accuracy"]) <= float(row["clean_accuracy"]) <= 1
        assert 0 <= float(row["unstable_ratio_crown"]) <= float(row["unstable_ratio_ibp"]) <= 1
    assert float(rows[3]["sparsity"]) == pytest.approx(0.8, abs=1e-3)
    assert rows[2]["schedule"] == "iterative x2" and rows[1]["schedule"] == "one-shot"
    assert (root / "results.md").read_text().count("\n| standard |") == 5
    assert (root / "certified_vs_sparsity_standard.png").stat().st_size > 1000
    if any(int(r["n_correct"]) for r in rows):
        assert (root / "tightness_standard" / "summary.json").is_file()


def test_rerun_does_no_work_and_a_half_verified_model_resumes_at_its_next_image(quick_study):
    config_path, out, _ = quick_study
    root = out / "tiny-quick"
    log_before = (root / "stages.log").read_text()
    config = load_config(config_path).quick()
    study = Study(config, out)
    study.run()
    assert study.work == {"train": 0, "prune": 0, "measure": 0, "export": 0, "verify": 0}
    assert (root / "stages.log").read_text() == log_before

    # a half-verified model continues from the next image
    image = root / "standard" / "imp_s0.5" / "verify" / "img2.json"
    image.unlink()
    study = Study(config, out)
    study.run()
    assert study.work == {"train": 0, "prune": 0, "measure": 0, "export": 0, "verify": 1}
    assert json.loads(image.read_text())["image"] == 2


def test_changed_configuration_is_refused(quick_study, tmp_path):
    config_path, out, _ = quick_study
    changed = tmp_path / "tiny.toml"
    changed.write_text(config_path.read_text().replace("eps = 0.01", "eps = 0.02"))
    with pytest.raises(PruningError, match=r"another configuration \(verify.eps differ\)"):
        Study(load_config(changed).quick(), out).run()


@pytest.mark.parametrize("text,message", [
    ('name = "x"\nbogus = 1\n', "unknown key 'bogus'"),
    ('name = "x"\n[prune]\nmethods = ["magnitude", "pruneall"]\n',
     "prune.methods: unknown 'pruneall'"),
    ('name = "x"\n[verify]\ntimeout = "long"\n', "timeout must be a float, got 'long'"),
    ('name = "x"\n[prune]\nsparsities = [0.5, 1.0]\n', "prune.sparsities: 1.0 is not in [0, 1)"),
    ('name = "x"\n[prune.schedule.imp]\nkind = "gradual"\n', "unknown 'gradual'"),
    ('name = "x"\n[quick]\nwarp = 9\n', "[quick]: unknown key 'warp'"),
    ('name = "x"\n[train\n', "not valid TOML"),
])
def test_config_errors_are_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "cifar.toml"
    path.write_text(f'dataset = "cifar10"\nmodel = "cnn_base"\ndata_dir = "{tmp_path}"\n')
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar-10-batches-py/data_batch_1" in err[0]
    assert not (tmp_path / "out").exists()


def test_quick_variant_shrinks_and_keeps_schedules_short():
    config = parse_config({"name": "p", "prune": {
        "methods": ["imp"], "sparsities": [0.0, 0.5, 0.9, 0.95],
        "schedule": {"imp": {"kind": "iterative", "rounds": 12}}}})
    quick = config.quick()
    assert quick.name == "p-quick" and quick.train.epochs == 1 and quick.verify.images == 5
    assert quick.prune.sparsities == (0.0, 0.9)
    assert quick.prune.schedules["imp"].rounds == 2 and config.prune.schedules["imp"].rounds == 12


def test_a_method_that_cannot_prune_leaves_an_error_row(tmp_path):
    config = parse_config({
        "name": "slim", "model": "mlp3x100", "data_dir": DATA, "test_limit": 50,
        "train_limit": 200, "train": {"epochs": 1},
        "prune": {"methods": ["slim"], "sparsities": [0.5], "finetune_epochs": 1,
                  "score_epochs": 1},
        "verify": {"images": 2, "timeout": 1.0, "pgd_steps": 1}})
    study = Study(config, tmp_path)
    rows = study.run()
    assert [r["method"] for r in rows] == ["dense", "slim"]
    assert rows[0]["status"] == "done"
    assert rows[1]["status"].startswith("error: ") and "BatchNorm" in rows[1]["status"]
    assert Study(config, tmp_path).run() == rows
