"""Shared helpers of the bound tests: the float tolerance (stated once, here), input-box
samplers, reference evaluation, and the one soundness/ordering check every model case runs.

Soundness is judged against the *true* function: nn.Module cases are evaluated by the module
itself in float64 (independent of the verifier's bound graph), ONNX cases by onnxruntime.
A bound may miss a sample by at most ``tolerance(dtype) * (1 + |value|)``; anything beyond that
is a soundness bug, never a reason to loosen the tolerance.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from verifier import BoundedModel

# ---- the tolerance ----------------------------------------------------------------------------
# Relative + absolute slack allowed between a bound computed in `dtype` and a true value:
# a few hundred ulps of float32 / a few million ulps of float64 on O(1) values -- rounding only.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}

METHODS = ("ibp", "crown", "alpha-crown", "crown-ibp")
DTYPES = (torch.float32, torch.float64)
N_SAMPLES = 10_000          # sampled points per input box (at least; corners come on top)
ALL_CORNERS_UP_TO = 10      # boxes of at most this many input entries get all 2^d vertices too
MODELS_DIR = Path(__file__).parent / "data" / "models"


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- assertions -------------------------------------------------------------------------------
def slack(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Allowed rounding slack at ``value`` (any shape)."""
    return tolerance(dtype) * (1 + value.abs())


def assert_contains(lb: Tensor, ub: Tensor, values: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Every value lies in [lb, ub] up to the tolerance of ``dtype``.

    lb, ub: (B, S); values: (B, n, S) true outputs (or spec @ outputs) of n points per box.
    """
    lb, ub, values = (t.detach().to(torch.float64) for t in (lb, ub, values))
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), f"{what}: non-finite bounds"
    below = (lb.unsqueeze(1) - values) - slack(values, dtype)
    above = (values - ub.unsqueeze(1)) - slack(values, dtype)
    worst_below, worst_above = float(below.max()), float(above.max())
    if worst_below > 0 or worst_above > 0:
        side, worst = ("lower", below) if worst_below >= worst_above else ("upper", above)
        b, n, s = [int(i) for i in torch.unravel_index(worst.argmax(), worst.shape)]
        raise AssertionError(
            f"{what}: {side} bound violated by {float(worst.max()):.3e} beyond tolerance at box {b}, "
            f"sample {n}, output {s}: value {float(values[b, n, s]):.9g}, bounds "
            f"[{float(lb[b, s]):.9g}, {float(ub[b, s]):.9g}]")


def assert_le(small: Tensor, large: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``small <= large`` elementwise up to the tolerance of ``dtype``."""
    small, large = small.detach().to(torch.float64), large.detach().to(torch.float64)
    excess = small - large - slack(large, dtype)
    if float(excess.max()) > 0:
        i = int(excess.flatten().argmax())
        raise AssertionError(f"{what}: {float(small.flatten()[i]):.9g} > {float(large.flatten()[i]):.9g} "
                             f"(by {float(excess.max()):.3e} beyond tolerance) at flat index {i}")


def assert_close(a: Tensor, b: Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert_le(a, b, dtype, what)
    assert_le(b, a, dtype, what)


# ---- input boxes and samples ------------------------------------------------------------------
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_box(input_shape: tuple[int, ...], batch: int, rng: torch.Generator,
               radius: tuple[float, float] = (0.05, 0.5), center_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``batch`` boxes with N(0, center_scale) centres and per-entry radii uniform in ``radius``;
    lower, upper: (batch, *input_shape), float64."""
    center = torch.randn(batch, *input_shape, generator=rng, dtype=torch.float64) * center_scale
    r = radius[0] + (radius[1] - radius[0]) * torch.rand(batch, *input_shape, generator=rng, dtype=torch.float64)
    return center - r, center + r


def sample_box(lower: Tensor, upper: Tensor, rng: torch.Generator, n: int = N_SAMPLES) -> Tensor:
    """Points of each box: (B, m, *shape) with m >= n, float64.

    Three kinds, because bound violations hide at the extremes: uniform points (half), random
    vertices (a quarter), points on random faces (a quarter); plus every vertex of boxes with at
    most ``ALL_CORNERS_UP_TO`` entries.
    """
    lower, upper = lower.to(torch.float64), upper.to(torch.float64)
    B, shape = lower.shape[0], lower.shape[1:]
    d = lower[0].numel()
    n_vertex, n_face = n // 4, n // 4
    n_uniform = n - n_vertex - n_face
    unit = [torch.rand(B, n_uniform, d, generator=rng, dtype=torch.float64),
            torch.randint(0, 2, (B, n_vertex, d), generator=rng).to(torch.float64)]
    face = torch.rand(B, n_face, d, generator=rng, dtype=torch.float64)
    on_face = torch.rand(B, n_face, d, generator=rng) < 0.5
    unit.append(torch.where(on_face, face.round(), face))
    if d <= ALL_CORNERS_UP_TO:
        corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=d)), dtype=torch.float64)
        unit.append(corners.unsqueeze(0).expand(B, -1, -1))
    t = torch.cat(unit, dim=1)                                    # (B, m, d) in [0, 1]
    lo, hi = lower.reshape(B, 1, d), upper.reshape(B, 1, d)
    return (lo + t * (hi - lo)).reshape(B, -1, *shape)


def random_spec(batch: int, n_specs: int, n_out: int, rng: torch.Generator) -> Tensor:
    """Random spec matrices (batch, n_specs, n_out) with mixed signs, float64."""
    return torch.randn(batch, n_specs, n_out, generator=rng, dtype=torch.float64)


# ---- reference evaluation ---------------------------------------------------------------------
@torch.no_grad()
def module_outputs(module64: nn.Module, points: Tensor, chunk: int = 8192) -> Tensor:
    """True outputs of a float64 module at points (B, m, *shape) -> (B, m, n_out), float64."""
    B, m = points.shape[:2]
    flat = points.reshape(B * m, *points.shape[2:])
    out = torch.cat([module64(flat[i:i + chunk]).reshape(min(chunk, B * m - i), -1)
                     for i in range(0, B * m, chunk)])
    return out.reshape(B, m, -1)


def as_float64(module: nn.Module) -> nn.Module:
    """An independent float64 copy of an eval-mode module (the reference function)."""
    return copy.deepcopy(module).double().eval()


def apply_spec(spec: Tensor, outputs: Tensor) -> Tensor:
    """spec (B, S, n_out), outputs (B, m, n_out) -> (B, m, S)."""
    return torch.einsum("bsn,bmn->bms", spec.to(torch.float64), outputs.to(torch.float64))


# ---- model cases ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Case:
    """A model and the input boxes to bound it on.

    ``build(rng)`` returns an eval-mode nn.Module; boxes are ``batch`` random boxes of
    ``input_shape`` (centres N(0, center_scale), radii uniform in ``radius``)."""

    name: str
    build: Callable[[torch.Generator], nn.Module]
    input_shape: tuple[int, ...]
    radius: tuple[float, float] = (0.05, 0.5)
    center_scale: float = 1.0
    batch: int = 2
    n_specs: int = 4
    seed: int = 0

    def __repr__(self) -> str:
        return self.name


@dataclass
class CaseData:
    """One case in one dtype: the module, its BoundedModel, the boxes, samples and true outputs."""

    module: nn.Module
    bm: BoundedModel
    lower: Tensor                   # (B, *input_shape) in the case's dtype
    upper: Tensor
    points: Tensor                  # (B, m, *input_shape) float64, m >= N_SAMPLES
    outputs: Tensor                 # (B, m, n_out) true outputs at the points, float64
    spec: Tensor                    # (B, S, n_out) random spec, float64


@lru_cache(maxsize=None)
def case_data(case: Case, dtype: torch.dtype) -> CaseData:
    rng = generator(case.seed)
    module = case.build(rng).eval()
    lower, upper = random_box(case.input_shape, case.batch, rng, case.radius, case.center_scale)
    points = sample_box(lower, upper, rng)
    outputs = module_outputs(as_float64(module), points)
    spec = random_spec(case.batch, case.n_specs, outputs.shape[-1], rng)
    return CaseData(module, BoundedModel(module, dtype=dtype), lower.to(dtype), upper.to(dtype), points, outputs, spec)


@lru_cache(maxsize=None)
def method_bounds(case: Case, dtype: torch.dtype, method: str):
    """((lb, ub) without a spec: (B, n_out); (lb, ub) with the random spec: (B, S)), detached.
    Not under torch.no_grad(): alpha-CROWN optimises by gradient (no_grad is tested on its own)."""
    data = case_data(case, dtype)
    plain = data.bm.compute_bounds(data.lower, data.upper, method=method)
    with_spec = data.bm.compute_bounds(data.lower, data.upper, data.spec.to(dtype), method=method)
    return tuple(t.detach() for t in plain), tuple(t.detach() for t in with_spec)


def check_contains_samples(case: Case, dtype: torch.dtype, method: str) -> None:
    """The method's bounds (identity spec and random spec) contain the sampled true outputs."""
    data = case_data(case, dtype)
    (lb, ub), (spec_lb, spec_ub) = method_bounds(case, dtype, method)
    what = f"{case.name} {dtype_id(dtype)} {method}"
    assert lb.shape == ub.shape == (case.batch, data.outputs.shape[-1]), f"{what}: shape {tuple(lb.shape)}"
    assert_contains(lb, ub, data.outputs, dtype, what)
    assert spec_lb.shape == spec_ub.shape == (case.batch, case.n_specs), f"{what} with spec: shape"
    assert_contains(spec_lb, spec_ub, apply_spec(data.spec, data.outputs), dtype, f"{what} with spec")


def check_ordering(case: Case, dtype: torch.dtype) -> None:
    """CROWN within IBP; alpha-CROWN within CROWN; crown-ibp within IBP (identity and random spec)."""
    bounds = {m: method_bounds(case, dtype, m) for m in METHODS}
    for k, label in ((0, ""), (1, " with spec")):
        what = f"{case.name} {dtype_id(dtype)}{label}"
        for tight, loose in (("crown", "ibp"), ("alpha-crown", "crown"), ("crown-ibp", "ibp")):
            assert_le(bounds[loose][k][0], bounds[tight][k][0], dtype, f"{what}: {tight} lower >= {loose} lower")
            assert_le(bounds[tight][k][1], bounds[loose][k][1], dtype, f"{what}: {tight} upper <= {loose} upper")


def check_forward(case: Case, dtype: torch.dtype) -> None:
    """The bound graph's concrete forward equals the module's (up to the tolerance)."""
    data = case_data(case, dtype)
    some = data.points[:, :256]
    with torch.no_grad():
        forward = data.bm.forward(some.reshape(-1, *case.input_shape).to(dtype))
    forward = forward.reshape(case.batch, some.shape[1], -1).to(torch.float64)
    assert_close(forward, data.outputs[:, :some.shape[1]], dtype, f"{case.name} forward")


def case_params(cases: list[Case], methods: bool = False) -> list:
    """pytest params over cases x dtypes (x methods), with readable ids."""
    if not methods:
        return [pytest.param(c, d, id=f"{c.name}-{dtype_id(d)}") for c in cases for d in DTYPES]
    return [pytest.param(c, d, m, id=f"{c.name}-{dtype_id(d)}-{m}") for c in cases for d in DTYPES for m in METHODS]


# ---- small module builders --------------------------------------------------------------------
def init_(module: nn.Module, rng: torch.Generator, scale: float = 1.0) -> nn.Module:
    """Re-initialise every parameter (and BatchNorm running statistics) from ``rng``, so cases do
    not depend on torch's global seed. Weights ~ N(0, scale^2 / fan_in)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d)):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=rng) * scale / fan_in ** 0.5)
                if sub.bias is not None:
                    sub.bias.copy_(torch.randn(sub.bias.shape, generator=rng) * 0.3)
            elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
                C = sub.num_features
                sub.weight.copy_(1 + 0.5 * torch.randn(C, generator=rng))
                sub.bias.copy_(0.3 * torch.randn(C, generator=rng))
                sub.running_mean.copy_(0.5 * torch.randn(C, generator=rng))
                sub.running_var.copy_(0.3 + torch.rand(C, generator=rng) * 2)
    return module.eval()


class Lambda(nn.Module):
    """A traceable module around a function of x (fx traces through ``fn``'s torch calls)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], **tensors: Tensor):
        super().__init__()
        self.fn = fn
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def forward(self, x):
        return self.fn(self, x)


def onnx_model_path(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python tests/data/models/make_models.py`")
    return path


# ---- verifier bugs still open -----------------------------------------------------------------
# A test module lists the tests that expose an open bug in ``KNOWN_BUGS = {pattern: reason}``
# (pattern: the test item's name, ``*`` matching anything). They are marked
# xfail(strict=True), so a fix shows up as XPASS: then delete the entry.


def _pattern(glob: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")) + r"\Z")


def pytest_collection_modifyitems(items):
    for item in items:
        known = getattr(getattr(item, "module", None), "KNOWN_BUGS", {})
        for glob, reason in known.items():
            if _pattern(glob).match(item.name):
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
                break


# ---- shared by the pruning tests ---------------------------------------------------------------
@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny tensors: thread start-up (and, on a shared 2-core machine, a descheduled
    second thread) costs more than it saves. One thread for the whole suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_images(n: int = 64, shape: tuple[int, ...] = (1, 10, 10), classes: int = 3, seed: int = 0):
    """A random image data set: images (n, *shape) uniform in [0, 1], labels (n,) in [0, classes)."""
    from pruning.data import ImageData
    rng = torch.Generator().manual_seed(seed)
    return ImageData(torch.rand(n, *shape, generator=rng), torch.randint(0, classes, (n,), generator=rng))


def prune_context(data, **overrides):
    """A PruneContext for tiny tests: standard loss, a 2-step attack, one epoch of score training."""
    from pruning.methods import PruneContext
    from pruning.objectives import AttackConfig, Standard
    from pruning.train import TrainConfig
    fields = dict(data=data, objective=Standard(), attack=AttackConfig(eps=0.05, steps=2),
                  score_training=TrainConfig(epochs=1, batch_size=16), seed=0)
    fields.update(overrides)
    return PruneContext(**fields)
