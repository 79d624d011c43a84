"""What the search's side jobs cost: the per-subdomain records (tightness statistics, always
on) and the attacks interleaved with the search, on the same instances, in one process.

    python -m benchmarks.search_costs --root ../shared/benchmarks/vnncomp2021/mnistfc \\
        mnist-net_256x4.onnx:prop_10_0.05.vnnlib ... [--timeout 150] [--threads 1]

Each instance is verified twice, alternating: without the search's attacks, then with them
(the default). Printed per run: the verdict, the verifier's seconds (model loading excluded),
the subdomains bounded, the seconds inside the records (``SubdomainRecords.add``, ``new_ids`` and
the unstable-ReLU counts that go into them, by cProfile) and inside the attacks, and each as a
share of the run. The record cost is read off the first run, the attacks' from both.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from verifier.bab.config import BabConfig
from verifier.verify import VerifyConfig, verify

from .instances import add_pair_arguments, load_pairs

RECORD_FUNCTIONS = (("records.py", "add"), ("records.py", "new_ids"), ("relu_split.py", "unstable_counts"))
ATTACK_FUNCTIONS = (("attacks.py", "maybe_run"), ("attacks.py", "offer"))


def cumulative(stats: pstats.Stats, functions) -> float:
    """Seconds spent inside the (file name, function name) pairs, callees included."""
    return sum(entry[3] for (path, _, name), entry in stats.stats.items()
               if any(path.endswith("/" + f) and name == n for f, n in functions))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_costs", description=__doc__.split("\n\n")[0])
    add_pair_arguments(p)
    args = p.parse_args(argv)
    print(f"{'instance':44} {'attacks':7} {'verdict':8} {'seconds':>8} {'subdomains':>10} "
          f"{'records s':>9} {'%':>5} {'attacks s':>9} {'%':>5}", flush=True)
    for onnx, vnnlib, model, prop in load_pairs(args):
        for attacks in (False, True):
            bab = BabConfig() if attacks else BabConfig(attack_restarts=0, relu_attack_restarts=0)
            profile = cProfile.Profile()
            started = time.perf_counter()
            profile.enable()
            result = verify(model, prop, VerifyConfig(timeout=args.timeout, bab=bab))
            profile.disable()
            seconds = time.perf_counter() - started
            stats = pstats.Stats(profile)
            records, attacking = cumulative(stats, RECORD_FUNCTIONS), cumulative(stats, ATTACK_FUNCTIONS)
            print(f"{onnx + ' ' + vnnlib:44} {'on' if attacks else 'off':7} {result.status:8} {seconds:8.2f} "
                  f"{result.records.count:10d} {records:9.3f} {100 * records / seconds:5.2f} "
                  f"{attacking:9.3f} {100 * attacking / seconds:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
