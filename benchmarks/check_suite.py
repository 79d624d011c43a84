"""Front-end check of VNN-COMP suites: every model loads, every spec parses and fits its model,
and the converted model agrees with onnxruntime on the original file.

    python -m benchmarks.check_suite ../shared/benchmarks/vnncomp2021/acasxu [MORE_SUITES ...]

For each suite folder, each ``*instances.csv`` in it is read (``onnx,vnnlib,timeout``, paths
relative to the folder; ``.vnnlib.gz`` is read by the parser). Per instance:

1. the model loads into a bound graph (``BoundedModel``; cached per ONNX file);
2. the spec parses with the model's sizes, ``load_vnnlib(path, n_inputs, n_outputs)``;
3. ``--points`` points in the spec's input box (its centre and uniform random points, in at most
   ``--regions`` regions) go through the bound graph's forward pass and through onnxruntime on
   the original ONNX file; the largest absolute output deviation must be within
   ``--tolerance`` · max(1, |y|);
4. bounds contain samples: on the first checked region of each spec, CROWN bounds (intermediate
   passes stop after ``--bound-seconds``; what is left keeps IBP bounds, sound) of the spec's
   rows (or the outputs, at most 64 of them) contain the bound graph's outputs at
   ``--bound-points`` points of the region, up to ``--tolerance``.

One line per failure, a summary per suite; exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from verifier.attack import OnnxChecker


@dataclass
class SuiteReport:
    suite: str
    instances: int = 0
    models: int = 0
    failures: list[str] = field(default_factory=list)
    max_deviation: float = 0.0
    worst_instance: str = ""
    load_seconds: float = 0.0
    parse_seconds: float = 0.0
    bound_seconds: float = 0.0
    bounded: int = 0            # regions whose bounds were checked against samples
    mean_width: float = 0.0     # the largest mean bound width among them


def sample_points(lower: np.ndarray, upper: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The box centre and n - 1 uniform points: (n, n_inputs) float32, inside [lower, upper]."""
    points = lower + (upper - lower) * rng.random((n, lower.size))
    points[0] = (lower + upper) / 2
    return np.clip(points.astype(np.float32), lower.astype(np.float32), upper.astype(np.float32))


def check_instance(model, runtime, vnnlib_path: str, args, rng, report: SuiteReport, label: str) -> None:
    from verifier.errors import VerifierError
    from verifier.io.vnnlib import load_vnnlib
    graph = model.graph()
    n_inputs, n_outputs = graph.nodes[0].numel, graph.nodes[graph.output].numel
    t0 = time.perf_counter()
    try:
        prop = load_vnnlib(vnnlib_path, n_inputs, n_outputs)
    except VerifierError as exc:
        report.failures.append(f"FAIL {label}: spec: {exc}")
        return
    finally:
        report.parse_seconds += time.perf_counter() - t0
    if not prop.regions:
        return   # a trivially unsat property: nothing to evaluate
    chosen = sorted({0, len(prop.regions) - 1} | set(rng.choice(len(prop.regions),
                                                                min(args.regions, len(prop.regions)),
                                                                replace=False).tolist()))[:args.regions]
    for k, r in enumerate(chosen):
        region = prop.regions[r]
        if k == 0 and args.bound_points > 0:
            check_bounds(model, region, args, rng, report, label, r)
        points = sample_points(region.lower, region.upper, args.points, rng)
        with torch.no_grad():
            ours = model.forward(torch.as_tensor(points).reshape(-1, *graph.input_shape))
        ours = ours.double().reshape(len(points), -1).numpy()
        for x, y in zip(points, ours):
            expected = runtime(x)
            deviation = float(np.max(np.abs(y - expected)))
            if not np.isfinite(deviation) or deviation > args.tolerance * max(1.0, float(np.max(np.abs(expected)))):
                report.failures.append(f"FAIL {label}: region {r}: converted model deviates from onnxruntime "
                                       f"by {deviation:.3g}")
                return
            if deviation > report.max_deviation:
                report.max_deviation, report.worst_instance = deviation, label


def check_bounds(model, region, args, rng, report: SuiteReport, label: str, r: int) -> None:
    """CROWN bounds of the region contain the bound graph's outputs at sampled points."""
    from verifier.bounds.crown import backward_bound, crown_bounds
    from verifier.ops import Bounds
    graph = model.graph()
    n_out = graph.nodes[graph.output].numel
    lower = torch.as_tensor(region.lower, dtype=torch.float32).reshape(1, *graph.input_shape)
    upper = torch.as_tensor(region.upper, dtype=torch.float32).reshape(1, *graph.input_shape)
    C = torch.eye(n_out)[:64] if n_out <= 64 else torch.as_tensor(rng.standard_normal((8, n_out)), dtype=torch.float32)
    C = C.reshape(1, C.shape[0], *graph.output_shape)
    t0 = time.perf_counter()
    with torch.no_grad():
        box = Bounds(lower, upper)
        bounds = crown_bounds(graph, box, deadline=time.monotonic() + args.bound_seconds)
        lb, ub = backward_bound(graph, graph.output, C, C, bounds, box)
        points = torch.as_tensor(sample_points(region.lower, region.upper, args.bound_points, rng))
        values = model.forward(points.reshape(-1, *graph.input_shape)).reshape(len(points), -1) @ C[0].flatten(1).t()
    report.bound_seconds += time.perf_counter() - t0
    slack = args.tolerance * values.abs().clamp(min=1.0)
    below, above = (lb - values - slack).max(), (values - ub - slack).max()
    if not (torch.isfinite(lb).all() and torch.isfinite(ub).all()) or below > 0 or above > 0:
        report.failures.append(f"FAIL {label}: region {r}: bounds miss a sample by {float(max(below, above)):.3g}")
    report.bounded += 1
    report.mean_width = max(report.mean_width, float((ub - lb).mean()))


def check_suite(suite_dir: str, args) -> SuiteReport:
    from benchmarks.instances import read_instances
    from verifier import BoundedModel
    from verifier.errors import VerifierError
    report = SuiteReport(os.path.basename(os.path.normpath(suite_dir)))
    csv_files = sorted(glob.glob(os.path.join(suite_dir, "*instances.csv")))
    if not csv_files:
        report.failures.append(f"FAIL {suite_dir}: no *instances.csv")
        print(report.failures[-1], flush=True)
        return report
    rng = np.random.default_rng(args.seed)
    printed = 0
    models: dict[str, object] = {}     # onnx path -> (BoundedModel, OnnxChecker) or error text
    for csv_file in csv_files:
        for inst in read_instances(csv_file):
            report.instances += 1
            label = f"{inst.benchmark} {inst.onnx} {inst.vnnlib}"
            if inst.onnx_path not in models:
                t0 = time.perf_counter()
                try:
                    model = BoundedModel(inst.onnx_path, dtype=torch.float32)
                    runtime = OnnxChecker(inst.onnx_path, model.onnx.input_name, model.onnx.input_layout)
                    models[inst.onnx_path] = (model, runtime)
                except VerifierError as exc:
                    models[inst.onnx_path] = f"model: {exc}"
                except Exception as exc:   # onnxruntime refusing the file is a failure too
                    models[inst.onnx_path] = f"model: {type(exc).__name__}: {exc}"
                report.load_seconds += time.perf_counter() - t0
                report.models += 1
            loaded = models[inst.onnx_path]
            if isinstance(loaded, str):
                report.failures.append(f"FAIL {label}: {loaded}")
                continue
            try:
                check_instance(*loaded, inst.vnnlib_path, args, rng, report, label)
            except Exception as exc:   # a crash is a failure of the front end, not of this script
                report.failures.append(f"FAIL {label}: {type(exc).__name__}: {exc}")
            if len(report.failures) > printed:
                print(report.failures[-1], flush=True)
                printed = len(report.failures)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+", metavar="SUITE_DIR", help="folder holding *instances.csv")
    parser.add_argument("--points", type=int, default=4, help="points per region checked (default 4)")
    parser.add_argument("--regions", type=int, default=2, help="regions per spec checked (default 2)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="allowed |ours - onnxruntime| / max(1, |y|) (default 1e-4)")
    parser.add_argument("--bound-points", type=int, default=256,
                        help="points per spec whose outputs the bounds must contain (0: no bound check)")
    parser.add_argument("--bound-seconds", type=float, default=30.0,
                        help="time for CROWN's intermediate passes per spec (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    total_failures = 0
    for suite in args.suites:
        t0 = time.perf_counter()
        report = check_suite(suite, args)
        total_failures += len(report.failures)
        print(f"{report.suite}: {report.instances} instances, {report.models} models, "
              f"{len(report.failures)} failures; max |ours - onnxruntime| = {report.max_deviation:.3g}"
              f"{f' ({report.worst_instance})' if report.worst_instance else ''}; "
              f"bounds checked on {report.bounded} regions (largest mean width {report.mean_width:.3g}, "
              f"{report.bound_seconds:.1f} s); "
              f"model loading {report.load_seconds:.1f} s, spec parsing {report.parse_seconds:.1f} s, "
              f"total {time.perf_counter() - t0:.1f} s", flush=True)
    print("OK" if total_failures == 0 else f"{total_failures} FAILURES")
    return 0 if total_failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
