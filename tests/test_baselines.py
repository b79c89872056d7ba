"""Each named merge of a scenario maps to the MergeMethod the paper's baseline defines."""

from __future__ import annotations

import numpy as np
import pytest

from recall_ray.config import BaselineConfig
from recall_ray.core.merge_methods import METHODS, build_method

G, K = 4, 3
CFG = BaselineConfig(lam=0.6, ties_density=0.3, dare_drop=0.8, seed=5, cocktail_temperature=2.0)
RECALL = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.25, 0.5]])


def test_every_method_builds():
    for name in METHODS:
        m = build_method(name, G, K, True, CFG, RECALL, [1.0, 2.0, 3.0])
        assert m.label == name and m.num_groups == G and m.num_models == K


def test_linear_methods_weights():
    assert np.allclose(build_method("recall", G, K, True, CFG, RECALL).weights, RECALL)
    const = build_method("recall_layer_constant", G, K, True, CFG, RECALL).weights
    expect = [(0.2 + 0.1 + 1 / 3 + 0.25) / 4, (0.3 + 0.1 + 1 / 3 + 0.25) / 4, (0.5 + 0.8 + 1 / 3 + 0.5) / 4]
    assert np.allclose(const, [expect] * G)
    assert np.allclose(build_method("average", G, K, True, CFG).weights, 1 / 3)
    assert np.allclose(build_method("average", G, K, False, CFG).weights, [[0, 0.5, 0.5]] * G)


@pytest.mark.parametrize("include_base", [True, False])
def test_lm_cocktail_is_a_softmax_of_minus_loss_over_temperature(include_base):
    losses = [2.0, 1.0, 0.5]
    parts = [0, 1, 2] if include_base else [1, 2]
    e = [np.exp(-losses[q] / 2.0) for q in parts]
    row = [0.0] * K
    for q, v in zip(parts, e):
        row[q] = v / sum(e)
    m = build_method("lm_cocktail", G, K, include_base, CFG, losses=losses)
    assert m.kind == "linear" and np.allclose(m.weights, [row] * G)


def test_task_vector_methods():
    ta = build_method("task_arithmetic", G, K, True, CFG)
    assert (ta.kind, ta.lam) == ("task_arithmetic", 0.6) and np.allclose(ta.weights, [[0, 1, 1]] * G)
    ties = build_method("ties", G, K, True, CFG)
    assert (ties.kind, ties.density, ties.lam, ties.normalize) == ("ties", 0.3, 0.6, True)
    da = build_method("dare_average", G, K, True, CFG)
    assert (da.kind, da.density, da.lam, da.normalize, da.seed) == ("dare_linear", pytest.approx(0.2), 1.0, True, 5)
    dt = build_method("dare_task_arithmetic", G, K, True, CFG)
    assert (dt.kind, dt.density, dt.lam, dt.normalize) == ("dare_linear", pytest.approx(0.2), 0.6, False)


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown merge method 'soup'"):
        build_method("soup", G, K, True, CFG)
    with pytest.raises(ValueError, match="needs the \\[4, 3\\] RECALL weights"):
        build_method("recall", G, K, True, CFG)
    with pytest.raises(ValueError, match="one loss per model"):
        build_method("lm_cocktail", G, K, True, CFG, losses=[1.0])


def test_dare_average_with_the_base_among_the_averaged_models():
    """The paper's DARE+Avg with the base: the base is one of the K averaged models (its task
    vector is 0), so the merge is base + sum_q DARE(delta_q) / K, in float64 from the DARE
    masks; ours without it (dare_average) divides by the K - 1 experts instead."""
    import torch

    from test_merge_methods import recover_dare_mask

    g = torch.Generator().manual_seed(7)
    shape = (6, 5)
    tensors = [torch.randn(*shape, generator=g) for _ in range(K)]
    with_base = build_method("dare_average_with_base", G, K, True, CFG)
    assert (with_base.kind, with_base.density, with_base.lam, with_base.normalize, with_base.seed) == (
        "dare_linear", pytest.approx(0.2), 1.0, False, 5)
    got = with_base.merge_tensor(lambda q: tensors[q], 1, "blk.1").to(torch.float64).numpy()
    t = [x.to(torch.float64).numpy() for x in tensors]
    keep = {q: recover_dare_mask("blk.1", q, 5, 1 - CFG.dare_drop, shape) for q in range(1, K)}
    want = t[0] + sum(keep[q] * (t[q] - t[0]) / (1 - CFG.dare_drop) for q in range(1, K)) / K
    assert np.allclose(got, want, atol=1e-5)
    without = build_method("dare_average", G, K, True, CFG).merge_tensor(lambda q: tensors[q], 1, "blk.1")
    assert np.allclose(got - t[0], (without.to(torch.float64).numpy() - t[0]) * (K - 1) / K, atol=1e-5)
    with pytest.raises(ValueError, match="averages the base .* include_base true"):
        build_method("dare_average_with_base", G, K, False, CFG)
