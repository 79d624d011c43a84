"""What runs on a Dask worker: one instance, warm (in the worker's process) or isolated.

A warm worker imports torch and the verifier once (``WarmVerifier``, a worker plugin that also
keeps the last few converted models, keyed by the ONNX file's SHA-256) and verifies each instance
in-process with the same flags, configuration and result text as ``certiprune verify``. The
timeout is enforced inside the search (``verify`` stops at its deadline between bounding steps);
the verdict of a search that overran its deadline by more than half a second is ``timeout``, as
the command's wall-clock safety net would make it. That safety net (SIGALRM) works only in a
process's main thread and Dask runs tasks in threads, so the hard cut is the client's: a task
still running at timeout + grace costs its worker a restart by the nanny (``runner``).

Each task announces its start on the ``certiprune-start`` event topic (key, worker address), so
the client measures overruns from the start, not from the submission, and knows whom to restart.
"""
from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from distributed import WorkerPlugin

START_TOPIC = "certiprune-start"
PLUGIN_NAME = "certiprune-warm"
LATE = 0.5   # seconds past the deadline after which a verdict counts as a timeout (the CLI's safety net)


@dataclass(frozen=True)
class InstanceTask:
    """One instance as a worker receives it. Paths must be readable on the worker."""

    key: tuple[str, str, str]       # (benchmark, onnx, vnnlib) as in the results CSV
    onnx_path: str
    vnnlib_path: str
    timeout: float                  # seconds given to the verifier
    grace: float                    # an isolated process is killed at timeout + grace
    verify_args: tuple[str, ...] = field(default_factory=tuple)   # extra `certiprune verify` flags


@dataclass(frozen=True)
class TaskResult:
    """What a task sends back: the verdict, the result file's text, seconds from the task's start."""

    result: str        # sat | unsat | timeout | unknown | error | killed
    seconds: float
    exit_code: int
    text: str
    mode: str          # warm | isolated
    worker: str
    restart: bool = False   # the worker's state is suspect (an internal error, e.g. out of memory)


def announce_start(task: InstanceTask) -> str:
    """Tell the client (event topic ``certiprune-start``) that ``task`` starts on this worker."""
    from distributed import get_worker
    worker = get_worker()
    worker.log_event(START_TOPIC, {"key": list(task.key), "worker": worker.address, "pid": os.getpid()})
    return worker.address


class WarmVerifier(WorkerPlugin):
    """Worker plugin: torch and the verifier imported once per worker process, torch's threads
    set, and the ``max_models`` most recently used models kept (key: file hash, device, dtype).

    ``threads``: torch threads per worker (also OMP_NUM_THREADS of the process it sets up)."""

    name = PLUGIN_NAME

    def __init__(self, threads: int = 1, max_models: int = 8, cache_dir: Optional[str] = None):
        self.threads, self.max_models, self.cache_dir = threads, max_models, cache_dir
        self.models: collections.OrderedDict = collections.OrderedDict()

    def setup(self, worker=None) -> None:
        import torch
        import verifier.cli   # noqa: F401  (the parser, configuration and loading of `verify`)
        import verifier.verify   # noqa: F401
        from verifier.io.onnx import skip_torchvision_import
        skip_torchvision_import()
        import onnx2torch  # noqa: F401  (0.8-1.2 s: paid here once, not by the first instance)
        torch.set_num_threads(self.threads)

    def model(self, path: str, device: str, dtype):
        """The BoundedModel of an ONNX file, converted at most once per worker while it is kept."""
        from verifier import BoundedModel
        from verifier.io.cache import file_digest
        key = (file_digest(path), device, str(dtype))
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        model = BoundedModel(path, device=device, dtype=dtype, cache_dir=self.cache_dir)
        self.models[key] = model
        while len(self.models) > self.max_models:
            self.models.popitem(last=False)
        return model


def warm_verify(task: InstanceTask) -> TaskResult:
    """Verify ``task`` in this worker's process (the plugin must be registered)."""
    start = time.perf_counter()
    address = announce_start(task)
    from distributed import get_worker
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None:   # a worker that joined without the plugin: set one up for it
        plugin = WarmVerifier()
        plugin.setup()
    try:
        text, code = verify_in_process(task, plugin, start)
    except Exception as exc:   # a bug of ours or memory exhausted: an error row, and a fresh worker
        print(f"certiprune verify: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return TaskResult("error", time.perf_counter() - start, 1, "error\n", "warm", address, restart=True)
    result = text.split("\n", 1)[0].strip() or "error"
    return TaskResult(result, time.perf_counter() - start, code, text, "warm", address)


def verify_in_process(task: InstanceTask, plugin: WarmVerifier, start: float) -> tuple[str, int]:
    """``certiprune verify`` without a new process: the same flags and configuration, the result
    file's text and the command's exit code; a user error is ``error`` with its exit code."""
    import dataclasses

    import torch
    from verifier import cli
    from verifier.errors import VerifierError
    from verifier.io.vnnlib import load_vnnlib
    from verifier.verify import format_result, verify
    argv = ["verify", task.onnx_path, task.vnnlib_path, "--timeout", f"{task.timeout:g}", "--quiet",
            *task.verify_args]
    parser = cli.build_parser("verify")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # a bad flag: argparse has printed why
        return "error\n", int(exc.code or 2)
    args.given = cli._given_dests(parser.commands["verify"], argv[1:])
    try:
        config = cli.verify_config(args)
        threads = args.threads if args.threads > 0 else plugin.threads
        torch.set_num_threads(threads)
        cli.check_device(args.device)
        model = plugin.model(args.model, args.device, cli._dtype(args.dtype))
        graph = model.graph()
        prop = load_vnnlib(args.spec, n_inputs=graph.nodes[0].numel, n_outputs=graph.nodes[graph.output].numel)
        remaining = max(0.0, config.timeout - (time.perf_counter() - start))
        config = dataclasses.replace(config, timeout=remaining)
        began = time.perf_counter()
        result = verify(model, prop, config)
        if result.status in ("sat", "unsat") and time.perf_counter() - began > remaining + LATE:
            return "timeout\n", 0   # the command's safety net would have cut this search
        return format_result(result), 0
    except VerifierError as exc:
        print(f"certiprune verify: error: {exc}", file=sys.stderr)
        return "error\n", exc.exit_code


def isolated_verify(task: InstanceTask) -> TaskResult:
    """One fresh ``certiprune verify`` process on the worker (``--isolate``), as the sequential
    runner does: wall seconds include the process's start-up; killed at timeout + grace."""
    from benchmarks.bench import run_instance
    from benchmarks.instances import Instance
    start = time.perf_counter()
    address = announce_start(task)
    inst = Instance(*task.key, task.timeout, task.onnx_path, task.vnnlib_path)
    out = run_instance(inst, task.timeout, task.grace, list(task.verify_args))
    return TaskResult(out.result, time.perf_counter() - start if out.result == "killed" else out.seconds,
                      out.exit_code, out.text, "isolated", address)


def worker_environment(threads: int) -> dict[str, str]:
    """Environment of a worker process: its thread count for OpenMP / MKL before torch loads, and
    Dask's log at errors only."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "DASK_LOGGING__DISTRIBUTED": "error"}

