"""``certiprune study CONFIG.toml [--quick] [--out DIR] [--threads N] [--data-dir DIR]``."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "study", help="train, prune at a sparsity ladder, fine-tune, verify and tabulate "
                      "(resumable)")
    parser.add_argument("config", type=Path, metavar="CONFIG.toml", help="study configuration")
    parser.add_argument("--quick", action="store_true",
                        help="small data, 1 epoch, few images, short ladder (about a minute "
                             "for an MLP); outputs go to <name>-quick")
    parser.add_argument("--out", type=Path, default=Path("runs/study"),
                        help="output root; the study goes to OUT/<name> (default runs/study)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the config's)")
    parser.add_argument("--data-dir", help="dataset root (default: the config's data_dir, "
                                           "else $CERTIPRUNE_DATA)")
    parser.add_argument("--workers", type=int, default=0, help="run the stages as tasks on an embedded "
                        "Dask cluster of N worker processes (default 0: in this process)")
    parser.add_argument("--scheduler", metavar="ADDR", help="run the stages on an existing Dask cluster "
                        "(tcp://HOST:PORT or a scheduler file); the output folder must be shared")
    parser.set_defaults(handler=run_study)


def run_study(args) -> int:
    from pruning.errors import PruningError
    from verifier.errors import VerifierError
    from pruning.study.config import load_config
    from pruning.study.pipeline import Study

    try:
        config = load_config(args.config)
        if args.quick:
            config = config.quick()
        if args.threads is not None:
            if args.threads < 1:
                raise PruningError(f"--threads must be ≥ 1, got {args.threads}")
            config = dataclasses.replace(config, threads=args.threads)
        study = Study(config, args.out, data_dir=args.data_dir)
        if args.workers or args.scheduler:   # stages as Dask tasks: pruning/study/distributed.py
            from pruning.study.distributed import run_with_dask
            rows = run_with_dask(study, args.workers, args.scheduler)
        else:
            rows = study.run()
    except VerifierError as err:  # PruningError included: one line, its exit code
        print(f"certiprune study: error: {err}", file=sys.stderr)
        return err.exit_code
    done = sum(r["status"] == "done" for r in rows)
    print(f"{config.name}: {done}/{len(rows)} models done; wrote "
          + ", ".join(str(p) for p in study.outputs.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="certiprune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["study", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
