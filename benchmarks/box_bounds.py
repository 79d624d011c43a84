"""How many input boxes each bound proves: CROWN, then alpha-CROWN (output slopes only, and with
the intermediate layers' slopes) on the boxes CROWN leaves open. The question it answers: is a
tighter bound per box worth its cost inside input splitting?

    python -m benchmarks.box_bounds ONNX VNNLIB [--grid 16,16,8,4,4] [--open 2000] [--threads 1]

The region's box is cut into a regular grid (one entry per input dimension); every cell is
bounded by CROWN, and the first ``--open`` cells CROWN does not prove by alpha-CROWN at 10 and
30 iterations. Prints counts and seconds.
"""
from __future__ import annotations

import argparse
import time

import torch

from verifier import BoundedModel
from verifier.bab.input_split import bound_boxes
from verifier.bounds.alpha import AlphaConfig, alpha_crown
from verifier.io.vnnlib import load_vnnlib
from verifier.ops import Bounds
from verifier.spec import region_specs


def grid_boxes(lower: torch.Tensor, upper: torch.Tensor, cells: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The box lower/upper (*in) cut into prod(cells) cells: (M, *in) each."""
    lo, hi = lower.flatten(), upper.flatten()
    if len(cells) != lo.numel():
        raise SystemExit(f"--grid needs {lo.numel()} entries, one per input, got {len(cells)}")
    index = torch.cartesian_prod(*[torch.arange(c) for c in cells]).reshape(-1, len(cells)).to(lo)
    width = (hi - lo) / torch.tensor(cells, dtype=lo.dtype)
    cell_lo = (lo + index * width).reshape(-1, *lower.shape)
    return cell_lo, cell_lo + width.reshape(lower.shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.box_bounds", description=__doc__.split("\n\n")[0])
    p.add_argument("onnx")
    p.add_argument("vnnlib")
    p.add_argument("--grid", default="16,16,8,4,4", help="cells per input dimension (default 16,16,8,4,4)")
    p.add_argument("--open", type=int, default=2000, help="CROWN-open cells given to alpha-CROWN (default 2000)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = BoundedModel(args.onnx)
    graph = model.graph()
    prop = load_vnnlib(args.vnnlib, n_inputs=graph.nodes[0].numel, n_outputs=graph.nodes[graph.output].numel)
    spec = region_specs(prop, graph.input_shape, model.device, model.dtype)[0]
    lo, hi = grid_boxes(spec.lower, spec.upper, [int(c) for c in args.grid.split(",")])
    t0 = time.perf_counter()
    with torch.no_grad():
        margins, _, _ = bound_boxes(graph, spec, lo, hi)
    proven = spec.proven(margins)
    print(f"{len(lo)} boxes: CROWN proves {int(proven.sum())} in {time.perf_counter() - t0:.2f} s", flush=True)
    cells = (~proven).nonzero().squeeze(1)[:args.open]
    box = Bounds(lo[cells], hi[cells])
    C = spec.C.unsqueeze(0).expand(len(cells), *spec.C.shape)
    for intermediate in (False, True):
        for iterations in (10, 30):
            t0 = time.perf_counter()
            config = AlphaConfig(iterations=iterations, optimize_intermediate=intermediate,
                                 early_stop_patience=iterations)
            lb, _, _, _ = alpha_crown(graph, box, C, config, need_upper=False)
            closed = spec.proven(torch.maximum(lb - spec.rhs, margins[cells]))
            print(f"alpha-CROWN ({'all slopes' if intermediate else 'output slopes'}, {iterations} it): "
                  f"proves {int(closed.sum())} of {len(cells)} CROWN-open boxes in "
                  f"{time.perf_counter() - t0:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
