"""The untimed work of VNN-COMP's ``prepare_instance.sh``:

    python -m benchmarks.cluster.vnncomp ONNX VNNLIB

1. End the processes an earlier prepare started (a warm scheduler and worker, which may still run
   an overrun instance): their ids are in ``$CERTIPRUNE_STATE_DIR/pids``, each with the process's
   start time, so a recycled id is never killed.
2. Load the model (converting it into ``$CERTIPRUNE_CACHE_DIR``, keyed by the file's hash, for the
   timed run), parse the spec against it and bound it once with IBP: a bad instance is reported
   here, as one line and the error's exit code.
3. With ``CERTIPRUNE_WARM=1``: start a Dask scheduler and one warm worker (``dask scheduler`` /
   ``dask worker``, scheduler file ``$CERTIPRUNE_STATE_DIR/scheduler.json``) for
   ``run_instance.sh`` to hand the instance to (``benchmarks.cluster.handoff``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ENV_STATE, ENV_WARM = "CERTIPRUNE_STATE_DIR", "CERTIPRUNE_WARM"
SCHEDULER_FILE = "scheduler.json"


def state_dir() -> Path:
    default = Path(os.environ.get("TMPDIR", "/tmp")) / f"certiprune-vnncomp-{os.getuid()}"
    return Path(os.environ.get(ENV_STATE) or default)


def process_start_time(pid: int) -> Optional[str]:
    """The start time of a process in clock ticks since boot (/proc/PID/stat field 22), None if
    there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def remember(state: Path, pid: int) -> None:
    with open(state / "pids", "a") as f:
        f.write(f"{pid} {process_start_time(pid)}\n")


def end_leftovers(state: Path, wait: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``wait`` seconds, to each process group this module started
    that still runs; returns how many there were. Forgets them and the scheduler file."""
    ended = []
    pids = state / "pids"
    if pids.exists():
        for line in pids.read_text().splitlines():
            pid, _, started = line.partition(" ")
            if pid.isdigit() and started != "None" and process_start_time(int(pid)) == started:
                ended.append(int(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ended:
            try:
                os.killpg(pid, sig)   # started with start_new_session: its group is its id
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(process_start_time(p) for p in ended):
            time.sleep(0.1)
    for path in (pids, state / SCHEDULER_FILE):
        path.unlink(missing_ok=True)
    return len(ended)


def check_instance(onnx: str, vnnlib: str) -> str:
    """Load the model (filling the cache), parse the spec against it, bound it once with IBP."""
    import torch
    from verifier import BoundedModel
    from verifier.io.cache import ENV_CACHE_DIR
    from verifier.io.onnx import skip_torchvision_import
    from verifier.io.vnnlib import load_vnnlib
    from verifier.spec import region_specs
    skip_torchvision_import()
    torch.set_num_threads(1)
    model = BoundedModel(onnx, cache_dir=os.environ.get(ENV_CACHE_DIR))
    graph = model.graph()
    prop = load_vnnlib(vnnlib, n_inputs=graph.nodes[0].numel, n_outputs=graph.nodes[graph.output].numel)
    specs = region_specs(prop, model.input_shape, model.device, model.dtype)
    with torch.no_grad():
        for spec in specs:
            model.compute_bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0), spec.C.unsqueeze(0), method="ibp")
    return f"{onnx}: input {model.input_shape}, {len(prop.regions)} region(s) of {vnnlib} bounded by IBP"


def start_warm_worker(state: Path, timeout: float = 120.0) -> None:
    """A scheduler on 127.0.0.1 and one warm worker, each in its own session; returns once the
    worker has registered and loaded the verifier (raises TimeoutError otherwise)."""
    bin_dir = Path(sys.executable).parent
    dask = str(bin_dir / "dask") if (bin_dir / "dask").exists() else "dask"
    scheduler_file = state / SCHEDULER_FILE
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DASK_LOGGING__DISTRIBUTED="error",
               DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="1.0")
    log = open(state / "cluster.log", "a")
    for cmd in ([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                 "--scheduler-file", str(scheduler_file)],
                [dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--nworkers", "1",
                 "--no-dashboard", "--name", "certiprune-warm"]):
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)
        remember(state, proc.pid)
    from distributed import Client
    from benchmarks.cluster.worker import WarmVerifier
    deadline = time.monotonic() + timeout
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with Client(scheduler_file=str(scheduler_file), timeout=max(1.0, deadline - time.monotonic())) as client:
        client.wait_for_workers(1, timeout=max(1.0, deadline - time.monotonic()))
        client.register_plugin(WarmVerifier(int(env["OMP_NUM_THREADS"]),
                                            cache_dir=os.environ.get("CERTIPRUNE_CACHE_DIR")),
                               name=WarmVerifier.name)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.cluster.vnncomp ONNX VNNLIB", file=sys.stderr)
        return 2
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    ended = end_leftovers(state)
    if ended:
        print(f"ended {ended} process(es) left by an earlier prepare", file=sys.stderr)
    from verifier.errors import VerifierError
    try:
        print(check_instance(*argv), file=sys.stderr)
    except VerifierError as exc:
        print(f"prepare_instance: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if os.environ.get(ENV_WARM) == "1":
        try:
            start_warm_worker(state)
            print(f"warm worker ready ({state / SCHEDULER_FILE})", file=sys.stderr)
        except Exception as exc:   # no warm worker: run_instance.sh runs cold
            end_leftovers(state)
            print(f"prepare_instance: no warm worker ({type(exc).__name__}: {exc}); the run will be cold",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
