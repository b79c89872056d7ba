"""Typical samples: KMeans centres -> nearest distinct samples, against a reference written
here; determinism; union over layers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.cluster import KMeans

from recall_ray.core.typical import TooFewSamplesError, typical_indices, union_in_order


def ref_typical(x, k, seed, n_init):
    x = np.asarray(x, dtype=np.float64)
    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(x)
    taken: list[int] = []
    for c in km.cluster_centers_:
        best, best_d = None, None
        for i in range(x.shape[0]):
            if i in taken:
                continue
            d = sum((float(x[i, j]) - float(c[j])) ** 2 for j in range(x.shape[1]))
            if best_d is None or d < best_d:  # strict: ties go to the lower index
                best, best_d = i, d
        taken.append(best)
    return taken


@pytest.mark.parametrize("n,h,k,seed,n_init", [(60, 4, 5, 3, 4), (40, 8, 20, 0, 4), (25, 3, 7, 11, 1), (20, 6, 20, 2, 4)])
def test_typical_indices_match_reference(n, h, k, seed, n_init):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, h)).astype(np.float32)  # float32 in, as read from Parquet
    got = typical_indices(x, k=k, seed=seed, n_init=n_init)
    assert got == ref_typical(x, k, seed, n_init)
    assert len(got) == k and len(set(got)) == k
    assert all(isinstance(i, int) and 0 <= i < n for i in got)
    if n == k:
        assert sorted(got) == list(range(n))
    assert typical_indices(x, k=k, seed=seed, n_init=n_init) == got  # deterministic


def test_well_separated_blobs_one_sample_per_blob():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100], [50, 300]], dtype=float)
    blob = np.repeat(np.arange(5), 9)
    x = centres[blob] + rng.normal(size=(45, 2))
    perm = rng.permutation(45)
    x, blob = x[perm], blob[perm]
    got = typical_indices(x, k=5, seed=1)
    assert sorted(blob[got].tolist()) == [0, 1, 2, 3, 4]
    for i in got:  # and it is the blob member nearest the blob's mean
        members = np.flatnonzero(blob == blob[i])
        m = x[members].mean(0)
        assert i == members[np.argmin(((x[members] - m) ** 2).sum(1))]


def test_duplicate_rows_still_give_distinct_indices():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [9.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = typical_indices(x, k=5, seed=0)
        assert got == ref_typical(x, 5, 0, 4)
    assert sorted(got) == [0, 1, 2, 3, 4]


def test_too_few_samples():
    x = np.zeros((4, 3))
    with pytest.raises(TooFewSamplesError) as e:
        typical_indices(x, k=5)
    assert "k=5" in str(e.value) and "4" in str(e.value)


def test_union_in_order():
    order, chosen_by = union_in_order([[3, 1, 2], [2, 5], [1, 3, 7], [7, 7]])
    assert order == [3, 1, 2, 5, 7]
    assert chosen_by == {3: [0, 2], 1: [0, 2], 2: [0, 1], 5: [1], 7: [2, 3]}
    assert list(chosen_by) == order
    assert union_in_order([]) == ([], {})
    assert union_in_order([[], [4]]) == ([4], {4: [1]})
