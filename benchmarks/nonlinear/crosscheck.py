"""Exact answers for the max-pool CNN by mixed-integer programming (``scipy.optimize.milp``, HiGHS),
independent of the verifier: its own float64 interval bounds, its own encoding, read from the
ONNX file's weights.

    python -m benchmarks.nonlinear.crosscheck --time-limit 120
    python -m benchmarks.nonlinear.crosscheck --method bounds      # the bounds alone (seconds)

For every wrong class ``j`` the MILP maximises ``y_j - y_label`` over the box with the network
encoded exactly: convolutions and the classifier as equalities; each ReLU ``a = max(z, 0)`` with
interval bounds ``l < 0 < u`` as ``a >= 0, a >= z, a <= u·d, a <= z - l·(1 - d)``, ``d`` binary
(stable ones substituted); each 2x2 max-pool ``p = max_k a_k`` as ``p >= a_k`` and, over the
inputs that can be the maximum, ``p <= a_k + (U - l_k)·(1 - e_k)``, ``sum e_k = 1``, ``e_k``
binary (``U`` the largest upper bound). Interval bounds are sound for every input of the box,
so the encoding's feasible set is exactly the network's graph over the box.

The answer is ``unsat`` when every target's MILP dual bound is below ``-UNSAT_GAP`` (a margin the
float32 network, the float64 MILP and HiGHS' tolerances cannot close), ``sat`` when a MILP point
rounded into the box makes onnxruntime's output of some wrong class at least the true class's,
and nothing otherwise. Rows go to ``--work``/crosscheck.csv (skipped on rerun).

``--method bounds`` instead only concretises ``margin_lower_bounds`` (the same relaxations carried
to the classifier): an incomplete but independent proof, ``unsat`` when every margin exceeds
``UNSAT_GAP``. At the suite's boxes the MILP needs thousands of binaries (README).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import numpy_helper
from scipy.optimize import Bounds, LinearConstraint, milp

from benchmarks.nonlinear.attack import inside_box
from benchmarks.nonlinear.make_suite import SUITE_DIR, append_row, done_keys, instances, label_of

UNSAT_GAP = 1e-3
MODEL = "mnist_convmaxpool.onnx"


class Encoding:
    """Variables with bounds, equality/inequality rows and integrality, built layer by layer."""

    def __init__(self):
        self.lower: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.rows: list[sp.csr_matrix] = []       # each over the variables known when added
        self.row_lower: list[np.ndarray] = []
        self.row_upper: list[np.ndarray] = []
        self.n = 0

    def variables(self, lower: np.ndarray, upper: np.ndarray, integer: bool = False) -> np.ndarray:
        index = np.arange(self.n, self.n + len(lower))
        self.lower.append(np.asarray(lower, float))
        self.upper.append(np.asarray(upper, float))
        self.integer.append(np.full(len(lower), int(integer)))
        self.n += len(lower)
        return index

    def add(self, coefficients: sp.spmatrix, lower, upper) -> None:
        m = coefficients.shape[0]
        self.rows.append(sp.csr_matrix(coefficients))
        self.row_lower.append(np.broadcast_to(np.asarray(lower, float), (m,)).copy())
        self.row_upper.append(np.broadcast_to(np.asarray(upper, float), (m,)).copy())

    def affine(self, x: np.ndarray, x_lower, x_upper, weight: sp.csr_matrix, bias: np.ndarray, tighter=None):
        """z = W x + b as new variables with interval bounds (intersected with ``tighter``, sound
        bounds from elsewhere, when given); returns (z, lower, upper)."""
        positive, negative = weight.maximum(0), weight.minimum(0)
        z_lower, z_upper = widen(positive @ x_lower + negative @ x_upper + bias,
                                 positive @ x_upper + negative @ x_lower + bias)
        if tighter is not None:
            z_lower, z_upper = np.maximum(z_lower, tighter[0]), np.minimum(z_upper, tighter[1])
        z = self.variables(z_lower, z_upper)
        m = len(z)
        self.add(self.selector(x, -weight) + self.selector(z, sp.identity(m)), bias, bias)
        return z, z_lower, z_upper

    def selector(self, columns: np.ndarray, block: sp.spmatrix) -> sp.csr_matrix:
        """block's columns placed at the given variable indices, over the variables known so far."""
        block = sp.coo_matrix(block)
        return sp.csr_matrix((block.data, (block.row, columns[block.col])), shape=(block.shape[0], self.n))

    def relu(self, z: np.ndarray, lower: np.ndarray, upper: np.ndarray):
        """a = max(z, 0): one binary per unstable neuron. Returns (a, lower, upper, n_binaries)."""
        a = self.variables(np.maximum(lower, 0), np.maximum(upper, 0))
        m = len(z)
        active, inactive = lower >= 0, upper <= 0
        unstable = ~(active | inactive)
        eye = sp.identity(m, format="csr")
        pick = lambda mask: eye[np.flatnonzero(mask)]
        self.add(self.selector(z, -pick(active)) + self.selector(a, pick(active)), 0, 0)
        self.add(self.selector(a, pick(inactive)), 0, 0)
        u = np.flatnonzero(unstable)
        d = self.variables(np.zeros(len(u)), np.ones(len(u)), integer=True)
        k = len(u)
        rows_u = sp.identity(k, format="csr")
        # a - z >= 0
        self.add(self.selector(z[u], -rows_u) + self.selector(a[u], rows_u), 0, np.inf)
        # a - u d <= 0
        self.add(self.selector(a[u], rows_u) + self.selector(d, -sp.diags(upper[u])), -np.inf, 0)
        # a - z - l d <= -l
        self.add(self.selector(a[u], rows_u) + self.selector(z[u], -rows_u) + self.selector(d, -sp.diags(lower[u])),
                 -np.inf, -lower[u])
        return a, np.maximum(lower, 0), np.maximum(upper, 0), k

    def maxpool(self, a: np.ndarray, lower: np.ndarray, upper: np.ndarray, shape: tuple[int, int, int]):
        """2x2 stride-2 max pooling of (C, H, W) variables (flattened C-order)."""
        windows = pool_windows(shape)
        win_lower, win_upper = lower[windows], upper[windows]
        p_lower, p_upper = win_lower.max(1), win_upper.max(1)
        p = self.variables(p_lower, p_upper)
        m = len(windows)
        for k in range(4):                                     # p >= a_k
            self.add(self.selector(p, sp.identity(m)) + self.selector(a[windows[:, k]], -sp.identity(m)), 0, np.inf)
        n_binaries = 0
        for i, window in enumerate(windows):
            # entries that cannot exceed the largest lower bound never beat its entry
            best = window[np.argmax(win_lower[i])]
            candidates = np.union1d([best], window[win_upper[i] > p_lower[i]])
            if len(candidates) == 1:                           # p = the only possible maximum
                self.add(self.selector(np.array([p[i], a[candidates[0]]]), sp.csr_matrix([[1.0, -1.0]])), 0, 0)
                continue
            e = self.variables(np.zeros(len(candidates)), np.ones(len(candidates)), integer=True)
            n_binaries += len(candidates)
            self.add(self.selector(e, sp.csr_matrix(np.ones((1, len(candidates))))), 1, 1)
            for j, k in enumerate(candidates):                 # p - a_k + (U - l_k) e_k <= U - l_k
                big = p_upper[i] - lower[k]
                self.add(self.selector(np.array([p[i], a[k], e[j]]), sp.csr_matrix([[1.0, -1.0, big]])),
                         -np.inf, big)
        return p, p_lower, p_upper, n_binaries

    def constraints(self) -> LinearConstraint:
        blocks = [sp.coo_matrix(r) for r in self.rows]
        offsets = np.cumsum([0] + [b.shape[0] for b in blocks])
        matrix = sp.coo_matrix((np.concatenate([b.data for b in blocks]),
                                (np.concatenate([b.row.astype(np.int64) + o for b, o in zip(blocks, offsets)]),
                                 np.concatenate([b.col.astype(np.int64) for b in blocks]))),
                               shape=(int(offsets[-1]), self.n)).tocsr()
        return LinearConstraint(matrix, np.concatenate(self.row_lower), np.concatenate(self.row_upper))


def conv_matrix(weight: np.ndarray, in_shape: tuple[int, int, int]) -> sp.csr_matrix:
    """A stride-1, unpadded convolution as a sparse (C_out·H'·W', C_in·H·W) matrix."""
    c_out, c_in, kh, kw = weight.shape
    _, h, w = in_shape
    oh, ow = h - kh + 1, w - kw + 1
    rows, cols, vals = [], [], []
    out_index = np.arange(c_out * oh * ow).reshape(c_out, oh, ow)
    in_index = np.arange(c_in * h * w).reshape(c_in, h, w)
    for o in range(c_out):
        for i in range(c_in):
            for dy in range(kh):
                for dx in range(kw):
                    rows.append(out_index[o].ravel())
                    cols.append(in_index[i, dy:dy + oh, dx:dx + ow].ravel())
                    vals.append(np.full(oh * ow, weight[o, i, dy, dx]))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(c_out * oh * ow, c_in * h * w))


def read_cnn(path: str) -> dict[str, np.ndarray]:
    """The CNN's parameters from the ONNX initialisers (float64), checked against the graph's ops."""
    model = onnx.load(path)
    ops = [node.op_type for node in model.graph.node]
    expected = ["Sub", "Div", "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm"]
    if ops != expected:
        raise SystemExit(f"{path}: expected the ops {expected}, found {ops}")
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    inputs = [list(node.input[1:]) for node in model.graph.node]
    return dict(mean=weights[inputs[0][0]].reshape(-1), std=weights[inputs[1][0]].reshape(-1),
                w1=weights[inputs[2][0]], b1=weights[inputs[2][1]],
                w2=weights[inputs[5][0]], b2=weights[inputs[5][1]],
                w3=weights[inputs[9][0]], b3=weights[inputs[9][1]])


def pool_windows(shape: tuple[int, int, int]) -> np.ndarray:
    """The flat (C-order) indices of each 2x2 stride-2 window of a (C, H, W) map: (C·H/2·W/2, 4)."""
    c, h, w = shape
    grid = np.arange(c * h * w).reshape(c, h, w)[:, :h // 2 * 2, :w // 2 * 2]
    return grid.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)


def relu_relaxation(lower: np.ndarray, upper: np.ndarray):
    """Per-neuron slopes and offsets of linear bounds on max(z, 0) for z in [lower, upper]:
    (lower slope, upper slope, upper offset); the lower bound has offset 0 (DeepPoly's choice of
    slope 0 or 1, the upper bound the chord)."""
    unstable = (lower < 0) & (upper > 0)
    active = lower >= 0
    chord = np.where(unstable, upper / np.where(unstable, upper - lower, 1.0), 0.0)
    upper_slope = np.where(active, 1.0, chord)
    upper_offset = np.where(unstable, -chord * lower, 0.0)
    lower_slope = np.where(active | (unstable & (upper > -lower)), 1.0, 0.0)
    return lower_slope, upper_slope, upper_offset


def second_conv_bounds(w1, b1, l1, u1, lower, upper, w2, b2):
    """Bounds on conv 2's outputs by back-substitution to the input (float64, sound over the box).

    The pooled value is at least the window's entry with the largest lower bound, and at most
    that entry's upper relaxation when no other entry can exceed it, else its interval's top.
    Returns (lower, upper) of shape (C2·11·11,).
    """
    lower_slope, upper_slope, upper_offset = relu_relaxation(l1, u1)
    w1 = w1.toarray()
    a_lower_A, a_lower_c = lower_slope[:, None] * w1, lower_slope * b1
    a_upper_A, a_upper_c = upper_slope[:, None] * w1, upper_slope * b1 + upper_offset
    windows = pool_windows((8, 26, 26))
    la1, ua1 = np.maximum(l1, 0), np.maximum(u1, 0)
    best = windows[np.arange(len(windows)), np.argmax(la1[windows], 1)]
    p_lower, p_upper = la1[windows].max(1), ua1[windows].max(1)
    alone = np.array([np.all((ua1[w] <= p_lower[i]) | (w == best[i])) for i, w in enumerate(windows)])
    pl_A, pl_c = a_lower_A[best], a_lower_c[best]
    pu_A = np.where(alone[:, None], a_upper_A[best], 0.0)
    pu_c = np.where(alone, a_upper_c[best], p_upper)
    w2 = w2.toarray()
    positive, negative = np.maximum(w2, 0), np.minimum(w2, 0)
    low_A, low_c = positive @ pl_A + negative @ pu_A, positive @ pl_c + negative @ pu_c + b2
    up_A, up_c = positive @ pu_A + negative @ pl_A, positive @ pu_c + negative @ pl_c + b2
    return concretise(low_A, low_c, lower, upper), -concretise(-up_A, -up_c, lower, upper), \
        (low_A, low_c, up_A, up_c)


def concretise(A: np.ndarray, c: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """min over the box of A x + c, per row. A: (m, n), c: (m,), lower / upper: (n,)."""
    return np.maximum(A, 0) @ lower + np.minimum(A, 0) @ upper + c


def margin_lower_bounds(params: dict, lower: np.ndarray, upper: np.ndarray, label: int) -> np.ndarray:
    """Sound lower bounds of ``y_label - y_j`` over the box for every class j (j = label: 0), by
    back-substitution to the input through each layer's relaxation (the one of
    ``second_conv_bounds``, applied again to ReLU 2, pool 2 and the classifier). Returns (10,)."""
    scale = 1.0 / params["std"][0]
    w1 = conv_matrix(params["w1"], (1, 28, 28)) * scale
    b1 = np.repeat(params["b1"], 26 * 26) - w1 @ np.full(784, params["mean"][0])
    l1, u1 = widen(concretise(w1.toarray(), b1, lower, upper), -concretise(-w1.toarray(), -b1, lower, upper))
    w2, b2 = conv_matrix(params["w2"], (8, 13, 13)), np.repeat(params["b2"], 11 * 11)
    l2, u2, (low_A, low_c, up_A, up_c) = second_conv_bounds(w1, b1, l1, u1, lower, upper, w2, b2)
    l2, u2 = widen(l2, u2)
    lower_slope, upper_slope, upper_offset = relu_relaxation(l2, u2)
    windows = pool_windows((16, 11, 11))
    la2, ua2 = np.maximum(l2, 0), np.maximum(u2, 0)
    best = windows[np.arange(len(windows)), np.argmax(la2[windows], 1)]
    p_lower = la2[windows].max(1)
    alone = np.array([np.all((ua2[w] <= p_lower[i]) | (w == best[i])) for i, w in enumerate(windows)])
    pl_A, pl_c = lower_slope[best, None] * low_A[best], lower_slope[best] * low_c[best]
    pu_A = np.where(alone[:, None], upper_slope[best, None] * up_A[best], 0.0)
    pu_c = np.where(alone, upper_slope[best] * up_c[best] + upper_offset[best], ua2[windows].max(1))
    spec = params["w3"][label][None, :] - params["w3"]                     # (10, 400)
    positive, negative = np.maximum(spec, 0), np.minimum(spec, 0)
    A = positive @ pl_A + negative @ pu_A
    c = positive @ pl_c + negative @ pu_c + params["b3"][label] - params["b3"]
    return concretise(A, c, lower, upper)


def widen(lower: np.ndarray, upper: np.ndarray, tolerance: float = 1e-7):
    """Bounds widened by a relative float64 rounding allowance before they become big-M terms."""
    return lower - tolerance * (1 + np.abs(lower)), upper + tolerance * (1 + np.abs(upper))


def encode(params: dict, lower: np.ndarray, upper: np.ndarray):
    """The network over the box [lower, upper] (784 pixels): returns (encoding, logits, n_binaries)."""
    enc = Encoding()
    x = enc.variables(lower, upper)
    scale = 1.0 / params["std"][0]
    w1 = conv_matrix(params["w1"], (1, 28, 28)) * scale        # normalisation folded into conv 1
    b1 = np.repeat(params["b1"], 26 * 26) - w1 @ np.full(784, params["mean"][0])
    z1, l1, u1 = enc.affine(x, lower, upper, w1, b1)
    a1, la1, ua1, n1 = enc.relu(z1, l1, u1)
    p1, lp1, up1, m1 = enc.maxpool(a1, la1, ua1, (8, 26, 26))
    w2, b2 = conv_matrix(params["w2"], (8, 13, 13)), np.repeat(params["b2"], 11 * 11)
    tighter = widen(*second_conv_bounds(w1, b1, l1, u1, lower, upper, w2, b2)[:2])
    z2, l2, u2 = enc.affine(p1, lp1, up1, w2, b2, tighter)
    a2, la2, ua2, n2 = enc.relu(z2, l2, u2)
    p2, lp2, up2, m2 = enc.maxpool(a2, la2, ua2, (16, 11, 11))
    y, _, _ = enc.affine(p2, lp2, up2, sp.csr_matrix(params["w3"]), params["b3"])
    return enc, x, y, (n1, m1, n2, m2)


def solve(params, session, lower, upper, label, time_limit):
    """(answer or '', worst dual bound over the targets, binaries, seconds)."""
    start = time.perf_counter()
    enc, x, y, n_binaries = encode(params, lower, upper)
    constraints = enc.constraints()
    bounds = Bounds(np.concatenate(enc.lower), np.concatenate(enc.upper))
    integrality = np.concatenate(enc.integer)
    worst = -np.inf
    name = session.get_inputs()[0].name
    for j in (k for k in range(10) if k != label):
        objective = np.zeros(enc.n)
        objective[y[j]], objective[y[label]] = -1.0, 1.0      # minimise y_label - y_j
        result = milp(objective, constraints=constraints, bounds=bounds, integrality=integrality,
                      options=dict(time_limit=time_limit, presolve=True))
        if result.x is not None:
            x32 = inside_box(result.x[x], lower, upper)
            out = session.run(None, {name: x32.reshape(1, 1, 28, 28)})[0].reshape(-1)
            if max(out[k] for k in range(10) if k != label) >= out[label]:
                return "sat", float(-result.fun), n_binaries, time.perf_counter() - start
        dual = result.get("mip_dual_bound")                  # a lower bound on min(y_label - y_j)
        bound = -dual if dual is not None and np.isfinite(dual) else np.inf
        worst = max(worst, bound)
        if bound >= -UNSAT_GAP:
            return "", worst, n_binaries, time.perf_counter() - start
    return "unsat", worst, n_binaries, time.perf_counter() - start


def main(argv=None) -> int:
    import onnxruntime as ort
    from verifier.io.vnnlib import load_vnnlib
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/nonlinear")
    parser.add_argument("--out", default=str(SUITE_DIR))
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per MILP (one target)")
    parser.add_argument("--method", choices=("milp", "bounds"), default="milp",
                        help="bounds: only margin_lower_bounds (unsat when every margin is > 0)")
    args = parser.parse_args(argv)
    target = Path(args.work) / "crosscheck.csv"
    done = done_keys(target)
    for inst in instances(Path(args.out)):
        if inst.onnx != MODEL or (inst.onnx, inst.vnnlib) in done:
            continue
        params = read_cnn(inst.onnx_path)
        session = ort.InferenceSession(inst.onnx_path, providers=["CPUExecutionProvider"])
        region = load_vnnlib(inst.vnnlib_path).regions[0]
        label = label_of(inst.vnnlib_path)
        if args.method == "bounds":
            start = time.perf_counter()
            margins = np.delete(margin_lower_bounds(params, region.lower, region.upper, label), label)
            row = dict(onnx=inst.onnx, vnnlib=inst.vnnlib, result="unsat" if margins.min() > UNSAT_GAP else "none",
                       method="independent float64 back-substitution bound (crosscheck.py)",
                       max_margin_bound=f"{-margins.min():.6g}", binaries="",
                       seconds=f"{time.perf_counter() - start:.1f}")
        else:
            answer, bound, n_binaries, seconds = solve(params, session, region.lower, region.upper, label,
                                                       args.time_limit)
            row = dict(onnx=inst.onnx, vnnlib=inst.vnnlib, result=answer or "none", method="exact MILP (HiGHS)",
                       max_margin_bound=f"{bound:.6g}", binaries="/".join(map(str, n_binaries)),
                       seconds=f"{seconds:.1f}")
        append_row(target, row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
