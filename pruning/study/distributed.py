"""A study's stages as Dask tasks: ``certiprune study CONFIG.toml --workers N | --scheduler ADDR``.

Every stage of ``Study.stages()`` (train, prune, measure, export, verify, reverify) becomes one
task that depends on the tasks of its ``needs``; a task builds the study from its configuration
and runs that one stage (``Study.run_stage``) in the worker's process. The stage files stay the
resume mechanism: a finished stage is not redone, every stage file is written atomically, so a
task that runs again after its worker was lost resumes from what is on disk, and a study whose
client died resumes when it is run again (on Dask or not). The client checks the data and the
configuration first (``Study.prepare``) and writes the tables and plots at the end.

The output folder must be one file system for the client and the workers (one machine, or a
shared disk on a cluster). A stage that raises is reported and counted; its dependants run
anyway and find their input missing (``run_stage`` answers False: cannot be done), as in a
sequential run.
"""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Optional

ALLOWED_FAILURES = 2   # a stage whose worker dies three times is reported as failed


def run_stage_task(config, out: str, data_dir: Optional[str], stage, *needs) -> tuple[str, Optional[bool], str]:
    """On a worker: (stage name, what ``run_stage`` answered, error text or "")."""
    import torch

    from pruning.study.pipeline import Study
    torch.set_num_threads(config.threads)
    cap_memory(config.verify.memory_limit_gb)
    study = Study(config, Path(out), data_dir=data_dir, log_stream=sys.stderr)
    try:
        return stage.name, study.run_stage(stage), ""
    except Exception as exc:   # one line, as the sequential run would print it; dependants still run
        return stage.name, False, f"{type(exc).__name__}: {exc}"


def cap_memory(limit_gb: Optional[float]) -> None:
    """The worker process's address space capped at ``verify.memory_limit_gb``, as ``Study.prepare``
    caps a sequential run's process (an allocation that does not fit fails, not the machine)."""
    if limit_gb is None:
        return
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(limit_gb * 2 ** 30)
    if soft == resource.RLIM_INFINITY or cap < soft:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def local_client(workers: int, threads: int):
    """A client of an embedded cluster: a scheduler on 127.0.0.1 and ``workers`` nanny-managed
    processes of one task thread each (``threads`` OpenMP threads)."""
    import logging

    import dask
    from distributed import Client, LocalCluster
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=logging.ERROR,
                               env={"OMP_NUM_THREADS": str(threads), "DASK_LOGGING__DISTRIBUTED": "error"})
    return Client(cluster)


def connect(address: str):
    from distributed import Client
    return Client(scheduler_file=address, timeout=30) if address.endswith(".json") else Client(address, timeout=30)


def run_with_dask(study, workers: int = 0, scheduler: Optional[str] = None) -> list[dict]:
    """``run_on_dask`` on the cluster at ``scheduler`` (``tcp://HOST:PORT`` or a scheduler file),
    else on an embedded one of ``workers`` processes, closed at the end."""
    client = connect(scheduler) if scheduler else local_client(workers, study.config.threads)
    try:
        return run_on_dask(study, client)
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()


def run_on_dask(study, client) -> list[dict]:
    """Run (or resume) ``study``'s stages on ``client``'s workers; the rows, as ``Study.run``."""
    from distributed import as_completed

    from pruning.study.report import rows_of, write_outputs
    study.prepare()
    stages = study.stages()
    run_id = uuid.uuid4().hex[:8]
    out = str(study.root.parent)
    futures = {}
    for n, stage in enumerate(stages):
        needs = [futures[name] for name in stage.needs]
        futures[stage.name] = client.submit(run_stage_task, study.config, out, study.data_dir, stage, *needs,
                                            key=f"study-{run_id}-{n}-{stage.kind}", pure=False)
    study.progress.line(f"{len(study.jobs())} evaluated models, {len(stages)} stages on Dask "
                        f"({len(client.scheduler_info(n_workers=-1)['workers'])} workers); output {study.root}")
    start, failed, did = time.monotonic(), [], 0
    for future in as_completed(list(futures.values())):
        try:
            name, answer, error = future.result()
        except Exception as exc:   # the task's workers kept dying (KilledWorker) or it was lost
            name, answer, error = future.key, False, f"{type(exc).__name__}: {exc}"
        did += answer is True
        if error:
            failed.append(f"{name}: {error}")
            study.progress.line(f"stage {name} failed: {error}")
        future.release()
    rows = rows_of(study)
    study.outputs = write_outputs(study, rows, final=True)
    study.progress.line(f"done on Dask in {time.monotonic() - start:.1f} s: {did} stage(s) of work, "
                        f"{len(failed)} failed")
    return rows
