"""Complete/incomplete verification of a VNN-LIB property: attack, bound, then search.

The verdict is ``unsat`` only when sound bounds prove every disjunct of every region impossible,
``sat`` only with a counterexample that a concrete run of the original model confirms.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
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
from .float_check import prepare_float_mode, recheck_counterexample
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
    float_mode: str = "sound"    # "fast": no rounding analysis (verifier/bounds/floating.py, issue 26)


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


def ibp_lower_margins(graph, spec: RegionSpec) -> tuple[torch.Tensor, list[Bounds]]:
    """Sound lower bounds (1, R) of the margins C y - rhs over the region's box by interval
    propagation, and the IBP bounds per node (1, *shape) behind them: the cheapest bound there is."""
    box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
    with torch.no_grad():
        ibp = ibp_bounds(graph, box)
    out = ibp[graph.output]
    C = spec.C.unsqueeze(0).flatten(2)                                         # (1, R, n_out)
    lo, hi = out.lower.flatten(1).unsqueeze(-1), out.upper.flatten(1).unsqueeze(-1)
    lb = (C.clamp(min=0) @ lo + C.clamp(max=0) @ hi).squeeze(-1)             # (1, R)
    return lb - spec.rhs, ibp


def region_lower_margins(model: BoundedModel, spec: RegionSpec, config: VerifyConfig, alpha: Optional[bool] = None,
                         root: Optional[RootRecord] = None, deadline: Optional[float] = None,
                         crown: Optional[RegionBounds] = None) -> RegionBounds:
    """Sound lower bounds of the margins C y - rhs over the region's box, and the intermediate
    bounds behind them: CROWN first (or ``crown``, CROWN's bounds computed before), then
    alpha-CROWN where CROWN does not prove it (``alpha`` None), always (True) or never (False).
    ``root`` receives the worst-disjunct bound of each method run."""
    graph = model.graph()
    box = Bounds(spec.lower.unsqueeze(0), spec.upper.unsqueeze(0))
    C = spec.C.unsqueeze(0)
    if crown is None:
        with torch.no_grad():
            bounds = crown_bounds(graph, box)
            lb, _ = output_bounds(graph, box, C, bounds, need_upper=False)
        margins = lb - spec.rhs
        if root is not None:
            root.crown, root.unstable["crown"] = float(spec.worst(margins)[0]), unstable_per_layer(graph, bounds)
    else:
        margins, bounds = crown.margins, crown.bounds
    if not graph.relu_nodes() or alpha is False or (spec.proven(margins).all() and alpha is None):
        if root is not None and not graph.relu_nodes():   # no relaxation to optimise: alpha = CROWN
            root.alpha, root.unstable["alpha"] = root.crown, []
        return RegionBounds(margins, bounds, None)
    crown_bounds_ = bounds
    lb, _, bounds, alphas = alpha_crown(graph, box, C, config.alpha, need_upper=False, initial=crown_bounds_,
                                        deadline=deadline)
    margins = torch.maximum(margins, lb - spec.rhs)
    if root is not None:
        root.alpha, root.unstable["alpha"] = float(spec.worst(margins)[0]), unstable_per_layer(graph, bounds)
    return RegionBounds(margins, bounds, intermediate_slopes(graph, alphas, crown_bounds_))


def complete_root_records(model: BoundedModel, prop: Property, records: SubdomainRecords,
                          config: VerifyConfig = VerifyConfig()) -> None:
    """Fill what ``verify`` left out of each region's root record (it bounds only what the verdict
    needs): IBP, CROWN and alpha-CROWN where a cheaper bound or the attack already decided, and
    the attack's best margin where a bound decided before any attack (within the attack's time
    share). Runs after
    the verdict, so statistics never change the timing of the verification itself."""
    graph = model.graph()
    for i, spec in enumerate(region_specs(prop, graph.input_shape, model.device, model.dtype)):
        root = records.root(i)
        if root.ibp is None:
            margins, ibp = ibp_lower_margins(graph, spec)
            root.ibp, root.unstable["ibp"] = float(spec.worst(margins)[0]), unstable_per_layer(graph, ibp)
        if root.crown is None or root.alpha is None:
            region_lower_margins(model, spec, config, alpha=True, root=root)
        if root.attack is None and not spec.empty_disjunct:   # the other end of the relaxation gap
            attack = pgd_search(graph.forward, spec, config.attack,
                                time.monotonic() + config.attack.time_share * config.timeout)
            root.attack = attack.best_margin


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


@contextmanager
def _phase(records: SubdomainRecords, name: str):
    """Time the block as phase ``name`` of ``records`` (kept even when the block is interrupted)."""
    began = time.monotonic()
    try:
        yield
    finally:
        records.add_phase(name, time.monotonic() - began)


SEARCH_UNDECIDED = ("the search ended without a verdict: more open domains than bab.max_domains, input "
                    "boxes at bab.min_box_width, or a leaf the LP could not decide (see the log)")


def verify(model: BoundedModel, prop: Property, config: VerifyConfig = VerifyConfig(),
           log: Callable[[str], None] = lambda s: None,
           records: Optional[SubdomainRecords] = None) -> VerificationResult:
    """Decide ``prop`` on ``model`` within ``config.timeout`` seconds.

    Phases, cheapest first, each over the regions the earlier ones left open: IBP, then CROWN
    (milliseconds, and on some models all it takes: VNN-COMP 2024 metaroom is proven by IBP in
    0.15 s, while one PGD attack of 20 restarts x 19 disjuncts took the whole 60 s); then PGD,
    within ``config.attack.time_share`` of the time left; then alpha-CROWN (not before input
    splitting, which bounds its boxes itself); then branch and bound. ``records`` (created here if
    None) receives what each phase found and its seconds, so a caller that interrupts the run
    keeps them (``verifier.cli``'s wall-clock safety net)."""
    start = time.monotonic()
    deadline = start + config.timeout
    records = records if records is not None else SubdomainRecords(start=start)
    graph = model.graph()
    # float-soundness pass (issue 26): rounding bounds in every bound; no rule for an op: unknown
    if (float_reason := prepare_float_mode(model, config.float_mode, log)) is not None:
        return VerificationResult("unknown", time.monotonic() - start, details={"reason": float_reason})
    specs = region_specs(prop, graph.input_shape, model.device, model.dtype)
    evaluate = concrete_evaluator(model)

    def elapsed():
        return time.monotonic() - start

    def out_of_time(phase: str) -> Optional[VerificationResult]:
        if time.monotonic() <= deadline:
            return None
        records.cut = f"time limit reached during the {phase}"
        return VerificationResult("timeout", elapsed(), details={"reason": records.cut}, records=records)

    def sat_if_confirmed(i: int, candidate) -> Optional[VerificationResult]:
        found = confirm(specs[i], candidate.detach().cpu().double().numpy(), evaluate)
        if found is None:
            log(f"region {i}: attack candidate not confirmed by the concrete run; ignored")
            return None
        log(f"region {i}: counterexample confirmed by a concrete run")
        details = {"region": i, **recheck_counterexample(model, specs[i], found, log)}   # issue 26
        return VerificationResult("sat", elapsed(), found, details, records)

    use_input_split = config.complete and (config.bab.input_split == "on" or (
        config.bab.input_split == "auto" and graph.nodes[0].numel <= config.bab.input_split_max_dim))
    crown_roots: dict[int, RegionBounds] = {}
    for i, spec in enumerate(specs):   # cheap bounds first: IBP, then CROWN
        if spec.empty_disjunct:        # a disjunct without constraints: every point violates it
            if (result := sat_if_confirmed(i, (spec.lower + spec.upper) / 2)) is not None:
                return result
        root = records.root(i)
        with _phase(records, "ibp"):
            margins, ibp = ibp_lower_margins(graph, spec)
            root.ibp, root.unstable["ibp"] = float(spec.worst(margins)[0]), unstable_per_layer(graph, ibp)
        if bool(spec.proven(margins).all()):
            log(f"region {i}: proven by IBP (worst disjunct lower margin {root.ibp:.6g})")
            continue
        with _phase(records, "crown"):
            crown_roots[i] = region_lower_margins(model, spec, config, alpha=False, root=root)
        if bool(spec.proven(crown_roots[i].margins).all()):
            log(f"region {i}: proven by CROWN (worst disjunct lower margin {root.crown:.6g})")
            del crown_roots[i]
        if (result := out_of_time("cheap bounds")) is not None:
            return result
    open_regions = sorted(crown_roots)
    if not open_regions:
        return VerificationResult("unsat", elapsed(), records=records)

    # falsification: sat answers are cheap when they exist, but one attack may not take the budget
    attack_end = time.monotonic() + config.attack.time_share * max(0.0, deadline - time.monotonic())
    for n, i in enumerate(open_regions):
        now = time.monotonic()
        with _phase(records, "attack"):
            attack = pgd_search(graph.forward, specs[i], config.attack,
                                min(deadline, now + max(0.0, attack_end - now) / (len(open_regions) - n)))
        records.root(i).attack = attack.best_margin
        if attack.point is not None and (result := sat_if_confirmed(i, attack.point)) is not None:
            return result
        if (result := out_of_time("attack")) is not None:
            return result

    roots: dict[int, RegionBounds] = dict(crown_roots)
    for i in open_regions:
        if not use_input_split:   # input splitting bounds its boxes itself, from the whole box on
            with _phase(records, "alpha"):
                roots[i] = region_lower_margins(model, specs[i], config, root=records.root(i), deadline=deadline,
                                                crown=crown_roots[i])
        log(f"region {i}: worst disjunct lower margin {float(specs[i].worst(roots[i].margins)[0]):.6g}")
        if (result := out_of_time("root bounds")) is not None:
            return result
    unproven = [i for i in open_regions if not bool(specs[i].proven(roots[i].margins).all())]
    if not unproven:
        return VerificationResult("unsat", elapsed(), records=records)
    if not config.complete:
        return VerificationResult("unknown", elapsed(), records=records, details={
            "unproven_regions": unproven,
            "reason": f"incomplete run (no branch and bound): the root bounds leave region(s) {unproven} unproven"})
    with _phase(records, "search"):
        outcome, found = _search(model, specs, roots, unproven, use_input_split, evaluate, config, records,
                                 deadline, log)
    if outcome == "sat":
        details = {"region": found[0], **recheck_counterexample(model, specs[found[0]], found[1], log)}   # issue 26
        return VerificationResult("sat", elapsed(), found[1], details, records)
    details = {"unproven_regions": unproven}
    if outcome == "timeout":
        records.cut = "time limit reached during the search"
        details["reason"] = records.cut
    elif outcome == "unknown":
        details["reason"] = SEARCH_UNDECIDED
    return VerificationResult(outcome, elapsed(), details=details, records=records)


def _search(model: BoundedModel, specs: list[RegionSpec], roots: dict[int, RegionBounds], unproven: list[int],
            use_input_split: bool, evaluate, config: VerifyConfig, records: SubdomainRecords, deadline: float,
            log: Callable[[str], None]) -> tuple[str, Optional[tuple]]:
    """Branch and bound on each unproven region: ("unsat" | "sat" | "timeout" | "unknown",
    (region, counterexample) where sat)."""
    graph = model.graph()
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
            return "sat", (i, found)
        if outcome != "unsat":
            status = outcome if status == "unsat" or outcome == "timeout" else status
            if outcome == "timeout":
                break
    return status, None


def format_result(result: VerificationResult) -> str:
    """VNN-COMP result file text: the verdict, and for sat the assignment of every X_i and Y_j."""
    if result.status != "sat" or result.counterexample is None:
        return result.status + "\n"
    x, y = result.counterexample
    lines = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.reshape(-1))]
    lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y.reshape(-1))]
    return "sat\n(" + "\n ".join(lines) + ")\n"
