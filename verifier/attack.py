"""Falsification: projected gradient descent towards each output disjunct, and the independent
check of a candidate counterexample on the original ONNX file with onnxruntime."""
from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .spec import RegionSpec


@dataclass(frozen=True)
class AttackConfig:
    """PGD before the search (``verify``); the searches' own attacks take their sizes and shares
    from ``BabConfig`` (attack_*, relu_attack_*)."""

    restarts: int = 20             # per disjunct
    steps: int = 50
    step_fraction: float = 0.25    # initial step, as a fraction of the box width; decays to ~0
    seed: int = 0
    # at most this share of the time left when the attack phase starts (after IBP and CROWN):
    # 20 restarts x 19 disjuncts of a conv net took all of metaroom's 60 s on one thread, a
    # property IBP proves in 0.15 s; the search's own attacks find what a longer one would
    time_share: float = 0.1


@dataclass(frozen=True)
class AttackOutcome:
    """point: (*in) violating some disjunct, or None. best_margin: the lowest worst-disjunct margin
    (``spec.worst`` of the margins) over every point the attack evaluated -- an upper bound on the
    minimum over the box, <= 0 where a violation was found; None if no point was evaluated."""

    point: Optional[Tensor]
    best_margin: Optional[float]


def pgd_attack(forward: Callable[[Tensor], Tensor], spec: RegionSpec, config: AttackConfig = AttackConfig(),
               deadline: Optional[float] = None) -> Optional[Tensor]:
    """The violating point of ``pgd_search`` (shape (*in)), or None."""
    return pgd_search(forward, spec, config, deadline).point


def pgd_search(forward: Callable[[Tensor], Tensor], spec: RegionSpec, config: AttackConfig = AttackConfig(),
               deadline: Optional[float] = None, starts: Optional[Tensor] = None) -> AttackOutcome:
    """Search the box for a point violating some disjunct. forward: (N, *in) -> (N, *out).

    Every (restart, disjunct) pair descends on the disjunct's worst margin (max over its rows);
    the first point at which all rows of a disjunct are <= 0 is returned, with the best margin seen.
    The restarts begin at the box centre, then at ``starts`` (S, *in) (points inside the box, e.g.
    promising points of a branch-and-bound search; as many as the restarts leave room for),
    then at random points.
    """
    lo, hi = spec.lower.unsqueeze(0), spec.upper.unsqueeze(0)
    K = spec.n_disjuncts
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    n = config.restarts * K
    x = lo + (hi - lo) * torch.rand((n, *lo.shape[1:]), generator=gen, dtype=lo.dtype).to(lo.device)
    x[:K] = ((lo + hi) / 2).expand(K, *lo.shape[1:])  # the centre is a good first guess
    if starts is not None and n > K:
        starts = starts[:n - K].to(x)
        x[K:K + len(starts)] = torch.minimum(torch.maximum(starts, lo), hi)
    target = torch.arange(K, device=lo.device).repeat(config.restarts)            # (n,)
    row_mask = spec.disjunct.unsqueeze(0) == target.unsqueeze(1)                 # (n, R)
    width = hi - lo
    best = None                                                                  # () tensor
    for step in range(config.steps + 1):
        x = x.detach().requires_grad_(True)
        margins = spec.margins(forward(x))
        per_disjunct = spec.per_disjunct(margins.detach())                       # (n, K)
        lowest = per_disjunct.amin()
        best = lowest if best is None else torch.minimum(best, lowest)
        found = (per_disjunct <= 0).any(1)
        if bool(found.any()):
            return AttackOutcome(x[found.nonzero()[0, 0]].detach(), float(best))
        if step == config.steps or (deadline is not None and time.monotonic() > deadline):
            break
        objective = margins.masked_fill(~row_mask, -float("inf")).amax(1)       # (n,)
        grad, = torch.autograd.grad(objective.sum(), x)
        alpha = config.step_fraction * (1 - step / config.steps) + 1e-3
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - alpha * width * grad.sign(), lo), hi)
    return AttackOutcome(None, None if best is None else float(best))


def inside_box(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Round x to float32 while keeping every entry inside [lower, upper] (float64 bounds)."""
    x32 = np.clip(x.astype(np.float64), lower, upper).astype(np.float32)
    too_low = x32.astype(np.float64) < lower
    too_high = x32.astype(np.float64) > upper
    x32[too_low] = np.nextafter(x32[too_low], np.float32(np.inf))
    x32[too_high] = np.nextafter(x32[too_high], np.float32(-np.inf))
    return x32


class OnnxChecker:
    """Runs the original ONNX file with onnxruntime, independently of our conversion."""

    def __init__(self, path: str, input_name: str, input_layout: tuple[int, ...]):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        source = path
        if str(path).endswith(".gz"):   # onnxruntime reads the model's bytes as well as its path
            with gzip.open(path, "rb") as f:
                source = f.read()
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name, self.layout = input_name, input_layout
        self.output_name = self.session.get_outputs()[0].name
        kind = next(i for i in self.session.get_inputs() if i.name == input_name).type
        self.dtype = np.float64 if kind == "tensor(double)" else np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: flat input (float32 values, exact in either input dtype) -> flat float64 outputs."""
        out = self.session.run([self.output_name], {self.input_name: x.astype(self.dtype).reshape(self.layout)})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)


def confirm(spec: RegionSpec, x: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray]):
    """Check a candidate with a concrete run; returns (x32, y) if it violates a disjunct, else None."""
    lower = spec.lower.detach().cpu().double().numpy().reshape(-1)
    upper = spec.upper.detach().cpu().double().numpy().reshape(-1)
    x32 = inside_box(x.reshape(-1), lower, upper)
    if np.any(x32 < lower) or np.any(x32 > upper):
        return None
    y = evaluate(x32)
    C = spec.C.detach().cpu().double().numpy()
    rhs = spec.rhs.detach().cpu().double().numpy()
    margins = C @ y - rhs
    disjunct = spec.disjunct.cpu().numpy()
    for k in range(spec.n_disjuncts):
        rows = disjunct == k
        if np.all(margins[rows] <= 0):
            return x32, y
    return None
