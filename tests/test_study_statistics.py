"""The study's statistics against known values: Wilson intervals (scipy's binomtest and a
published example), the exact McNemar test (binomial tail by hand and scipy), Holm's
adjustment (a worked example), mean ± sd."""
import math

import pytest
from scipy import stats

from pruning.study.statistics import discordant, holm, mcnemar_exact, mean_sd, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (58, 100), (62, 100), (120, 200),
                                 (200, 200), (3, 7)])
def test_wilson_interval_equals_scipy_binomtest(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)


def test_wilson_interval_published_example():
    # Newcombe (1998), Statistics in Medicine 17, table I: 81 of 263 -> 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_wilson_interval_at_100_images_is_about_ten_points():
    low, high = wilson_interval(58, 100)
    assert 0.09 < 0.58 - low < 0.11 and 0.08 < high - 0.58 < 0.10


@pytest.mark.parametrize("b,c", [(0, 4), (4, 0), (1, 9), (10, 12), (3, 3), (0, 0), (25, 7)])
def test_mcnemar_exact_equals_two_sided_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-12)


def test_mcnemar_four_images_all_one_way_is_p_0125():
    # the example: 58 -> 62 % on the same 100 images with 4 discordant images
    assert mcnemar_exact(0, 4) == 0.125
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2 ** 10)


def test_discordant_counts_pairs():
    first = [True, True, False, False, True]
    second = [True, False, True, True, False]
    assert discordant(first, second) == (2, 2)
    with pytest.raises(ValueError):
        discordant([True], [True, False])


def test_holm_adjustment_worked_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06,
    # 0.04*1=0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_mean_sd_is_the_sample_standard_deviation():
    mean, sd = mean_sd([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1)
    assert mean_sd([0.4]) == (0.4, None)
    assert math.isclose(mean_sd([1.0, 3.0])[1], math.sqrt(2))
