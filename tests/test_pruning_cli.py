"""The train / prune / export subcommands end to end on the committed 400-image slice, their
JSON summaries, and one-line errors."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from pruning import cli

DATA = str(Path(__file__).parent / "data" / "pruning")
FAST = ["--data-dir", DATA, "--test-limit", "50", "--quiet", "--pgd-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    code = cli.main(["train", "--model", "mlp3x100", "--epochs", "2", "--regime", "pgd",
                     "--out", str(out), *FAST])
    assert code == 0
    return out


def test_train_writes_checkpoints_and_summary(trained):
    summary = json.loads((trained / "train.json").read_text())
    assert {p.name for p in trained.iterdir()} >= {"model.pt", "init.pt", "rewind.pt",
                                                    "train.json"}
    assert summary["regime"] == "pgd" and summary["eps"] == 0.1
    assert len(summary["epochs"]) == 2
    assert 0.0 <= summary["pgd_accuracy"] <= summary["clean_accuracy"] <= 1.0
    assert summary["seconds"] > 0


@pytest.mark.parametrize("method", ["random", "magnitude", "imp", "hydra", "stability"])
def test_prune_reaches_sparsity_and_reports_per_layer(trained, tmp_path, method):
    code = cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method", method,
                     "--sparsity", "0.8", "--finetune-epochs", "1", "--score-epochs", "1",
                     "--rounds", "2", "--count-unstable", "ibp", "--out", str(tmp_path),
                     *FAST])
    assert code == 0
    summary = json.loads((tmp_path / "prune.json").read_text())
    n_weights = sum(layer["n_weights"] for layer in summary["layers"].values())
    n_zero = sum(layer["n_zero"] for layer in summary["layers"].values())
    assert n_zero >= round(0.8 * n_weights)  # exact zeros in unmasked weights may add a few
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["schedule"]["kind"] == ("iterative" if method == "imp" else "one-shot")
    assert len(summary["rounds"]) == (2 if method == "imp" else 1)
    assert "mean_unstable_relus_ibp" in summary and "pgd_accuracy" in summary


def test_export_writes_onnx_specs_and_matches_onnxruntime(trained, tmp_path):
    pruned = tmp_path / "pruned"
    assert cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method",
                     "magnitude", "--sparsity", "0.95", "--finetune-epochs", "0",
                     "--out", str(pruned), *FAST]) == 0
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(pruned / "model.pt"), "--out", str(out),
                     "--compact", "--specs", "3", "--data-dir", DATA]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["onnxruntime_max_abs_diff"] < 1e-5
    assert len(summary["specs"]) == 3 and (out / "model.onnx").is_file()
    rows = (out / "instances.csv").read_text().splitlines()
    assert rows[0].startswith("model.onnx,vnnlib/img0_eps0.1.vnnlib,")


def test_pruning_a_pruned_checkpoint_keeps_its_zeros(trained, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--finetune-epochs", "1", *FAST]
    assert cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method", "magnitude",
                     "--sparsity", "0.5", "--out", str(first), *args]) == 0
    assert cli.main(["prune", "--checkpoint", str(first / "model.pt"), "--method", "random",
                     "--sparsity", "0.7", "--out", str(second), *args]) == 0
    import torch

    before = torch.load(first / "model.pt", weights_only=False)["model"]
    after = torch.load(second / "model.pt", weights_only=False)["model"]
    for key, weight in before.items():
        if key.endswith("weight") and weight.dim() > 1:
            assert bool((after[key][weight == 0] == 0).all()), key
    capsys.readouterr()
    assert cli.main(["prune", "--checkpoint", str(second / "model.pt"), "--method", "random",
                     "--sparsity", "0.6", "--out", str(tmp_path / "third"), *args]) == 2
    assert "already have" in capsys.readouterr().err


def test_subcommands_follow_the_entry_point_contract():
    parser = argparse.ArgumentParser(prog="certiprune")
    subparsers = parser.add_subparsers(dest="command")
    for add in (cli.add_train_parser, cli.add_prune_parser, cli.add_export_parser):
        assert add(subparsers) is None
    args = parser.parse_args(["export", "--checkpoint", "x.pt", "--out", "o"])
    assert callable(args.handler)


@pytest.mark.parametrize("argv,message,code", [
    (["prune", "--checkpoint", "missing.pt", "--method", "random", "--sparsity", "0.5",
      "--out", "o"], "checkpoint not found: missing.pt", 3),
    (["train", "--out", "{tmp}", "--data-dir", "{tmp}"],
     "dataset file missing: expected {tmp}/FashionMNIST/raw/train-images-idx3-ubyte[.gz]", 3),
    (["train", "--out", "{tmp}", "--epochs", "2", "--rewind-epoch", "3"],
     "--rewind-epoch 3 is not in 0..2", 2),
    (["export", "--checkpoint", "{tmp}", "--out", "{tmp}/x"], "checkpoint not found", 3),
    (["train", "--out", "{tmp}", "--device", "cuda:7"], "--device cuda:7", 8),
])
def test_user_errors_are_one_line_on_stderr(argv, message, code, tmp_path, capsys):
    # exit codes of the project's scheme (verifier.errors): 2 usage, 3 input file, 8 device
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0]


def test_impossible_sparsity_is_one_line(trained, tmp_path, capsys):
    code = cli.main(["prune", "--checkpoint", str(trained / "model.pt"), "--method", "random",
                     "--sparsity", "1.5", "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sparsity must be in [0, 1), got 1.5" in err[0]
