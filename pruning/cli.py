"""``certiprune train | prune | export``: the pruning layer's subcommands.

Each ``add_*_parser(subparsers)`` is an entry point of the ``certiprune.commands`` group: it adds
one subparser and sets ``handler(args) -> exit code``. Every command prints what it did and
writes a JSON summary next to its outputs. ``python -m pruning.cli ...`` runs them without the
dispatcher.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch

from pruning.atomic import write_json_atomic
from pruning.checkpoint import load_checkpoint, save_checkpoint
from pruning.data import ImageData, dataset_info, load_dataset, resolve_data_dir
from pruning.errors import PruningError
from pruning.evaluate import accuracy, pgd_accuracy, unstable_relus
from pruning.models import LAYER_SCOPES, MODELS, build_model
from pruning.objectives import REGIMES, AttackConfig, make_regime
from pruning.sparsity import (
    SCOPES, check_sparsity, format_report, make_permanent,
    overall_sparsity, sparsity_report,
)
from pruning.train import TrainConfig, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_EPS = {"mnist": 0.1, "fashion-mnist": 0.1, "cifar10": 2 / 255}


def _guarded(name: str, handler):
    """``handler`` with user errors turned into one stderr line and the error's exit code."""
    from verifier.errors import VerifierError

    def run(args) -> int:
        try:
            return handler(args)
        except VerifierError as err:  # PruningError included
            print(f"certiprune {name}: error: {err}", file=sys.stderr)
            return err.exit_code

    return run


def set_handler(parser: argparse.ArgumentParser, name: str, handler) -> None:
    """Add ``--config FILE.toml`` to ``parser`` and set its ``handler``: flags not given on the
    command line come from the file, else from their defaults (``pruning.cli_config``); user
    errors become one stderr line. Call it last, after every ``add_argument``."""
    from pruning.cli_config import enable_config, resolve_config

    spec = enable_config(parser, name)
    parser.set_defaults(handler=_guarded(name, lambda args: handler(resolve_config(args, spec))))


def _log(message: str) -> None:
    print(message, flush=True)


def _write_json(path: Path, summary: dict) -> None:
    write_json_atomic(path, summary, indent=2)
    _log(f"wrote {path}")


def _finish(out: Path, summary: dict, eps: float, after: str) -> int:
    """The last step of train and prune: log the clean and PGD accuracy of ``summary`` (then
    ``after``) and write it to ``out / "<command>.json"``; the exit code 0."""
    _log(f"clean accuracy {summary['clean_accuracy']:.4f}, PGD accuracy "
         f"{summary['pgd_accuracy']:.4f} (eps {eps}){after}")
    _write_json(out / f"{summary['command']}.json", summary)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset root (default: $CERTIPRUNE_DATA)")
    parser.add_argument("--train-limit", type=int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=1000,
                        help="evaluate on the first N test images (default 1000)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="floating-point type of the model and the data")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: initialisation, data order, random scores")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="mini-batch size of training, fine-tuning and score learning")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="learning rate of training or fine-tuning (train: the regime's when "
                             "not given)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="optimiser of training or fine-tuning (train: the regime's when not "
                             "given)")
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--pgd-step-size", type=float,
                        help="PGD step size (default 2.5·eps/steps)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _device(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``--device`` / ``--dtype``: ``verifier.errors.check_device``
    (exit code 8 for a device this machine lacks, 2 for a malformed name)."""
    from verifier.errors import check_device

    check_device(args.device)
    return torch.device(args.device), DTYPES[args.dtype]


def _data(args, dataset: str, device, dtype) -> tuple[ImageData, ImageData]:
    root = resolve_data_dir(args.data_dir)
    train_data = load_dataset(dataset, root, "train").head(args.train_limit)
    test_data = load_dataset(dataset, root, "test").head(args.test_limit)
    return train_data.to(device, dtype), test_data.to(device, dtype)


def _attack(args, eps: float) -> AttackConfig:
    return AttackConfig(eps=eps, steps=args.pgd_steps, step_size=args.pgd_step_size)


def _metrics(model, test_data, attack, count_unstable: str, device, dtype) -> dict:
    metrics = {"clean_accuracy": accuracy(model, test_data),
               "pgd_accuracy": pgd_accuracy(model, test_data, attack),
               "eps": attack.eps, "n_test": len(test_data)}
    if count_unstable != "none":
        from pruning.bounds import bounded_model

        counts = unstable_relus(bounded_model(model, device, dtype), test_data, attack.eps,
                                method=count_unstable)
        metrics[f"mean_unstable_relus_{count_unstable}"] = float(counts.float().mean())
    return metrics


# ---------------------------------------------------------------- train

def add_train_parser(subparsers) -> None:
    from pruning.train import LR_SCHEDULES

    parser = subparsers.add_parser(
        "train", help="train a zoo model (standard, PGD, FGSM+GradAlign or CROWN-IBP)")
    parser.add_argument("--dataset", choices=sorted(DEFAULT_EPS), default="fashion-mnist",
                        help="dataset to train and evaluate on, read from --data-dir")
    parser.add_argument("--model", default="mlp2x256",
                        help=f"zoo model, one of {', '.join(sorted(MODELS))} (default mlp2x256)")
    parser.add_argument("--regime", default="standard",
                        help=f"one of {', '.join(REGIMES)} (default standard)")
    parser.add_argument("--eps", type=float,
                        help="L∞ radius (default 0.1 on (Fashion-)MNIST, 2/255 on CIFAR-10)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--rewind-epoch", type=int, default=1,
                        help="save the weights after this epoch for rewinding (default 1; "
                             "0: the initial weights)")
    parser.add_argument("--ramp-epochs", type=float,
                        help="crown-ibp: epochs over which eps ramps from 0 (smoothed) and β, κ "
                             "go from 1 to 0 (default: half the epochs)")
    parser.add_argument("--grad-align-weight", type=float, default=0.2,
                        help="fgsm: weight of the GradAlign regulariser (default 0.2)")
    parser.add_argument("--nrs", action="store_true",
                        help="add the NRS neuron-stability loss (methods/nrs.py) to the regime")
    parser.add_argument("--rs-weight", type=float,
                        help="weight of the NRS loss; implies --nrs (default 0.01, or 0.001 "
                             "under crown-ibp)")
    parser.add_argument("--gamma-pow", type=float, default=2.0,
                        help="NRS: power p of the BatchNorm normaliser |γ|^p (default 2)")
    parser.add_argument("--weight-decay", type=float,
                        help="default: the regime's (5e-4 for fgsm, else 0)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help="default: the regime's (step for fgsm and crown-ibp, else cosine)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    _common(parser)
    # Unset optimiser flags take the regime's defaults (pruning.train.REGIME_TRAINING).
    parser.set_defaults(lr=None, optimizer=None)
    set_handler(parser, "train", run_train)


def run_train(args) -> int:
    from pruning.recipes import DenseRecipe, train_dense
    from pruning.train import regime_train_config

    start = time.perf_counter()
    if args.regime not in REGIMES:
        raise PruningError(f"unknown training regime {args.regime!r}; choose one of "
                           f"{', '.join(REGIMES)}")
    if args.model not in MODELS:
        raise PruningError(f"unknown model {args.model!r}; choose one of "
                           f"{', '.join(sorted(MODELS))}")
    if not 0 <= args.rewind_epoch <= args.epochs:
        raise PruningError(f"--rewind-epoch {args.rewind_epoch} is not in 0..{args.epochs} "
                           "(the training epochs)")
    device, dtype = _device(args)
    dataset_info(args.dataset)
    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.dataset]
    attack = _attack(args, eps)
    config = regime_train_config(args.regime, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, optimizer=args.optimizer, seed=args.seed,
                                 weight_decay=args.weight_decay, lr_schedule=args.lr_schedule)
    regulariser = "nrs" if (args.nrs or args.rs_weight is not None) else None
    recipe = DenseRecipe(model=args.model, dataset=args.dataset, regime=args.regime,
                         attack=attack, train=config, seed=args.seed,
                         rewind_epoch=args.rewind_epoch, ramp_epochs=args.ramp_epochs,
                         grad_align_weight=args.grad_align_weight, regulariser=regulariser,
                         rs_weight=args.rs_weight, gamma_pow=args.gamma_pow)
    train_data, test_data = _data(args, args.dataset, device, dtype)
    nrs = f" + NRS {args.rs_weight or 'default'}" if regulariser else ""
    _log(f"training {args.model} on {args.dataset} ({len(train_data)} images), regime "
         f"{args.regime}{nrs}, eps {eps}, {args.epochs} epochs, {config.optimizer} lr "
         f"{config.lr} ({config.lr_schedule})")
    model, meta, history = train_dense(recipe, train_data, args.out, eval_data=test_data,
                                       device=device, dtype=dtype, progress=not args.quiet)
    summary = {"command": "train", **meta, "train_config": dataclasses.asdict(config),
               "attack": dataclasses.asdict(attack),
               "epochs": [dataclasses.asdict(h) for h in history],
               **_metrics(model, test_data, attack, "none", device, dtype),
               "seconds": time.perf_counter() - start}
    return _finish(args.out, summary, eps, f" on {len(test_data)} test images\nwrote {args.out / 'model.pt'}")


# ---------------------------------------------------------------- prune

def add_prune_parser(subparsers) -> None:
    from pruning.methods import METHOD_NAMES
    from pruning.schedule import DEFAULT_RATE, DEFAULT_ROUNDS, REWINDS, SCHEDULES

    parser = subparsers.add_parser("prune", help="prune a trained checkpoint and fine-tune it")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="model.pt written by `certiprune train`")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    parser.add_argument("--sparsity", type=float,
                        help="fraction of prunable weights set to zero, in [0, 1); for slim, "
                             "l1-channel, refill the fraction of channels / neurons removed per "
                             "hidden layer; iterative: the final target (or give --rate)")
    parser.add_argument("--rate", type=float,
                        help="iterative: fraction of the remaining weights pruned per round "
                             f"(default {DEFAULT_RATE} unless --sparsity is given)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"iterative rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument("--scope", choices=SCOPES,
                        help="one threshold over all layers (global) or per layer (default: "
                             "global for unstructured, layer for structured methods)")
    parser.add_argument("--layers", choices=LAYER_SCOPES, default="all",
                        help="prune every Linear and Conv2d (all) or only the Conv2d layers "
                             "(conv, as the paper; default all)")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="default: iterative for imp, one-shot otherwise")
    parser.add_argument("--rewind", choices=REWINDS, default="rewind_lt",
                        help="iterative: reset the surviving weights after each round to the "
                             "snapshot after train's --rewind-epoch (rewind_lt), to the initial "
                             "weights (lt), or not at all (pt)")
    parser.add_argument("--finetune-epochs", type=int, default=2,
                        help="epochs of fine-tuning (per round when iterative)")
    parser.add_argument("--score-epochs", type=int, default=2,
                        help="HYDRA score-learning / slim L1-on-γ training epochs")
    parser.add_argument("--score-lr", type=float, default=1e-3,
                        help="learning rate of score learning (hydra, stability) and of the "
                             "regularised training before slim / nrs remove channels")
    parser.add_argument("--score-batches", type=int,
                        help="mini-batches of gradients for snip / taylor (default 8 for snip, "
                             "one epoch for taylor)")
    parser.add_argument("--slim-penalty", type=float, default=1e-4,
                        help="λ of slim's L1 penalty on BatchNorm γ (default 1e-4)")
    parser.add_argument("--at-init", action="store_true",
                        help="score and prune the initial weights (init.pt beside "
                             "--checkpoint), as SNIP does at initialisation")
    parser.add_argument("--stability-weight", type=float, default=0.5,
                        help="λ of the ReLU-stability loss (method stability)")
    parser.add_argument("--regime", choices=REGIMES, help="default: the checkpoint's regime")
    parser.add_argument("--eps", type=float, help="default: the checkpoint's eps")
    parser.add_argument("--bound-images", type=int, default=32,
                        help="test images on which each round counts unstable ReLUs (IBP, "
                             "CROWN; default 32)")
    parser.add_argument("--count-unstable", choices=("none", "ibp", "crown"), default="none",
                        help="also report mean unstable ReLUs per test image (needs verifier)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    _common(parser)
    set_handler(parser, "prune", run_prune)


def _schedule_and_target(args, method):
    """The ``ScheduleConfig`` and final sparsity (or channel fraction) the flags ask for."""
    from pruning.schedule import ScheduleConfig, iterative_target

    kind = args.schedule or method.schedule
    if kind == "iterative":
        target = iterative_target(args.rounds, args.rate, args.sparsity)
    elif args.rate is not None:
        raise PruningError("--rate sets the per-round fraction of an iterative schedule; a "
                           "one-shot schedule takes --sparsity")
    elif args.sparsity is None:
        raise PruningError(f"--sparsity is required for the one-shot schedule of {method.name}")
    else:
        target = args.sparsity
    check_sparsity(target)
    return ScheduleConfig(kind=kind, rounds=args.rounds, rewind=args.rewind,
                          scope=args.scope), target


def run_prune(args) -> int:
    from pruning.methods import get_method
    from pruning.methods.structured import channel_report
    from pruning.recipes import PruneRecipe, prune_checkpoint
    from pruning.schedule import RoundEvaluator

    start = time.perf_counter()
    device, dtype = _device(args)
    method = get_method(args.method)
    scope = args.scope or ("layer" if method.structured else "global")
    args = argparse.Namespace(**{**vars(args), "scope": scope})
    schedule, target = _schedule_and_target(args, method)
    meta = load_checkpoint(args.checkpoint)[1]
    regime = args.regime or meta.get("regime", "standard")
    eps = args.eps if args.eps is not None else meta.get("eps", DEFAULT_EPS[meta["dataset"]])
    attack = _attack(args, eps)
    recipe = PruneRecipe(
        method=args.method, target=target, schedule=schedule, regime=regime, attack=attack,
        finetune=TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size,
                             lr=args.lr, optimizer=args.optimizer, seed=args.seed),
        score_training=TrainConfig(epochs=args.score_epochs, batch_size=args.batch_size,
                                   lr=args.score_lr, seed=args.seed),
        layers=args.layers, stability_weight=args.stability_weight,
        score_batches=args.score_batches, slim_penalty=args.slim_penalty, seed=args.seed,
        at_init=args.at_init)
    train_data, test_data = _data(args, meta["dataset"], device, dtype)
    what = "channel fraction" if method.structured else "sparsity"
    _log(f"pruning {meta['model']} ({args.checkpoint}{', initial weights' if args.at_init else ''})"
         f" with {args.method} to {what} {target:.4g} ({scope}, layers {args.layers}, "
         f"{schedule.kind}" + (f", {schedule.rounds} rounds, rewind {schedule.rewind}"
                               if schedule.kind == "iterative" else "")
         + f"), fine-tuning {args.finetune_epochs} epochs under {regime}")
    model, meta, rounds = prune_checkpoint(
        recipe, args.checkpoint, train_data, args.out / "rounds",
        evaluate=RoundEvaluator(test_data, attack, n_bound_images=args.bound_images),
        device=device, dtype=dtype, progress=not args.quiet)
    make_permanent(model)
    model.eval()
    report = sparsity_report(model)
    save_checkpoint(args.out / "model.pt", model,
                    {**meta, "regime": regime, "eps": eps, "method": args.method,
                     "sparsity": target, "scope": scope, "layers": args.layers})
    metrics = _metrics(model, test_data, attack, args.count_unstable, device, dtype)
    summary = {"command": "prune", "checkpoint": str(args.checkpoint), "method": args.method,
               "schedule": dataclasses.asdict(schedule), "target_sparsity": target,
               "structured": method.structured, "at_init": args.at_init,
               "layer_scope": args.layers,
               "sparsity": overall_sparsity(report), "channels": channel_report(model),
               "regime": regime, **metrics,
               "layers": {r.name: {"shape": list(r.shape), "n_weights": r.n_weights,
                                      "n_zero": r.n_zero, "sparsity": r.sparsity}
                             for r in report},
               "rounds": rounds, "seconds": time.perf_counter() - start}
    _log(format_report(report))
    return _finish(args.out, summary, eps, f"; wrote {args.out / 'model.pt'}")


# ---------------------------------------------------------------- export

def add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint to ONNX + VNN-LIB specs")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="model.pt written by `certiprune train` or `certiprune prune`")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--compact", action="store_true",
                        help="fold BatchNorm into the preceding layer and remove dead neurons / "
                             "channels (function unchanged)")
    parser.add_argument("--specs", type=int, default=0,
                        help="write VNN-LIB robustness specs for the first N test images")
    parser.add_argument("--eps", type=float, help="spec radius (default: the checkpoint's eps)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="per-instance timeout written to instances.csv (seconds)")
    parser.add_argument("--data-dir", help="dataset root (default: $CERTIPRUNE_DATA)")
    set_handler(parser, "export", run_export)


def run_export(args) -> int:
    import numpy as np
    import onnxruntime

    from pruning.compact import compact
    from pruning.export import export_onnx, write_vnnlib

    start = time.perf_counter()
    model, meta = load_checkpoint(args.checkpoint)
    info = dataset_info(meta["dataset"])
    make_permanent(model)
    removed = {}
    if args.compact:
        model, removed = compact(model)
    onnx_path = export_onnx(model, info.input_shape, args.out / "model.onnx")
    report = sparsity_report(model)
    _log(f"exported {meta['model']} to {onnx_path}"
         + (f" (compaction removed {sum(removed.values())} units)" if args.compact else ""))
    _log(format_report(report))
    if args.specs > 0:
        test_data = load_dataset(meta["dataset"], resolve_data_dir(args.data_dir), "test")
        probe = test_data.head(args.specs)
    else:
        probe = ImageData(torch.rand(8, *info.input_shape, generator=torch.Generator()
                                     .manual_seed(0)), torch.zeros(8, dtype=torch.long))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": probe.images.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        torch_out = model(probe.images).numpy()
    max_diff = float(np.abs(onnx_out - torch_out).max())
    _log(f"onnxruntime vs PyTorch on {len(probe)} inputs: max |difference| {max_diff:.3g}")
    eps = args.eps if args.eps is not None else meta.get("eps", DEFAULT_EPS[meta["dataset"]])
    specs = []
    for index in range(args.specs):
        path = write_vnnlib(
            args.out / "vnnlib" / f"img{index}_eps{eps}.vnnlib", probe.images[index],
            int(probe.labels[index]), eps, info.n_classes,
            comment=f"{meta['dataset']} test image {index}, model {meta['model']}")
        specs.append(path)
    if specs:
        with open(args.out / "instances.csv", "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            for path in specs:
                writer.writerow([onnx_path.name, f"vnnlib/{path.name}", args.timeout])
        _log(f"wrote {len(specs)} VNN-LIB specs (eps {eps}) and {args.out / 'instances.csv'}")
    summary = {"command": "export", "checkpoint": str(args.checkpoint), "onnx": str(onnx_path),
               "compacted": args.compact, "units_removed": removed,
               "sparsity": overall_sparsity(report),
               "layers": {r.name: {"shape": list(r.shape), "n_weights": r.n_weights,
                                   "n_zero": r.n_zero, "sparsity": r.sparsity} for r in report},
               "onnxruntime_max_abs_diff": max_diff, "specs": [str(p) for p in specs],
               "eps": eps, "seconds": time.perf_counter() - start}
    _write_json(args.out / "export.json", summary)
    return 0


# ---------------------------------------------------------------- stand-alone driver

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certiprune")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_prune_parser, add_export_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one pruning subcommand; user errors become one line on stderr and an exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
