"""The expert budget rule (recall_ray.core.budget) against plain computations."""

from __future__ import annotations

import numpy as np
import pytest

from recall_ray.core.budget import Rung, choose_rung, one_sided_sign_test


def test_one_sided_sign_test_is_the_binomial_tail():
    # by hand: 9 of 10 one way -> (C(10,9) + C(10,10)) / 1024
    assert one_sided_sign_test(9, 1) == pytest.approx(11 / 1024)
    assert one_sided_sign_test(0, 0) == 1.0
    assert one_sided_sign_test(0, 5) == 1.0
    # against a simulation-free float64 sum of the pmf
    n, k = 40, 27
    pmf = np.array([np.exp(np.sum(np.log(np.arange(n - i + 1, n + 1))) - np.sum(np.log(np.arange(1, i + 1))))
                    for i in range(n + 1)], dtype=np.float64) / 2.0**n
    assert one_sided_sign_test(k, n - k) == pytest.approx(pmf[k:].sum(), rel=1e-12)
    with pytest.raises(ValueError):
        one_sided_sign_test(-1, 2)


def test_the_smallest_rung_that_learns_and_forgets_is_chosen():
    learns_only = Rung(225, own_better=30, own_worse=5, general_worse=8, general_better=6)
    both = Rung(450, own_better=35, own_worse=4, general_worse=20, general_better=6)
    both_later = Rung(675, own_better=40, own_worse=3, general_worse=30, general_better=5)
    assert learns_only.p_learns < 0.05 and learns_only.p_forgets > 0.05
    assert choose_rung([both_later, learns_only, both]) == (both, True)


def test_no_rung_meeting_the_rule_takes_the_largest_and_says_so():
    a = Rung(225, 30, 5, 5, 5)
    b = Rung(450, 3, 3, 20, 2)  # forgets but does not learn
    assert choose_rung([a, b]) == (b, False)
    with pytest.raises(ValueError, match="no rungs"):
        choose_rung([])


def test_paired_counts_of_hits_and_of_log_likelihoods():
    from recall_ray.core.budget import paired_counts_of

    hits_e = np.array([True, True, False, False, True])
    hits_b = np.array([False, True, True, False, False])
    assert paired_counts_of(hits_e, hits_b) == (2, 1)  # samples 0 and 4; sample 2
    lp_e = np.array([-1.0, -2.0, -3.0, -0.5])
    lp_b = np.array([-1.5, -2.0, -2.0, -0.7])
    assert paired_counts_of(lp_e, lp_b) == (2, 1)  # ties count for neither
    with pytest.raises(ValueError, match="one length"):
        paired_counts_of(lp_e, lp_b[:3])
