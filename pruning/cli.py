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
import json
import sys
import time
from pathlib import Path

import torch

from pruning.checkpoint import load_checkpoint, save_checkpoint
from pruning.data import ImageData, dataset_info, load_dataset, resolve_data_dir
from pruning.errors import PruningError
from pruning.evaluate import accuracy, pgd_accuracy, unstable_relus
from pruning.models import MODELS, build_model, prunable_layers
from pruning.objectives import REGIMES, AttackConfig, make_regime
from pruning.sparsity import (
    SCOPES, apply_masks, check_sparsity, format_report, layer_weights, make_permanent,
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


def _log(message: str) -> None:
    print(message, flush=True)


def _write_json(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"wrote {path}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset root (default: $CERTIPRUNE_DATA)")
    parser.add_argument("--train-limit", type=int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=1000,
                        help="evaluate on the first N test images (default 1000)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--pgd-step-size", type=float,
                        help="PGD step size (default 2.5·eps/steps)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _device(args) -> tuple[torch.device, torch.dtype]:
    try:
        return torch.device(args.device), DTYPES[args.dtype]
    except RuntimeError as err:
        raise PruningError(f"bad --device {args.device!r}: {err}") from None


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
    parser = subparsers.add_parser("train", help="train a zoo model (standard or PGD)")
    parser.add_argument("--dataset", choices=sorted(DEFAULT_EPS), default="fashion-mnist")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp2x256")
    parser.add_argument("--regime", choices=REGIMES, default="standard")
    parser.add_argument("--eps", type=float,
                        help="L∞ radius (default 0.1 on (Fashion-)MNIST, 2/255 on CIFAR-10)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rewind-epoch", type=int, default=1,
                        help="save the weights after this epoch for rewinding (default 1; "
                             "0: the initial weights)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    _common(parser)
    parser.set_defaults(handler=_guarded("train", run_train))


def run_train(args) -> int:
    start = time.perf_counter()
    if not 0 <= args.rewind_epoch <= args.epochs:
        raise PruningError(f"--rewind-epoch {args.rewind_epoch} is not in 0..{args.epochs} "
                           "(the training epochs)")
    device, dtype = _device(args)
    info = dataset_info(args.dataset)
    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.dataset]
    attack = _attack(args, eps)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         optimizer=args.optimizer, seed=args.seed)
    train_data, test_data = _data(args, args.dataset, device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.model, info).to(device=device, dtype=dtype)
    meta = {"model": args.model, "dataset": args.dataset, "regime": args.regime, "eps": eps,
            "seed": args.seed}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "init.pt").is_file():
        save_checkpoint(out / "init.pt", model, {**meta, "epoch": 0})
        if args.rewind_epoch == 0:
            save_checkpoint(out / "rewind.pt", model, {**meta, "epoch": 0})

    def snapshot(epoch, trained):
        if epoch == args.rewind_epoch:
            save_checkpoint(out / "rewind.pt", trained, {**meta, "epoch": epoch})

    _log(f"training {args.model} on {args.dataset} ({len(train_data)} images), regime "
         f"{args.regime}, eps {eps}, {args.epochs} epochs")
    history = train(model, make_regime(args.regime, attack), train_data, config,
                    eval_data=test_data, eval_attack=attack, checkpoint=out / "train.ckpt",
                    after_epoch=snapshot, progress=not args.quiet)
    save_checkpoint(out / "model.pt", model, {**meta, "epoch": args.epochs})
    summary = {"command": "train", **meta, "train_config": dataclasses.asdict(config),
               "attack": dataclasses.asdict(attack),
               "epochs": [dataclasses.asdict(h) for h in history],
               **_metrics(model, test_data, attack, "none", device, dtype),
               "seconds": time.perf_counter() - start}
    _log(f"clean accuracy {summary['clean_accuracy']:.4f}, PGD accuracy "
         f"{summary['pgd_accuracy']:.4f} (eps {eps}) on {len(test_data)} test images")
    _log(f"wrote {out / 'model.pt'}")
    _write_json(out / "train.json", summary)
    return 0


# ---------------------------------------------------------------- prune

def add_prune_parser(subparsers) -> None:
    from pruning.methods import METHOD_NAMES
    from pruning.schedule import REWINDS, SCHEDULES

    parser = subparsers.add_parser("prune", help="prune a trained checkpoint and fine-tune it")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="model.pt written by `certiprune train`")
    parser.add_argument("--method", choices=METHOD_NAMES, required=True)
    parser.add_argument("--sparsity", type=float, required=True,
                        help="fraction of prunable weights set to zero, in [0, 1)")
    parser.add_argument("--scope", choices=SCOPES, default="global")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="default: iterative for imp, one-shot otherwise")
    parser.add_argument("--rounds", type=int, default=3, help="iterative rounds (default 3)")
    parser.add_argument("--rewind", choices=REWINDS, default="rewind_lt")
    parser.add_argument("--finetune-epochs", type=int, default=2,
                        help="epochs of fine-tuning (per round when iterative)")
    parser.add_argument("--score-epochs", type=int, default=2, help="HYDRA score-learning epochs")
    parser.add_argument("--score-lr", type=float, default=1e-3)
    parser.add_argument("--stability-weight", type=float, default=0.5,
                        help="λ of the ReLU-stability loss (method stability)")
    parser.add_argument("--regime", choices=REGIMES, help="default: the checkpoint's regime")
    parser.add_argument("--eps", type=float, help="default: the checkpoint's eps")
    parser.add_argument("--count-unstable", choices=("none", "ibp", "crown"), default="none",
                        help="also report mean unstable ReLUs per test image (needs verifier)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    _common(parser)
    parser.set_defaults(handler=_guarded("prune", run_prune))


def run_prune(args) -> int:
    from pruning.methods import PruneContext, get_method
    from pruning.schedule import ScheduleConfig, run_schedule

    start = time.perf_counter()
    check_sparsity(args.sparsity)
    device, dtype = _device(args)
    method = get_method(args.method)
    model, meta = load_checkpoint(args.checkpoint, device, dtype)
    if "method" in meta:  # an already pruned checkpoint: its zeros stay zeros
        apply_masks(model, {name: (module.weight != 0).to(module.weight.dtype)
                            for name, module in prunable_layers(model)})
    regime = args.regime or meta.get("regime", "standard")
    eps = args.eps if args.eps is not None else meta.get("eps", DEFAULT_EPS[meta["dataset"]])
    attack = _attack(args, eps)
    schedule = ScheduleConfig(kind=args.schedule or method.schedule, rounds=args.rounds,
                              rewind=args.rewind, scope=args.scope)
    early_state = None
    if schedule.kind == "iterative" and schedule.rewind != "pt":
        source = args.checkpoint.parent / ("rewind.pt" if schedule.rewind == "rewind_lt"
                                           else "init.pt")
        early_state = layer_weights(load_checkpoint(source, device, dtype)[0])
    train_data, test_data = _data(args, meta["dataset"], device, dtype)
    finetune = TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr,
                           optimizer=args.optimizer, seed=args.seed)
    ctx = PruneContext(
        data=train_data, objective=make_regime(regime, attack), attack=attack, device=device,
        dtype=dtype, score_training=TrainConfig(epochs=args.score_epochs,
                                                batch_size=args.batch_size, lr=args.score_lr,
                                                seed=args.seed),
        stability_weight=args.stability_weight, seed=args.seed, progress=not args.quiet,
    )
    _log(f"pruning {meta['model']} ({args.checkpoint}) with {args.method} to sparsity "
         f"{args.sparsity} ({args.scope}, {schedule.kind}"
         + (f", {schedule.rounds} rounds, rewind {schedule.rewind}" if schedule.kind == "iterative"
            else "") + f"), fine-tuning {args.finetune_epochs} epochs under {regime}")
    model.train()
    rounds = run_schedule(
        model, method, args.sparsity, schedule, ctx, finetune, args.out / "rounds",
        early_state=early_state,
        evaluate=lambda m: _metrics(m, test_data, attack, "none", device, dtype),
    )
    make_permanent(model)
    model.eval()
    report = sparsity_report(model)
    save_checkpoint(args.out / "model.pt", model,
                    {**meta, "regime": regime, "eps": eps, "method": args.method,
                     "sparsity": args.sparsity, "scope": args.scope})
    metrics = _metrics(model, test_data, attack, args.count_unstable, device, dtype)
    summary = {"command": "prune", "checkpoint": str(args.checkpoint), "method": args.method,
               "schedule": dataclasses.asdict(schedule), "target_sparsity": args.sparsity,
               "sparsity": overall_sparsity(report), "regime": regime, **metrics,
               "layers": {r.name: {"shape": list(r.shape), "n_weights": r.n_weights,
                                   "n_zero": r.n_zero, "sparsity": r.sparsity} for r in report},
               "rounds": rounds, "seconds": time.perf_counter() - start}
    _log(format_report(report))
    _log(f"clean accuracy {metrics['clean_accuracy']:.4f}, PGD accuracy "
         f"{metrics['pgd_accuracy']:.4f} (eps {eps}); wrote {args.out / 'model.pt'}")
    _write_json(args.out / "prune.json", summary)
    return 0


# ---------------------------------------------------------------- export

def add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint to ONNX + VNN-LIB specs")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--compact", action="store_true",
                        help="remove dead neurons / channels (function unchanged)")
    parser.add_argument("--specs", type=int, default=0,
                        help="write VNN-LIB robustness specs for the first N test images")
    parser.add_argument("--eps", type=float, help="spec radius (default: the checkpoint's eps)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="per-instance timeout written to instances.csv (seconds)")
    parser.add_argument("--data-dir", help="dataset root (default: $CERTIPRUNE_DATA)")
    parser.set_defaults(handler=_guarded("export", run_export))


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
