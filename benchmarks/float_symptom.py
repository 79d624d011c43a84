"""The symptom of issue 26, measured: on tiny boxes, how far onnxruntime's float32 outputs lie
outside our IBP and CROWN output bounds (> 0: outside) and how far CROWN's lower bound exceeds
its upper bound, in float mode fast and sound, float32 and float64.

    python -m benchmarks.float_symptom MODEL.onnx [SPEC.vnnlib ...] [--width 1e-7] [--points 200]

With VNN-LIB files, the boxes are their regions' (metaroom's are single points); without, boxes
of --width around uniform random points of [0, 1]^d (seed 0, --boxes of them). onnxruntime runs
at the box corners, the centre and --points uniform points of each box.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from verifier import BoundedModel
from verifier.attack import OnnxChecker
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.bounds.floating import attach, float_model_for
from verifier.bounds.ibp import ibp_bounds
from verifier.io.vnnlib import load_vnnlib
from verifier.ops import Bounds
from verifier.spec import region_specs


def boxes(model, specs, width: float, count: int):
    """float32 (lower, upper) pairs (*in_shape) to bound."""
    graph = model.graph()
    if specs:
        out = []
        for path in specs:
            for s in region_specs(load_vnnlib(path), graph.input_shape, "cpu", torch.float32):
                out.append((s.lower, s.upper))
        return out
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand((count, *graph.input_shape), generator=gen)
    return [((c - width / 2).clamp(0, 1), (c + width / 2).clamp(0, 1)) for c in centres]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("specs", nargs="*")
    p.add_argument("--width", type=float, default=1e-7)
    p.add_argument("--boxes", type=int, default=5)
    p.add_argument("--points", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("dtype,mode,boxes,max_outside_ibp,max_outside_crown,max_crown_lb_minus_ub,max_abs_output,"
          "mean_crown_width")
    for dtype in (torch.float32, torch.float64):
        model = BoundedModel(args.model, dtype=dtype)
        graph = model.graph()
        check = OnnxChecker(model.onnx.path, model.onnx.input_name, model.onnx.input_layout)
        n_out = graph.nodes[graph.output].numel
        box_list = boxes(model, args.specs, args.width, args.boxes)
        for mode in ("fast", "sound"):
            attach(graph, float_model_for(model, mode))
            outside_ibp = outside_crown = crossing = top = width = -float("inf")
            widths = []
            gen = torch.Generator().manual_seed(1)
            for lower, upper in box_list:
                pts = lower + (upper - lower) * torch.rand((args.points, *lower.shape), generator=gen)
                pts = torch.cat([lower[None], upper[None], ((lower + upper) / 2)[None], pts]).float()
                y = torch.as_tensor(np.stack([check(x.numpy().reshape(-1)) for x in pts]))
                box = Bounds(lower.unsqueeze(0).to(dtype), upper.unsqueeze(0).to(dtype))
                with torch.no_grad():
                    ibp = ibp_bounds(graph, box)[graph.output]
                    lb, ub = output_bounds(graph, box, torch.eye(n_out, dtype=dtype).unsqueeze(0),
                                           crown_bounds(graph, box))
                il, iu = ibp.lower.double().reshape(1, -1), ibp.upper.double().reshape(1, -1)
                cl, cu = lb.double().reshape(1, -1), ub.double().reshape(1, -1)
                outside_ibp = max(outside_ibp, float(torch.maximum(il - y, y - iu).max()))
                outside_crown = max(outside_crown, float(torch.maximum(cl - y, y - cu).max()))
                crossing = max(crossing, float((cl - cu).max()))
                top = max(top, float(y.abs().max()))
                widths.append(float((cu - cl).mean()))
            print(f"{str(dtype).removeprefix('torch.')},{mode},{len(box_list)},{outside_ibp:.3g},{outside_crown:.3g},"
                  f"{crossing:.3g},{top:.3g},{float(np.mean(widths)):.3g}", flush=True)
        attach(graph, None)


if __name__ == "__main__":
    main()
