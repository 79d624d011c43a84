"""Bound throughput: CROWN and alpha-CROWN time per batch of input boxes, against TARGETS.md.

    python -m benchmarks.bounds_speed --suite-dir ../shared/benchmarks/vnncomp2021 --threads 1 \\
        [--quick] [--skip alpha-crown:1024] [--device cpu] [--mnist ../shared/datasets/MNIST/raw]

Networks: mnistfc 256x2 / 256x4 / 256x6 (input (784, 1)) and the oval21 base CNN
(``nets/cifar_base_kw.onnx``, input (3, 32, 32), normalisation inside the weights).

Boxes: for mnistfc, ±0.02 around the first MNIST test images (t10k-images-idx3-ubyte.gz, pixels
/255), clipped to [0, 1]; if the file is missing, uniform points in [0, 1] (the script says so).
For oval21, ±2/255 around the images at the centre of the suite's ``cifar_base_kw`` VNN-LIB
boxes (CIFAR-10 test images; cycled when the batch is larger than their number), clipped to
[0, 1]. Bounds are of the network's outputs (identity spec: 10 rows), every intermediate
pre-activation bound by CROWN ("full CROWN"), as the auto_LiRPA figures in TARGETS.md.

Each (net, method, batch) is timed ``--repeats`` times (once if a call takes over 10 s) after one warm-up call at batch 1 per
net; the median is reported as ms per batch and boxes per second, with the ratio of our
boxes/s to auto_LiRPA's (CROWN rows of TARGETS.md; > 1 is faster) and the peak resident memory
of the process so far. ``--skip METHOD:BATCH`` or ``--skip NET:METHOD:BATCH`` leaves a
combination out (alpha-CROWN at batch 1024 is heavy); skipped rows are listed as such.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

# auto_LiRPA CROWN on one thread (TARGETS.md, measured 2026-12-03): seconds per batch.
TARGET_SECONDS = {
    ("mnist-net_256x2", 1): 0.0056, ("mnist-net_256x2", 64): 0.272, ("mnist-net_256x2", 1024): 5.12,
    ("mnist-net_256x4", 1): 0.0135, ("mnist-net_256x4", 64): 1.27, ("mnist-net_256x4", 1024): 22.7,
    ("mnist-net_256x6", 1): 0.0280, ("mnist-net_256x6", 64): 2.46, ("mnist-net_256x6", 1024): 56.4,
}
MNIST_NETS = ("mnist-net_256x2", "mnist-net_256x4", "mnist-net_256x6")
OVAL_NET = "cifar_base_kw"


def mnist_centres(path: str, n: int) -> tuple[np.ndarray, str]:
    """The first n MNIST test images as (n, 784) in [0, 1], or uniform points if unreadable."""
    try:
        with gzip.open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        images = data[16:].reshape(-1, 784).astype(np.float64) / 255.0
        return images[np.arange(n) % len(images)], f"MNIST test images from {path}"
    except OSError as exc:
        rng = np.random.default_rng(0)
        return rng.random((n, 784)), f"uniform random points in [0, 1] ({path} unreadable: {exc})"


def oval_centres(suite_dir: str, n: int) -> tuple[np.ndarray, str]:
    """Centres of the cifar_base_kw VNN-LIB boxes, (n, 3072) cycled; uniform points if none."""
    from verifier.io.vnnlib import load_vnnlib
    files = sorted(glob.glob(os.path.join(suite_dir, "oval21", "vnnlib", f"{OVAL_NET}-*.vnnlib*")))
    centres = []
    for path in files:
        region = load_vnnlib(path).regions[0]
        centres.append((region.lower + region.upper) / 2)
    if not centres:
        rng = np.random.default_rng(0)
        return rng.random((n, 3072)), "uniform random points in [0, 1] (no oval21 VNN-LIB files found)"
    centres = np.stack(centres)
    return centres[np.arange(n) % len(centres)], f"centres of the {len(files)} {OVAL_NET} VNN-LIB boxes, cycled"


def boxes(centres: np.ndarray, eps: float, shape: tuple[int, ...], device, dtype):
    """(B, n) centres -> lower, upper (B, *shape), the eps-box clipped to [0, 1]."""
    c = torch.as_tensor(centres, dtype=dtype, device=device).reshape(len(centres), *shape)
    return (c - eps).clamp(0, 1), (c + eps).clamp(0, 1)


def time_bounds(model, lower, upper, method: str, repeats: int) -> tuple[float, float]:
    """Median seconds of compute_bounds, and the mean width of the output bounds."""
    times, width = [], float("nan")
    for _ in range(repeats):
        if times and times[0] > 10.0:
            break   # one call of more than 10 s is measurement enough
        start = time.perf_counter()
        with torch.set_grad_enabled(method == "alpha-crown"):
            lb, ub = model.compute_bounds(lower, upper, method=method)
        if lower.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        width = float((ub - lb).mean())
    return statistics.median(times), width


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def skipped(skips: set[str], net: str, method: str, batch: int) -> bool:
    return f"{method}:{batch}" in skips or f"{net}:{method}:{batch}" in skips


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite-dir", default="../shared/benchmarks/vnncomp2021",
                        help="folder holding mnistfc/ and oval21/")
    parser.add_argument("--mnist", default="../shared/datasets/MNIST/raw/t10k-images-idx3-ubyte.gz",
                        help="MNIST test images (idx3, gzip)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, as TARGETS.md)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,64,1024", help="comma-separated batch sizes")
    parser.add_argument("--methods", default="crown,alpha-crown")
    parser.add_argument("--nets", default=",".join(MNIST_NETS + (OVAL_NET,)))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row, median (default 3)")
    parser.add_argument("--skip", action="append", default=[], help="METHOD:BATCH or NET:METHOD:BATCH")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 64, one timed call each")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = "1,64", 1
    torch.set_num_threads(args.threads)
    from verifier import BoundedModel
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")
    skips = set(args.skip)
    largest = max(batches)
    mnist, mnist_source = mnist_centres(args.mnist, largest)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"mnistfc boxes: ±0.02 around {mnist_source}, clipped to [0, 1]")
    header = (f"{'net':<16} {'method':<11} {'batch':>5} {'ms/batch':>10} {'boxes/s':>9} "
              f"{'auto_LiRPA/s':>12} {'ratio':>6} {'mean width':>10} {'peak RSS MiB':>12}")
    print(header)
    for net in args.nets.split(","):
        if net == OVAL_NET:
            path = os.path.join(args.suite_dir, "oval21", "nets", f"{OVAL_NET}.onnx")
            centres, source = oval_centres(args.suite_dir, largest)
            print(f"  ({OVAL_NET} boxes: ±2/255 around {source}, clipped to [0, 1])")
            eps = 2 / 255
        else:
            path = os.path.join(args.suite_dir, "mnistfc", f"{net}.onnx")
            centres, eps = mnist, 0.02
        model = BoundedModel(path, device=args.device, dtype=torch.float32)
        shape = model.input_shape
        warm_l, warm_u = boxes(centres[:1], eps, shape, args.device, torch.float32)
        for method in methods:
            time_bounds(model, warm_l, warm_u, method, 1)   # lazy initialisation, caches
            for batch in batches:
                if skipped(skips, net, method, batch):
                    print(f"{net:<16} {method:<11} {batch:>5} {'skipped':>10}", flush=True)
                    continue
                lower, upper = boxes(centres[:batch], eps, shape, args.device, torch.float32)
                seconds, width = time_bounds(model, lower, upper, method, args.repeats)
                target = TARGET_SECONDS.get((net, batch)) if method == "crown" else None
                theirs = f"{batch / target:12.1f}" if target else f"{'-':>12}"
                ratio = f"{target / seconds:6.2f}" if target else f"{'-':>6}"
                print(f"{net:<16} {method:<11} {batch:>5} {seconds * 1000:>10.1f} {batch / seconds:>9.1f} "
                      f"{theirs} {ratio} {width:>10.4g} {peak_rss_mib():>12.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
