"""VNN-LIB front end: real VNN-COMP 2021 files (copied under tests/data/vnnlib, see its README)
and handwritten properties, each checked against the exact boxes, matrices and right-hand sides
it must produce, plus every user error with its exception type and line."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from verifier.errors import DimensionMismatchError, InputFileError, VnnlibSyntaxError
from verifier.io.vnnlib import MAX_DNF_TERMS, InputRegion, load_vnnlib, parse_vnnlib

DATA = Path(__file__).parent / "data" / "vnnlib"


def declarations(n_inputs: int, n_outputs: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_inputs)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_outputs))


def unit_box(n_inputs: int) -> str:
    return "".join(f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))\n" for i in range(n_inputs))


def single_disjunct(region: InputRegion) -> tuple[np.ndarray, np.ndarray]:
    assert len(region.disjuncts) == 1
    return region.disjuncts[0].matrix, region.disjuncts[0].rhs


def assert_rows(region: InputRegion, matrices: list[list[list[float]]], rhs: list[list[float]]) -> None:
    """The region's disjuncts are exactly these (matrix, rhs) pairs, in order."""
    assert len(region.disjuncts) == len(matrices)
    for disjunct, matrix, bound in zip(region.disjuncts, matrices, rhs):
        np.testing.assert_array_equal(disjunct.matrix, np.array(matrix, dtype=np.float64))
        np.testing.assert_array_equal(disjunct.rhs, np.array(bound, dtype=np.float64))
        assert disjunct.matrix.dtype == disjunct.rhs.dtype == np.float64


# ---- real files -------------------------------------------------------------------------------
def test_acasxu_prop_1_is_one_box_with_one_output_row():
    prop = load_vnnlib(DATA / "acasxu_prop_1.vnnlib", n_inputs=5, n_outputs=5)
    assert (prop.n_inputs, prop.n_outputs, len(prop.regions)) == (5, 5, 1)
    assert prop.path == str(DATA / "acasxu_prop_1.vnnlib")
    region = prop.regions[0]
    np.testing.assert_array_equal(region.lower, [0.6, -0.5, -0.5, 0.45, -0.5])
    np.testing.assert_array_equal(region.upper, [0.679857769, 0.5, 0.5, 0.5, -0.45])
    assert region.lower.dtype == np.float64 and region.lower.shape == (5,)
    assert_rows(region, [[[-1, 0, 0, 0, 0]]], [[-3.991125645861615]])   # Y_0 >= 3.99...


def test_acasxu_prop_6_input_disjunction_gives_two_regions_of_four_disjuncts():
    prop = load_vnnlib(DATA / "acasxu_prop_6.vnnlib")
    assert len(prop.regions) == 2
    first, second = prop.regions
    np.testing.assert_array_equal(first.lower, [-0.129289109, 0.11140846, -0.499999896, -0.5, -0.5])
    np.testing.assert_array_equal(first.upper, [0.700434925, 0.499999896, -0.499204121, 0.5, 0.5])
    np.testing.assert_array_equal(second.lower, [-0.129289109, -0.499999896, -0.499999896, -0.5, -0.5])
    np.testing.assert_array_equal(second.upper, [0.700434925, -0.11140846, -0.499204121, 0.5, 0.5])
    # (<= Y_k Y_0): Y_k - Y_0 <= 0, one disjunct per k = 1..4, in file order
    expected = [[[-1.0 if j == 0 else float(j == k) for j in range(5)]] for k in range(1, 5)]
    for region in prop.regions:
        assert_rows(region, expected, [[0.0]] * 4)


def test_acasxu_prop_7_has_two_disjuncts_of_three_rows():
    prop = load_vnnlib(DATA / "acasxu_prop_7.vnnlib")
    (region,) = prop.regions
    np.testing.assert_array_equal(region.lower, [-0.328422877, -0.499999896, -0.499999896, -0.5, -0.5])
    np.testing.assert_array_equal(region.upper, [0.679857769, 0.499999896, 0.499999896, 0.5, 0.5])
    rows_for = lambda k: [[-float(j == i) + float(j == k) for j in range(5)] for i in range(3)]
    assert_rows(region, [rows_for(3), rows_for(4)], [[0.0] * 3, [0.0] * 3])


def test_top_level_output_asserts_form_one_disjunct_of_four_rows():
    prop = load_vnnlib(DATA / "test_prop.vnnlib")
    (region,) = prop.regions
    np.testing.assert_array_equal(region.lower, [-0.30353115613746867, -0.009549296585513092,
                                                 0.4933803235848431, 0.3, 0.3])
    np.testing.assert_array_equal(region.upper, [-0.29855281193475053, 0.009549296585513092,
                                                 0.49999999998567607, 0.5, 0.5])
    assert_rows(region, [[[1, -1, 0, 0, 0], [1, 0, -1, 0, 0], [1, 0, 0, -1, 0], [1, 0, 0, 0, -1]]], [[0.0] * 4])


def test_nano_is_one_box_and_one_row():
    (region,) = load_vnnlib(DATA / "test_nano.vnnlib", n_inputs=1, n_outputs=1).regions
    assert (region.lower.tolist(), region.upper.tolist()) == ([-1.0], [1.0])
    assert_rows(region, [[[1.0]]], [[-1.0]])                       # Y_0 <= -1


def test_box_and_output_row_inside_one_or_and_without_final_newline():
    (region,) = load_vnnlib(DATA / "test_tiny.vnnlib", n_inputs=1, n_outputs=1).regions
    assert (region.lower.tolist(), region.upper.tolist()) == ([-1.0], [1.0])
    assert_rows(region, [[[-1.0]]], [[-100.0]])                    # Y_0 >= 100


def test_gzip_mnist_spec_by_suffix_and_by_magic_bytes(tmp_path):
    prop = load_vnnlib(DATA / "mnistfc_prop_0_0.03.vnnlib.gz", n_inputs=784, n_outputs=10)
    (region,) = prop.regions
    assert region.lower.shape == region.upper.shape == (784,)
    assert (region.lower[0], region.upper[0]) == (0.0, 0.029999999329447746)
    assert (region.lower[300], region.upper[300]) == (0.9268627762794495, 0.9868627190589905)
    # (>= Y_k Y_8) for k != 8: Y_8 - Y_k <= 0
    expected = [[[float(j == 8) - float(j == k) for j in range(10)]] for k in range(10) if k != 8]
    assert_rows(region, expected, [[0.0]] * 9)
    renamed = tmp_path / "no_suffix.vnnlib"
    renamed.write_bytes((DATA / "mnistfc_prop_0_0.03.vnnlib.gz").read_bytes())
    again = load_vnnlib(renamed)
    np.testing.assert_array_equal(again.regions[0].upper, region.upper)


# ---- handwritten properties -------------------------------------------------------------------
def test_linear_combinations_of_outputs_become_one_row():
    text = declarations(1, 3) + unit_box(1) + """
        (assert (<= (+ (* 2 Y_0) (- Y_1) (* Y_2 -0.5) 1) (- 3 Y_0)))
        (assert (>= (- Y_0 Y_1 Y_2 2.5e-1) -2E+1))
    """
    (region,) = parse_vnnlib(text).regions
    # 2y0 - y1 - y2/2 + 1 <= 3 - y0  ->  3y0 - y1 - 0.5y2 <= 2;  y0 - y1 - y2 - 0.25 >= -20
    assert_rows(region, [[[3, -1, -0.5], [-1, 1, 1]]], [[2.0, 19.75]])


def test_input_atoms_with_constants_and_coefficients_bound_one_input():
    text = declarations(3, 1) + """
        (assert (>= X_0 -1.5))  (assert (>= 0.1 X_0))
        (assert (<= (* 2 X_1) 1))  (assert (>= (- X_1) -3))  ; X_1 <= 0.5, then X_1 <= 3 is looser
        (assert (<= (- 2) X_1))
        (assert (<= (+ X_2 1) 3))  (assert (>= (* -4 X_2) -12))  (assert (> X_2 1))
        (assert (<= X_1 X_1))
        (assert (< Y_0 0))
    """
    (region,) = parse_vnnlib(text, n_inputs=3, n_outputs=1).regions
    np.testing.assert_array_equal(region.lower, [-1.5, -2.0, 1.0])
    np.testing.assert_array_equal(region.upper, [0.1, 0.5, 2.0])
    assert_rows(region, [[[1.0]]], [[0.0]])


def test_geq_is_normalised_by_negation_and_strict_comparisons_are_non_strict():
    text = declarations(1, 2) + unit_box(1) + """
        (assert (>= Y_0 Y_1)) (assert (> 3 Y_1)) (assert (< 2.5 Y_0)) (assert (= Y_1 1))
    """
    (region,) = parse_vnnlib(text).regions
    assert_rows(region, [[[-1, 1], [0, 1], [-1, 0], [0, 1], [0, -1]]], [[0.0, 3.0, -2.5, 1.0, -1.0]])


def test_nested_and_or_is_expanded_to_dnf_and_grouped_by_box():
    text = declarations(1, 2) + """
        (assert (and
            (or (and (>= X_0 0) (<= X_0 1))
                (and (>= X_0 2) (<= X_0 3)))
            (or (<= Y_0 5)
                (and (>= Y_1 1) (or (<= Y_0 Y_1) (<= Y_0 -7))))))
    """
    prop = parse_vnnlib(text)
    assert [(r.lower.tolist(), r.upper.tolist()) for r in prop.regions] == [([0.0], [1.0]), ([2.0], [3.0])]
    for region in prop.regions:   # (Y_0 <= 5) or (Y_1 >= 1 and Y_0 <= Y_1) or (Y_1 >= 1 and Y_0 <= -7)
        assert_rows(region, [[[1, 0]], [[0, -1], [1, -1]], [[0, -1], [1, 0]]],
                    [[5.0], [-1.0, 0.0], [-1.0, -7.0]])


def test_equal_boxes_share_a_region_and_duplicate_disjuncts_collapse():
    text = declarations(2, 1) + """
        (assert (or (and (<= X_0 1) (>= X_0 0) (<= X_1 1) (>= X_1 -0) (<= Y_0 1))
                    (and (>= X_1 0) (<= X_1 1) (>= X_0 0.0) (<= X_0 1.0) (<= Y_0 2))
                    (and (>= X_1 0) (<= X_1 1) (>= X_0 0) (<= X_0 1) (<= Y_0 1))))
    """
    (region,) = parse_vnnlib(text).regions
    np.testing.assert_array_equal(region.lower, [0.0, 0.0])
    assert not np.signbit(region.lower).any()      # -0 in the file is stored as 0.0
    assert_rows(region, [[[1.0]], [[1.0]]], [[1.0], [2.0]])


def test_term_without_output_constraint_is_a_zero_row_disjunct():
    text = declarations(1, 2) + """
        (assert (or (and (>= X_0 0) (<= X_0 1))
                    (and (>= X_0 2) (<= X_0 3) (<= Y_1 0))))
    """
    trivially_sat, other = parse_vnnlib(text).regions
    assert trivially_sat.disjuncts[0].matrix.shape == (0, 2)
    assert trivially_sat.disjuncts[0].rhs.shape == (0,)
    assert (trivially_sat.lower.tolist(), trivially_sat.upper.tolist()) == ([0.0], [1.0])
    assert_rows(other, [[[0, 1]]], [[0.0]])


def test_false_constant_atom_drops_its_term_and_all_false_means_no_region():
    text = declarations(1, 1) + unit_box(1) + "(assert (or (and (<= 1 0) (<= Y_0 1)) (<= Y_0 2)))"
    (region,) = parse_vnnlib(text).regions
    assert_rows(region, [[[1.0]]], [[2.0]])
    assert parse_vnnlib(declarations(1, 1) + unit_box(1) + "(assert (> (- 1) 0))").regions == ()


def test_comments_and_ignored_commands():
    text = "; (assert (<= X_0 -5)) is a comment\n" + declarations(1, 1) + unit_box(1) + \
        "(assert (<= Y_0 0)) ; trailing ) (\n(check-sat)\n(get-model)\n"
    (region,) = parse_vnnlib(text).regions
    assert (region.lower.tolist(), region.upper.tolist()) == ([0.0], [1.0])
    assert_rows(region, [[[1.0]]], [[0.0]])


def test_irregular_text_takes_the_slow_reader_with_the_same_result():
    regular = declarations(1, 1) + unit_box(1) + "(assert (<= Y_0 0))"
    irregular = regular + '\n(set-info :source "a \\ quoted string")'
    fast, slow = parse_vnnlib(regular).regions[0], parse_vnnlib(irregular).regions[0]
    np.testing.assert_array_equal(fast.upper, slow.upper)
    assert_rows(slow, [[[1.0]]], [[0.0]])


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, line, message", [
    (declarations(1, 1) + "(assert (>= X_0 0))\n(assert (<= X_0 1)))\n(assert (<= Y_0 0))", 4,
     "unbalanced parenthesis"),
    (declarations(1, 1) + "(assert (>= X_0 0))\n(assert (<= X_0 1)\n(assert (<= Y_0 0))", 4,
     "unbalanced parenthesis"),
    (declarations(1, 1) + unit_box(1) + "(assert (or\n  (<= Y_0 0)\n  (<= Y_0 zero)))", 7, "unknown symbol 'zero'"),
    (declarations(1, 1) + unit_box(1) + "\n(assert (not (<= Y_0 0)))", 6, "unsupported operator 'not'"),
    (declarations(1, 1) + unit_box(1) + "(assert (<= X_0 Y_0))", 5, "unsupported atom mixing"),
    (declarations(1, 2) + unit_box(1) + "(assert (<= (* Y_0 Y_1) 0))", 6, "unsupported nonlinear"),
    (declarations(2, 1) + unit_box(2) + "(assert (<= (+ X_0 X_1) 1))", 8, "unsupported input constraint"),
    (declarations(1, 1) + "(assert (<= Y_0 1 2))", 3, "expects exactly 2 arguments"),
    (declarations(1, 1) + "(declare-fun f () Real)", 3, "unsupported command"),
    (declarations(1, 1) + "(declare-const Z Real)", 3, "unsupported variable name"),
    ("(declare-const X_0 Int)\n", 1, "unsupported sort"),
    ("(declare-const X_0 Real)\nX_0", 2, "outside parentheses"),
    (declarations(1, 1) + "(assert ((<= Y_0 1)))", 3, "expected an operator"),
    (declarations(1, 1) + "\n()", 4, "expected an operator"),
])
def test_syntax_errors_name_file_and_line(text, line, message):
    with pytest.raises(VnnlibSyntaxError, match=rf"^spec\.vnnlib:{line}: .*{message}"):
        parse_vnnlib(text, "spec.vnnlib")


def test_out_of_range_variable_is_a_dimension_error_with_its_line():
    text = declarations(2, 1) + unit_box(2) + "(assert (<= Y_0 0))\n(assert (<= X_2 1))"
    with pytest.raises(DimensionMismatchError, match=r"^p\.vnnlib:9: X_2 is out of range: 2 input variable\(s\) declared \(X_0\.\.X_1\)"):
        parse_vnnlib(text, "p.vnnlib")
    with pytest.raises(DimensionMismatchError, match=r":3: Y_1 is out of range: 1 output variable\(s\) declared"):
        parse_vnnlib(declarations(1, 1) + "(assert (<= Y_1 0))", "p.vnnlib")


def test_missing_input_bound_is_a_dimension_error_naming_the_variable():
    text = declarations(2, 1) + "(assert (>= X_0 0)) (assert (<= X_0 1)) (assert (<= X_1 1))"
    with pytest.raises(DimensionMismatchError, match="X_1 has no lower bound in region 0"):
        parse_vnnlib(text)
    text = declarations(1, 1) + "(assert (or (and (>= X_0 0) (<= X_0 1)) (>= X_0 2)))"
    with pytest.raises(DimensionMismatchError, match="X_0 has no upper bound in region 1"):
        parse_vnnlib(text)


def test_empty_input_box_is_rejected_naming_the_variable():
    with pytest.raises(VnnlibSyntaxError, match=r"empty input box in region 0: X_0 >= 1\.0 and X_0 <= 0\.5"):
        parse_vnnlib(declarations(1, 1) + "(assert (>= X_0 1)) (assert (<= X_0 0.5))")


def test_declared_counts_must_match_the_model():
    with pytest.raises(DimensionMismatchError, match="declares 5 input variables .*, but 6 were expected"):
        load_vnnlib(DATA / "acasxu_prop_1.vnnlib", n_inputs=6, n_outputs=5)
    with pytest.raises(DimensionMismatchError, match="declares 5 output variables .*, but 10 were expected"):
        load_vnnlib(DATA / "acasxu_prop_1.vnnlib", n_inputs=5, n_outputs=10)


def test_declarations_must_be_contiguous_and_unique():
    with pytest.raises(VnnlibSyntaxError, match="X_1 is not declared, but X_2 is"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const X_2 Real)(declare-const Y_0 Real)")
    with pytest.raises(VnnlibSyntaxError, match=":2: Y_0 declared twice"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)\n(declare-const Y_0 Real)")
    with pytest.raises(VnnlibSyntaxError, match="no output variable is declared"):
        parse_vnnlib("(declare-const X_0 Real)")


def test_dnf_blow_up_is_refused_before_expanding():
    text = declarations(1, 2) + unit_box(1) + "(assert (or (<= Y_0 0) (<= Y_1 0)))\n" * 17   # 2^17 terms
    assert 2 ** 17 > MAX_DNF_TERMS
    with pytest.raises(VnnlibSyntaxError, match=f"exceeds {MAX_DNF_TERMS} terms"):
        parse_vnnlib(text)


def test_missing_unreadable_and_corrupt_files_are_input_errors(tmp_path):
    with pytest.raises(InputFileError, match="missing.vnnlib: cannot read"):
        load_vnnlib(tmp_path / "missing.vnnlib")
    with pytest.raises(InputFileError, match="cannot read"):
        load_vnnlib(tmp_path)
    corrupt = tmp_path / "corrupt.vnnlib.gz"
    corrupt.write_bytes(gzip.compress(b"(declare-const X_0 Real)")[:-6])
    with pytest.raises(InputFileError, match="not a valid gzip file"):
        load_vnnlib(corrupt)
    binary = tmp_path / "binary.vnnlib"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputFileError, match="not a text file"):
        load_vnnlib(binary)
