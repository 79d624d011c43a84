"""VNN-LIB front end: a property file -> input boxes and, per box, the output constraints whose
joint satisfiability is the *violation*.

Semantics (VNN-COMP): the file asserts a counterexample. The property is violated (``sat``) iff
there are a region r, a point x in [r.lower, r.upper] and a disjunct k of r with
``k.matrix @ f(x) <= k.rhs`` on every row; it holds (``unsat``) when no such point exists.

Supported subset (what VNN-COMP files use):

* ``;`` comments; ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)`` with indices
  contiguous from 0; ``check-sat``, ``get-model``, ``set-logic``, ``set-info``, ``set-option``
  and ``exit`` are accepted and ignored.
* ``(assert F)``; all asserts are conjoined. F nests ``and`` / ``or`` arbitrarily over atoms
  ``(<= a b)``, ``(>= a b)``, ``(< a b)``, ``(> a b)``, ``(= a b)``. Strict comparisons are read
  as non-strict: the violation set only grows, so ``unsat`` stays sound; a ``sat`` witness may
  then lie on the boundary of a strict inequality.
* Terms are linear: variables, numbers (decimal or scientific), ``(+ ...)``, ``(- a)``,
  ``(- a b ...)``, ``(* ...)`` with at most one non-constant factor. Constants are combined in
  float64, the precision in which the file's decimals are read in the first place.

The formula is put in disjunctive normal form. In each term, atoms over inputs only must bound
one input each (``(<= X_3 0.5)``, ``(>= 0.1 X_0)``, ``(<= (* 2 X_1) 1)``) and tighten the term's
box; atoms over outputs only become rows ``a . y <= b``; anything else (an atom mixing X and Y,
several inputs in one atom, a nonlinear term) is rejected. Terms with exactly the same box share
one region, each term being one disjunct. A term without output rows makes the violation hold on
its whole box: it is kept as a disjunct with zero rows, so that region is trivially ``sat``. A
term made false by a constant atom (``(<= 1 0)``) is dropped; if every term is dropped the
property has no region and is trivially ``unsat``.

Errors: ``InputFileError`` (missing, unreadable, corrupt gzip, not text), ``VnnlibSyntaxError``
(``path:line: message``; also unsupported constructs and an empty box, lower > upper),
``DimensionMismatchError`` (declared counts differ from the model's, a variable index out of
range, an input without a lower or an upper bound in some region). ``.gz`` files are recognised
by suffix or by gzip's magic bytes.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DimensionMismatchError, InputFileError, VnnlibSyntaxError

MAX_DNF_TERMS = 100_000

_COMMENT = re.compile(r";[^\n]*")
_TOKEN = re.compile(r"[()]|[^\s()]+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_VARIABLE = re.compile(r"([XY])_(0|[1-9][0-9]*)")
_IGNORED_COMMANDS = frozenset({"check-sat", "get-model", "set-logic", "set-info", "set-option", "exit"})
_RELATIONS = frozenset({"<=", ">=", "<", ">", "="})


@dataclass(frozen=True)
class OutputConstraint:
    """One disjunct of the violation: the conjunction of rows  matrix @ y <= rhs.

    Zero rows (matrix of shape (0, n_outputs)) means the disjunct holds for every output."""

    matrix: np.ndarray   # (R, n_outputs) float64
    rhs: np.ndarray      # (R,) float64


@dataclass(frozen=True)
class InputRegion:
    """One input box and the disjunction of output constraints that must be impossible on it."""

    lower: np.ndarray    # (n_inputs,) float64
    upper: np.ndarray    # (n_inputs,) float64
    disjuncts: tuple[OutputConstraint, ...]


@dataclass(frozen=True)
class Property:
    path: str
    n_inputs: int
    n_outputs: int
    regions: tuple[InputRegion, ...]


def load_vnnlib(path, n_inputs: int | None = None, n_outputs: int | None = None) -> Property:
    """Read a ``.vnnlib`` (or gzip-compressed ``.vnnlib.gz``) file; see ``parse_vnnlib``."""
    return parse_vnnlib(_read_text(Path(path)), str(path), n_inputs, n_outputs)


def parse_vnnlib(text: str, path: str = "<string>", n_inputs: int | None = None,
                 n_outputs: int | None = None) -> Property:
    """Parse VNN-LIB ``text``. ``n_inputs`` / ``n_outputs``, when given, must equal the numbers
    of declared X / Y variables (``DimensionMismatchError`` otherwise). ``path`` only names the
    text in error messages (``path:line: message``)."""
    return _Parser(text, path).parse(n_inputs, n_outputs)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read VNN-LIB file ({exc.strerror or exc})") from None
    if data[:2] == b"\x1f\x8b" or path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InputFileError(f"{path}: not a valid gzip file ({exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None


# Variables are keyed by one int: X_i -> i >= 0, Y_j -> ~j = -1 - j < 0.
# Atoms of a DNF term are tuples: ("lo", i, value) / ("up", i, value) bound input i;
# ("row", {j: coefficient}, rhs) is the output row  sum_j coefficient * Y_j <= rhs.
_TRUE, _FALSE = ("true",), ("false",)   # atoms without variables, compared by identity


class _Parser:
    """One parse of one text. S-expressions are nested lists ``[head, *args]`` of str tokens;
    ``self.form`` is the index of the top-level form being interpreted, which is all an error
    needs to find its line again (positions are not tracked on the fast path)."""

    def __init__(self, text: str, path: str):
        self.path = path
        self.text = _COMMENT.sub("", text)   # keeps the newlines, hence the line numbers
        self.variables: dict[str, int] = {}
        self.numbers: dict[str, float] = {}  # token -> value; pixel bounds repeat a lot
        self.n_x = self.n_y = 0
        self.form = 0

    # ---- errors -------------------------------------------------------------------------------
    def fail(self, message: str, token: str | None = None, error: type = VnnlibSyntaxError):
        """Raise ``error`` with ``path:line: message``, the line being that of the first ``token``
        in the current top-level form (or of the form's '(')."""
        line = _line_number(self.text, len(self.text))
        form = -1
        depth = 0
        for match in _TOKEN.finditer(self.text):
            text = match.group()
            if text == "(" and depth == 0:
                form += 1
                if form == self.form:
                    line = _line_number(self.text, match.start())
            depth += (text == "(") - (text == ")")
            if form > self.form:
                break
            if form == self.form and text == token:
                line = _line_number(self.text, match.start())
                break
        raise error(f"{self.path}:{line}: {message}")

    def fail_at_token(self, token_index: int, message: str):
        """Raise a syntax error at the line of token number ``token_index``."""
        offset = len(self.text)
        for k, match in enumerate(_TOKEN.finditer(self.text)):
            if k == token_index:
                offset = match.start()
                break
        raise VnnlibSyntaxError(f"{self.path}:{_line_number(self.text, offset)}: {message}")

    # ---- reading ------------------------------------------------------------------------------
    def read_forms(self) -> list:
        """The top-level s-expressions. The fast path lets the C json parser build the lists: the
        tokens (the same as ``_TOKEN.findall``) are joined as JSON strings, then '(' and ')'
        become brackets. Anything unusual -- unbalanced, '()', quotes, a bare top-level token --
        goes to ``read_forms_slowly``, which gives the precise error (or the right lists)."""
        tokens = self.text.replace("(", " ( ").replace(")", " ) ").split()
        if not tokens:
            return []
        if '"' not in self.text and "\\" not in self.text:
            source = ('["' + '","'.join(tokens) + '"]').replace('"(",', "[").replace(',")"', "]")
            if '"("' not in source and '")"' not in source:
                try:
                    forms = json.loads(source)
                except ValueError:
                    forms = None
                if forms is not None and all(type(form) is list for form in forms):
                    return forms
        return self.read_forms_slowly(tokens)

    def read_forms_slowly(self, tokens: list[str]) -> list:
        top: list = []
        current, stack, opened = top, [], []
        for index, token in enumerate(tokens):
            if token == "(":
                node: list = []
                current.append(node)
                stack.append(current)
                opened.append(index)
                current = node
            elif token == ")":
                if not stack:
                    self.fail_at_token(index, "unbalanced parenthesis: ')' without a matching '('")
                current = stack.pop()
                opened.pop()
            elif current is top:
                self.fail_at_token(index, f"unexpected {token!r} outside parentheses")
            else:
                current.append(token)
        if stack:
            self.fail_at_token(opened[0], "unbalanced parenthesis: '(' never closed")
        return top

    def head(self, node: list) -> str:
        if not node or type(node[0]) is not str:
            self.fail("expected an operator after '('")
        return node[0]

    # ---- declarations -------------------------------------------------------------------------
    def declare(self, node: list, indices: dict[str, list[int]]) -> None:
        if len(node) != 3 or type(node[1]) is not str or type(node[2]) is not str:
            self.fail("expected (declare-const NAME Real)")
        name, sort = node[1], node[2]
        match = _VARIABLE.fullmatch(name)
        if match is None:
            self.fail(f"unsupported variable name {name!r} (expected X_i or Y_j)", name)
        if sort != "Real":
            self.fail(f"unsupported sort {sort!r} of {name} (expected Real)", sort)
        if name in self.variables:
            self.fail(f"{name} declared twice", name)
        kind, index = match.group(1), int(match.group(2))
        self.variables[name] = index if kind == "X" else ~index
        indices[kind].append(index)

    def check_declarations(self, indices: dict[str, list[int]], n_inputs, n_outputs) -> None:
        for kind, expected, what in (("X", n_inputs, "input"), ("Y", n_outputs, "output")):
            declared = sorted(indices[kind])
            if declared != list(range(len(declared))):
                missing = min(set(range(len(declared) + 1)) - set(declared))
                raise VnnlibSyntaxError(f"{self.path}: {kind}_{missing} is not declared, but "
                                        f"{kind}_{declared[-1]} is (indices must be contiguous from 0)")
            if expected is not None and len(declared) != expected:
                raise DimensionMismatchError(f"{self.path}: declares {len(declared)} {what} variables "
                                             f"({kind}_i), but {expected} were expected")
            if not declared:
                raise VnnlibSyntaxError(f"{self.path}: no {what} variable is declared")
        self.n_x, self.n_y = len(indices["X"]), len(indices["Y"])

    # ---- the whole file -----------------------------------------------------------------------
    def parse(self, n_inputs, n_outputs) -> Property:
        indices: dict[str, list[int]] = {"X": [], "Y": []}
        forms = self.read_forms()
        assertions = []
        for self.form, form in enumerate(forms):   # self.form locates errors
            command = self.head(form)
            if command == "assert":
                if len(form) != 2:
                    self.fail("expected (assert FORMULA)")
                assertions.append(self.form)
            elif command == "declare-const":
                self.declare(form, indices)
            elif command not in _IGNORED_COMMANDS:
                self.fail(f"unsupported command {command!r}")
        self.check_declarations(indices, n_inputs, n_outputs)
        dnfs = []
        for self.form in assertions:
            dnfs.append(self.dnf(forms[self.form][1]))
        split = self.split_conjunction(dnfs)
        regions = () if split is None else self.build_regions(*split)
        return Property(self.path, self.n_x, self.n_y, regions)

    # ---- formulas -> DNF ----------------------------------------------------------------------
    def dnf(self, node) -> list[list[tuple]]:
        """Formula -> list of terms (each a list of atoms); [] is false, [[]] is true."""
        if type(node) is str:
            if node in ("true", "false"):
                return [[]] if node == "true" else []
            self.fail(f"expected a formula, found {node!r}", node)
        op = node[0] if node else None
        if type(op) is not str:
            self.fail("expected an operator after '('")
        if op in _RELATIONS:
            return self.relation(node, op)
        if op == "and":
            split = self.split_conjunction([self.dnf(child) for child in node[1:]])
            if split is None:
                return []
            common, terms = split
            return [common + term for term in terms] if common else terms
        if op == "or":
            terms = []
            for child in node[1:]:
                terms.extend(self.dnf(child))
                if len(terms) > MAX_DNF_TERMS:
                    self.fail(f"disjunctive normal form exceeds {MAX_DNF_TERMS} terms", "or")
            return terms
        self.fail(f"unsupported operator {op!r} in a formula", op)

    def split_conjunction(self, dnfs: list[list[list[tuple]]]):
        """The conjunction of DNFs as (common atoms, terms): it holds iff the common atoms and one
        of the terms hold. None when it is false. The single-term DNFs (the usual case: one bound
        per assert) are merged without copying, so n bounds cost O(n), not O(n^2)."""
        common, multi = [], []
        for terms in dnfs:
            if not terms:
                return None
            if len(terms) == 1:
                common.extend(terms[0])
            else:
                multi.append(terms)
        if math.prod(len(terms) for terms in multi) > MAX_DNF_TERMS:
            self.fail(f"disjunctive normal form exceeds {MAX_DNF_TERMS} terms "
                      f"({' x '.join(str(len(t)) for t in multi)} combinations)")
        product: list[list[tuple]] = [[]]
        for terms in multi:
            product = [left + right for left in product for right in terms]
        return common, product

    def relation(self, node: list, op: str) -> list[list[tuple]]:
        if len(node) != 3:
            self.fail(f"{op!r} expects exactly 2 arguments, got {len(node) - 1}", op)
        lhs, rhs = (node[2], node[1]) if op in (">=", ">") else (node[1], node[2])
        if op == "=":
            atoms = (self.less_equal(lhs, rhs), self.less_equal(rhs, lhs))
            if _FALSE in atoms:
                return []
            return [[atom for atom in atoms if atom is not _TRUE]]
        atom = self.less_equal(lhs, rhs)
        return [] if atom is _FALSE else [[]] if atom is _TRUE else [[atom]]

    def less_equal(self, lhs, rhs):
        """The atom ``lhs <= rhs``, or _TRUE / _FALSE when it has no variable. (``0.0 - v``, not
        ``-v``: no -0.0 in the results.)"""
        if type(lhs) is str and type(rhs) is str:   # fast path: (<= X_3 0.5), (>= 0.1 X_0)
            left, right = self.variables.get(lhs), self.variables.get(rhs)
            if left is not None and right is None:
                value = self.numbers.get(rhs)
                if value is None:
                    value = self.number(rhs)
                return ("up", left, value) if left >= 0 else ("row", {~left: 1.0}, value)
            if right is not None and left is None:
                value = self.numbers.get(lhs)
                if value is None:
                    value = self.number(lhs)
                return ("lo", right, value) if right >= 0 else ("row", {~right: -1.0}, 0.0 - value)
        coefficients, constant = self.linear(lhs)
        right_coefficients, right_constant = self.linear(rhs)
        for key, c in right_coefficients.items():
            coefficients[key] = coefficients.get(key, 0.0) - c
        constant -= right_constant          # now  sum coefficients * var + constant <= 0
        coefficients = {key: c for key, c in coefficients.items() if c != 0.0}
        if not coefficients:
            return _TRUE if constant <= 0.0 else _FALSE
        n_inputs = sum(1 for key in coefficients if key >= 0)
        if n_inputs and n_inputs != len(coefficients):
            self.fail("unsupported atom mixing input (X) and output (Y) variables")
        if n_inputs > 1:
            self.fail("unsupported input constraint over several variables (only boxes are supported)")
        if n_inputs:
            ((key, c),) = coefficients.items()
            return ("up" if c > 0 else "lo", key, (0.0 - constant) / c)
        return ("row", {~key: c for key, c in coefficients.items()}, 0.0 - constant)

    def linear(self, node) -> tuple[dict[int, float], float]:
        """A term as (coefficients by variable key, constant)."""
        if type(node) is str:
            key = self.variables.get(node)
            return ({key: 1.0}, 0.0) if key is not None else ({}, self.number(node))
        op = self.head(node)
        if op not in ("+", "-", "*"):
            self.fail(f"unsupported operator {op!r} in a term", op)
        if len(node) == 1:
            self.fail(f"{op!r} without arguments", op)
        args = [self.linear(arg) for arg in node[1:]]
        if op == "*":
            return self.product(args)
        if op == "-" and len(args) == 1:
            return _negate(args[0])
        if op == "-":
            return _add([args[0]] + [_negate(arg) for arg in args[1:]])
        return _add(args)

    def product(self, args: list[tuple[dict, float]]) -> tuple[dict[int, float], float]:
        variable_factors = [arg for arg in args if arg[0]]
        if len(variable_factors) > 1:
            self.fail("unsupported nonlinear term (product of variables)", "*")
        scale = math.prod(const for coefficients, const in args if not coefficients)
        if not variable_factors:
            return {}, scale
        coefficients, const = variable_factors[0]
        return {k: c * scale for k, c in coefficients.items()}, const * scale

    def number(self, token: str) -> float:
        value = self.numbers.get(token)
        if value is not None:
            return value
        if _NUMBER.fullmatch(token):
            value = float(token)
            if not math.isfinite(value):
                self.fail(f"number {token} out of the float64 range", token)
            self.numbers[token] = value
            return value
        if _VARIABLE.fullmatch(token):
            kind, count = ("input", self.n_x) if token[0] == "X" else ("output", self.n_y)
            self.fail(f"{token} is out of range: {count} {kind} variable(s) declared "
                      f"({token[0]}_0..{token[0]}_{count - 1})", token, DimensionMismatchError)
        self.fail(f"unknown symbol {token!r}", token)

    # ---- DNF terms -> regions -----------------------------------------------------------------
    def build_regions(self, common: list[tuple], terms: list[list[tuple]]) -> tuple[InputRegion, ...]:
        base_lower, base_upper = np.full(self.n_x, -np.inf), np.full(self.n_x, np.inf)
        base_rows = _apply_atoms(common, base_lower, base_upper)
        base_key = None
        regions: dict[bytes, tuple[np.ndarray, np.ndarray, dict[bytes, OutputConstraint]]] = {}
        for term in terms:
            lower, upper, rows = base_lower, base_upper, base_rows
            if any(atom[0] != "row" for atom in term):
                lower, upper = base_lower.copy(), base_upper.copy()
            term_rows = _apply_atoms(term, lower, upper)
            if term_rows:
                rows = base_rows + term_rows
            if lower is base_lower:
                base_key = base_key or self.box_key(lower, upper, len(regions))
                key = base_key
            else:
                key = self.box_key(lower, upper, len(regions))
            if key not in regions:
                regions[key] = (lower, upper, {})
            disjunct = self.output_constraint(rows)
            regions[key][2].setdefault(disjunct.matrix.tobytes() + disjunct.rhs.tobytes(), disjunct)
        return tuple(InputRegion(lower + 0.0, upper + 0.0, tuple(disjuncts.values()))
                     for lower, upper, disjuncts in regions.values())

    def box_key(self, lower: np.ndarray, upper: np.ndarray, region: int) -> bytes:
        """Check the box (finite and non-empty); its exact bytes identify it among regions."""
        for bound, name in ((lower, "lower"), (upper, "upper")):
            missing = np.flatnonzero(~np.isfinite(bound))
            if missing.size:
                raise DimensionMismatchError(f"{self.path}: X_{missing[0]} has no {name} bound in region "
                                             f"{region} ({missing.size} input(s) without one)")
        empty = np.flatnonzero(lower > upper)
        if empty.size:
            i = empty[0]
            raise VnnlibSyntaxError(f"{self.path}: empty input box in region {region}: "
                                    f"X_{i} >= {float(lower[i])!r} and X_{i} <= {float(upper[i])!r}")
        return (lower + 0.0).tobytes() + (upper + 0.0).tobytes()   # + 0.0 maps -0.0 to 0.0

    def output_constraint(self, rows: list[tuple]) -> OutputConstraint:
        matrix = np.zeros((len(rows), self.n_y))
        rhs = np.empty(len(rows))
        for r, (_, coefficients, bound) in enumerate(rows):
            for j, c in coefficients.items():
                matrix[r, j] = c
            rhs[r] = bound
        return OutputConstraint(matrix, rhs)


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _negate(term: tuple[dict[int, float], float]) -> tuple[dict[int, float], float]:
    return {key: -c for key, c in term[0].items()}, -term[1]


def _add(terms: list[tuple[dict[int, float], float]]) -> tuple[dict[int, float], float]:
    coefficients: dict[int, float] = {}
    for co, _ in terms:
        for key, c in co.items():
            coefficients[key] = coefficients.get(key, 0.0) + c
    return coefficients, math.fsum(const for _, const in terms)


def _apply_atoms(atoms: list[tuple], lower: np.ndarray, upper: np.ndarray) -> list[tuple]:
    """Tighten ``lower`` / ``upper`` (n_inputs,) in place by the bound atoms; return the rows."""
    rows, lo_index, lo_value, up_index, up_value = [], [], [], [], []
    for atom in atoms:
        kind = atom[0]
        if kind == "up":
            up_index.append(atom[1])
            up_value.append(atom[2])
        elif kind == "lo":
            lo_index.append(atom[1])
            lo_value.append(atom[2])
        else:
            rows.append(atom)
    if lo_index:
        np.maximum.at(lower, np.array(lo_index, dtype=np.intp), np.array(lo_value))
    if up_index:
        np.minimum.at(upper, np.array(up_index, dtype=np.intp), np.array(up_value))
    return rows
