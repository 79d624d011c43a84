"""Complete/incomplete verification of a VNN-LIB property: attack, bound, then search.

The verdict is ``unsat`` only when sound bounds prove every disjunct of every region impossible,
``sat`` only with a counterexample that a concrete run of the original model confirms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from .api import BoundedModel
from .attack import AttackConfig, OnnxChecker, confirm, pgd_search
from .bab.config import BabConfig
from .bab.input_split import input_split_search
from .bab.records import RootRecord, SubdomainRecords
from .bab.general_split import split_search
from .bounds.alpha import AlphaConfig, alpha_crown, intermediate_slopes
from .bounds.crown import IntermediateSlopes, crown_bounds, output_bounds
from .bounds.ibp import ibp_bounds
from .io.vnnlib import Property
from .ops import Bounds
from .spec import RegionSpec, region_specs


@dataclass(frozen=True)
class VerifyConfig:
    timeout: float = 300.0
    attack: AttackConfig = AttackConfig()
    alpha: AlphaConfig = AlphaConfig()
    bab: BabConfig = BabConfig()
    complete: bool = True        # run branch and bound after the root bounds (False: incomplete)


@dataclass
class VerificationResult:
    status: str                                   # "sat" | "unsat" | "timeout" | "unknown"
    seconds: float
    counterexample: Optional[tuple[np.ndarray, np.ndarray]] = None   # (x flat float32, y flat)
    details: dict = field(default_factory=dict)
    records: Optional[SubdomainRecords] = None


def concrete_evaluator(model: BoundedModel) -> Callable[[np.ndarray], np.ndarray]:
    """The independent check: onnxruntime on the ONNX file, or the original nn.Module."""
    if model.onnx is not None:
        return OnnxChecker(model.onnx.path, model.onnx.input_name, model.onnx.input_layout)
    module, shape = model.module, model.input_shape

    def run(x32: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            p = next(iter(module.parameters()), None)
            x = torch.as_tensor(x32).reshape(1, *shape)
            if p is not None:
                x = x.to(device=p.device, dtype=p.dtype)
            return module(x).double().cpu().numpy().reshape(-1)
    return run


def unstable_per_layer(graph, bounds: list) -> list[int]:
    """Unstable ReLUs (l < 0 < u) per ReLU layer of one subdomain; bounds: per node, (1, *shape)."""
    return [int(((bounds[z].lower < 0) & (bounds[z].upper > 0)).sum())
            for z in (graph.nodes[r].inputs[0] for r in graph.relu_nodes())]


class RegionBounds(NamedTuple):
    """What ``region_lower_margins`` proved about one region's box."""

    margins: torch.Tensor                  # (1, R) sound lower bounds of C y - rhs
    bounds: list[Optional[Bounds]]         # per node, (1, *shape): the bounds behind them
    slopes: Optional[IntermediateSlopes]   # alpha-CROWN's for the intermediate bounds (None: not run)


def region_lower_margins(model: BoundedModel, spec: RegionSpec, config: VerifyConfig, alpha: Optional[bool] = None,
                         root: Optional[RootRecord] = None, deadline: Optional[float] = None) -> RegionBounds:
    """Sound lower bounds of the margins C y - rhs over the region's box, and the intermediate
    bounds behind them: CROWN first, then alpha-CROWN where CROWN does not prove it (``alpha``
    None), always (True) or never (False). ``root`` receives the worst-disjunct bound of each
    method run."""
    graph = model.graph()
    box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
    C = spec.C.unsqueeze(0)
    with torch.no_grad():
        bounds = crown_bounds(graph, box)
        lb, _ = output_bounds(graph, box, C, bounds, need_upper=False)
    margins = lb - spec.rhs
    if root is not None:
        root.crown, root.unstable["crown"] = float(spec.worst(margins)[0]), unstable_per_layer(graph, bounds)
    if not graph.relu_nodes() or alpha is False or (spec.proven(margins).all() and alpha is None):
        if root is not None and not graph.relu_nodes():   # no relaxation to optimise: alpha = CROWN
            root.alpha, root.unstable["alpha"] = root.crown, []
        return RegionBounds(margins, bounds, None)
    crown = bounds
    lb, _, bounds, alphas = alpha_crown(graph, box, C, config.alpha, need_upper=False, initial=crown,
                                        deadline=deadline)
    margins = torch.maximum(margins, lb - spec.rhs)
    if root is not None:
        root.alpha, root.unstable["alpha"] = float(spec.worst(margins)[0]), unstable_per_layer(graph, bounds)
    return RegionBounds(margins, bounds, intermediate_slopes(graph, alphas, crown))


def complete_root_records(model: BoundedModel, prop: Property, records: SubdomainRecords,
                          config: VerifyConfig = VerifyConfig()) -> None:
    """Fill what ``verify`` left out of each region's root record (it bounds only what the verdict
    needs): IBP always, CROWN and alpha-CROWN where the attack or CROWN already decided. Runs after
    the verdict, so statistics never change the timing of the verification itself."""
    graph = model.graph()
    for i, spec in enumerate(region_specs(prop, graph.input_shape, model.device, model.dtype)):
        root = records.root(i)
        box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
        with torch.no_grad():
            ibp = ibp_bounds(graph, box)
        out = ibp[graph.output]
        C = spec.C.unsqueeze(0).flatten(2)                                         # (1, R, n_out)
        lo, hi = out.lower.flatten(1).unsqueeze(-1), out.upper.flatten(1).unsqueeze(-1)
        lb = (C.clamp(min=0) @ lo + C.clamp(max=0) @ hi).squeeze(-1)             # (1, R)
        root.ibp, root.unstable["ibp"] = float(spec.worst(lb - spec.rhs)[0]), unstable_per_layer(graph, ibp)
        if root.crown is None or root.alpha is None:
            region_lower_margins(model, spec, config, alpha=True, root=root)


def make_checker(graph, spec: RegionSpec, evaluate, limit: int = 8):
    """check(points (M, *in)) -> confirmed counterexample or None: screens the points on the bound
    graph, then confirms the first few violating ones by a concrete run of the original model."""
    def check(points: torch.Tensor):
        with torch.no_grad():
            margins = spec.margins(graph.forward(points))
        hits = spec.violated(margins).any(1).nonzero().squeeze(1)[:limit]
        for i in hits.tolist():
            found = confirm(spec, points[i].detach().cpu().double().numpy(), evaluate)
            if found is not None:
                return found
        return None
    return check


def verify(model: BoundedModel, prop: Property, config: VerifyConfig = VerifyConfig(),
           log: Callable[[str], None] = lambda s: None) -> VerificationResult:
    start = time.monotonic()
    deadline = start + config.timeout
    graph = model.graph()
    specs = region_specs(prop, graph.input_shape, model.device, model.dtype)
    evaluate = concrete_evaluator(model)
    forward = graph.forward

    def elapsed():
        return time.monotonic() - start

    records = SubdomainRecords(start=start)
    for i, spec in enumerate(specs):   # falsification first: sat answers are cheap
        if spec.empty_disjunct:
            candidate = (spec.lower + spec.upper) / 2
        else:
            attack = pgd_search(forward, spec, config.attack, deadline)
            candidate, records.root(i).attack = attack.point, attack.best_margin
        if candidate is not None:
            found = confirm(spec, candidate.detach().cpu().double().numpy(), evaluate)
            if found is not None:
                log(f"region {i}: counterexample confirmed by a concrete run")
                return VerificationResult("sat", elapsed(), found, {"region": i}, records)
            log(f"region {i}: attack candidate not confirmed by the concrete run; ignored")
        if time.monotonic() > deadline:
            return VerificationResult("timeout", elapsed(), records=records)
    use_input_split = config.complete and (config.bab.input_split == "on" or (
        config.bab.input_split == "auto" and graph.nodes[0].numel <= config.bab.input_split_max_dim))
    # input splitting bounds its boxes itself, from the whole box on: alpha-CROWN on the root
    # would be spent twice (on ACAS Xu, 0.4 s of a 0.6 s verification; RESULTS.md)
    root_alpha = False if use_input_split else None
    roots = []
    for i, spec in enumerate(specs):
        roots.append(region_lower_margins(model, spec, config, alpha=root_alpha, root=records.root(i),
                                          deadline=deadline))
        log(f"region {i}: worst disjunct lower margin {float(spec.worst(roots[i].margins)[0]):.6g}")
        if time.monotonic() > deadline:
            return VerificationResult("timeout", elapsed(), records=records)
    unproven = [i for i, root in enumerate(roots) if not bool(specs[i].proven(root.margins).all())]
    if not unproven:
        return VerificationResult("unsat", elapsed(), records=records)
    if not config.complete:
        return VerificationResult("unknown", elapsed(), details={"unproven_regions": unproven}, records=records)
    status = "unsat"
    for i in unproven:
        spec = specs[i]
        check = make_checker(graph, spec, evaluate)
        if use_input_split:
            log(f"region {i}: input splitting")
            outcome, found = input_split_search(graph, spec, check, deadline, config.bab, records, i, log)
        else:
            per_disjunct = spec.per_disjunct(roots[i].margins)[0]
            outcome, found = "unsat", None
            for k in range(spec.n_disjuncts):
                if per_disjunct[k] > 0:
                    continue
                log(f"region {i}, disjunct {k}: ReLU splitting (root bound {float(per_disjunct[k]):.4g})")
                search = split_search(graph, spec.select(k), check, config.bab, records, i, log)
                outcome, found = search.run(deadline, reference=roots[i].bounds, slopes=roots[i].slopes)
                if outcome != "unsat":
                    break
        if outcome == "sat":
            return VerificationResult("sat", elapsed(), found, {"region": i}, records)
        if outcome != "unsat":
            status = outcome if status == "unsat" or outcome == "timeout" else status
            if outcome == "timeout":
                break
    return VerificationResult(status, elapsed(), details={"unproven_regions": unproven}, records=records)



def format_result(result: VerificationResult) -> str:
    """VNN-COMP result file text: the verdict, and for sat the assignment of every X_i and Y_j."""
    if result.status != "sat" or result.counterexample is None:
        return result.status + "\n"
    x, y = result.counterexample
    lines = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.reshape(-1))]
    lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y.reshape(-1))]
    return "sat\n(" + "\n ".join(lines) + ")\n"
