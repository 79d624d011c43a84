"""An instance run the way VNN-COMP's harness runs a tool: ``prepare_instance.sh`` (untimed), then
``run_instance.sh`` (timed, the figure that is scored), each a fresh process.

    certiprune bench INSTANCES.csv --scripts cold     # no warm worker: run_instance.sh verifies cold
    certiprune bench INSTANCES.csv --scripts warm     # CERTIPRUNE_WARM=1: prepare starts a warm worker
                                                      # that run_instance.sh hands the instance to

The row's ``seconds`` is run_instance.sh's wall time alone (what the competition times); the
preparation's time is not counted, as in the competition. ``--verify-args`` / ``--threads``
reach the verifier through ``CERTIPRUNE_ARGS``. The cache of converted models and the warm
worker's state live in a folder of this run, removed at its end, so a run starts cold.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "vnncomp"


def run_with_scripts(inst, timeout: float, grace: float, extra: list[str], warm: bool, state: Path):
    """prepare_instance.sh then the timed run_instance.sh of one instance -> ``bench.Outcome``
    (mode ``scripts-warm`` or ``scripts-cold``). ``state`` holds the model cache and the warm
    worker's files for the whole run. A run past ``timeout + grace`` is killed (``killed``)."""
    from benchmarks.bench import VERDICTS, Outcome
    env = dict(os.environ, CERTIPRUNE_ARGS=shlex.join(extra), CERTIPRUNE_WARM="1" if warm else "0",
               CERTIPRUNE_CACHE_DIR=str(state / "cache"), CERTIPRUNE_STATE_DIR=str(state / "state"))
    mode = "scripts-warm" if warm else "scripts-cold"
    prepare = subprocess.run(["bash", str(SCRIPTS / "prepare_instance.sh"), "v1", inst.benchmark, inst.onnx_path,
                              inst.vnnlib_path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    if prepare.returncode != 0:
        return Outcome("error", 0.0, prepare.returncode, mode=mode)
    result_file = state / "result.txt"
    start = time.perf_counter()
    try:
        proc = subprocess.run(["bash", str(SCRIPTS / "run_instance.sh"), "v1", inst.benchmark, inst.onnx_path,
                               inst.vnnlib_path, str(result_file), f"{timeout:g}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + grace)
    except subprocess.TimeoutExpired:
        return Outcome("killed", time.perf_counter() - start, -9, mode=mode)
    seconds = time.perf_counter() - start
    text = result_file.read_text() if result_file.exists() else ""
    result = text.split("\n", 1)[0].strip().lower() or "error"
    if proc.returncode != 0 and result in VERDICTS:
        result = "error"
    return Outcome(result, seconds, proc.returncode, text, mode=mode)


def run_all_with_scripts(pending: list, args, writer, reference: dict) -> None:
    """Every pending instance through the two scripts, one at a time (as the competition runs them),
    the rows appended as each finishes; the warm worker of the last instance is ended at the end."""
    from benchmarks.bench import Progress, source_version, verify_arguments
    from benchmarks.cluster.vnncomp import end_leftovers
    extra = verify_arguments(args)
    progress = Progress(len(pending), reference)
    with tempfile.TemporaryDirectory(prefix="certiprune-scripts-") as tmp:
        state = Path(tmp)
        try:
            for inst in pending:
                timeout = inst.timeout * args.timeout_scale
                version = source_version()
                out = run_with_scripts(inst, timeout, args.grace, extra, args.scripts == "warm", state)
                if writer.record(inst, timeout, out, version):
                    progress.done(inst, out)
        finally:
            end_leftovers(state / "state")
            progress.close()
