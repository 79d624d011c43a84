"""Run a VNN-COMP suite the way the competition does: one fresh ``certiprune verify`` process per
instance, wall time measured around the process (start-up included).

    certiprune bench ../shared/benchmarks/vnncomp2021/acasxu/acasxu_instances.csv \\
        --out runs/bench/acasxu.csv --reference ../shared/benchmarks/vnncomp2021/REFERENCE.csv
    certiprune bench benchmarks/quick_suite.csv --root ../shared/benchmarks/vnncomp2021 ...
    certiprune bench --summary --out runs/bench/acasxu.csv --reference .../REFERENCE.csv

Each finished instance appends one row to ``--out`` (benchmark, onnx, vnnlib, result, seconds,
then timeout, exit code, the git commit of the verifier and the finishing time); instances
already in that file are skipped, so an interrupted run resumes where it stopped. At the end (or
with ``--summary`` alone) the rows of the selected instances are summarised: solved sat/unsat,
timeouts, total and median wall seconds; with ``--reference`` (REFERENCE.csv: benchmark, onnx,
vnnlib, answer, ...) also correct / wrong / unsolved and the VNN-COMP 2021 score (+10 per
correct answer, -100 per wrong one; the time bonuses are left out). A verdict that contradicts
the reference is a soundness bug until shown otherwise: it is printed loudly, and the exit
status is 3.

Verdicts given after the instance's timeout count as unsolved in the score (as in VNN-COMP), but
a late wrong verdict is still listed as wrong.
"""
from __future__ import annotations

import argparse
import csv
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

FIELDS = ["benchmark", "onnx", "vnnlib", "result", "seconds", "timeout", "exit_code", "commit", "finished_at"]
VERDICTS = ("sat", "unsat")
EXIT_WRONG = 3


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
                result = f.readline().strip().lower() or "error"
        except OSError:
            result = "error"
        if proc.returncode != 0 and result in VERDICTS:
            result = "error"   # a verdict from a process that then failed is not trusted
        if result == "error" and proc.stderr:
            tail = proc.stderr.strip().splitlines()[-1]
            print(f"\n{inst.benchmark} {inst.onnx} {inst.vnnlib}: exit {proc.returncode}: {tail}", file=sys.stderr)
        return Outcome(result, seconds, proc.returncode)


def read_results(path: str) -> dict[tuple[str, str, str], dict]:
    """Rows of a results CSV keyed by (benchmark, onnx, vnnlib); the last row of a key wins."""
    rows = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows[(row["benchmark"], row["onnx"], row["vnnlib"])] = row
    return rows


class ResultWriter:
    """Appends rows to the results CSV, header first if the file is new; thread-safe."""

    def __init__(self, path: str):
        self.path, self.lock = path, threading.Lock()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(FIELDS)

    def append(self, row: dict) -> None:
        with self.lock, open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
            f.flush()


def select(instances: list[Instance], every: int, limit: Optional[int]) -> list[Instance]:
    chosen = instances[::max(1, every)]
    return chosen[:limit] if limit is not None else chosen


def run_all(pending: list[Instance], args, writer: ResultWriter, reference: dict) -> None:
    from tqdm import tqdm
    extra = shlex.split(args.verify_args or "")
    if args.threads:
        extra += ["--threads", str(args.threads)]
    counts = {"sat": 0, "unsat": 0, "other": 0, "WRONG": 0}
    bar = tqdm(total=len(pending), unit="inst", dynamic_ncols=True, file=sys.stderr)

    def one(inst: Instance):
        timeout = inst.timeout * args.timeout_scale
        version = source_version()   # at the instance's start: the source may change during a long run
        return inst, timeout, version, run_instance(inst, timeout, args.grace, extra)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(one, inst) for inst in pending]
        for future in as_completed(futures):
            inst, timeout, version, out = future.result()
            writer.append({"benchmark": inst.benchmark, "onnx": inst.onnx, "vnnlib": inst.vnnlib,
                           "result": out.result, "seconds": f"{out.seconds:.3f}", "timeout": f"{timeout:g}",
                           "exit_code": out.exit_code, "commit": version,
                           "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
            counts[out.result if out.result in VERDICTS else "other"] += 1
            expected = reference.get(inst.key)
            if out.result in VERDICTS and expected in VERDICTS and out.result != expected:
                counts["WRONG"] += 1
                bar.write(loud_disagreement(inst.key, out.result, expected, out.seconds))
            bar.set_postfix_str(f"{inst.benchmark} {Path(inst.vnnlib).name}: {out.result} {out.seconds:.1f}s | "
                                + " ".join(f"{k}={v}" for k, v in counts.items()))
            bar.update(1)
    bar.close()


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
            line += f" {correct:>7} {wrong:>5} {len(insts) - correct - wrong:>8} {10 * correct - 100 * wrong:>6}"
        lines.append(line)
    if reference is not None:
        missing = [i for i in instances if i.key not in reference]
        if missing:
            lines.append(f"({len(missing)} instance(s) have no reference answer, e.g. {' '.join(missing[0].key)})")
    lines.extend(disagreements)
    return "\n".join(lines), wrong_total


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
    p.add_argument("--grace", type=float, default=10.0, help="kill a process this many seconds after its "
                                                             "timeout (default 10)")
    p.add_argument("--limit", type=int, help="run at most N instances (after --every)")
    p.add_argument("--every", type=int, default=1, help="take every K-th instance (default 1: all)")
    p.add_argument("--jobs", type=int, default=1, help="instances run at once (default 1; >1 skews timings)")
    p.add_argument("--threads", type=int, default=0, help="pass --threads N to verify (default: verify's, the idle cores)")
    p.add_argument("--verify-args", help="extra arguments for `certiprune verify`, e.g. \"--input-split on\"")
    p.add_argument("--summary", action="store_true", help="only summarise --out, run nothing")


def add_parser(subparsers) -> None:
    """Entry point ``certiprune.commands: bench = benchmarks.bench:add_parser``."""
    p = subparsers.add_parser("bench", help="run a VNN-COMP instances CSV, one process per instance")
    configure(p)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    reference = read_reference(args.reference) if args.reference else None
    if args.instances:
        instances = select(read_instances(args.instances, args.root), args.every, args.limit)
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
        print(f"{len(instances)} instances selected, {len(instances) - len(pending)} already in {args.out}, "
              f"{len(pending)} to run; verifier {source_version()}, {os.cpu_count()} CPUs, {args.jobs} at a time", file=sys.stderr)
        writer = ResultWriter(args.out)
        try:
            run_all(pending, args, writer, reference or {})
        except KeyboardInterrupt:
            print("\ninterrupted; finished instances are in " + args.out, file=sys.stderr)
            return 130
    text, wrong = summarise(instances, read_results(args.out), reference)
    print(text)
    return EXIT_WRONG if wrong else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    configure(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
