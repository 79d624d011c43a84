"""A first look at the verifier: decide a few real VNN-COMP 2021 instances shipped with the project.

    python -m benchmarks.demo          (or: make demo)

The instances (``benchmarks/data/demo.csv``: the five ``test`` suite instances and three
ACAS Xu ones, sat and unsat) and their agreed answers (``benchmarks/data/REFERENCE.csv``) lie in
``benchmarks/data/``; see its README for where each file comes from. Each instance is loaded and
verified in this process through the Python API; the table shows the verdict, the expected answer
and the seconds taken (model loading included). The exit status is 1 if a verdict contradicts
the expected answer (a soundness bug), 0 otherwise (``timeout``/``unknown`` are not errors).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every timeout (default 1)")
    args = parser.parse_args(argv)

    t_import = time.perf_counter()
    from benchmarks.instances import read_instances, read_reference
    from verifier import BoundedModel
    from verifier.errors import VerifierError
    from verifier.io.onnx import skip_torchvision_import
    from verifier.io.vnnlib import load_vnnlib
    from verifier.verify import VerifyConfig, verify
    skip_torchvision_import()   # a process that only verifies, like the CLI
    print(f"certiprune demo: verifier imported in {time.perf_counter() - t_import:.1f} s; "
          f"instances from {DATA}\n")

    instances = read_instances(DATA / "demo.csv", root=DATA)
    reference = read_reference(DATA / "REFERENCE.csv")
    print(f"{'instance':<52} {'verdict':>8} {'expected':>8} {'seconds':>8}")
    wrong = 0
    for inst in instances:
        expected = reference.get(inst.key, "unknown")
        start = time.perf_counter()
        try:
            model = BoundedModel(inst.onnx_path)
            graph = model.graph()
            prop = load_vnnlib(inst.vnnlib_path, graph.nodes[0].numel, graph.nodes[graph.output].numel)
            verdict = verify(model, prop, VerifyConfig(timeout=inst.timeout * args.timeout_scale)).status
        except VerifierError as exc:
            print(f"  {inst.benchmark} {inst.onnx}: error: {exc}", file=sys.stderr)
            verdict = "error"
        seconds = time.perf_counter() - start
        contradicts = verdict in ("sat", "unsat") and expected in ("sat", "unsat") and verdict != expected
        wrong += contradicts
        name = f"{inst.benchmark}/{Path(inst.onnx).stem} {Path(inst.vnnlib).stem}"
        print(f"{name:<52} {verdict:>8} {expected:>8} {seconds:>8.2f}"
              f"{'   <-- WRONG: contradicts the expected answer' if contradicts else ''}", flush=True)
    print(f"\n{len(instances)} instances. sat: a counterexample, confirmed by onnxruntime; unsat: the property "
          "is proven; expected: the answer the VNN-COMP 2021 tools agreed on.")
    if wrong:
        print(f"{wrong} verdict(s) contradict the expected answer: this is a soundness bug.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
