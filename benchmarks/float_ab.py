"""Float mode fast against sound on a suite, in one process (issue 26): each instance's model and
property are loaded once and ``verify`` runs in both modes back to back (the order alternating
from one instance to the next), so start-up and the machine's drift do not enter the comparison.

    python -m benchmarks.float_ab benchmarks/quick_suite.csv --root ../shared/benchmarks/vnncomp2021 \\
        --out runs/float_ab.csv [--timeout 30] [--threads 1]

Rows (appended; instances already in --out are skipped, so a run resumes): onnx, vnnlib, mode,
result, seconds. At the end: verdicts per mode, instances whose verdict differs, total seconds.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from benchmarks.instances import read_instances
from verifier import BoundedModel
from verifier.io.vnnlib import load_vnnlib
from verifier.verify import VerifyConfig, verify


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("instances")
    p.add_argument("--root")
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, help="seconds per verify call (default: the CSV's)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["onnx"], r["vnnlib"], r["mode"]) for r in csv.DictReader(f)}
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["onnx", "vnnlib", "mode", "result", "seconds"])
        for k, inst in enumerate(read_instances(args.instances, args.root)):
            model = BoundedModel(inst.onnx_path)
            prop = load_vnnlib(inst.vnnlib_path)
            modes = ("fast", "sound") if k % 2 == 0 else ("sound", "fast")
            for mode in modes:
                if (inst.onnx, inst.vnnlib, mode) in done:
                    continue
                config = VerifyConfig(timeout=args.timeout or inst.timeout, float_mode=mode)
                result = verify(model, prop, config)
                writer.writerow([inst.onnx, inst.vnnlib, mode, result.status, f"{result.seconds:.3f}"])
                f.flush()
                print(f"{os.path.basename(inst.onnx)} {os.path.basename(inst.vnnlib)} {mode}: {result.status} "
                      f"{result.seconds:.2f}s", file=sys.stderr, flush=True)
    summarise(args.out)


def summarise(path: str) -> None:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    by = {}
    for r in rows:
        by.setdefault((r["onnx"], r["vnnlib"]), {})[r["mode"]] = r
    for mode in ("fast", "sound"):
        got = [v[mode] for v in by.values() if mode in v]
        counts = {s: sum(r["result"] == s for r in got) for s in ("sat", "unsat", "timeout", "unknown")}
        print(f"{mode}: {counts}, total {sum(float(r['seconds']) for r in got):.1f} s")
    for key, v in by.items():
        if len(v) == 2 and v["fast"]["result"] != v["sound"]["result"]:
            print(f"differs: {os.path.basename(key[0])} {os.path.basename(key[1])}: fast {v['fast']['result']} "
                  f"{v['fast']['seconds']} s, sound {v['sound']['result']} {v['sound']['seconds']} s")


if __name__ == "__main__":
    main()
