"""Root bounds of the nonlinear suite's sigmoid / tanh instances: CROWN and alpha-CROWN (default AlphaConfig),
worst margin lower bound (> 0 proves) and alpha-CROWN's seconds, one CSV row per instance on stdout.

    PYTHONPATH=<tree> .venv/bin/python benchmarks/nonlinear/root_bounds.py > root.csv

Instances: runs/H2b/sshaped_instances.csv (the sigmoid / tanh rows of benchmarks/data/nonlinear/instances.csv)."""
import sys, time, torch
torch.set_num_threads(1)
from verifier.api import BoundedModel
from verifier.io.vnnlib import load_vnnlib
from verifier.spec import region_specs
from verifier.bounds.alpha import alpha_crown, AlphaConfig
from verifier.bounds.crown import crown_bounds, output_bounds
from verifier.ops import Bounds
import os
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'nonlinear') + '/'
for onnx, vnn in [l.strip().split(',')[:2] for l in open(root + 'instances.csv') if ('sigmoid' in l or 'tanh' in l)]:
    m = BoundedModel(root+onnx); g = list(m._graphs.values())[0]
    prop = load_vnnlib(root+vnn)
    spec = region_specs(prop, g.input_shape, 'cpu', torch.float32)[0]
    box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0)); C = spec.C.unsqueeze(0)
    with torch.no_grad():
        cl = output_bounds(g, box, C, crown_bounds(g, box), need_upper=False)[0] - spec.rhs
    t=time.time(); al = alpha_crown(g, box, C, AlphaConfig(), need_upper=False)[0].detach() - spec.rhs
    print(f"{vnn.split('/')[-1]},{spec.worst(cl)[0].item():.4f},{spec.worst(al)[0].item():.4f},{time.time()-t:.1f}", flush=True)
