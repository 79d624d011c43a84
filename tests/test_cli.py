"""The ``certiprune`` console script as users and the VNN-COMP scripts run it: a fresh process
whose verdict, log, result file and exit status must all be complete when it ends (it ends
without the interpreter's shutdown: ``verifier.cli.console_main``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

SCRIPT = Path(sys.executable).with_name("certiprune")
DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "test"

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="certiprune is not installed next to this interpreter")


def certiprune(*args: str) -> subprocess.CompletedProcess:
    """Run the script with its output to pipes, block-buffered as under any harness (not with
    PYTHONUNBUFFERED, which would hide output lost at exit)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def test_console_script_leaves_verdict_log_and_counterexample_complete_when_it_ends(tmp_path):
    result = tmp_path / "result.txt"
    done = certiprune("verify", str(DATA / "test_sat.onnx"), str(DATA / "test_prop.vnnlib"), "--timeout", "60",
                      "--result-file", str(result))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:1] == ["sat"], done.stdout
    assert "loaded" in done.stderr and "Traceback" not in done.stderr
    text = result.read_text()
    assert text.startswith("sat\n(") and text.endswith(")\n")
    # the file's last line is there and the assignment is the model's: X gives Y on onnxruntime
    values = {name: float(v) for name, v in (line.strip(" ()").split() for line in text.splitlines()[1:])}
    x = np.array([values[k] for k in sorted((k for k in values if k.startswith("X_")), key=lambda k: int(k[2:]))],
                 dtype=np.float32)
    y = np.array([values[k] for k in sorted((k for k in values if k.startswith("Y_")), key=lambda k: int(k[2:]))])
    session = ort.InferenceSession(str(DATA / "test_sat.onnx"))
    feed = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in feed.shape]
    out = session.run(None, {feed.name: x.reshape(shape)})[0].reshape(-1)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)


def test_console_script_error_is_a_message_an_error_result_and_a_non_zero_status(tmp_path):
    result = tmp_path / "result.txt"
    done = certiprune("verify", str(tmp_path / "missing.onnx"), str(DATA / "test_prop.vnnlib"),
                      "--result-file", str(result))
    assert done.returncode != 0
    assert "error" in done.stderr and "missing.onnx" in done.stderr and "Traceback" not in done.stderr
    assert result.read_text() == "error\n"
