"""What float mode "sound" costs in bound computations (issue 26): CROWN (every intermediate bound
by a backward pass, then the output) and alpha-CROWN on the same boxes, without the analysis
("fast": none attached) and with it, interleaved per repeat; the median ms per call, the ratio,
and how much the widening moves the mean output bound.

    python -m benchmarks.float_cost --suite-dir ../shared/benchmarks/vnncomp2021 --threads 1

Networks: mnistfc 256x2 / 256x4 / 256x6 and the oval21 base CNN (as benchmarks/bounds_speed.py).
Boxes: +-eps around uniform points of [0, 1]^d (seed 0), eps 0.02 (mnistfc) and 2/255 (oval21).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from verifier import BoundedModel
from verifier.bounds.alpha import AlphaConfig, alpha_crown
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.bounds.floating import attach, float_model_for
from verifier.ops import Bounds

NETS = {"mnist-net_256x2": ("mnistfc/mnist-net_256x2.onnx", 0.02), "mnist-net_256x4": ("mnistfc/mnist-net_256x4.onnx", 0.02),
        "mnist-net_256x6": ("mnistfc/mnist-net_256x6.onnx", 0.02), "cifar_base_kw": ("oval21/nets/cifar_base_kw.onnx", 2 / 255)}


def _time(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nets", nargs="+", default=list(NETS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("net,method,batch,fast_ms,sound_ms,ratio,mean_width_fast,mean_width_sound")
    for name in args.nets:
        rel, eps = NETS[name]
        model = BoundedModel(os.path.join(args.suite_dir, rel))
        graph = model.graph()
        n_out = graph.nodes[graph.output].numel
        for batch in args.batch:
            gen = torch.Generator().manual_seed(0)
            center = torch.rand((batch, *graph.input_shape), generator=gen)
            box = Bounds((center - eps).clamp(0, 1), (center + eps).clamp(0, 1))
            C = torch.eye(n_out).unsqueeze(0).expand(batch, n_out, n_out)
            methods = {"crown": lambda: output_bounds(graph, box, C, crown_bounds(graph, box))}
            if batch == 1:
                methods["alpha-crown"] = lambda: alpha_crown(graph, box, C, AlphaConfig(iterations=20))[:2]
            for method, fn in methods.items():
                timings = {"fast": [], "sound": []}
                widths = {}
                for _ in range(args.repeats):       # interleaved: the machine's drift hits both alike
                    for mode in ("fast", "sound"):
                        attach(graph, None if mode == "fast" else float_model_for(model, "sound"))
                        with torch.no_grad() if method == "crown" else torch.enable_grad():
                            seconds, (lb, ub) = _time(fn, 1)
                        timings[mode].append(seconds)
                        widths[mode] = float((ub - lb).mean())
                fast, sound = statistics.median(timings["fast"]), statistics.median(timings["sound"])
                print(f"{name},{method},{batch},{fast * 1e3:.1f},{sound * 1e3:.1f},{sound / fast:.3f},"
                      f"{widths['fast']:.6g},{widths['sound']:.6g}", flush=True)
        attach(graph, None)


if __name__ == "__main__":
    main()
