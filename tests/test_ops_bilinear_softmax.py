"""The ops of several perturbed inputs (Mul, MatMul, Maximum, Minimum: verifier/ops/bilinear.py,
piecewise.py) and Softmax (verifier/ops/softmax.py) on their own: IBP bounds and bounds pushed
backward with random A (default and random alpha) contain the op's outputs at >= 10^4 sampled
points (a quarter of them vertices of the box) in float32 and float64, on boxes from narrow to
wide (radius 30) and across 0; McCormick's planes are exact at the corners they touch; Softmax's
IBP is attained at corners and its linear bounds are nowhere looser than IBP.

Measured (python, float64, 64 random boxes, centres N(0, 1), radii U(0, r); mean over random A
of the concretised upper minus lower bound), for the choices made in the ops:
- MatMul (4x5 @ 5x6), default alpha 0.5 vs auto_LiRPA's 1 vs IBP: r = 0.1: 8.95 / 8.97 / 15.8;
  r = 1: 131 / 157 / 175; r = 3: 680 / 1141 / 787.
- Softmax (K = 8, centres N(0, 4)), linear vs IBP: r = 0.05: 0.029 / 0.046; r = 0.3: 0.198 / 0.271;
  r = 1: 0.876 / 0.972; r = 3: 2.91 / 2.93; with A = identity both equal IBP's exact range.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from nonlinear_cases import ROUNDING, linear_gap
from verifier.errors import UnsupportedOperatorError
from verifier.ops import Bounds
from verifier.ops.bilinear import MatMul, Mul
from verifier.ops.piecewise import Maximum, Minimum
from verifier.ops.softmax import Softmax

DTYPES = [torch.float32, torch.float64]
SAMPLES = 10_000
RADII = [1e-3, 0.3, 3.0, 30.0]


def _box(rng, shape, dtype, radius):
    centre = torch.randn(shape, generator=rng, dtype=torch.float64) * (1 + radius / 3)
    r = torch.rand(shape, generator=rng, dtype=torch.float64) * radius
    r.view(-1)[::7] = 0.0   # some degenerate coordinates
    return Bounds((centre - r).to(dtype), (centre + r).to(dtype))


def _samples(rng, b: Bounds, count: int = SAMPLES):
    """(count, *box shape): the two extreme vertices, a quarter random vertices, the rest uniform."""
    vertices = count // 4
    t = torch.rand((count - 2,) + tuple(b.lower.shape), generator=rng, dtype=torch.float64)
    t[:vertices] = t[:vertices].round()
    lo, hi = b.lower.double(), b.upper.double()
    x = (lo + t * (hi - lo)).to(b.lower.dtype)
    x = torch.minimum(torch.maximum(x, b.lower), b.upper)
    return torch.cat([b.lower.unsqueeze(0), b.upper.unsqueeze(0), x])


def _forward(op, xs):
    """The op on samples (P, N, *shape) of each input -> (P, N, *out_shape)."""
    P, N = xs[0].shape[:2]
    out = op.forward(*[x.reshape((P * N,) + tuple(x.shape[2:])) for x in xs])
    return out.reshape((P, N) + tuple(out.shape[1:]))


def _check(op, bounds, rng, alpha: bool, n_specs: int = 3):
    xs = [_samples(rng, b) for b in bounds]
    fx = _forward(op, xs)
    assert torch.isfinite(fx).all()
    ibp = op.ibp(*bounds)
    assert int((fx.double() < ibp.lower.double()).sum()) == 0, "IBP lower bound above a sample"
    assert int((fx.double() > ibp.upper.double()).sum()) == 0, "IBP upper bound below a sample"
    A = torch.randn((fx.shape[1], n_specs) + tuple(fx.shape[2:]), generator=rng, dtype=torch.float64).to(fx.dtype)
    A.view(-1)[::5] = 0.0
    kwargs = {}
    if alpha:
        kwargs = {k: torch.rand(A.shape, generator=rng, dtype=torch.float64).to(fx.dtype) for k in ("alpha_l", "alpha_u")}
    result = op.backward(A, A, *bounds, **kwargs)
    assert len(result.input_A) == len(bounds)
    for side, bias in ((0, result.lbias), (1, result.ubias)):
        bound = slack = 0.0
        for (A_in, x) in zip((pair[side] for pair in result.input_A), xs):
            assert A_in.shape == (A.shape[:2] + x.shape[2:])
            part, objective, part_slack = linear_gap(A_in, torch.zeros_like(bias), A, x, fx)
            bound, slack = bound + part, slack + part_slack
        bound = bound + bias.double()
        if side == 0:
            assert (bound <= objective + slack).all(), "lower bound cut a sample"
        else:
            assert (bound >= objective - slack).all(), "upper bound cut a sample"


TWO_INPUTS = {
    "mul": (Mul, (2, 4, 5), (2, 4, 5)),
    "mul_broadcast": (Mul, (2, 4, 5), (2, 4, 1)),
    "matmul": (MatMul, (2, 3, 4, 5), (2, 3, 5, 2)),
    "matmul_broadcast": (MatMul, (2, 4, 5), (2, 3, 5, 2)),
    "maximum": (Maximum, (2, 3, 7), (2, 3, 7)),
    "minimum_broadcast": (Minimum, (2, 3, 7), (2, 1, 7)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("name", TWO_INPUTS)
def test_two_input_ops_contain_samples(name, radius, dtype):
    factory, x_shape, y_shape = TWO_INPUTS[name]
    rng = torch.Generator().manual_seed(zlib.crc32(f"{name} {radius}".encode()))
    bounds = [_box(rng, x_shape, dtype, radius), _box(rng, y_shape, dtype, radius)]
    for alpha in (False, True):
        _check(factory(), bounds, rng, alpha)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("radius", RADII + [300.0])
@pytest.mark.parametrize("dim, shape", [(-1, (2, 3, 6)), (1, (2, 5, 4)), (2, (2, 3, 4, 2))])
def test_softmax_contains_samples(dim, shape, radius, dtype):
    rng = torch.Generator().manual_seed(int(radius * 1000) + len(shape))
    _check(Softmax(dim), [_box(rng, shape, dtype, radius)], rng, alpha=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mccormick_planes_are_exact_at_their_corners(dtype):
    """With alpha = 1 the lower plane ly x + lx y - lx ly equals x y at (lx, ly), and the upper
    plane uy x + lx y - lx uy equals it at (lx, uy); with alpha = 0 the others, at (ux, uy) and
    (ux, ly)."""
    rng = torch.Generator().manual_seed(3)
    bx, by = _box(rng, (1, 6), dtype, 2.0), _box(rng, (1, 6), dtype, 2.0)
    A = torch.eye(6, dtype=dtype).unsqueeze(0)                      # one spec per output
    for alpha, lower_corner, upper_corner in ((1.0, (bx.lower, by.lower), (bx.lower, by.upper)),
                                              (0.0, (bx.upper, by.upper), (bx.upper, by.lower))):
        a = torch.full_like(A, alpha)
        result = Mul().backward(A, A, bx, by, alpha_l=a, alpha_u=a)
        (lA_x, uA_x), (lA_y, uA_y) = result.input_A
        for A_x, A_y, bias, (x, y) in ((lA_x, lA_y, result.lbias, lower_corner), (uA_x, uA_y, result.ubias, upper_corner)):
            plane = (A_x * x.unsqueeze(1)).sum(-1) + (A_y * y.unsqueeze(1)).sum(-1) + bias
            exact = (x * y).squeeze(0)
            scale = (x.abs() * y.abs()).squeeze(0) + 1
            assert ((plane.squeeze(0) - exact).abs() <= ROUNDING[dtype] * scale).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_ibp_is_attained_at_corners(dtype):
    rng = torch.Generator().manual_seed(4)
    b = _box(rng, (3, 5), dtype, 1.0)
    ibp = Softmax(-1).ibp(b)
    eye = torch.eye(5, dtype=torch.bool)
    for i in range(5):
        low_corner = torch.where(eye[i], b.lower, b.upper)           # x_i low, the others high
        high_corner = torch.where(eye[i], b.upper, b.lower)
        lowest = torch.softmax(low_corner.double(), -1)[:, i]
        highest = torch.softmax(high_corner.double(), -1)[:, i]
        tol = ROUNDING[dtype] * 4
        assert ((ibp.lower[:, i].double() - lowest).abs() <= tol).all()
        assert ((ibp.upper[:, i].double() - highest).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_linear_bounds_are_no_looser_than_ibp(dtype):
    """Per output (A = identity) the concretised lines give IBP's range; for random A they are
    tighter than IBP on average."""
    rng = torch.Generator().manual_seed(5)
    centre = 2 * torch.randn(32, 6, generator=rng, dtype=torch.float64)
    radius = 0.3 * torch.rand(32, 6, generator=rng, dtype=torch.float64)
    b = Bounds((centre - radius).to(dtype), (centre + radius).to(dtype))
    op = Softmax(-1)
    ibp = op.ibp(b)

    def concretise(A):
        result = op.backward(A, A, b)
        (lA, uA), = result.input_A
        mid, rad = ((b.lower + b.upper) / 2).unsqueeze(1), ((b.upper - b.lower) / 2).unsqueeze(1)
        lower = (lA * mid).sum(-1) - (lA.abs() * rad).sum(-1) + result.lbias
        upper = (uA * mid).sum(-1) + (uA.abs() * rad).sum(-1) + result.ubias
        ibp_lower = (A.clamp(min=0) * ibp.lower.unsqueeze(1) + A.clamp(max=0) * ibp.upper.unsqueeze(1)).sum(-1)
        ibp_upper = (A.clamp(min=0) * ibp.upper.unsqueeze(1) + A.clamp(max=0) * ibp.lower.unsqueeze(1)).sum(-1)
        return lower, upper, ibp_lower, ibp_upper

    lower, upper, ibp_lower, ibp_upper = concretise(torch.eye(6, dtype=dtype).expand(32, 6, 6))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (lower >= ibp_lower - tol).all() and (upper <= ibp_upper + tol).all()
    A = torch.randn(32, 4, 6, generator=rng, dtype=torch.float64).to(dtype)
    lower, upper, ibp_lower, ibp_upper = concretise(A)
    assert (upper - lower).mean() < 0.9 * (ibp_upper - ibp_lower).mean()


def test_unsupported_shapes_raise_one_line_errors():
    with pytest.raises(UnsupportedOperatorError, match="MatMul"):
        MatMul().forward(torch.ones(2, 3), torch.ones(2, 3, 4))
    with pytest.raises(UnsupportedOperatorError, match="Softmax"):
        Softmax(0).ibp(Bounds(torch.zeros(2, 3), torch.ones(2, 3)))


def test_bilinear_alpha_gets_gradients():
    rng = torch.Generator().manual_seed(6)
    bx, by = _box(rng, (1, 3, 4), torch.float64, 1.0), _box(rng, (1, 4, 2), torch.float64, 1.0)
    for op, out in ((MatMul(), (1, 2, 3, 2)), (Mul(), (1, 2, 3, 4))):
        y = by if isinstance(op, MatMul) else bx
        alpha = torch.rand(out, generator=rng, dtype=torch.float64).requires_grad_()
        A = torch.randn(out, generator=rng, dtype=torch.float64)
        result = op.backward(A, None, bx, y, alpha_l=alpha)
        result.lbias.sum().backward()
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_with_masked_inputs_contains_samples_without_nan(dtype):
    """Inputs fixed at -inf (an attention mask) contribute 0; the other rows keep their lines."""
    rng = torch.Generator().manual_seed(7)
    b = _box(rng, (2, 3, 5), dtype, 1.0)
    masked = torch.zeros(2, 3, 5, dtype=torch.bool)
    masked[:, :, 1] = True
    masked[0, 2, 3] = True
    inf = torch.tensor(float("-inf"), dtype=dtype)
    b = Bounds(torch.where(masked, inf, b.lower), torch.where(masked, inf, b.upper))
    finite = Bounds(torch.where(masked, 0.0, b.lower), torch.where(masked, 0.0, b.upper))
    x = torch.where(masked, inf, _samples(rng, finite))
    op = Softmax(-1)
    fx = _forward(op, [x])
    ibp = op.ibp(b)
    assert not ibp.lower.isnan().any() and not ibp.upper.isnan().any()
    assert ((fx >= ibp.lower) & (fx <= ibp.upper)).all()
    A = torch.randn((2, 3, 3, 5), generator=rng, dtype=torch.float64).to(dtype)
    result = op.backward(A, A, b)
    (lA, uA), = result.input_A
    assert (lA[masked.unsqueeze(1).expand_as(lA)] == 0).all() and (lA != 0).any()
    xs = torch.where(masked, 0.0, x)            # masked coefficients are 0: evaluate them at 0
    lower, objective, slack = linear_gap(lA, result.lbias, A, xs, fx)
    assert (lower <= objective + slack).all()
    upper, objective, slack = linear_gap(uA, result.ubias, A, xs, fx)
    assert (upper >= objective - slack).all()


def _concretised_lower(op, bounds, A, alpha):
    """The lower bound of A . op(x) over the box (N, S), with alpha on the lA side."""
    result = op.backward(A, None, *bounds, alpha_l=alpha)
    lower = result.lbias
    for (lA, _), b in zip(result.input_A, bounds):
        mid, rad = ((b.lower + b.upper) / 2).unsqueeze(1), ((b.upper - b.lower) / 2).unsqueeze(1)
        lower = lower + (lA * mid).flatten(2).sum(-1) - (lA.abs() * rad).flatten(2).sum(-1)
    return lower


@pytest.mark.parametrize("name", ["mul", "matmul", "maximum"])
def test_optimised_alpha_is_no_worse_than_default_and_sound(name):
    """A few projected gradient steps on alpha (as alpha-CROWN takes) raise the concretised lower
    bound from the default's, and the optimised bound still holds at the samples."""
    factory, x_shape, y_shape = TWO_INPUTS[name]
    rng = torch.Generator().manual_seed(8)
    bounds = [_box(rng, x_shape, torch.float64, 1.0), _box(rng, y_shape, torch.float64, 1.0)]
    op = factory()
    out_shape = op.forward(bounds[0].lower, bounds[1].lower).shape
    A = torch.randn((out_shape[0], 3) + tuple(out_shape[1:]), generator=rng, dtype=torch.float64)
    default = op.default_alpha(*bounds).unsqueeze(1).expand_as(A)
    start = _concretised_lower(op, bounds, A, default)
    assert torch.allclose(start, _concretised_lower(op, bounds, A, None))
    alpha = default.clone().requires_grad_()
    optimiser = torch.optim.Adam([alpha], lr=0.1)
    best = start.clone()
    for _ in range(30):
        optimiser.zero_grad()
        bound = _concretised_lower(op, bounds, A, alpha)
        best = torch.maximum(best, bound.detach())   # alpha-CROWN keeps the best bound seen
        (-bound.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
    with torch.no_grad():
        final = _concretised_lower(op, bounds, A, alpha)
        assert (best >= start).all() and (best > start + 1e-6).any()
        xs = [_samples(rng, b) for b in bounds]
        objective = (A.unsqueeze(0) * _forward(op, xs).unsqueeze(2)).flatten(3).sum(-1)
        assert (final <= objective.amin(0) + 1e-9).all()
