"""Pilot for planning a study's compute: seconds per training batch of each regime and seconds
per verified image, on the study's model, at one torch thread.

    python -m benchmarks.study.pilot benchmarks/study/paper_fmnist.toml --batches 20 \
        --train-images 4000 --images 20 --out runs/pilot

Trains one dense model per regime on ``--train-images`` images for one epoch (wall and CPU
time: on a shared machine the CPU seconds are what plans the work; the epoch's evaluation is
included), then verifies the first ``--images`` test images at the study's eps with the study's
timeout. Prints one JSON line per regime: seconds per batch, per epoch of the study's
train_limit (extrapolated), and per image (mean, and the share of timeouts).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from pruning.study import Study, load_config
    from pruning.study.jobs import ModelJob

    parser = argparse.ArgumentParser(prog="python -m benchmarks.study.pilot")
    parser.add_argument("config", type=Path)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/pilot"))
    args = parser.parse_args(argv)
    config = load_config(args.config)
    config = dataclasses.replace(
        config, name=config.name + "-pilot", seeds=(config.seeds[0],),
        train_limit=args.train_images, test_limit=200,
        train=dataclasses.replace(config.train, epochs=1, rewind_epoch=1),
        verify=dataclasses.replace(config.verify, images=args.images))
    torch.set_num_threads(1)
    study = Study(config, args.out)
    study.prepare()
    full_train = load_config(args.config).train_limit or 60000
    for regime in config.train.regimes:
        start, cpu = time.monotonic(), time.process_time()
        study.train_base(regime, config.seeds[0], "dense")
        train_s, train_cpu = time.monotonic() - start, time.process_time() - cpu
        batches = -(-args.train_images // config.train.batch_size)
        job = ModelJob(regime, config.seeds[0], "dense")
        study.measure(job)
        study.export(job)
        start, cpu = time.monotonic(), time.process_time()
        study.verify(job)
        verify_s, verify_cpu = time.monotonic() - start, time.process_time() - cpu
        records = [json.loads(study.layout.verdict(job, i).read_text())
                   for i in range(args.images)]
        attempted = [r for r in records if r["verdict"] != "misclassified"]
        print(json.dumps({
            "regime": regime, "model": config.model, "seconds_per_batch": train_s / batches,
            "cpu_seconds_per_batch": train_cpu / batches,
            "cpu_seconds_per_epoch_of_train_limit": train_cpu / batches
            * -(-full_train // config.train.batch_size),
            "verify_wall_seconds_per_image": verify_s / args.images,
            "verify_cpu_seconds_per_image": verify_cpu / args.images,
            "verify_seconds_per_attempted_image": sum(r["seconds"] or 0 for r in attempted)
            / max(len(attempted), 1),
            "timeouts": sum(r["verdict"] == "timeout" for r in attempted),
            "attempted": len(attempted), "timeout_s": config.verify.timeout}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
