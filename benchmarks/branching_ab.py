"""BaBSR against filtered smart branching (FSB) on the same instances, in one process.

    python -m benchmarks.branching_ab --root ../shared/benchmarks/vnncomp2021/mnistfc \\
        mnist-net_256x2.onnx:prop_1_0.03.vnnlib ... [--timeout 150] [--threads 1]

For each instance and heuristic: the verdict, the verifier's seconds (model loading excluded) and
the number of subdomains bounded. The two heuristics alternate per instance (babsr first, then
fsb) so slow drifts in machine load touch both; compare subdomains where the timings are noisy.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from verifier.bab.config import BabConfig
from verifier.verify import VerifyConfig, verify

from .instances import add_pair_arguments, load_pairs

HEURISTICS = ("babsr", "fsb")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.branching_ab", description=__doc__.split("\n\n")[0])
    add_pair_arguments(p)
    args = p.parse_args(argv)
    solved = {h: [] for h in HEURISTICS}
    print(f"{'instance':48} {'heuristic':9} {'verdict':8} {'seconds':>8} {'subdomains':>10}", flush=True)
    for onnx, vnnlib, model, prop in load_pairs(args):
        for h in HEURISTICS:
            config = VerifyConfig(timeout=args.timeout, bab=BabConfig(branching=h, input_split="off"))
            result = verify(model, prop, config)
            print(f"{Path(onnx).stem + ' ' + Path(vnnlib).stem:48} {h:9} {result.status:8} "
                  f"{result.seconds:8.2f} {result.records.count:10d}", flush=True)
            solved[h].append((result.status in ("sat", "unsat"), result.seconds, result.records.count))
    for h in HEURISTICS:
        rows = solved[h]
        print(f"{h}: {sum(r[0] for r in rows)}/{len(rows)} decided, total {sum(r[1] for r in rows):.1f} s, "
              f"median {statistics.median(r[1] for r in rows):.2f} s, subdomains {sum(r[2] for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
