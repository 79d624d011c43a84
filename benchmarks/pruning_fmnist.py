"""Fashion-MNIST sparsity table: each pruning method at 50/80/90/95 % under standard and PGD
training — clean accuracy, PGD accuracy, mean unstable ReLUs per image (CROWN), wall time.

    python -m benchmarks.pruning_fmnist --data-dir ../shared/datasets --out runs/pruning_fmnist

Resumable: every finished row is appended to ``<out>/results.jsonl`` and skipped on a rerun;
pre-training and every pruning round are checkpointed under ``<out>``. The Markdown table is
rewritten to ``<out>/table.md`` after each row. All runs are seeded; on CPU they repeat exactly.

Protocol (defaults; every number is a flag):
- model ``mlp2x256`` (784-256-256-10, ReLU, input normalisation inside), Adam lr 1e-3, batch 128,
  cosine schedule; pre-training 15 epochs on the first 30,000 training images; weights after
  epoch 1 kept for rewinding.
- regimes: ``standard`` (clean cross-entropy) and ``pgd`` (Madry, L∞ eps 0.1, 10 steps of
  2.5·eps/10, random start); fine-tuning uses the same regime.
- methods, global unstructured scope: random, magnitude (one-shot, 3 fine-tuning epochs);
  imp (3 rounds to the target, rewinding to the epoch-1 weights, 3 epochs per round);
  hydra (2 score epochs, Adam lr 1e-3, then 3 fine-tuning epochs); stability (as hydra,
  loss + 0.5 · ReLU-stability loss at eps 0.1 during both phases).
- measured on the first 1,000 test images: clean accuracy; PGD accuracy (eps 0.1, 10 steps,
  one random start; an upper bound on robust accuracy); mean number of unstable ReLUs per image
  (CROWN pre-activation bounds of the verifier over the eps-ball clipped to [0, 1], out of 512).
- time: wall and CPU seconds of pruning + fine-tuning of the row (the shared pre-training is
  reported on the dense row); one torch thread by default, so that a second process on the
  same cores slows the run down proportionally instead of stalling OpenMP's spinning threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from pruning.bounds import bounded_model
from pruning.checkpoint import load_checkpoint, save_checkpoint
from pruning.data import dataset_info, load_dataset, resolve_data_dir
from pruning.evaluate import accuracy, pgd_accuracy, unstable_relus
from pruning.methods import PruneContext, get_method
from pruning.models import build_model
from pruning.objectives import AttackConfig, make_regime
from pruning.schedule import ScheduleConfig, run_schedule
from pruning.sparsity import clone_model, layer_weights, make_permanent, overall_sparsity, \
    sparsity_report
from pruning.train import TrainConfig, train

DATASET = "fashion-mnist"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="dataset root (default: $CERTIPRUNE_DATA)")
    p.add_argument("--out", type=Path, default=Path("runs/pruning_fmnist"))
    p.add_argument("--model", default="mlp2x256")
    p.add_argument("--regimes", default="standard,pgd")
    p.add_argument("--methods", default="random,magnitude,imp,hydra,stability")
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--epochs", type=int, default=15, help="pre-training epochs")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--score-epochs", type=int, default=2)
    p.add_argument("--imp-rounds", type=int, default=3)
    p.add_argument("--stability-weight", type=float, default=0.5)
    p.add_argument("--train-limit", type=int, default=30000,
                   help="first N training images (default 30000, to fit ~1 h on 2 cores)")
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: robust when the cores are shared)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pretrain(args, regime, attack, train_data, test_data) -> Path:
    """Train (or resume) the dense model of ``regime``; returns its directory."""
    out = args.out / regime / "dense"
    if (out / "model.pt").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args.model, dataset_info(DATASET))
    meta = {"model": args.model, "dataset": DATASET, "regime": regime, "eps": args.eps}
    if not (out / "init.pt").is_file():
        save_checkpoint(out / "init.pt", model, meta)
    start, cpu_start = time.perf_counter(), time.process_time()

    def snapshot(epoch, trained):
        if epoch == 1:
            save_checkpoint(out / "rewind.pt", trained, meta)

    train(model, make_regime(regime, attack), train_data, TrainConfig(epochs=args.epochs,
          seed=args.seed), eval_data=test_data, eval_attack=attack,
          checkpoint=out / "train.ckpt", after_epoch=snapshot, desc=f"{regime} pre-train")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    (out / "seconds.txt").write_text(f"{wall} {cpu}\n")
    save_checkpoint(out / "model.pt", model, meta)
    return out


def measure(model, test_data, attack) -> dict:
    model.eval()
    counts = unstable_relus(bounded_model(model, "cpu", torch.float32), test_data, attack.eps,
                            method="crown")
    return {"clean_accuracy": accuracy(model, test_data),
            "pgd_accuracy": pgd_accuracy(model, test_data, attack),
            "unstable_crown": float(counts.float().mean()),
            "sparsity": overall_sparsity(sparsity_report(model))}


def run_row(args, regime, method_name, sparsity, dense_dir, attack, train_data) -> dict:
    model, _ = load_checkpoint(dense_dir / "model.pt")
    model.train()
    method = get_method(method_name)
    schedule = ScheduleConfig(kind=method.schedule, rounds=args.imp_rounds, rewind="rewind_lt")
    early = layer_weights(load_checkpoint(dense_dir / "rewind.pt")[0])
    ctx = PruneContext(data=train_data, objective=make_regime(regime, attack), attack=attack,
                       score_training=TrainConfig(epochs=args.score_epochs, seed=args.seed),
                       stability_weight=args.stability_weight, seed=args.seed, progress=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    run_schedule(model, method, sparsity, schedule, ctx,
                 TrainConfig(epochs=args.finetune_epochs, seed=args.seed),
                 args.out / regime / f"{method_name}_{sparsity}", early_state=early)
    make_permanent(model)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "model": model}


def table(rows: list[dict]) -> str:
    lines = ["| regime | method | sparsity | clean acc | PGD acc | unstable ReLUs (CROWN) | "
             "wall s | CPU s |", "|---|---|---|---|---|---|---|---|"]
    order = {"dense": 0, "random": 1, "magnitude": 2, "imp": 3, "hydra": 4, "stability": 5}
    for r in sorted(rows, key=lambda r: (r["regime"] != "standard", r["target_sparsity"],
                                         order.get(r["method"], 9))):
        lines.append(f"| {r['regime']} | {r['method']} | {r['sparsity']:.3f} | "
                     f"{r['clean_accuracy']:.3f} | {r['pgd_accuracy']:.3f} | "
                     f"{r['unstable_crown']:.1f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = resolve_data_dir(args.data_dir)
    train_data = load_dataset(DATASET, root, "train").head(args.train_limit)
    test_data = load_dataset(DATASET, root, "test").head(args.test_limit)
    attack = AttackConfig(eps=args.eps, steps=args.pgd_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.is_file() else []
    done = {(r["regime"], r["method"], r["target_sparsity"]) for r in rows}
    common = {"model": args.model, "eps": args.eps, "pgd_steps": args.pgd_steps,
              "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
              "score_epochs": args.score_epochs, "imp_rounds": args.imp_rounds,
              "stability_weight": args.stability_weight, "n_train": len(train_data),
              "n_test": len(test_data), "threads": torch.get_num_threads()}
    for regime in args.regimes.split(","):
        dense_dir = pretrain(args, regime, attack, train_data, test_data)
        jobs = [("dense", 0.0)] + [(m, float(s)) for s in args.sparsities.split(",")
                                   for m in args.methods.split(",")]
        for method_name, sparsity in jobs:
            if (regime, method_name, sparsity) in done:
                continue
            if method_name == "dense":
                model = load_checkpoint(dense_dir / "model.pt")[0]
                seconds, cpu_seconds = map(float, (dense_dir / "seconds.txt").read_text().split())
            else:
                outcome = run_row(args, regime, method_name, sparsity, dense_dir, attack,
                                  train_data)
                model, seconds = outcome["model"], outcome["seconds"]
                cpu_seconds = outcome["cpu_seconds"]
            row = {"regime": regime, "method": method_name, "target_sparsity": sparsity,
                   **measure(model, test_data, attack), "seconds": seconds,
                   "cpu_seconds": cpu_seconds, **common}
            with open(results, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            rows.append(row)
            done.add((regime, method_name, sparsity))
            (args.out / "table.md").write_text(table(rows))
            print(f"{regime} {method_name} {sparsity}: clean {row['clean_accuracy']:.3f} "
                  f"PGD {row['pgd_accuracy']:.3f} unstable {row['unstable_crown']:.1f} "
                  f"({seconds:.0f} s)", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
