"""Verdicts and times on a suite's instances in one process (the model loaded once per file), for
before / after comparisons of the search engine: run it with PYTHONPATH on each tree.

    PYTHONPATH=/work/main .venv/bin/python -m benchmarks.general_split_ab \
        benchmarks/data/nonlinear/instances.csv --only sigmoid --out before.csv

Rows of the output CSV: onnx, vnnlib, timeout, status, seconds, reason. One thread; the
instance's own timeout unless ``--timeout`` overrides it. Results: Hengine-RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from verifier.api import BoundedModel
from verifier.io.vnnlib import load_vnnlib
from verifier.verify import VerifyConfig, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("instances", help="instances.csv (onnx, vnnlib, timeout), paths relative to it")
    parser.add_argument("--only", default="", help="keep rows whose onnx path contains this")
    parser.add_argument("--skip", default="", help="drop rows whose vnnlib path contains any of these (comma list)")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = os.path.dirname(os.path.abspath(args.instances))
    with open(args.instances) as f:
        rows = [r for r in csv.reader(f) if r and args.only in r[0]]
    skips = [s for s in args.skip.split(",") if s]
    rows = [r for r in rows if not any(s in r[1] for s in skips)]
    models: dict[str, BoundedModel] = {}
    with open(args.out, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["onnx", "vnnlib", "timeout", "status", "seconds", "reason"])
        for onnx, spec, timeout in rows:
            path = os.path.join(root, onnx)
            if path not in models:
                models[path] = BoundedModel(path)
            model = models[path]
            graph = model.graph()
            prop = load_vnnlib(os.path.join(root, spec), graph.nodes[0].numel, graph.nodes[graph.output].numel)
            limit = args.timeout if args.timeout is not None else float(timeout)
            started = time.monotonic()
            result = verify(model, prop, VerifyConfig(timeout=limit))
            seconds = time.monotonic() - started
            reason = result.details.get("reason", "") if result.details else ""
            writer.writerow([onnx, spec, limit, result.status, f"{seconds:.2f}", reason])
            out.flush()
            print(f"{spec}: {result.status} {seconds:.1f} s {reason}", flush=True)


if __name__ == "__main__":
    main()
