"""What ``verify`` does about floating point (issue 26): attach the float-soundness analysis
(``verifier.bounds.floating``) to the model's graph, refuse to conclude where an op has no
rounding rule, and re-check a counterexample that lies within the rounding error of the
property's boundary in float64.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import numpy as np
import torch

from .bounds.floating import MODES, attach, float_model_for, unsupported_ops
from .bounds.ibp import ibp_bounds
from .errors import UsageError
from .ops import Bounds
from .spec import RegionSpec

FLOAT_MODE_HELP = ("sound: every bound is widened by rigorous bounds on our own rounding and on the "
                   "difference between the real-valued network and its float32 evaluation by a runtime "
                   "(onnxruntime), so unsat holds for the network as onnxruntime computes it; fast: no "
                   "such widening (an unsat may then rest on rounding)")


def prepare_float_mode(model, mode: str, log: Callable[[str], None]) -> Optional[str]:
    """Attach ``mode``'s analysis to the model's graph and log it. Returns None, or in mode
    "sound" the reason no verdict but sat can be concluded (ops without rounding rules)."""
    if mode not in MODES:
        raise UsageError(f"--float-mode must be one of {', '.join(MODES)}, got {mode!r}")
    graph = model.graph()
    float_model = float_model_for(model, mode)
    attach(graph, float_model)
    if mode == "fast":
        log("float mode: fast (bounds not widened for rounding: an unsat may rest on float error)")
        return None
    missing = unsupported_ops(graph)
    if missing:
        reason = (f"float mode sound: no rounding rule for {', '.join(missing[:3])}"
                  f"{' ...' if len(missing) > 3 else ''}; rerun with --float-mode fast to bound it unsoundly")
        log(reason)
        return reason
    log(f"float mode: sound (our rounding, unit {float_model.own.unit:.3g}, and a float"
        f"{32 if float_model.runtime.unit > 1e-10 else 64} runtime's bounded in every bound)")
    return None


def point_error_bound(model, x32: np.ndarray) -> np.ndarray:
    """Half the width of the sound bounds of the outputs at the single point x32 (flat): a bound
    on |runtime output - real-valued output| there (float mode sound attached). (n_out,)"""
    graph = model.graph()
    x = torch.as_tensor(x32, dtype=model.dtype, device=model.device).reshape(1, *graph.input_shape)
    with torch.no_grad():
        out = ibp_bounds(graph, Bounds(x, x))[graph.output]
    return ((out.upper - out.lower) / 2).double().cpu().numpy().reshape(-1)


def float64_outputs(model, x32: np.ndarray) -> np.ndarray:
    """The network at x32 (flat) evaluated in float64 (the ONNX file's converted module, or the
    nn.Module, copied): (n_out,). A close stand-in for the real-valued network."""
    module = model.onnx.graph_module if model.onnx is not None else model.module
    twin = copy.deepcopy(module).double().cpu().eval()
    layout = model.onnx.input_layout if model.onnx is not None else (1, *model.input_shape)
    with torch.no_grad():
        y = twin(torch.as_tensor(x32, dtype=torch.float64).reshape(layout))
    return y.reshape(-1).numpy()


def recheck_counterexample(model, spec: RegionSpec, found, log: Callable[[str], None]) -> dict:
    """A counterexample ``found`` = (x32, y) confirmed by the runtime: if its worst violated
    margin lies within the rounding error bound of 0, evaluate it in float64 as well and say
    whether the violation exists only in float32. Returns details for the result."""
    if getattr(model.graph(), "float_model", None) is None or model.graph().float_model.mode != "sound":
        return {}
    x32, y = found
    C = spec.C.detach().cpu().double().numpy()
    rhs = spec.rhs.detach().cpu().double().numpy()
    error = np.abs(C) @ point_error_bound(model, x32)
    margins = C @ np.asarray(y, dtype=np.float64) - rhs
    if not bool(np.any(np.abs(margins) <= error)):
        return {}
    y64 = float64_outputs(model, x32)
    margins64 = C @ y64 - rhs
    violated64 = bool(spec.violated(torch.as_tensor(margins64).unsqueeze(0)).any())
    log(f"counterexample within the rounding error of the boundary: float64 evaluation "
        f"{'violates the property too' if violated64 else 'does not violate it (a float32 rounding effect)'}")
    return {"float64_violates": violated64}
