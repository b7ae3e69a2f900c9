import itertools
import math

import numpy as np
import pytest

from thinkforge.metrics import bootstrap_ci, maj_correct, majority_answer, paired_bootstrap, pass_at_k


def brute_pass_at_k(results, k):
    subsets = list(itertools.combinations(results, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        results = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(results, k))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))


def test_majority_vote():
    assert majority_answer(["5", "6", "6", "5.0", "5"]) == 0
    assert majority_answer([None, None, "7"]) == 2
    assert majority_answer([None, None]) is None
    assert majority_answer(["Yes", "yes.", "no"]) == 0
    assert maj_correct(["4", "3", "3"], [True, False, False]) is False
    assert maj_correct(["4", "3", "4"], [True, False, True]) is True


def test_bootstrap_ci():
    mean, lo, hi = bootstrap_ci([1.0] * 10)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    v = np.r_[np.ones(50), np.zeros(50)]
    mean, lo, hi = bootstrap_ci(v, seed=0)
    assert mean == 0.5 and 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # ±1.96·0.05 ≈ ±0.098


def test_paired_bootstrap():
    a = np.r_[np.zeros(40), np.ones(60)]
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    b = a.copy()
    b[:30] = 1
    better = paired_bootstrap(a, b)
    assert better["diff"] == pytest.approx(0.3) and better["p_value"] == 0.0 and better["ci_low"] > 0.15
