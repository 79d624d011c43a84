"""The client side of ``certiprune bench --workers N | --scheduler ADDR``.

One Dask task per instance. Rows go to the results CSV as tasks finish (``ResultWriter.record``:
at most one row per instance, and none for an instance already in the file, so an interrupted
run resumes as the sequential runner does). The client watches every started task (the
``certiprune-start`` events of ``worker``): a task still running ``grace`` seconds past its
instance's timeout gets a ``killed`` row, is cancelled, and its worker is restarted by its nanny;
so is a worker whose task ended in an internal error (out of memory, say: an ``error`` row).
A worker that dies (crash, out of memory, SIGKILL) loses its task to the scheduler, which runs it
again on another worker; an instance whose workers die ``allowed-failures + 1`` times gets an
``error`` row (exit code -9). Where this runs the scheduler (``--workers``), tasks are not queued
on busy workers (worker-saturation 1.0), so a restart takes no innocent task with it.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from typing import Callable, Optional

from benchmarks.bench import Outcome, Progress, ResultWriter, source_version, verify_arguments
from benchmarks.cluster.worker import (START_TOPIC, InstanceTask, TaskResult, WarmVerifier, isolated_verify,
                                       warm_verify, worker_environment)
from benchmarks.instances import Instance

# Scheduler settings of the embedded cluster (an external scheduler keeps its own: README).
LOCAL_SCHEDULER_CONFIG = {
    "distributed.scheduler.allowed-failures": 2,     # an instance that kills 3 workers gets an error row
    "distributed.scheduler.worker-saturation": 1.0,  # one task per worker thread, none queued behind it
}
ISOLATED_MARGIN = 5.0   # an isolated task kills its own process at timeout + grace; the restart is the backstop


def worker_threads(args, workers: int) -> int:
    """torch threads per worker: ``--threads``, else the machine's cores shared among the workers."""
    return args.threads if args.threads else max(1, (os.cpu_count() or 1) // max(1, workers))


def gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    import torch
    return torch.cuda.device_count()


def worker_specs(workers: int, threads: int, device: str, gpus: int = 0) -> dict:
    """SpecCluster worker specs: nanny-managed processes of one task thread each on 127.0.0.1,
    ``threads`` OpenMP threads, an equal share of the memory; with a CUDA device, worker i sees
    GPU i (mod ``gpus``) alone and offers resource GPU=1."""
    from distributed import Nanny
    from distributed.system import MEMORY_LIMIT
    specs = {}
    for i in range(workers):
        env = worker_environment(threads)
        options = {"nthreads": 1, "env": env, "memory_limit": MEMORY_LIMIT // workers, "host": "127.0.0.1",
                   "dashboard": False, "silence_logs": logging.ERROR}
        if device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            options["resources"] = {"GPU": 1}
        specs[f"certiprune-{i}"] = {"cls": Nanny, "options": options}
    return specs


def task_resources(device: str) -> Optional[dict]:
    """What one instance asks of a worker: a whole GPU on a CUDA device, nothing on the CPU."""
    return {"GPU": 1} if device.startswith("cuda") else None


def start_local_cluster(workers: int, threads: int, device: str):
    """A scheduler on 127.0.0.1 (random port, no dashboard) and the workers of ``worker_specs``."""
    from distributed import Scheduler, SpecCluster
    gpus = gpu_count() if device.startswith("cuda") else 0
    if device.startswith("cuda") and gpus == 0:
        raise RuntimeError("--device cuda with --workers: no CUDA device is visible")
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard_address": None}}
    return SpecCluster(workers=worker_specs(workers, threads, device, gpus), scheduler=scheduler,
                       silence_logs=logging.ERROR, name="certiprune")


def connect(address: str):
    """A client of an existing scheduler: ``tcp://HOST:PORT`` or a scheduler file (``*.json``)."""
    from distributed import Client
    if address.endswith(".json"):
        return Client(scheduler_file=address, timeout=30)
    return Client(address, timeout=30)


def run_on_dask(pending: list[Instance], args, writer: ResultWriter, reference: dict) -> None:
    """Run ``pending`` on Dask: ``args.scheduler`` or a local cluster of ``args.workers``."""
    import dask
    from distributed import Client
    threads = worker_threads(args, args.workers or 1)
    cluster = client = None
    try:
        if args.scheduler:
            client = connect(args.scheduler)
        else:
            with dask.config.set(LOCAL_SCHEDULER_CONFIG):
                cluster = start_local_cluster(args.workers, threads, args.device)
            client = Client(cluster)
        Tasks(client, args, threads).run(pending, writer, Progress(len(pending), reference))
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


class Tasks:
    """Submits one task per instance and turns every ending (result, death, overrun) into one row."""

    def __init__(self, client, args, threads: int, function: Optional[Callable[[InstanceTask], TaskResult]] = None):
        """``function`` runs one instance on a worker (default: ``warm_verify``, or
        ``isolated_verify`` with ``args.isolate``); it must call ``worker.announce_start``."""
        self.client, self.args = client, args
        self.grace = args.grace + (ISOLATED_MARGIN if args.isolate else 0.0)
        self.starts: dict[tuple, tuple[float, str]] = {}   # instance key -> (monotonic start, worker)
        self.lock = threading.Lock()
        self.function = function or (isolated_verify if args.isolate else warm_verify)
        self.resources = task_resources(args.device)
        if not args.isolate:
            client.register_plugin(WarmVerifier(threads, cache_dir=os.environ.get("CERTIPRUNE_CACHE_DIR")),
                                   name=WarmVerifier.name)

    def _on_start(self, event) -> None:
        _, message = event
        with self.lock:
            self.starts[tuple(message["key"])] = (time.monotonic(), message["worker"])

    def run(self, pending: list[Instance], writer: ResultWriter, progress: Progress) -> None:
        extra = tuple(verify_arguments(self.args))
        run_id = uuid.uuid4().hex[:8]
        self.client.subscribe_topic(START_TOPIC, self._on_start)
        futures = {}
        for n, inst in enumerate(pending):
            timeout = inst.timeout * self.args.timeout_scale
            task = InstanceTask(inst.key, inst.onnx_path, inst.vnnlib_path, timeout, self.args.grace, extra)
            future = self.client.submit(self.function, task, key=f"certiprune-{run_id}-{n}", pure=False,
                                        resources=self.resources)
            futures[future] = (inst, timeout)
        version = source_version()
        try:
            while futures:
                for future in list(futures):
                    inst, timeout = futures[future]
                    out = self._ending(future, inst, timeout)
                    if out is None:
                        continue
                    del futures[future]
                    if writer.record(inst, timeout, out, version):
                        progress.done(inst, out)
                if futures:
                    time.sleep(0.2)
        finally:
            progress.close()
            self.client.unsubscribe_topic(START_TOPIC)
            if futures:
                self.client.cancel(list(futures))

    def _ending(self, future, inst: Instance, timeout: float) -> Optional[Outcome]:
        """The outcome of a task that has ended or overrun; None while it runs within its time."""
        with self.lock:
            started, worker = self.starts.get(inst.key, (None, ""))
        mode = "isolated" if self.args.isolate else "warm"
        if future.status == "finished":
            result: TaskResult = future.result()
            future.release()
            if result.restart:
                threading.Thread(target=self._restart, args=(result.worker,), daemon=True).start()
            return Outcome(result.result, result.seconds, result.exit_code, result.text, result.mode, result.worker)
        if future.status in ("error", "cancelled"):
            exc = future.exception() if future.status == "error" else None
            seconds = time.monotonic() - started if started is not None else 0.0
            from distributed import KilledWorker
            code = -9 if isinstance(exc, KilledWorker) else 1
            print(f"\n{' '.join(inst.key)}: task failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return Outcome("error", seconds, code, "", mode, worker)
        if started is not None and time.monotonic() - started > timeout + self.grace:
            self.client.cancel(future)
            threading.Thread(target=self._restart, args=(worker,), daemon=True).start()
            return Outcome("killed", time.monotonic() - started, -9, "", mode, worker)
        return None

    def _restart(self, worker: str) -> None:
        """The nanny restarts the worker process (the hung task's thread dies with it)."""
        try:
            self.client.restart_workers([worker], timeout=120, raise_for_error=False)
        except Exception:   # the worker may be gone already; the scheduler copes
            pass
