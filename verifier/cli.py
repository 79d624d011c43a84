"""certiprune: sound verification of neural networks (IBP, CROWN, alpha-CROWN, branch and bound
on ONNX models and VNN-LIB properties) and pruning for certifiability.

Each package registers its subcommands as ``certiprune.commands`` entry points (setup.cfg); the
dispatcher loads only the one asked for, so ``certiprune verify`` never imports the pruning layer.
Exit codes: ``verifier.errors``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Optional

from . import __version__
from .errors import (EXIT_BROKEN_PIPE, EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, InputFileError, UsageError,
                     VerifierError, check_device)
from .runtime import idle_cores, keep_freed_memory

# One line per subcommand for ``certiprune --help``, so that the help imports none of them; a
# command registered by a package not listed here is described by its entry point's target.
COMMANDS = {
    "verify": "decide a VNN-LIB property on an ONNX model: sat, unsat, timeout or unknown",
    "bounds": "bounds of each output constraint of a VNN-LIB property (IBP, CROWN, alpha-CROWN)",
    "train": "train a model of the zoo (standard, PGD, FGSM+GradAlign or CROWN-IBP)",
    "prune": "prune a trained checkpoint and fine-tune it",
    "export": "export a checkpoint to ONNX and VNN-LIB robustness properties",
    "bench": "run a VNN-COMP instances CSV (one process per instance, or warm Dask workers) and score it",
    "stats": "tightness report (JSON, CSVs, PNGs) of `verify --stats` records",
    "study": "train, prune at a sparsity ladder, fine-tune, verify and tabulate (resumable)",
}
LOGGER = "certiprune"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is nothing to say (None, False:
    flags) or the help already states it. Subcommands of every package get it through
    ``CommandParser``; pass it as ``formatter_class`` to a parser built outside the dispatcher."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        # a parser that replaces defaults by a sentinel (to tell given flags apart) keeps the
        # real one to show in ``action.shown_default``
        key = "shown_default" if hasattr(action, "shown_default") else "default"
        default = getattr(action, key)
        if default is False or default == [] or default is argparse.SUPPRESS \
                or not isinstance(default, (str, int, float, tuple, list, os.PathLike)):
            return text   # None, SUPPRESS, flags, sentinels: nothing to show
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return (text.rstrip() + f" (default: %({key})s)").lstrip()
        return text


class CommandParser(argparse.ArgumentParser):
    """The parser class of every subcommand: ``HelpFormatter`` unless the caller names another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse prints nothing, default included, for an option without help: a placeholder
        # lets HelpFormatter show the default (``missing_help`` still reports the option)
        missing = not kwargs.get("help") and kwargs.get("help") is not argparse.SUPPRESS
        if missing:
            kwargs["help"] = "(undocumented)"
        action = super().add_argument(*args, **kwargs)
        action.help_missing = missing
        return action


def missing_help(parser: argparse.ArgumentParser) -> list[str]:
    """Options and arguments of ``parser`` without help text (for tests of every subcommand)."""
    return [(a.option_strings or [a.dest])[0] for a in parser._actions
            if (getattr(a, "help_missing", False) or not (a.help or "").strip())
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _entry_points() -> dict:
    from importlib.metadata import entry_points
    registered = {ep.name: ep for ep in entry_points(group="certiprune.commands")}
    if not registered:  # running from a source tree that was not installed
        registered = {"bounds": add_bounds_parser, "verify": add_verify_parser}
    return registered


def _command_in(argv: list[str]) -> Optional[str]:
    """The subcommand named in ``argv``: the first word not an option (the top-level parser's
    options, -h and --version, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``certiprune`` parser with subcommand ``command`` loaded from its entry point (every
    one where ``command`` is "*") and the others as one-line stubs (enough for ``--help``)."""
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="certiprune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=f"Run `certiprune COMMAND --help` for a command's options.\n\nexit codes:\n{codes}")
    parser.add_argument("--version", action="version", version=f"certiprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=CommandParser)
    parser.commands = sub.choices    # name -> subparser
    registered = _entry_points()
    for name in [*[n for n in COMMANDS if n in registered], *sorted(set(registered) - set(COMMANDS))]:
        ep = registered[name]
        if command in (name, "*"):
            (ep.load() if hasattr(ep, "load") else ep)(sub)
        else:
            sub.add_parser(name, add_help=False, help=COMMANDS.get(name, f"(see {getattr(ep, 'value', name)})"))
    return parser


# ---- logging ------------------------------------------------------------------------------------
class _ElapsedFormatter(logging.Formatter):
    """``[  1.23s] message``: seconds since the command started (the timeout's clock)."""

    def __init__(self, started: float):
        super().__init__()
        self.started = started

    def format(self, record):
        return f"[{time.perf_counter() - self.started:7.2f}s] {record.getMessage()}"


def add_logging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log at debug level too: the full configuration, the seconds of each phase")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print the verdict only: no log on stderr (warnings and errors still)")
    p.add_argument("--log-file", metavar="PATH", help="append the log to this file as well (at debug level with "
                                                      "-v, else info), whatever -q says")


def setup_logging(args, started: float) -> logging.Logger:
    """The ``certiprune`` logger with a stderr handler (-q: warnings only; -v: debug) and the
    ``--log-file`` handler; handlers of an earlier in-process call are replaced."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(_ElapsedFormatter(started))
    logger.addHandler(console)
    if getattr(args, "log_file", None):
        try:
            to_file = logging.FileHandler(args.log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise InputFileError(f"cannot open --log-file {args.log_file}: {exc.strerror or exc}") from None
        to_file.setLevel(logging.DEBUG if verbose else logging.INFO)
        to_file.setFormatter(_ElapsedFormatter(started))
        logger.addHandler(to_file)
    return logger


# ---- bounds and verify --------------------------------------------------------------------------
def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _common(p: argparse.ArgumentParser, optional_files: bool = False) -> None:
    nargs = "?" if optional_files else None
    p.add_argument("model", nargs=nargs, help="ONNX model (.onnx or .onnx.gz)")
    p.add_argument("spec", nargs=nargs, help="VNN-LIB property (.vnnlib or .vnnlib.gz)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="floating-point type of the bounds")
    add_logging_options(p)


def _load(args):
    check_device(args.device)
    from .api import BoundedModel
    from .io.onnx import skip_torchvision_import
    from .io.vnnlib import load_vnnlib
    skip_torchvision_import()   # this process only verifies: see its docstring
    model = BoundedModel(args.model, device=args.device, dtype=_dtype(args.dtype))
    graph = model.graph()
    prop = load_vnnlib(args.spec, n_inputs=graph.nodes[0].numel, n_outputs=graph.nodes[graph.output].numel)
    return model, prop


def add_bounds_parser(subparsers) -> None:
    p = subparsers.add_parser("bounds", help=COMMANDS["bounds"], description=COMMANDS["bounds"])
    _common(p)
    p.add_argument("--method", default="crown", choices=("ibp", "crown", "alpha-crown", "crown-ibp"),
                   help="bounding method")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_bounds)


def run_bounds(args) -> int:
    import torch
    from .spec import region_specs
    setup_logging(args, getattr(args, "started", time.perf_counter()))
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


# verify's flags that set a field of VerifyConfig: dest -> (dotted field, flag value -> field value).
# A dest named as a top-level field of VerifyConfig (e.g. a later --float-mode) needs no entry.
VERIFY_FLAGS = {
    "timeout": ("timeout", float),
    "branching": ("bab.branching", str),
    "input_split": ("bab.input_split", str),
    "no_bab": ("complete", lambda flag: not flag),
}


def add_verify_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help=COMMANDS["verify"], description=COMMANDS["verify"] + ". The verdict and the wall "
        "seconds go to stdout as one line (or one JSON object with --json), the log to stderr.")
    _common(p, optional_files=True)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds of wall time, start-up included")
    p.add_argument("--result-file", metavar="PATH",
                   help="write the VNN-COMP result (and counterexample) here, atomically")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (verdict, seconds, counterexample, subdomains, reason, root "
                        "bounds, phase times) instead of the verdict line")
    p.add_argument("--stats", metavar="PATH",
                   help="append JSON lines to this file: an instance summary (verdict, seconds, root bounds of "
                        "IBP, CROWN, alpha-CROWN and the attack's best margin; cut: true where the time ran "
                        "out), then one line per bounded subdomain (read by `certiprune stats`)")
    p.add_argument("--branching", default="auto", choices=("auto", "babsr", "fsb", "layer"),
                   help="ReLU branching heuristic (auto: babsr, or where the root's intermediate bounds "
                        "have blown up, 1%% of the time in babsr and then layer from the root)")
    p.add_argument("--input-split", default="auto", choices=("auto", "on", "off"),
                   help="split the input box instead of ReLUs (auto: when the input has <= 16 entries)")
    p.add_argument("--no-bab", action="store_true", help="stop after the root bounds (incomplete)")
    p.add_argument("--float-mode", default="sound", choices=("sound", "fast"),   # issue 26
                   help="sound (default): bounds hold for the network as onnxruntime computes it, rounding "
                        "included; fast: no rounding analysis (verifier/bounds/floating.py)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: the idle cores, from the load average)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="verification configuration (sections attack, alpha, bab: see --print-config); "
                        "flags given on the command line override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration as TOML (fit for --config) and exit")
    p.set_defaults(handler=run_verify)


def verify_config(args):
    """The ``VerifyConfig`` of ``--config`` (or the defaults) with the flags given on the command
    line (``args.given``: their dests; every mapped flag where unknown) applied over it."""
    from .config_file import read_config, set_path
    from .verify import VerifyConfig
    config = read_config(VerifyConfig, args.config) if args.config else VerifyConfig()
    given = getattr(args, "given", None)
    fields = {f for f in VerifyConfig.__dataclass_fields__}
    mapping = dict(VERIFY_FLAGS, **{dest: (dest, lambda v: v) for dest in vars(args) if dest in fields
                                    and dest not in VERIFY_FLAGS})
    for dest, (path, convert) in mapping.items():
        if hasattr(args, dest) and (given is None or dest in given):
            config = set_path(config, path, convert(getattr(args, dest)))
    if not config.timeout >= 0:
        raise UsageError(f"the timeout must be a number of seconds >= 0, got {config.timeout}")
    return config


def _threads(args) -> tuple[int, str]:
    """torch threads for this run and why that many."""
    if args.threads > 0:
        return args.threads, "--threads"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    idle = idle_cores()
    try:
        load = f"load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load average unknown"
    return idle, f"the idle cores: {cores} core(s), {load}, at least 1"


def run_verify(args) -> int:
    # The timeout is wall time from the start of main(), torch's import included (verifier/__init__
    # loads torch lazily, so the console script imports nothing heavy before main()); an
    # in-process call of main() gets its own full budget.
    t0 = getattr(args, "started", time.perf_counter())
    config = verify_config(args)
    if args.print_config:
        from .config_file import to_toml
        print(to_toml(config, "certiprune verify configuration: `certiprune verify --config FILE.toml`"), end="")
        return 0
    if args.model is None or args.spec is None:
        raise UsageError("verify needs MODEL and SPEC (only --print-config goes without)")
    logger = setup_logging(args, t0)
    log = logger.info
    threads, why = _threads(args)
    logger.info(f"certiprune {__version__} verify: device {args.device}, dtype {args.dtype}, threads {threads} "
                f"({why}), timeout {config.timeout:g} s, branching {config.bab.branching}, input split "
                f"{config.bab.input_split}{'' if config.complete else ', no branch and bound'}"
                f"{', config ' + args.config if args.config else ''}")
    from .config_file import to_toml
    logger.debug("configuration:\n" + to_toml(config).rstrip())
    import torch
    from .bab.records import SubdomainRecords
    from .output import result_json, write_atomic
    from .verify import complete_root_records, format_result, verify
    torch.set_num_threads(threads)
    model, prop = _load(args)
    log(f"loaded {args.model} and {args.spec}: {len(prop.regions)} region(s)")
    import dataclasses
    config = dataclasses.replace(config, timeout=max(0.0, config.timeout - (time.perf_counter() - t0)))
    records = SubdomainRecords()
    result = _verify_within(verify, model, prop, config, log, records)
    if args.result_file:
        write_atomic(args.result_file, format_result(result))
        args.result_written = True
    if args.stats:
        complete_root_records(model, prop, records, config)   # after the verdict: not timed
        records.write(args.stats, {"model": args.model, "spec": args.spec, "result": result.status},
                      seconds=result.seconds)
    if records.count:
        log(f"{records.count} subdomains bounded, max depth {records.max_depth()}")
    logger.debug("seconds per phase: " + ", ".join(f"{k} {v:.3f}" for k, v in records.phases.items()))
    if result.status in ("unknown", "timeout") and result.details.get("reason"):
        log(f"{result.status}: {result.details['reason']}")
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result_json(result, args.model, args.spec, seconds)))
    else:
        print(f"{result.status} {seconds:.3f}")
    return 0


class _WallClockExpired(Exception):
    pass


def _verify_within(verify, model, prop, config, log, records=None):
    """verify() stops itself at its deadline between bounding steps; a wall-clock alarm half a
    second later is the safety net for a step that overruns it (a long batch on a loaded machine):
    the answer is then ``timeout``, never a late verdict, and ``records`` (passed on to
    ``verify`` where given) keeps what the run gathered, marked as cut."""
    from .verify import VerificationResult

    running = [True]

    def expire(signum, frame):
        if running[0]:
            raise _WallClockExpired()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, config.timeout + 0.5)
    try:
        result = verify(model, prop, config, log) if records is None else verify(model, prop, config, log, records)
        running[0] = False
        return result
    except _WallClockExpired:
        reason = "wall-clock safety net: a bounding step overran the time limit by 0.5 s"
        if records is not None:
            records.cut = reason
        log("wall-clock limit reached inside a bounding step")
        return VerificationResult("timeout", time.monotonic() - start, details={"reason": reason}, records=records)
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- the dispatcher -----------------------------------------------------------------------------
def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options that ``argv`` sets explicitly (not by default)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return set(vars(namespace))


def main(argv: Optional[list[str]] = None) -> int:
    started = time.perf_counter()   # before the subcommands' imports (torch): see run_verify
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    args.started = started
    if not getattr(args, "handler", None):
        parser.print_help()
        return UsageError.exit_code
    if args.handler is run_verify:   # which flags to lay over --config's file
        args.given = _given_dests(parser.commands["verify"], argv[argv.index(args.command) + 1:])
    try:
        return args.handler(args)
    except VerifierError as exc:
        return _error(args, str(exc), exc.exit_code)
    except BrokenPipeError:   # the reader of stdout went away (`| head`): nothing left to say
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return _error(args, "interrupted", EXIT_INTERRUPTED)
    except OSError as exc:   # a path the user gave that cannot be read or written
        if exc.filename is None:
            return _error(args, f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
        return _error(args, f"{exc.filename}: {exc.strerror or exc}", InputFileError.exit_code)
    except Exception as exc:  # a bug of ours: one line, and the result file says error
        return _error(args, f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _error(args, message: str, code: int) -> int:
    """One line on stderr (and with ``verify --json`` the JSON object ``{"verdict": "error",
    "error": message, "exit_code": code}`` on stdout); the result file (unless the verdict is in
    it already) says error. Returns ``code``."""
    try:
        print(f"certiprune {getattr(args, 'command', '')}: error: {message}", file=sys.stderr)
        if getattr(args, "json", False) and getattr(args, "handler", None) is run_verify:
            print(json.dumps({"verdict": "error", "error": message, "exit_code": code}))
    except (BrokenPipeError, ValueError):
        pass
    path = getattr(args, "result_file", None)
    if path and not getattr(args, "result_written", False):
        from .output import write_atomic
        try:
            write_atomic(path, "error\n")
        except (OSError, VerifierError):   # the result path itself is what failed
            pass
    return code


def console_main() -> None:
    """The ``certiprune`` console script: ``main``, then the process ends without the
    interpreter's shutdown. Tearing down torch's and onnxruntime's modules takes 0.5-0.8 s after
    the verdict is written, a quarter of a typical ACAS Xu instance's wall time (RESULTS.md), and
    nothing needs it: ``main`` has closed every file it wrote, and the streams are flushed here.
    In-process callers use ``main`` and keep their interpreter."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = code or EXIT_BROKEN_PIPE
    try:
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
