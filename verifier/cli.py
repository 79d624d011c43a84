"""The ``certiprune`` command. Subcommands are found through the ``certiprune.commands`` entry
points, so each package (verifier, pruning, benchmarks) registers its own without this module
importing a layer above it."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from importlib.metadata import entry_points
from typing import Optional

from .errors import VerifierError
from .runtime import idle_cores, keep_freed_memory

EXIT_INTERNAL = 1


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file")
    p.add_argument("spec", help="VNN-LIB property (.vnnlib or .vnnlib.gz)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))


def _load(args):
    from .api import BoundedModel
    from .io.onnx import skip_torchvision_import
    from .io.vnnlib import load_vnnlib
    skip_torchvision_import()   # this process only verifies: see its docstring
    model = BoundedModel(args.model, device=args.device, dtype=_dtype(args.dtype))
    graph = model.graph()
    prop = load_vnnlib(args.spec, n_inputs=graph.nodes[0].numel, n_outputs=graph.nodes[graph.output].numel)
    return model, prop


def add_bounds_parser(subparsers) -> None:
    p = subparsers.add_parser("bounds", help="bounds of every output-constraint row of a VNN-LIB property")
    _common(p)
    p.add_argument("--method", default="crown", choices=("ibp", "crown", "alpha-crown", "crown-ibp"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_bounds)


def run_bounds(args) -> int:
    import torch
    from .spec import region_specs
    model, prop = _load(args)
    specs = region_specs(prop, model.input_shape, model.device, model.dtype)
    report = []
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(args.method == "alpha-crown"):
            lb, ub = model.compute_bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0), spec.C.unsqueeze(0),
                                          method=args.method)
        seconds = time.perf_counter() - t0
        rows = [{"disjunct": int(k), "lower": float(l), "upper": float(u), "rhs": float(r),
                 "violable": bool(l <= r)}
                for k, l, u, r in zip(spec.disjunct.tolist(), lb[0], ub[0], spec.rhs)]
        proven = bool(spec.proven((lb - spec.rhs)).all())
        report.append({"region": i, "rows": rows, "proven": proven, "seconds": seconds})
    if args.json:
        print(json.dumps({"model": args.model, "spec": args.spec, "method": args.method, "regions": report},
                         indent=1))
        return 0
    for r in report:
        print(f"region {r['region']} ({args.method}, {r['seconds']:.3f} s): "
              f"{'all disjuncts proven impossible' if r['proven'] else 'not proven'}")
        print(f"  {'disjunct':>8} {'lower':>14} {'upper':>14}   row <= rhs")
        for row in r["rows"]:
            print(f"  {row['disjunct']:>8} {row['lower']:>14.6g} {row['upper']:>14.6g}   <= {row['rhs']:.6g}"
                  f"{'' if row['violable'] else '  (impossible)'}")
    return 0


def add_verify_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="decide a VNN-LIB property: sat, unsat, timeout or unknown")
    _common(p)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--result-file", help="write the VNN-COMP result (and counterexample) here")
    p.add_argument("--quiet", action="store_true", help="print the verdict only")
    p.add_argument("--stats", help="append JSON lines to this file: an instance summary (verdict, seconds, root "
                                   "bounds of IBP, CROWN, alpha-CROWN and the attack's best margin), then one "
                                   "line per bounded subdomain (read by `certiprune stats`)")
    p.add_argument("--branching", default="auto", choices=("auto", "babsr", "fsb", "layer"),
                   help="ReLU branching heuristic (auto: babsr, or where the root's intermediate bounds "
                        "have blown up, 1%% of the time in babsr and then layer from the root)")
    p.add_argument("--input-split", default="auto", choices=("auto", "on", "off"),
                   help="split the input box instead of ReLUs (auto: when the input has <= 16 entries)")
    p.add_argument("--no-bab", action="store_true", help="stop after the root bounds (incomplete)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: the idle cores, from the load average)")
    p.set_defaults(handler=run_verify)


def run_verify(args) -> int:
    # The timeout is wall time from the start of main(), torch's import included (verifier/__init__
    # loads torch lazily, so the console script imports nothing heavy before main()); an
    # in-process call of main() gets its own full budget.
    t0 = getattr(args, "started", time.perf_counter())
    import torch
    from .bab.config import BabConfig
    from .verify import VerifyConfig, complete_root_records, format_result, verify
    torch.set_num_threads(args.threads if args.threads > 0 else min(torch.get_num_threads(), idle_cores()))
    model, prop = _load(args)
    log = (lambda s: None) if args.quiet else (lambda s: print(f"[{time.perf_counter() - t0:7.2f}s] {s}",
                                                               file=sys.stderr))
    log(f"loaded {args.model} and {args.spec}: {len(prop.regions)} region(s)")
    config = VerifyConfig(timeout=max(0.0, args.timeout - (time.perf_counter() - t0)),
                          bab=BabConfig(branching=args.branching, input_split=args.input_split),
                          complete=not args.no_bab)
    result = _verify_within(verify, model, prop, config, log)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(format_result(result))
    if args.stats and result.records is not None:
        complete_root_records(model, prop, result.records, config)   # after the verdict: not timed
        result.records.write(args.stats, {"model": args.model, "spec": args.spec, "result": result.status},
                             seconds=result.seconds)
    if result.records is not None and result.records.count:
        log(f"{result.records.count} subdomains bounded, max depth {result.records.max_depth()}")
    print(f"{result.status} {time.perf_counter() - t0:.3f}")
    return 0


class _WallClockExpired(Exception):
    pass


def _verify_within(verify, model, prop, config, log):
    """verify() stops itself at its deadline between bounding steps; a wall-clock alarm half a
    second later is the safety net for a step that overruns it (a long batch on a loaded machine):
    the answer is then ``timeout``, never a late verdict."""
    from .verify import VerificationResult

    running = [True]

    def expire(signum, frame):
        if running[0]:
            raise _WallClockExpired()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, config.timeout + 0.5)
    try:
        result = verify(model, prop, config, log)
        running[0] = False
        return result
    except _WallClockExpired:
        log("wall-clock limit reached inside a bounding step")
        return VerificationResult("timeout", time.monotonic() - start)
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certiprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered = {ep.name: ep for ep in entry_points(group="certiprune.commands")}
    if not registered:  # running from a source tree that was not installed
        registered = {"bounds": add_bounds_parser, "verify": add_verify_parser}
    for name in sorted(registered):
        ep = registered[name]
        (ep.load() if hasattr(ep, "load") else ep)(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    started = time.perf_counter()   # before the subcommands' imports (torch): see run_verify
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started = started
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except VerifierError as exc:
        _error(args, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error(args, "interrupted")
        return 130
    except Exception as exc:  # a bug of ours: one line, and the result file says error
        _error(args, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_INTERNAL


def _error(args, message: str) -> None:
    print(f"certiprune {getattr(args, 'command', '')}: error: {message}", file=sys.stderr)
    path = getattr(args, "result_file", None)
    if path:
        try:
            with open(path, "w") as f:
                f.write("error\n")
        except OSError:
            pass


def console_main() -> None:
    """The ``certiprune`` console script: ``main``, then the process ends without the
    interpreter's shutdown. Tearing down torch's and onnxruntime's modules takes 0.5-0.8 s after
    the verdict is written, a quarter of a typical ACAS Xu instance's wall time (RESULTS.md), and
    nothing needs it: ``main`` has closed every file it wrote, and the streams are flushed here.
    In-process callers use ``main`` and keep their interpreter."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
