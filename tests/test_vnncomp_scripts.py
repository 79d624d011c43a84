"""VNN-COMP's three tool scripts (benchmarks/vnncomp/*.sh) as the competition runs them: a stale
verdict never survives a run that dies, the install is idempotent, and prepare_instance.sh
checks the instance, caches the converted model and ends the processes it left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "benchmarks" / "vnncomp"
DATA = ROOT / "benchmarks" / "data" / "test"
SAT = (str(DATA / "test_sat.onnx"), str(DATA / "test_prop.vnnlib"))   # a sat instance (REFERENCE.csv)

pytestmark = pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "certiprune").exists(),
                                reason="the scripts run the project's .venv")


def script_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}
    env.update(CERTIPRUNE_CACHE_DIR=str(tmp_path / "cache"), CERTIPRUNE_STATE_DIR=str(tmp_path / "state"), **extra)
    return env


def run_script(name: str, *args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_run_instance_stale_unsat_does_not_survive_a_bad_flag(tmp_path):
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")
    done = run_script("run_instance.sh", "v1", "test", *SAT, str(result), "30",
                      env=script_env(tmp_path, CERTIPRUNE_ARGS="--no-such-flag"))
    assert done.returncode != 0
    assert result.read_text().split() == ["error"], done.stderr[-1000:]


def started_verifier(pid: int) -> bool:
    """Whether the script ``pid`` runs ``certiprune verify`` now (a child whose command line says so)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return any(b"verify" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)
    except OSError:
        return False


def test_run_instance_stale_unsat_does_not_survive_a_killed_run(tmp_path):
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")
    proc = subprocess.Popen(["bash", str(SCRIPTS / "run_instance.sh"), "v1", "test", *SAT, str(result), "30"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env(tmp_path),
                            start_new_session=True)
    try:   # kill the run as soon as the script has started the verifier: long before any verdict
        deadline = time.monotonic() + 30
        while not started_verifier(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the script and the verifier it started
        proc.wait()
    assert not result.exists() or result.read_text().split()[:1] != ["unsat"], "the stale unsat survived"


def test_run_instance_usage_error_leaves_error_not_the_stale_verdict(tmp_path):
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")
    done = run_script("run_instance.sh", "v1", "test", *SAT, str(result), env=script_env(tmp_path))
    assert done.returncode == 1 and "usage" in done.stderr
    assert result.read_text() == "error\n"


def test_run_instance_writes_the_verdict_with_its_counterexample(tmp_path):
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")
    done = run_script("run_instance.sh", "v1", "test", *SAT, str(result), "60", env=script_env(tmp_path))
    assert done.returncode == 0, done.stderr[-1000:]
    text = result.read_text()
    assert text.startswith("sat\n(") and "(X_0 " in text and "(Y_0 " in text


def test_install_tool_is_idempotent_on_an_installed_tree(tmp_path):
    os.utime(ROOT / ".venv" / ".installed")   # as after `make venv` (the stamp newer than its inputs)
    done = run_script("install_tool.sh", "v1", env=script_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "up to date" in done.stdout
    assert run_script("install_tool.sh", env=script_env(tmp_path)).returncode == 1   # no version: usage


def test_prepare_instance_checks_the_instance_and_caches_the_converted_model(tmp_path):
    env = script_env(tmp_path)
    done = run_script("prepare_instance.sh", "v1", "test", *SAT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    entries = list((tmp_path / "cache").glob("*.pkl"))
    assert len(entries) == 1
    # the timed run reads the entry: same verdict, and the entry is not rewritten
    mtime = entries[0].stat().st_mtime_ns
    result = tmp_path / "result.txt"
    done = run_script("run_instance.sh", "v1", "test", *SAT, str(result), "60", env=env)
    assert done.returncode == 0 and result.read_text().startswith("sat\n")
    assert entries[0].stat().st_mtime_ns == mtime


def test_prepare_instance_reports_a_bad_spec_in_one_line(tmp_path):
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 oops))\n")
    done = run_script("prepare_instance.sh", "v1", "test", SAT[0], str(bad), env=script_env(tmp_path))
    assert done.returncode not in (0, 1), done.stderr
    assert "Traceback" not in done.stderr and "bad.vnnlib" in done.stderr


def test_prepare_instance_ends_the_processes_an_earlier_prepare_started(tmp_path):
    from benchmarks.cluster.vnncomp import remember
    state = tmp_path / "state"
    state.mkdir()
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    remember(state, leftover.pid)
    try:
        done = run_script("prepare_instance.sh", "v1", "test", *SAT, env=script_env(tmp_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert leftover.wait(timeout=10) == -signal.SIGTERM
        assert "ended 1 process" in done.stderr
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


# ---- the cache of converted models (verifier.io.cache) ------------------------------------------
ACASXU = ROOT / "benchmarks" / "data" / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx"


def test_cached_graph_bounds_and_forward_equal_a_fresh_conversion(tmp_path):
    import torch
    from verifier import BoundedModel
    fresh = BoundedModel(str(ACASXU))
    BoundedModel(str(ACASXU), cache_dir=tmp_path)            # miss: converts and stores
    cached = BoundedModel(str(ACASXU), cache_dir=tmp_path)   # hit
    assert (cached.onnx.input_name, cached.onnx.input_layout) == (fresh.onnx.input_name, fresh.onnx.input_layout)
    assert "graph_module" not in vars(cached.onnx)   # not converted until asked for
    torch.manual_seed(0)
    lower = torch.rand(4, *fresh.input_shape) - 0.5
    upper = lower + 0.1 * torch.rand_like(lower)
    for method in ("ibp", "crown"):
        for a, b in zip(fresh.compute_bounds(lower, upper, method=method),
                        cached.compute_bounds(lower, upper, method=method)):
            assert torch.equal(a, b)
    assert torch.equal(fresh.forward(lower), cached.forward(lower))
    # the converted module, when asked for, is the one a fresh load gives
    with torch.no_grad():
        layout = fresh.onnx.input_layout
        x = lower[:1].reshape(layout)
        assert torch.equal(fresh.onnx.graph_module(x), cached.onnx.graph_module(x))


def test_cache_hit_needs_neither_onnx2torch_nor_onnx(tmp_path):
    from verifier import BoundedModel
    BoundedModel(str(ACASXU), cache_dir=tmp_path)
    code = ("import sys; from verifier import BoundedModel; "
            f"m = BoundedModel({str(ACASXU)!r}, cache_dir={str(tmp_path)!r}); "
            "print(sorted(k for k in ('onnx', 'onnx2torch') if k in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_cache_changed_file_misses_and_corrupt_entry_is_rewritten(tmp_path):
    import shutil

    import torch
    from verifier.io.cache import cache_path, load_onnx_graph
    model = tmp_path / "net.onnx"
    shutil.copy(ACASXU, model)
    cache = tmp_path / "cache"
    cpu = torch.device("cpu")
    assert load_onnx_graph(str(model), cpu, torch.float32, cache)[2] is False
    assert load_onnx_graph(str(model), cpu, torch.float32, cache)[2] is True
    assert load_onnx_graph(str(model), cpu, torch.float64, cache)[2] is False   # dtype is part of the key
    entry = cache_path(cache, str(model), cpu, torch.float32)
    entry.write_bytes(b"not a pickle")
    assert load_onnx_graph(str(model), cpu, torch.float32, cache)[2] is False
    assert load_onnx_graph(str(model), cpu, torch.float32, cache)[2] is True
    shutil.copy(ROOT / "benchmarks" / "data" / "acasxu" / "ACASXU_run2a_1_6_batch_2000.onnx", model)
    assert cache_path(cache, str(model), cpu, torch.float32) != entry
    assert load_onnx_graph(str(model), cpu, torch.float32, cache)[2] is False


# ---- the warm worker of prepare_instance.sh (CERTIPRUNE_WARM=1) ---------------------------------
def test_warm_worker_takes_the_instance_and_the_next_prepare_ends_it(tmp_path):
    from benchmarks.cluster.vnncomp import end_leftovers, process_start_time
    env = script_env(tmp_path, CERTIPRUNE_WARM="1")
    state = tmp_path / "state"
    try:
        done = run_script("prepare_instance.sh", "v1", "test", *SAT, env=env, timeout=300)
        assert done.returncode == 0 and "warm worker ready" in done.stderr, done.stderr[-2000:]
        started = [int(line.split()[0]) for line in (state / "pids").read_text().splitlines()]
        assert len(started) == 2   # scheduler and worker
        result = tmp_path / "result.txt"
        result.write_text("unsat\n")
        done = run_script("run_instance.sh", "v1", "test", *SAT, str(result), "60", env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        text = result.read_text()
        assert text.startswith("sat\n(") and "(X_0 " in text and "(Y_0 " in text
        done = run_script("prepare_instance.sh", "v1", "test", *SAT, env=script_env(tmp_path), timeout=300)
        assert done.returncode == 0 and "ended 2 process(es)" in done.stderr, done.stderr[-2000:]
        assert not (state / "scheduler.json").exists()
        time.sleep(0.5)
        assert all(process_start_time(pid) is None for pid in started)
    finally:
        end_leftovers(state)


def test_run_instance_runs_cold_when_the_warm_worker_does_not_answer(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "scheduler.json").write_text('{"address": "tcp://127.0.0.1:9", "type": "Scheduler"}')
    result = tmp_path / "result.txt"
    result.write_text("unsat\n")
    done = run_script("run_instance.sh", "v1", "test", *SAT, str(result), "60", env=script_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert result.read_text().startswith("sat\n(")


def test_bench_through_the_scripts_times_run_instance_and_records_each_verdict_once(tmp_path):
    """`bench --scripts warm` runs prepare_instance.sh untimed and run_instance.sh timed per instance
    (the warm worker takes it): one row per instance with the reference's verdict, mode
    scripts-warm; a rerun finds nothing left to do."""
    suite = tmp_path / "instances.csv"
    suite.write_text("test_sat.onnx,test_prop.vnnlib,30\ntest_unsat.onnx,test_prop.vnnlib,30\n")
    out = tmp_path / "rows.csv"
    cmd = [str(ROOT / ".venv" / "bin" / "certiprune"), "bench", str(suite), "--root", str(DATA), "--scripts", "warm",
           "--out", str(out), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=script_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = out.read_text().splitlines()[1:]
    assert [(r.split(",")[1], r.split(",")[3], r.split(",")[9]) for r in rows] == [
        ("test_sat.onnx", "sat", "scripts-warm"), ("test_unsat.onnx", "unsat", "scripts-warm")]
    again = subprocess.run(cmd, capture_output=True, text=True, env=script_env(tmp_path), timeout=300)
    assert "0 to run" in again.stderr and out.read_text().splitlines()[1:] == rows
