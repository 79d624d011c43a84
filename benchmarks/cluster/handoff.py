"""The timed half of a warm VNN-COMP run: hand the instance to the worker prepare_instance.sh
started, and write the result file from this process.

    python -m benchmarks.cluster.handoff SCHEDULER_FILE ONNX VNNLIB RESULT_FILE TIMEOUT [VERIFY FLAGS...]

This process imports Dask, not torch (about 1 s instead of 3). It checks the worker's answer (a
verdict line; for ``sat`` an assignment of X and Y) and writes it atomically. When no warm worker
answers within a second, or the worker dies under the instance, it becomes ``certiprune verify``
(exec) with the time that is left: the cold run. An instance still running at its timeout + 2 s
is recorded ``timeout`` here; prepare_instance.sh ends that worker before the next instance.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

CONNECT_SECONDS = 1.0
GRACE = 2.0
VERDICTS = ("sat", "unsat", "timeout", "unknown", "error")


def well_formed(text: str) -> bool:
    """A result file's text: one known verdict, and for sat an assignment of X_ and Y_."""
    lines = text.splitlines()
    if not lines or lines[0].strip() not in VERDICTS:
        return False
    if lines[0].strip() != "sat":
        return len(lines) == 1
    body = " ".join(lines[1:])
    return "(X_0 " in body and "(Y_0 " in body


def write_result(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_cold(onnx: str, vnnlib: str, result_file: str, timeout: float, flags: list[str]) -> None:
    """Become ``certiprune verify`` with what is left of the timeout (never returns)."""
    script = os.path.join(os.path.dirname(sys.executable), "certiprune")
    argv = [script, "verify", onnx, vnnlib, "--timeout", f"{max(0.0, timeout):.3f}", "--result-file",
            result_file, *flags]
    if os.path.exists(script):
        os.execv(script, argv)
    os.execv(sys.executable, [sys.executable, "-m", "verifier.cli", *argv[1:]])


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    if len(argv) < 5:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    scheduler_file, onnx, vnnlib, result_file, timeout_text, *flags = argv
    timeout = float(timeout_text)
    from distributed import Client, TimeoutError as DaskTimeout
    from benchmarks.cluster.worker import InstanceTask, warm_verify
    try:
        client = Client(scheduler_file=scheduler_file, timeout=CONNECT_SECONDS)
    except (OSError, DaskTimeout, ValueError):
        run_cold(onnx, vnnlib, result_file, timeout - (time.perf_counter() - start), flags)
    with client:
        if not client.scheduler_info(n_workers=-1)["workers"]:
            run_cold(onnx, vnnlib, result_file, timeout - (time.perf_counter() - start), flags)
        left = timeout - (time.perf_counter() - start)
        task = InstanceTask(("vnncomp", onnx, vnnlib), os.path.abspath(onnx), os.path.abspath(vnnlib), left, GRACE,
                            tuple(flags))
        future = client.submit(warm_verify, task, pure=False)
        try:
            result = future.result(timeout=left + GRACE)
            text = result.text
        except DaskTimeout:
            client.cancel(future)
            text = "timeout\n"
        except Exception as exc:   # the worker died under the instance: the cold run, with the time left
            print(f"warm worker lost ({type(exc).__name__}); running cold", file=sys.stderr)
            run_cold(onnx, vnnlib, result_file, timeout - (time.perf_counter() - start), flags)
    if not well_formed(text):
        print(f"warm worker answered a malformed result ({text[:60]!r}); recorded as error", file=sys.stderr)
        text = "error\n"
    write_result(result_file, text)
    print(f"{text.split(chr(10), 1)[0]} {time.perf_counter() - start:.3f}")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter shutdown: Dask's teardown would be timed
