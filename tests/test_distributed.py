"""The Dask runner against a real cluster: a scheduler and two nanny-managed workers started with
``dask scheduler`` / ``dask worker`` on 127.0.0.1 (random ports, subprocesses, torn down here).

Every instance must get exactly one row; verdicts must equal REFERENCE.csv's (the answers the
sequential runner gives on these instances: ``make demo``); an instance whose worker is
SIGKILLed is run again or marked; a hung instance is cut at timeout + grace and costs its
worker a restart. The kill and the hang are driven from the test through the runner's task
function (a wrapper that waits before verifying, or never returns), so that they happen
mid-instance on every machine, however fast the verification itself is.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")
from benchmarks import bench  # noqa: E402
from benchmarks.cluster.runner import Tasks  # noqa: E402
from benchmarks.cluster.worker import announce_start, warm_verify  # noqa: E402
from benchmarks.instances import read_instances, read_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
DEMO = DATA / "demo.csv"
REFERENCE = read_reference(DATA / "REFERENCE.csv")
DASK = Path(sys.executable).with_name("dask")

pytestmark = pytest.mark.skipif(not DASK.exists(), reason="the dask command is not installed next to this interpreter")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler file, client) of a scheduler and two one-thread workers, each process in its own
    session; all of them killed at the end."""
    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    # PYTHONPATH: the scheduler and the workers import this module's task wrappers by name
    env = dict(os.environ, OMP_NUM_THREADS="1", DASK_LOGGING__DISTRIBUTED="error",
               DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="1.0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    log = open(folder / "cluster.log", "w")
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], stdout=log, stderr=log, env=env,
                              start_new_session=True)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    for i in range(2):
        procs.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--nthreads",
                                       "1", "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1",
                                       "--name", f"w{i}"], stdout=log, stderr=log, env=env,
                                      start_new_session=True))
    client = distributed.Client(scheduler_file=str(scheduler_file), timeout=60)
    try:
        client.wait_for_workers(2, timeout=120)
        yield str(scheduler_file), client
    finally:
        client.close()
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        log.close()


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    return parser.parse_args([str(DEMO), *argv])


def run_tasks(client, args, instances, out: Path, function=None) -> dict:
    writer = bench.ResultWriter(str(out))
    Tasks(client, args, threads=1, function=function).run(instances, writer, bench.Progress(len(instances), {}))
    return bench.read_results(str(out))


def rows_per_instance(out: Path) -> dict:
    counts: dict = {}
    for line in out.read_text().splitlines()[1:]:
        key = tuple(line.split(",")[:3])
        counts[key] = counts.get(key, 0) + 1
    return counts


def assert_restarted(client, old_pid: int) -> None:
    """The worker process ``old_pid`` is gone and its nanny has brought a new one: two workers again."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        pids = client.run(os.getpid)
        if len(pids) == 2 and old_pid not in pids.values():
            return
        time.sleep(0.2)
    raise AssertionError(f"worker process {old_pid} was not replaced: {client.run(os.getpid)}")


def slow_warm_verify(task):
    """The real warm verification, after 1.5 s: long enough to be killed in the middle."""
    time.sleep(1.5)
    return warm_verify(task)


def hang_on_sat(task):
    """Never returns for test_sat.onnx (a search that cannot finish); test_tiny.onnx exhausts
    memory; verifies the others."""
    if task.key[1] == "test_sat.onnx":
        announce_start(task)
        while True:
            time.sleep(0.05)
    if task.key[1] == "test_tiny.onnx":
        return out_of_memory(task)
    return warm_verify(task)


def out_of_memory(task):
    """The verification of ``task`` exhausts memory (its model load raises MemoryError)."""
    from distributed import get_worker
    from benchmarks.cluster.worker import PLUGIN_NAME, WarmVerifier
    plugin = get_worker().plugins.get(PLUGIN_NAME) or WarmVerifier()

    def exhausted(*args, **kwargs):
        raise MemoryError("injected by the test")
    get_worker().plugins[PLUGIN_NAME] = type("Exhausted", (), {"model": staticmethod(exhausted),
                                                               "threads": plugin.threads})()
    try:
        return warm_verify(task)
    finally:
        get_worker().plugins[PLUGIN_NAME] = plugin


def test_sigkilled_worker_mid_instance_leaves_one_row_per_instance_with_the_reference_verdicts(cluster, tmp_path):
    scheduler_file, client = cluster
    args = bench_args("--scheduler", scheduler_file, "--threads", "1", "--grace", "60")
    instances = read_instances(DEMO)
    pids = client.run(os.getpid)
    out = tmp_path / "killed.csv"
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(run_tasks(client, args, instances, out, slow_warm_verify)))
    runner.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if keys and w in pids]
        victim = busy[0] if busy else None
        time.sleep(0.05)
    assert victim is not None, "no worker ever ran a task"
    time.sleep(0.5)   # inside the task's 1.5 s wait: the instance is mid-run
    os.kill(pids[victim], signal.SIGKILL)
    runner.join(timeout=240)
    assert not runner.is_alive()
    assert rows_per_instance(out) == {i.key: 1 for i in instances}
    for inst in instances:
        row = done[inst.key]
        # the killed worker's instance ran again elsewhere (its verdict), or is marked an error
        assert row["result"] == REFERENCE[inst.key] or (row["result"] == "error" and row["exit_code"] == "-9"), row
        assert row["mode"] == "warm"
    assert sum(row["result"] == REFERENCE[key] for key, row in done.items()) >= len(instances) - 1
    assert_restarted(client, pids[victim])


def test_hung_instance_cut_at_timeout_plus_grace_and_out_of_memory_one_error_each_restart_their_worker(
        cluster, tmp_path):
    scheduler_file, client = cluster
    client.wait_for_workers(2, timeout=60)
    args = bench_args("--scheduler", scheduler_file, "--threads", "1", "--timeout-scale", "0.1", "--grace", "2")
    instances = read_instances(DATA / "test" / "test_instances.csv")
    pids = client.run(os.getpid)
    out = tmp_path / "hung.csv"
    rows = run_tasks(client, args, instances, out, hang_on_sat)
    assert rows_per_instance(out) == {i.key: 1 for i in instances}
    for inst in instances:
        row = rows[inst.key]
        if inst.onnx == "test_sat.onnx":
            timeout_plus_grace = 60 * 0.1 + 2
            assert row["result"] == "killed" and row["exit_code"] == "-9"
            assert timeout_plus_grace <= float(row["seconds"]) < timeout_plus_grace + 5
            hung_worker = row["worker"]
        elif inst.onnx == "test_tiny.onnx":
            assert (row["result"], row["exit_code"]) == ("error", "1")
            exhausted_worker = row["worker"]
        else:
            assert row["result"] == REFERENCE[inst.key]
    assert_restarted(client, pids[hung_worker])
    assert_restarted(client, pids[exhausted_worker])


def test_isolated_mode_on_dask_runs_one_process_per_instance(cluster, tmp_path):
    scheduler_file, client = cluster
    client.wait_for_workers(2, timeout=60)
    args = bench_args("--scheduler", scheduler_file, "--threads", "1", "--isolate")
    instances = bench.select(read_instances(DATA / "test" / "test_instances.csv"), 3, None)   # nano, sat
    rows = run_tasks(client, args, instances, tmp_path / "isolated.csv")
    assert {k: r["result"] for k, r in rows.items()} == {i.key: REFERENCE[i.key] for i in instances}
    assert {r["mode"] for r in rows.values()} == {"isolated"}


def test_bench_workers_on_a_local_cluster_resumes_without_a_second_row(tmp_path):
    out = tmp_path / "local.csv"
    suite = DATA / "test" / "test_instances.csv"
    instances = read_instances(suite)
    writer = bench.ResultWriter(str(out))   # an interrupted run's first two rows
    for inst in instances[:2]:
        writer.record(inst, inst.timeout, bench.Outcome(REFERENCE[inst.key], 1.0, 0, REFERENCE[inst.key] + "\n"), "x")
    cmd = [sys.executable, "-m", "benchmarks.bench", str(suite), "--workers", "2", "--threads", "1", "--out", str(out),
           "--reference", str(DATA / "REFERENCE.csv")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 already in" in done.stderr and "3 to run" in done.stderr
    assert rows_per_instance(out) == {i.key: 1 for i in instances}
    rows = bench.read_results(str(out))
    assert {k: r["result"] for k, r in rows.items()} == {i.key: REFERENCE[i.key] for i in instances}
    assert [rows[i.key]["mode"] for i in instances] == ["isolated"] * 2 + ["warm"] * 3



def test_cuda_workers_get_one_gpu_each_and_tasks_ask_for_one():
    from benchmarks.cluster.runner import task_resources, worker_specs
    specs = worker_specs(4, 2, "cuda", gpus=2)
    options = [spec["options"] for spec in specs.values()]
    assert [o["env"]["CUDA_VISIBLE_DEVICES"] for o in options] == ["0", "1", "0", "1"]
    assert all(o["resources"] == {"GPU": 1} and o["nthreads"] == 1 and o["env"]["OMP_NUM_THREADS"] == "2"
               for o in options)
    assert all("resources" not in spec["options"] for spec in worker_specs(2, 1, "cpu").values())
    assert task_resources("cuda:0") == {"GPU": 1} and task_resources("cpu") is None
    extra = bench.verify_arguments(bench_args("--device", "cuda:0"))
    assert extra[extra.index("--device") + 1] == "cuda:0"   # passed through to verify
