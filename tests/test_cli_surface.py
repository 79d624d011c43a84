"""The command line's conventions: --version and --help, defaults and help text on every option,
start-up loading only the subcommand asked for, one exit code per class of user error (none
reported as an internal error), .onnx.gz input, logging, and --config / --print-config."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_nets import write_mlp
from verifier.cli import COMMANDS, build_parser, main, missing_help
from verifier.errors import EXIT_BROKEN_PIPE, EXIT_CODES

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "test"
SCRIPT = Path(sys.executable).with_name("certiprune")
MY_COMMANDS = ("verify", "bounds", "stats")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def verify_args(model, spec, *flags) -> list[str]:
    return ["verify", str(model), str(spec), "--threads", "1", *flags]


# ---- --version, --help ---------------------------------------------------------------------------
def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"certiprune {version('certiprune')}"


def test_help_describes_the_tool_and_lists_every_subcommand_with_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "sound verification of neural networks" in text
    for name, summary in COMMANDS.items():
        assert any(line.split()[:1] == [name] and summary.split()[0] in line for line in text.splitlines()), name
    for code in EXIT_CODES:
        assert f" {code}  " in text


@pytest.mark.parametrize("command", MY_COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    parser = build_parser(command).commands[command]
    assert missing_help(parser) == []
    text = parser.format_help()
    for action in parser._actions:
        default = action.default
        if action.option_strings and default not in (None, False) and default is not __import__("argparse").SUPPRESS:
            assert f"(default: {default})" in " ".join(text.split()) or "default" in (action.help or ""), \
                action.option_strings


def test_subcommands_of_other_packages_get_the_formatter_that_shows_defaults():
    """Every subcommand's parser is made by the dispatcher's parser class: defaults shown."""
    parser = build_parser("*")
    for name, sub in parser.commands.items():
        assert isinstance(sub.formatter_class, type) and sub.formatter_class.__name__ == "HelpFormatter", name


# ---- start-up -----------------------------------------------------------------------------------
def test_verify_imports_neither_the_pruning_layer_nor_the_benchmarks():
    code = ("import sys; from verifier.cli import main; "
            f"main(['verify', {str(DATA / 'test_nano.onnx')!r}, {str(DATA / 'test_nano.vnnlib')!r}, '-q', "
            "'--threads', '1']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pruning', 'benchmarks', 'matplotlib'}))")
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"


def test_help_imports_no_subcommand_and_not_torch():
    done = run_python("import sys\nfrom verifier.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                      "    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & "
                      "{'torch', 'pruning', 'benchmarks', 'onnx'}))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"


# ---- exit codes ---------------------------------------------------------------------------------
def unsupported_model(path: Path) -> Path:
    import numpy as np
    rng = np.random.default_rng(0)
    return write_mlp(path, [(rng.normal(size=(4, 2)), np.zeros(4)), (rng.normal(size=(1, 4)), np.zeros(1))],
                     op_after_first="Softsign")


def nano_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.vnnlib"
    path.write_text(text)
    return path


GOOD_NANO = (DATA / "test_nano.vnnlib").read_text()


@pytest.mark.parametrize("case, code", [
    ("missing model", 3), ("not an onnx file", 3), ("corrupt onnx.gz", 3), ("unsupported operator", 4),
    ("malformed spec", 5), ("spec of another shape", 6), ("unknown config key", 2), ("unreadable config", 3),
    ("bad flag value", 2), ("negative timeout", 2), ("result file in a missing folder", 3),
])
def test_each_class_of_user_error_has_its_exit_code_and_one_line(tmp_path, capsys, case, code):
    model, spec, extra = DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", []
    if case == "missing model":
        model = tmp_path / "missing.onnx"
    elif case == "not an onnx file":
        model = tmp_path / "text.onnx"
        model.write_text("not onnx")
    elif case == "corrupt onnx.gz":
        model = tmp_path / "model.onnx.gz"
        model.write_bytes(b"\x1f\x8b not really gzip")
    elif case == "unsupported operator":
        model = unsupported_model(tmp_path / "softsign.onnx")
    elif case == "malformed spec":
        spec = nano_spec(tmp_path, GOOD_NANO.replace("(assert (<= Y_0 -1))", "(assert (<= Y_0 -1)"))
    elif case == "spec of another shape":
        spec = nano_spec(tmp_path, "(declare-const X_1 Real)\n" + GOOD_NANO + "(assert (>= X_1 0))\n")
    elif case == "unknown config key":
        (tmp_path / "c.toml").write_text("[bab]\nbrnching = 'fsb'\n")
        extra = ["--config", str(tmp_path / "c.toml")]
    elif case == "unreadable config":
        extra = ["--config", str(tmp_path / "none.toml")]
    elif case == "bad flag value":
        extra = ["--threads", "-x"]
    elif case == "negative timeout":
        extra = ["--timeout", "-1"]
    elif case == "result file in a missing folder":
        extra = ["--result-file", str(tmp_path / "missing" / "result.txt")]
    if case == "bad flag value":
        with pytest.raises(SystemExit) as stop:      # argparse's own usage error
            main(verify_args(model, spec, *extra))
        assert stop.value.code == code
        return
    assert main(verify_args(model, spec, *extra)) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("certiprune verify: error: ")]
    assert len(errors) == 1 and "internal" not in err and "Traceback" not in err, err
    if case == "unknown config key":
        assert "'brnching'" in errors[0] and "[bab]" in errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_device_error_not_an_internal_one(capsys):
    assert main(verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", "--device", "cuda")) == 8
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "internal" not in err


def test_an_internal_error_is_code_1_with_one_line_and_an_error_result(tmp_path, monkeypatch, capsys):
    import verifier.verify

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(verifier.verify, "verify", broken)
    result = tmp_path / "result.txt"
    assert main(verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib",
                            "--result-file", str(result))) == 1
    assert "internal error: ZeroDivisionError: a bug" in capsys.readouterr().err
    assert result.read_text() == "error\n"


@pytest.mark.skipif(not SCRIPT.exists(), reason="certiprune is not installed next to this interpreter")
def test_a_closed_output_pipe_ends_quietly_with_its_own_code(tmp_path):
    process = subprocess.Popen([str(SCRIPT), *verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", "-q")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()   # the reader went away before the verdict
    _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_BROKEN_PIPE
    assert b"Traceback" not in err and b"internal" not in err


# ---- .onnx.gz -----------------------------------------------------------------------------------
def test_gzipped_onnx_gives_the_verdict_and_counterexample_of_the_plain_file(tmp_path, capsys):
    gz = tmp_path / "test_sat.onnx.gz"
    with open(DATA / "test_sat.onnx", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    outputs = []
    for model in (DATA / "test_sat.onnx", gz):
        assert main(verify_args(model, DATA / "test_prop.vnnlib", "--json", "-q")) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["verdict"] == outputs[1]["verdict"] == "sat"
    assert outputs[0]["counterexample"] == outputs[1]["counterexample"]


# ---- logging ------------------------------------------------------------------------------------
def test_quiet_prints_the_verdict_only_and_the_log_file_starts_with_the_settings(tmp_path, capsys):
    log = tmp_path / "run.log"
    assert main(verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", "-q", "--log-file", str(log))) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and len(captured.out.splitlines()) == 1
    assert captured.out.split()[0] in ("sat", "unsat")
    first = log.read_text().splitlines()[0]
    for setting in ("device cpu", "dtype float32", "threads 1 (--threads)", "timeout 300 s", "branching auto"):
        assert setting in first, (setting, first)


def test_verbose_adds_the_configuration_and_the_phase_times(capsys):
    lines = {}
    for verbose in (False, True):
        assert main(verify_args(DATA / "test_nano.onnx", DATA / "test_nano.vnnlib", *(["-v"] if verbose else []))) == 0
        lines[verbose] = capsys.readouterr().err
    assert "[bab]" not in lines[False] and "seconds per phase" not in lines[False]
    assert "[bab]" in lines[True] and "seconds per phase: ibp" in lines[True]
    assert lines[False].splitlines()[0].split("] ", 1)[1].startswith("certiprune ")   # the settings first


# ---- --config and --print-config ----------------------------------------------------------------
def printed_config(capsys, *flags) -> str:
    assert main(["verify", "--print-config", *flags]) == 0
    return capsys.readouterr().out


def test_print_config_round_trips_through_config(tmp_path, capsys):
    text = printed_config(capsys)
    (tmp_path / "c.toml").write_text(text)
    assert printed_config(capsys, "--config", str(tmp_path / "c.toml")) == text
    for section in ("[attack]", "[alpha]", "[bab]"):
        assert section in text


def test_config_file_sets_nested_fields_and_flags_override_it(tmp_path, capsys):
    import tomllib
    (tmp_path / "c.toml").write_text('timeout = 42.0\n[attack]\nrestarts = 3\ntime_share = 0.2\n'
                                     '[bab]\nbranching = "fsb"\nrebound_intermediate = true\n')
    config = tomllib.loads(printed_config(capsys, "--config", str(tmp_path / "c.toml"), "--branching", "babsr"))
    assert config["timeout"] == 42.0 and config["attack"]["restarts"] == 3 and config["attack"]["time_share"] == 0.2
    assert config["bab"]["branching"] == "babsr"           # the flag given wins
    assert config["bab"]["rebound_intermediate"] is True
    assert config["bab"]["input_split"] == "auto"          # a flag not given leaves the file's (default) value
    # the file's timeout stands unless --timeout is given, even when given as the default value
    assert tomllib.loads(printed_config(capsys, "--config", str(tmp_path / "c.toml"),
                                        "--timeout", "300"))["timeout"] == 300.0


def test_config_file_with_a_wrong_type_names_the_key(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[attack]\nrestarts = "many"\n')
    assert main(["verify", "--print-config", "--config", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert "[attack] restarts" in err and "int" in err
