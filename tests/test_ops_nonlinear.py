"""The elementwise non-linear ops (verifier/ops/elementwise.py, piecewise.py) on their own:
IBP bounds and relaxation lines contain f at >= 10^4 sampled points (plus the box ends) of random
boxes of every width, straddling every kink and period, in float32 and float64; bounds pushed
backward with random A (default and random alpha) hold at the samples; the known tight cases are
tight (chords, exact linear pieces, exact constants); out-of-domain boxes raise one-line errors.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from nonlinear_cases import ROUNDING, below, boxes, linear_gap, restrict, sample
from verifier.errors import ModelValueError
from verifier.ops import Bounds
from verifier.ops.elementwise import Cos, Exp, Log, Pow, Reciprocal, Sin, Sqrt
from verifier.ops.piecewise import Clip, Floor, LeakyReLU, Sign

DTYPES = [torch.float32, torch.float64]
PI = math.pi


def _k(*values):
    return torch.tensor(values, dtype=torch.float64)


# name -> (op factory, kinks to straddle, domain (low, high))
CASES = {
    "exp": (Exp, _k(0.0), (-60.0, 60.0)),
    "log": (Log, _k(1e-3, 1.0), (1e-6, math.inf)),
    "sqrt": (Sqrt, _k(0.0, 1e-4), (0.0, math.inf)),
    "reciprocal_pos": (Reciprocal, _k(1e-3, 1.0), (1e-6, math.inf)),
    "reciprocal_neg": (Reciprocal, _k(-1e-3, -1.0), (-math.inf, -1e-6)),
    "pow2": (lambda: Pow(2), _k(0.0), (-math.inf, math.inf)),
    "pow3": (lambda: Pow(3), _k(0.0), (-1e3, 1e3)),
    "pow4": (lambda: Pow(4), _k(0.0), (-100.0, 100.0)),
    "pow0": (lambda: Pow(0), _k(0.0), (-math.inf, math.inf)),
    "pow1": (lambda: Pow(1), _k(0.0), (-math.inf, math.inf)),
    "pow_minus1": (lambda: Pow(-1), _k(1.0), (1e-6, math.inf)),
    "pow_minus2_neg": (lambda: Pow(-2), _k(-1.0), (-math.inf, -1e-6)),
    "pow_minus3_neg": (lambda: Pow(-3), _k(-1.0), (-math.inf, -1e-3)),
    "pow_half": (lambda: Pow(0.5), _k(0.0, 1.0), (0.0, math.inf)),
    "pow_2.5": (lambda: Pow(2.5), _k(0.0, 1.0), (0.0, 1e3)),
    "pow_minus1.5": (lambda: Pow(-1.5), _k(1.0), (1e-3, math.inf)),
    "sin": (Sin, _k(*(k * PI / 2 for k in range(-4, 5))), (-math.inf, math.inf)),
    "cos": (Cos, _k(*(k * PI / 2 for k in range(-4, 5))), (-math.inf, math.inf)),
    "sin_far": (Sin, _k(1000.0, 1000 * PI), (-math.inf, math.inf)),
    "cos_very_far": (Cos, _k(-3e4, 1e5 * PI), (-math.inf, math.inf)),
    "leaky_relu": (lambda: LeakyReLU(0.1), _k(0.0), (-math.inf, math.inf)),
    "leaky_relu_negative_slope": (lambda: LeakyReLU(-0.5), _k(0.0), (-math.inf, math.inf)),
    "leaky_relu_steep": (lambda: LeakyReLU(3.0), _k(0.0), (-math.inf, math.inf)),
    "clip": (lambda: Clip(-1.0, 2.0), _k(-1.0, 2.0), (-math.inf, math.inf)),
    "max_constant": (lambda: Clip(torch.tensor(0.5), None), _k(0.5), (-math.inf, math.inf)),
    "min_constant": (lambda: Clip(None, -0.25), _k(-0.25), (-math.inf, math.inf)),
    "sign": (Sign, _k(0.0), (-math.inf, math.inf)),
    "floor": (Floor, _k(-2.0, 0.0, 1.0, 3.0), (-math.inf, math.inf)),
}


def _case(name, dtype, seed=0):
    factory, kinks, (low, high) = CASES[name]
    rng = torch.Generator().manual_seed(seed)
    op = factory().cast(torch.device("cpu"), dtype)
    return op, restrict(boxes(rng, kinks, dtype), low, high), rng


def _values(op, x):
    with torch.no_grad():
        return op.forward(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_ibp_and_lines_contain_samples(name, dtype):
    op, b, rng = _case(name, dtype)
    x = sample(rng, b)
    fx = _values(op, x)
    assert torch.isfinite(fx).all()
    bounds = op.ibp(b)
    assert below(fx, bounds.lower) == 0 and below(bounds.upper, fx) == 0
    alphas = [None, torch.zeros_like(b.lower), torch.ones_like(b.lower),
              torch.rand(b.lower.shape, generator=rng, dtype=torch.float64).to(dtype)]
    for alpha in alphas if getattr(op, "optimisable", False) else [None]:
        lines = op.relaxation(b, alpha)
        xs = x.double()
        lower = lines.lower_slope.double() * xs + lines.lower_intercept.double()
        upper = lines.upper_slope.double() * xs + lines.upper_intercept.double()
        assert below(fx, lower) == 0, f"lower line above f (alpha {alpha is not None})"
        assert below(upper, fx) == 0, f"upper line below f (alpha {alpha is not None})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_backward_bounds_contain_samples(name, dtype):
    op, b, rng = _case(name, dtype, seed=1)
    n_specs = 3
    A = torch.randn((1, n_specs) + tuple(b.lower.shape[1:]), generator=rng, dtype=torch.float64).to(dtype)
    A[:, :, ::4] = 0   # entries of A that are exactly zero must not turn into NaN
    x = sample(rng, b, 4000)
    fx = _values(op, x)
    kwargs = [{}]
    if getattr(op, "optimisable", False):
        kwargs.append({name: torch.rand(A.shape, generator=rng, dtype=torch.float64).to(dtype)
                       for name in ("alpha_l", "alpha_u")})
    for kw in kwargs:
        result = op.backward(A, A, b, **kw)
        (lA, uA), = result.input_A
        lower, objective, slack = linear_gap(lA, result.lbias, A, x, fx)
        assert (lower <= objective + slack).all(), f"lower bound cut a sample ({kw.keys()})"
        upper, objective, slack = linear_gap(uA, result.ubias, A, x, fx)
        assert (upper >= objective - slack).all(), f"upper bound cut a sample ({kw.keys()})"


def _gap(dtype, scale):
    """The widening a fitted line may carry over the exact one: relax.MARGIN_ULPS ulps of the
    terms, with the terms' size ``scale``."""
    return 32 * torch.finfo(dtype).eps * (1 + scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["exp", "pow2", "pow4", "reciprocal_pos", "pow_minus1", "pow_2.5", "log", "sqrt",
                                  "pow_half", "reciprocal_neg", "pow_minus3_neg", "sin", "cos"])
def test_convex_and_concave_lines_are_chord_and_tangent(name, dtype):
    """Convex f: the upper line is the chord (touches f at both ends) and the lower line the
    tangent at the midpoint; concave f the other way round -- up to the ulps of widening."""
    op, b, _ = _case(name, dtype, seed=2)
    l, u = b.lower, b.upper
    keep = (u - l > 1e-3) & torch.isfinite(op.forward(u)) & (op.forward(u).abs() < 1e6) & (op.forward(l).abs() < 1e6)
    lines = op.relaxation(b)
    convex, concave = op.shape(l, u)
    keep = keep & (convex | concave)   # Sin, Cos: the boxes within one convex or concave piece
    fl, fu = op.forward(l).double(), op.forward(u).double()
    mid = l + 0.5 * (u - l)   # the op's tangent point, rounded the same way
    fm = op.forward(mid).double()
    chord_slope = torch.where(convex, lines.upper_slope, lines.lower_slope).double()
    chord_intercept = torch.where(convex, lines.upper_intercept, lines.lower_intercept).double()
    tangent_slope = torch.where(convex, lines.lower_slope, lines.upper_slope).double()
    tangent_intercept = torch.where(convex, lines.lower_intercept, lines.upper_intercept).double()
    scale = fl.abs() + fu.abs() + chord_slope.abs() * (l.double().abs() + u.double().abs())
    for x, fx in ((l, fl), (u, fu)):
        assert torch.where(keep, (chord_slope * x.double() + chord_intercept - fx).abs() <= _gap(dtype, scale), True).all()
    scale_m = fm.abs() + tangent_slope.abs() * mid.double().abs()
    assert torch.where(keep, (tangent_slope * mid.double() + tangent_intercept - fm).abs() <= _gap(dtype, scale_m), True).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_piecewise_linear_ops_are_exact_on_one_piece(dtype):
    b = Bounds(torch.tensor([[-3.0, 0.5, -0.9, 2.5, -5.0]], dtype=dtype),
               torch.tensor([[-1.0, 2.0, 1.9, 4.0, -1.5]], dtype=dtype))
    clip = Clip(-1.0, 2.0).cast(torch.device("cpu"), dtype)
    lines = clip.relaxation(b)
    exact_slope = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]], dtype=dtype)
    exact_intercept = torch.tensor([[-1.0, 0.0, 0.0, 2.0, -1.0]], dtype=dtype)
    for slope, intercept in ((lines.lower_slope, lines.lower_intercept), (lines.upper_slope, lines.upper_intercept)):
        assert torch.equal(slope, exact_slope)
        assert torch.allclose(intercept, exact_intercept, rtol=0, atol=_gap(dtype, 10.0))
    leaky = LeakyReLU(0.1)
    lines = leaky.relaxation(b)
    stable = [0, 1, 3, 4]                                            # boxes on one side of 0
    exact = torch.tensor([0.1, 1.0, 1.0, 0.1], dtype=dtype)
    for slope, intercept in ((lines.lower_slope, lines.lower_intercept), (lines.upper_slope, lines.upper_intercept)):
        assert torch.equal(slope[0, stable], exact)
        assert (intercept[0, stable].abs() <= _gap(dtype, 10.0)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_is_exact_off_zero(dtype):
    b = Bounds(torch.tensor([[0.2, -3.0, 0.0]], dtype=dtype), torch.tensor([[3.0, -0.1, 0.0]], dtype=dtype))
    want = torch.tensor([[1.0, -1.0, 0.0]], dtype=dtype)
    op = Sign()
    lines, ibp = op.relaxation(b), op.ibp(b)
    assert torch.equal(ibp.lower, want) and torch.equal(ibp.upper, want)
    assert torch.equal(lines.lower_slope, torch.zeros_like(want)) and torch.equal(lines.upper_slope, torch.zeros_like(want))
    assert torch.allclose(lines.lower_intercept, want, rtol=0, atol=_gap(dtype, 1.0))
    assert torch.allclose(lines.upper_intercept, want, rtol=0, atol=_gap(dtype, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_floor_is_exact_within_one_step(dtype):
    b = Bounds(torch.tensor([[1.1, -2.9, 0.0, 5.0]], dtype=dtype), torch.tensor([[1.9, -2.1, 0.0, 5.999]], dtype=dtype))
    want = torch.tensor([[1.0, -3.0, 0.0, 5.0]], dtype=dtype)
    op = Floor()
    lines, ibp = op.relaxation(b), op.ibp(b)
    assert torch.equal(ibp.lower, want) and torch.equal(ibp.upper, want)
    assert torch.equal(lines.lower_slope, torch.zeros_like(want)) and torch.equal(lines.upper_slope, torch.zeros_like(want))
    assert torch.equal(lines.lower_intercept, want) and torch.equal(lines.upper_intercept, want)


def test_floor_lines_are_the_diagonals_on_wide_boxes():
    b = Bounds(torch.tensor([[-10.5]]), torch.tensor([[10.5]]))
    lines = Floor().relaxation(b)
    assert lines == (torch.tensor([[1.0]]), torch.tensor([[-1.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]))


@pytest.mark.parametrize("op", [Sin(), Cos()], ids=["sin", "cos"])
def test_periodic_bounds_are_constant_on_wide_boxes_and_exact_at_peaks(op):
    wide = Bounds(torch.tensor([[-4.0, 100.0]], dtype=torch.float64), torch.tensor([[3.0, 100.0 + 2 * PI]], dtype=torch.float64))
    lines = op.relaxation(wide)
    assert torch.equal(lines.lower_slope, torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(lines.lower_intercept, -torch.ones(1, 2, dtype=torch.float64))
    assert torch.equal(lines.upper_intercept, torch.ones(1, 2, dtype=torch.float64))
    peak = PI / 2 if isinstance(op, Sin) else 0.0
    around = Bounds(torch.tensor([[peak - 0.5]], dtype=torch.float64), torch.tensor([[peak + 0.25]], dtype=torch.float64))
    assert op.ibp(around).upper.item() == pytest.approx(1.0, abs=1e-15)
    assert op.ibp(around).lower.item() == pytest.approx(op.forward(around.lower).item(), abs=1e-15)


@pytest.mark.parametrize("op, lower, upper, message", [
    (Log(), 0.0, 1.0, "Log: input lower bound <= 0"),
    (Sqrt(), -1e-3, 1.0, "Sqrt: input lower bound < 0"),
    (Reciprocal(), -1.0, 1.0, "Reciprocal: input interval contains 0"),
    (Reciprocal(), 0.0, 1.0, "Reciprocal: input interval contains 0"),
    (Pow(-2), -1.0, 1.0, "Pow(-2): input interval contains 0"),
    (Pow(0.5), -1.0, 1.0, "Pow(0.5): input lower bound < 0"),
    (Pow(-0.5), 0.0, 1.0, "Pow(-0.5): input lower bound <= 0"),
])
def test_out_of_domain_boxes_raise_one_line_errors(op, lower, upper, message):
    b = Bounds(torch.tensor([[lower, 1.0]]), torch.tensor([[upper, 2.0]]))
    for bound in (op.ibp, op.relaxation, lambda b: op.backward(torch.ones(1, 1, 2), None, b)):
        with pytest.raises(ModelValueError, match=re.escape(message)) as info:
            bound(b)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unbounded_boxes_give_finite_or_constant_lines(dtype):
    inf = math.inf
    b = Bounds(torch.tensor([[-inf, 0.0, -inf]], dtype=dtype), torch.tensor([[inf, inf, 1.0]], dtype=dtype))
    for op in (Sin(), Cos()):
        lines = op.relaxation(b)
        expected = (torch.zeros_like(b.lower), -torch.ones_like(b.lower), torch.zeros_like(b.lower), torch.ones_like(b.lower))
        assert all(torch.equal(got, want) for got, want in zip(lines, expected))
        assert torch.equal(op.ibp(b).upper, torch.ones_like(b.lower))
    for op in (LeakyReLU(0.1), Clip(-1.0, 1.0), Sign(), Exp()):
        lines = op.cast(torch.device("cpu"), dtype).relaxation(b)
        assert not any(t.isnan().any() for t in lines)
        result = op.backward(torch.tensor([[[1.0, 0.0, -1.0]]], dtype=dtype), None, b)
        assert not result.lbias.isnan().any()


def test_clip_rejects_crossed_limits():
    with pytest.raises(ModelValueError, match="Clip"):
        Clip(1.0, 0.0)


@pytest.mark.parametrize("name", ["exp", "log", "pow2", "sin", "leaky_relu", "clip"])
def test_alpha_gets_gradients_and_default_is_in_range(name):
    op, b, rng = _case(name, torch.float64)
    alpha = op.default_alpha(b)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    alpha = torch.rand((1, 2) + tuple(b.lower.shape[1:]), generator=rng, dtype=torch.float64).requires_grad_()
    A = torch.randn((1, 2) + tuple(b.lower.shape[1:]), generator=rng, dtype=torch.float64)
    result = op.backward(A, None, b, alpha_l=alpha)
    lower = (result.input_A[0][0] * (b.lower + b.upper).unsqueeze(1) / 2).sum() + result.lbias.sum()
    lower.backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["exp", "log", "pow2", "reciprocal_pos", "leaky_relu", "clip"])
def test_optimised_alpha_is_no_worse_than_default_and_sound(name):
    """Projected gradient steps on alpha (as alpha-CROWN takes) raise the concretised lower bound
    of A . f(x) from the default's; the optimised lines still hold at the samples."""
    op, b, rng = _case(name, torch.float64, seed=9)
    A = torch.randn((1, 2) + tuple(b.lower.shape[1:]), generator=rng, dtype=torch.float64)
    mid, rad = ((b.lower + b.upper) / 2).unsqueeze(1), ((b.upper - b.lower) / 2).unsqueeze(1)

    def lower(alpha):
        result = op.backward(A, None, b, alpha_l=alpha)
        lA = result.input_A[0][0]
        return (lA * mid).sum(-1) - (lA.abs() * rad).sum(-1) + result.lbias

    start = lower(None)
    alpha = op.default_alpha(b).unsqueeze(1).expand_as(A).clone().requires_grad_()
    assert torch.allclose(lower(alpha), start)
    optimiser = torch.optim.Adam([alpha], lr=0.1)
    best = start.clone()
    for _ in range(30):
        optimiser.zero_grad()
        bound = lower(alpha)
        best = torch.maximum(best, bound.detach())   # alpha-CROWN keeps the best bound seen
        (-bound.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
    with torch.no_grad():
        final = lower(alpha)
        assert (best >= start).all() and (best > start + 1e-6).any()
        x = sample(rng, b)
        objective = (A.unsqueeze(0) * op.forward(x).unsqueeze(2)).sum(-1)
        assert (final <= objective.amin(0) + 1e-9).all()
