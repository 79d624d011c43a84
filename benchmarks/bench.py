"""Run a VNN-COMP suite the way the competition does: one fresh ``certiprune verify`` process per
instance, wall time measured around the process (start-up included).

    certiprune bench ../shared/benchmarks/vnncomp2021/acasxu/acasxu_instances.csv \\
        --out runs/bench/acasxu.csv --reference ../shared/benchmarks/vnncomp2021/REFERENCE.csv
    certiprune bench benchmarks/quick_suite.csv --root ../shared/benchmarks/vnncomp2021 ...
    certiprune bench --summary --out runs/bench/acasxu.csv --reference .../REFERENCE.csv

    certiprune bench benchmarks/quick_suite.csv --root ... --workers 2      # warm Dask workers
    certiprune bench --summary --out runs/a.csv --compare runs/b.csv --reference .../REFERENCE.csv

Each finished instance appends one row to ``--out`` (benchmark, onnx, vnnlib, result, seconds,
then timeout, exit code, the git commit of the verifier, the finishing time, the mode that
produced it and the worker); instances already in that file are skipped, so an interrupted run
resumes where it stopped. Every result file (the verdict, with the counterexample of a ``sat``)
is kept next to the CSV, in ``<out>.results/<benchmark>/``. ``--workers N`` / ``--scheduler
ADDR`` run the instances on Dask workers (``benchmarks.cluster``); ``--shard I/N`` keeps every
N-th instance from the I-th (0-based), for a suite split by hand (SLURM job arrays).

At the end (or with ``--summary`` alone) the rows of the selected instances are summarised:
solved sat/unsat, timeouts, total and median wall seconds; with ``--reference`` (REFERENCE.csv:
benchmark, onnx, vnnlib, answer, ...) also correct / wrong / unsolved and the VNN-COMP score of
the current rules (+10 per correct answer, -150 per wrong one; no time bonus). ``--compare
OTHER.csv`` adds the side-by-side table of two result files (``compare``). A verdict
that contradicts the reference is a soundness bug until shown otherwise: it is printed loudly,
and the exit status is 3.

Verdicts given after the instance's timeout count as unsolved in the score (as in VNN-COMP), but
a late wrong verdict is still listed as wrong.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from benchmarks.instances import Instance, read_instances, read_reference

FIELDS = ["benchmark", "onnx", "vnnlib", "result", "seconds", "timeout", "exit_code", "commit", "finished_at",
          "mode", "worker"]
VERDICTS = ("sat", "unsat")
EXIT_WRONG = 3
SCORE_CORRECT, SCORE_WRONG = 10, -150   # VNN-COMP's current rules, time bonuses left out


# ---- running ------------------------------------------------------------------------------
def verifier_command() -> list[str]:
    """``certiprune`` next to this interpreter, else ``python -m verifier.cli``."""
    script = Path(sys.executable).with_name("certiprune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "verifier.cli"]


def source_version() -> str:
    """Short commit of the verifier's source tree, ``+dirty`` if it has uncommitted changes
    (read without taking git's index lock, so concurrent commits are not disturbed)."""
    here = Path(__file__).resolve().parent.parent
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, env=env, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "verifier"],
                               cwd=here, env=env, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


@dataclass
class Outcome:
    result: str          # sat | unsat | timeout | unknown | error | killed
    seconds: float
    exit_code: int
    text: str = ""       # the result file's text (for sat: with the counterexample)
    mode: str = "isolated"   # isolated: one fresh process; warm: in a Dask worker's process
    worker: str = ""


def run_instance(inst: Instance, timeout: float, grace: float, extra: list[str]) -> Outcome:
    """One fresh verifier process; wall seconds include interpreter start-up and model loading.
    The process gets ``timeout`` and is killed at ``timeout + grace``."""
    with tempfile.TemporaryDirectory(prefix="certiprune-bench-") as tmp:
        result_file = os.path.join(tmp, "result.txt")
        cmd = verifier_command() + ["verify", inst.onnx_path, inst.vnnlib_path, "--timeout", f"{timeout:g}",
                                    "--result-file", result_file, "--quiet"] + extra
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout + grace)
        except subprocess.TimeoutExpired:
            return Outcome("killed", time.perf_counter() - start, -9)
        seconds = time.perf_counter() - start
        try:
            with open(result_file) as f:
                text = f.read()
        except OSError:
            text = ""
        result = text.split("\n", 1)[0].strip().lower() or "error"
        if proc.returncode != 0 and result in VERDICTS:
            result = "error"   # a verdict from a process that then failed is not trusted
        if result == "error" and proc.stderr:
            tail = proc.stderr.strip().splitlines()[-1]
            print(f"\n{inst.benchmark} {inst.onnx} {inst.vnnlib}: exit {proc.returncode}: {tail}", file=sys.stderr)
        return Outcome(result, seconds, proc.returncode, text)


def result_file_path(out_csv: str, inst: Instance) -> Path:
    """Where the result file of ``inst`` is kept: ``<out>.results/<benchmark>/<onnx>__<vnnlib>.txt``,
    the two paths relative to the suite without their extensions, ``/`` written as ``-``."""
    def flat(rel: str) -> str:
        name = rel[:-3] if rel.endswith(".gz") else rel
        return os.path.splitext(name)[0].replace("/", "-")
    base = out_csv[:-4] if out_csv.endswith(".csv") else out_csv
    return Path(base + ".results") / inst.benchmark / f"{flat(inst.onnx)}__{flat(inst.vnnlib)}.txt"


def keep_result_file(path: Path, out: Outcome) -> None:
    """Writes the kept result file (temporary file + rename): the verifier's text when its first
    line is the row's verdict, else the row's result alone (a killed or failed run)."""
    first = out.text.split("\n", 1)[0].strip().lower()
    text = out.text if first == out.result and out.text.endswith("\n") else out.result + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_results(path: str) -> dict[tuple[str, str, str], dict]:
    """Rows of a results CSV keyed by (benchmark, onnx, vnnlib); the last row of a key wins."""
    rows = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows[(row["benchmark"], row["onnx"], row["vnnlib"])] = row
    return rows


class ResultWriter:
    """Appends rows to the results CSV, header first if the file is new; thread-safe. A file
    written before the ``mode`` and ``worker`` columns existed is rewritten once with them (its
    rows came from one process per instance: mode ``isolated``). ``record`` writes one instance's
    row and kept result file, at most once per instance of this run and never for an instance
    already in the file."""

    def __init__(self, path: str):
        self.path, self.lock = path, threading.Lock()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(FIELDS)
        else:
            self._upgrade()
        self.written = set(read_results(path))

    def _upgrade(self) -> None:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == FIELDS:
                return
            rows = list(reader)
        fd, tmp = tempfile.mkstemp(dir=Path(self.path).parent, suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({"mode": "isolated", "worker": "", **{k: v for k, v in row.items() if v is not None}})
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with self.lock, open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
            f.flush()

    def record(self, inst: Instance, timeout: float, out: Outcome, version: str) -> bool:
        """The row and result file of a finished instance; False (nothing written) if it has one."""
        with self.lock:
            if inst.key in self.written:
                return False
            self.written.add(inst.key)
        keep_result_file(result_file_path(self.path, inst), out)
        self.append({"benchmark": inst.benchmark, "onnx": inst.onnx, "vnnlib": inst.vnnlib, "result": out.result,
                     "seconds": f"{out.seconds:.3f}", "timeout": f"{timeout:g}", "exit_code": out.exit_code,
                     "commit": version, "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "mode": out.mode, "worker": out.worker})
        return True


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``I/N`` -> (I, N) with 0 <= I < N; None stays None."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N (two integers), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def select(instances: list[Instance], every: int, limit: Optional[int],
           shard: Optional[tuple[int, int]] = None) -> list[Instance]:
    """Every ``every``-th instance, then shard I of N (every N-th from the I-th), then the first ``limit``."""
    chosen = instances[::max(1, every)]
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    return chosen[:limit] if limit is not None else chosen


def verify_arguments(args) -> list[str]:
    """The extra ``certiprune verify`` flags of a bench run."""
    extra = shlex.split(args.verify_args or "")
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if getattr(args, "device", None) and args.device != "cpu":
        extra += ["--device", args.device]
    return extra


class Progress:
    """The progress bar and the running counts; a wrong verdict is printed loudly at once."""

    def __init__(self, total: int, reference: dict):
        from tqdm import tqdm
        self.reference = reference
        self.counts = {"sat": 0, "unsat": 0, "other": 0, "WRONG": 0}
        self.bar = tqdm(total=total, unit="inst", dynamic_ncols=True, file=sys.stderr)

    def done(self, inst: Instance, out: Outcome) -> None:
        self.counts[out.result if out.result in VERDICTS else "other"] += 1
        expected = self.reference.get(inst.key)
        if out.result in VERDICTS and expected in VERDICTS and out.result != expected:
            self.counts["WRONG"] += 1
            self.bar.write(loud_disagreement(inst.key, out.result, expected, out.seconds))
        self.bar.set_postfix_str(f"{inst.benchmark} {Path(inst.vnnlib).name}: {out.result} {out.seconds:.1f}s | "
                                 + " ".join(f"{k}={v}" for k, v in self.counts.items()))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_all(pending: list[Instance], args, writer: ResultWriter, reference: dict) -> None:
    """One fresh process per instance, ``--jobs`` at a time, on this machine."""
    extra = verify_arguments(args)
    progress = Progress(len(pending), reference)

    def one(inst: Instance):
        timeout = inst.timeout * args.timeout_scale
        version = source_version()   # at the instance's start: the source may change during a long run
        return inst, timeout, version, run_instance(inst, timeout, args.grace, extra)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(one, inst) for inst in pending]
        for future in as_completed(futures):
            inst, timeout, version, out = future.result()
            if writer.record(inst, timeout, out, version):
                progress.done(inst, out)
    progress.close()


def loud_disagreement(key, result: str, expected: str, seconds: float) -> str:
    line = "!" * 100
    return (f"{line}\n!!! WRONG ANSWER (soundness bug until shown otherwise): {' '.join(key)}\n"
            f"!!! verifier said {result} after {seconds:.1f} s; reference answer is {expected}\n{line}")


# ---- summary ------------------------------------------------------------------------------
def summarise(instances: list[Instance], rows: dict, reference: Optional[dict]) -> tuple[str, int]:
    """Text of the per-benchmark summary and the number of wrong verdicts."""
    lines, wrong_total = [], 0
    benchmarks = list(dict.fromkeys(inst.benchmark for inst in instances))
    header = (f"{'benchmark':<10} {'done':>5} {'sat':>4} {'unsat':>5} {'timeout':>7} {'other':>5} "
              f"{'total s':>8} {'median s':>8} {'med solved':>10}")
    if reference is not None:
        header += f" {'correct':>7} {'wrong':>5} {'unsolved':>8} {'score':>6}"
    lines.append(header)
    disagreements = []
    for bench in benchmarks + (["all"] if len(benchmarks) > 1 else []):
        insts = [i for i in instances if bench == "all" or i.benchmark == bench]
        done = [(i, rows[i.key]) for i in insts if i.key in rows]
        results = [r["result"] for _, r in done]
        seconds = [float(r["seconds"]) for _, r in done]
        solved = [float(r["seconds"]) for _, r in done if r["result"] in VERDICTS
                  and float(r["seconds"]) <= float(r["timeout"])]
        n_sat, n_unsat = results.count("sat"), results.count("unsat")
        n_timeout = sum(r in ("timeout", "killed") for r in results)
        line = (f"{bench:<10} {len(done):>3}/{len(insts):<3} {n_sat:>3} {n_unsat:>5} {n_timeout:>7} "
                f"{len(results) - n_sat - n_unsat - n_timeout:>5} {sum(seconds):>8.1f} "
                f"{statistics.median(seconds) if seconds else float('nan'):>8.2f} "
                f"{statistics.median(solved) if solved else float('nan'):>10.2f}")
        if reference is not None:
            correct = wrong = 0
            for inst, row in done:
                expected, result = reference.get(inst.key, "unknown"), row["result"]
                in_time = float(row["seconds"]) <= float(row["timeout"])
                if result in VERDICTS and expected in VERDICTS and result != expected:
                    wrong += 1
                    if bench != "all":
                        disagreements.append(loud_disagreement(inst.key, result, expected, float(row["seconds"])))
                elif result in VERDICTS and in_time:
                    correct += 1   # agrees with the reference, or decides one nobody decided in 2021
            if bench != "all":
                wrong_total += wrong
            line += (f" {correct:>7} {wrong:>5} {len(insts) - correct - wrong:>8} "
                     f"{SCORE_CORRECT * correct + SCORE_WRONG * wrong:>6}")
        lines.append(line)
    if reference is not None:
        missing = [i for i in instances if i.key not in reference]
        if missing:
            lines.append(f"({len(missing)} instance(s) have no reference answer, e.g. {' '.join(missing[0].key)})")
    lines.extend(disagreements)
    return "\n".join(lines), wrong_total


def _solved(row: Optional[dict]) -> bool:
    return row is not None and row["result"] in VERDICTS and float(row["seconds"]) <= float(row["timeout"])


def compare(instances: list[Instance], rows: dict, other: dict, names: tuple[str, str],
            reference: Optional[dict]) -> str:
    """Side-by-side table of two result files over ``instances``: per benchmark, instances run by
    both, solved (in time) by each, wrong by each (against ``reference``; without one, the
    instances where the two give opposite verdicts), solved by both, and the geometric mean of
    the time ratio first / second over the instances both solved (below 1: the first is faster)."""
    a, b = names
    lines = [f"{'benchmark':<10} {'both run':>8} {'solved ' + a:>14} {'solved ' + b:>14} {'wrong ' + a:>12} "
             f"{'wrong ' + b:>12} {'both solved':>11} {'geomean t(' + a + ')/t(' + b + ')':>24}"]
    benchmarks = list(dict.fromkeys(inst.benchmark for inst in instances))
    for bench in benchmarks + (["all"] if len(benchmarks) > 1 else []):
        keys = [i.key for i in instances if (bench == "all" or i.benchmark == bench) and i.key in rows and i.key in other]

        def wrong(mine: dict, theirs: dict) -> int:
            if reference is not None:
                return sum(mine[k]["result"] in VERDICTS and reference.get(k) in VERDICTS
                           and mine[k]["result"] != reference[k] for k in keys)
            return sum({mine[k]["result"], theirs[k]["result"]} == set(VERDICTS) for k in keys)

        both = [k for k in keys if _solved(rows[k]) and _solved(other[k])]
        ratios = [math.log(max(float(rows[k]["seconds"]), 1e-6) / max(float(other[k]["seconds"]), 1e-6)) for k in both]
        geomean = f"{math.exp(sum(ratios) / len(ratios)):.3f}" if ratios else "-"
        lines.append(f"{bench:<10} {len(keys):>8} {sum(_solved(rows[k]) for k in keys):>14} "
                     f"{sum(_solved(other[k]) for k in keys):>14} {wrong(rows, other):>12} {wrong(other, rows):>12} "
                     f"{len(both):>11} {geomean:>24}")
    if reference is None:
        lines.append("(no --reference: 'wrong' counts the instances where the two files give opposite verdicts)")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("instances", nargs="?", help="instances CSV (onnx,vnnlib,timeout); default with --summary: "
                                                "every instance in --out")
    p.add_argument("--root", help="folder the instance paths are relative to (default: the CSV's folder; "
                                  "for benchmarks/quick_suite.csv: the folder holding acasxu/, mnistfc/, test/)")
    p.add_argument("--out", default="runs/bench/results.csv", help="results CSV, appended to; finished instances "
                                                                   "are skipped (default runs/bench/results.csv)")
    p.add_argument("--reference", help="REFERENCE.csv with agreed answers (benchmark,onnx,vnnlib,answer,...)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every timeout (default 1)")
    p.add_argument("--grace", type=float, default=10.0, help="kill a process (or restart a warm worker) this "
                                                             "many seconds after its timeout (default 10)")
    p.add_argument("--limit", type=int, help="run at most N instances (after --every)")
    p.add_argument("--every", type=int, default=1, help="take every K-th instance (default 1: all)")
    p.add_argument("--jobs", type=int, default=1, help="instances run at once (default 1; >1 skews timings)")
    p.add_argument("--threads", type=int, default=0, help="pass --threads N to verify (default: verify's, the idle cores)")
    p.add_argument("--verify-args", help="extra arguments for `certiprune verify`, e.g. \"--input-split on\"")
    p.add_argument("--summary", action="store_true", help="only summarise --out, run nothing")
    p.add_argument("--compare", metavar="OTHER_CSV", help="also print the side-by-side table of --out and this "
                                                          "results CSV (solved, wrong, time ratio)")
    p.add_argument("--shard", metavar="I/N", help="run shard I of N (0-based): every N-th selected instance from "
                                                  "the I-th, e.g. a SLURM job array's task")
    p.add_argument("--workers", type=int, default=0, help="run on a local Dask cluster of N worker processes "
                                                          "(default 0: no Dask)")
    p.add_argument("--scheduler", metavar="ADDR", help="run on an existing Dask cluster, e.g. tcp://host:8786 "
                                                       "or a scheduler file (JSON)")
    p.add_argument("--isolate", action="store_true", help="with Dask: one fresh verifier process per instance "
                                                          "(VNN-COMP's timing) instead of warm workers")
    p.add_argument("--device", default="cpu", help="torch device passed to verify; with Dask and cuda, one "
                                                   "instance per GPU worker (resource GPU=1)")
    p.add_argument("--scripts", choices=("cold", "warm"), help="run each instance as VNN-COMP does: "
                   "prepare_instance.sh untimed, then run_instance.sh timed (warm: prepare starts a warm worker "
                   "that run_instance.sh hands the instance to)")


def add_parser(subparsers) -> None:
    """Entry point ``certiprune.commands: bench = benchmarks.bench:add_parser``."""
    p = subparsers.add_parser("bench", help="run a VNN-COMP instances CSV (one process per instance, or on Dask "
                                           "workers) and score it")
    configure(p)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    reference = read_reference(args.reference) if args.reference else None
    try:
        shard = parse_shard(args.shard)
    except ValueError as exc:
        print(f"certiprune bench: error: {exc}", file=sys.stderr)
        return 2
    if args.scripts and (args.workers or args.scheduler):
        print("certiprune bench: error: --scripts runs one instance at a time on this machine; "
              "it does not combine with --workers / --scheduler", file=sys.stderr)
        return 2
    if args.instances:
        instances = select(read_instances(args.instances, args.root), args.every, args.limit, shard)
    elif args.summary:
        instances = [Instance(*key, float(row["timeout"] or "nan"), "", "")
                     for key, row in read_results(args.out).items()]
    else:
        print("certiprune bench: error: an instances CSV is needed unless --summary is given", file=sys.stderr)
        return 2
    if not args.summary:
        missing = [i for i in instances if not (os.path.exists(i.onnx_path) and os.path.exists(i.vnnlib_path))]
        if missing:
            print(f"certiprune bench: error: {len(missing)} instance file(s) missing, e.g. {missing[0].onnx_path} "
                  f"or {missing[0].vnnlib_path} (is --root right?)", file=sys.stderr)
            return 2
        done = read_results(args.out)
        pending = [i for i in instances if i.key not in done]
        where = (f"Dask scheduler {args.scheduler}" if args.scheduler else f"{args.workers} Dask worker(s)"
                 if args.workers else f"VNN-COMP scripts, {args.scripts}" if args.scripts else f"{args.jobs} at a time")
        print(f"{len(instances)} instances selected, {len(instances) - len(pending)} already in {args.out}, "
              f"{len(pending)} to run; verifier {source_version()}, {os.cpu_count()} CPUs, {where}", file=sys.stderr)
        writer = ResultWriter(args.out)
        try:
            if args.workers or args.scheduler:
                from benchmarks.cluster.runner import run_on_dask
                run_on_dask(pending, args, writer, reference or {})
            elif args.scripts:
                from benchmarks.cluster.scripts import run_all_with_scripts
                run_all_with_scripts(pending, args, writer, reference or {})
            else:
                run_all(pending, args, writer, reference or {})
        except KeyboardInterrupt:
            print("\ninterrupted; finished instances are in " + args.out, file=sys.stderr)
            return 130
    rows = read_results(args.out)
    text, wrong = summarise(instances, rows, reference)
    print(text)
    if args.compare:
        print(f"\nA = {args.out}, B = {args.compare}")
        print(compare(instances, rows, read_results(args.compare), ("A", "B"), reference))
    return EXIT_WRONG if wrong else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    configure(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
