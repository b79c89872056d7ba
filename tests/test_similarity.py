"""Similarity kernels, softmax weights and saturation, checked number by number against
plain float64 references written here with loops (never with the functions under test)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recall_ray.core.similarity import layer_similarity, saturated_layers, softmax_weights

KERNELS = [("rbf", "paired"), ("rbf", "all_pairs"), ("cosine", "paired"), ("cosine", "all_pairs"),
           ("linear_cka", "paired"), ("mmd", "paired"), ("euclidean", "paired")]
NORMS = ["none", "l2", "standardize"]


# ----------------------------------------------------------------------------- references


def ref_normalize(x: np.ndarray, mode: str, new: np.ndarray) -> np.ndarray:
    n, h = x.shape
    out = np.zeros((n, h), dtype=np.float64)
    if mode == "none":
        return x.astype(np.float64).copy()
    if mode == "l2":
        for i in range(n):
            norm = math.sqrt(sum(float(v) ** 2 for v in x[i]))
            for j in range(h):
                out[i, j] = x[i, j] / norm
        return out
    assert mode == "standardize"
    m = new.shape[0]
    for j in range(h):
        mu = sum(float(new[i, j]) for i in range(m)) / m
        sd = math.sqrt(sum((float(new[i, j]) - mu) ** 2 for i in range(m)) / m)
        for i in range(n):
            out[i, j] = (x[i, j] - mu) / sd
    return out


def sqd(a, b) -> float:
    return float(sum((float(u) - float(v)) ** 2 for u, v in zip(a, b)))


def cos(a, b) -> float:
    dot = sum(float(u) * float(v) for u, v in zip(a, b))
    return dot / (math.sqrt(sum(float(u) ** 2 for u in a)) * math.sqrt(sum(float(v) ** 2 for v in b)))


def rbf_all(a, b, s) -> float:
    vals = [math.exp(-sqd(a[i], b[j]) / (2 * s * s)) for i in range(len(a)) for j in range(len(b))]
    return sum(vals) / len(vals)


def cka_gram(a, b) -> float:
    """Linear CKA via centred Gram matrices (HSIC form), a formulation independent of the
    feature-space one in the module."""
    n = a.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k = h @ (a @ a.T) @ h
    l_ = h @ (b @ b.T) @ h
    return float((k * l_).sum() / math.sqrt((k * k).sum() * (l_ * l_).sum()))


def ref_kernel(kernel: str, pairing: str, new, x, s) -> float:
    n = len(new)
    if kernel == "rbf" and pairing == "paired":
        return sum(math.exp(-sqd(new[d], x[d]) / (2 * s * s)) for d in range(n)) / n
    if kernel == "rbf":
        return rbf_all(new, x, s) / rbf_all(new, new, s)
    if kernel == "cosine" and pairing == "paired":
        return sum(cos(new[d], x[d]) for d in range(n)) / n
    if kernel == "cosine":
        num = sum(cos(new[i], x[j]) for i in range(n) for j in range(n)) / n**2
        den = sum(cos(new[i], new[j]) for i in range(n) for j in range(n)) / n**2
        return num / den
    if kernel == "linear_cka":
        return cka_gram(new, x)
    if kernel == "mmd":
        mmd2 = rbf_all(new, new, s) + rbf_all(x, x, s) - 2 * rbf_all(new, x, s)
        return 1.0 - max(mmd2, 0.0) / 2.0
    if kernel == "euclidean":
        return 1.0 / (1.0 + sum(math.sqrt(sqd(new[d], x[d])) for d in range(n)) / n)
    raise AssertionError(kernel)


def ref_layer(reps, new_index, kernel, sigma, normalize_mode, pairing):
    new_raw = reps[new_index].astype(np.float64)
    xs = [ref_normalize(r, normalize_mode, new_raw) for r in reps]
    new = xs[new_index]
    n = new.shape[0]
    if sigma == "median":
        dists = sorted(math.sqrt(sqd(new[d], xs[q][d])) for q in range(len(xs)) if q != new_index for d in range(n))
        m = len(dists)
        med = dists[m // 2] if m % 2 else (dists[m // 2 - 1] + dists[m // 2]) / 2
        s = med if med > 0 else 1.0
    else:
        s = float(sigma)
    sq = [sum(sqd(new[d], x[d]) for d in range(n)) / n for x in xs]
    sim = [1.0 if q == new_index else ref_kernel(kernel, pairing, new, x, s) for q, x in enumerate(xs)]
    return np.array(sq), np.array(sim), s


def ref_softmax(row, t):
    e = [math.exp(v / t) for v in row]
    z = sum(e)
    return [v / z for v in e]


# ----------------------------------------------------------------------------- data


def make_reps(seed=0, k=4, n=7, h=5, scale=1.0, noise=(0.2, 0.5, 0.0, 0.9)):
    """K models' reps of the same n samples: a shared signal plus model-specific noise,
    with per-feature offsets/scales so that standardisation is not a no-op."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, h)) * rng.uniform(0.5, 3.0, size=h) + rng.normal(size=h) * 2
    return [(base + noise[q % len(noise)] * rng.normal(size=(n, h))) * scale for q in range(k)]


# ----------------------------------------------------------------------------- layer_similarity


@pytest.mark.parametrize("kernel,pairing", KERNELS)
@pytest.mark.parametrize("normalize_mode", NORMS)
@pytest.mark.parametrize("sigma", [1.0, 2.5, "median"])
def test_layer_similarity_matches_reference(kernel, pairing, normalize_mode, sigma):
    seed = KERNELS.index((kernel, pairing)) * 100 + NORMS.index(normalize_mode) * 10 + [1.0, 2.5, "median"].index(sigma)
    reps = make_reps(seed=seed)
    new_index = 2
    got = layer_similarity(reps, new_index, kernel=kernel, sigma=sigma, normalize_mode=normalize_mode, pairing=pairing)
    sq, sim, s = ref_layer(reps, new_index, kernel, sigma, normalize_mode, pairing)
    assert got.sigma == pytest.approx(s, rel=1e-12)
    np.testing.assert_allclose(got.sq_dist, sq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.similarity, sim, rtol=1e-9, atol=1e-12)
    assert got.similarity[new_index] == 1.0
    assert got.sq_dist[new_index] == 0.0
    # the data is not degenerate: the models really are told apart
    others = np.delete(got.similarity, new_index)
    assert np.ptp(others) > 1e-6 or kernel == "linear_cka"


@pytest.mark.parametrize("kernel,pairing", KERNELS)
def test_new_model_similarity_is_one_and_identical_copy_also_one(kernel, pairing):
    reps = make_reps(seed=5)
    reps.append(reps[1].copy())  # model 4 = exact copy of the new model (index 1)
    got = layer_similarity(reps, 1, kernel=kernel, pairing=pairing, sigma=1.5)
    assert got.similarity[1] == 1.0
    assert got.similarity[4] == pytest.approx(1.0, abs=1e-9)
    assert got.sq_dist[4] == 0.0


def test_standardize_uses_new_models_frame_for_every_model():
    rng = np.random.default_rng(1)
    new = rng.normal(size=(6, 3)) * [1.0, 10.0, 0.1] + [5.0, -3.0, 100.0]
    other = new + rng.normal(size=(6, 3)) * 0.3 + [1.0, 0.0, 0.0]  # shifted: own-frame would hide the shift
    got = layer_similarity([other, new], 1, normalize_mode="standardize")
    mu = new.mean(axis=0)
    sd = np.sqrt(((new - mu) ** 2).mean(axis=0))
    d = [sum(((other[i, j] - mu[j]) / sd[j] - (new[i, j] - mu[j]) / sd[j]) ** 2 for j in range(3)) for i in range(6)]
    assert got.sq_dist[0] == pytest.approx(sum(d) / 6, rel=1e-12)
    # each model standardised by its OWN stats would give a different (smaller) distance
    own = (other - other.mean(0)) / other.std(0)
    nn = (new - mu) / sd
    assert abs(((own - nn) ** 2).sum(1).mean() - got.sq_dist[0]) > 1e-3


def test_median_sigma_exact_value_and_fallback():
    # paired distances new(index 0) vs model 1: 3, 4 ; vs model 2: 0, 12 -> median of [3, 4, 0, 12] = 3.5
    new = np.zeros((2, 2))
    m1 = np.array([[3.0, 0.0], [0.0, 4.0]])
    m2 = np.array([[0.0, 0.0], [12.0, 0.0]])
    got = layer_similarity([new, m1, m2], 0, sigma="median")
    assert got.sigma == pytest.approx(3.5)
    s2 = 2 * 3.5**2
    assert got.similarity[1] == pytest.approx((math.exp(-9 / s2) + math.exp(-16 / s2)) / 2, rel=1e-12)
    assert got.similarity[2] == pytest.approx((1.0 + math.exp(-144 / s2)) / 2, rel=1e-12)
    np.testing.assert_allclose(got.sq_dist, [0.0, 12.5, 72.0])
    # every distance 0 (embeddings a LoRA left untouched): fallback sigma 1.0, similarity 1
    same = layer_similarity([new, new.copy(), new.copy()], 0, sigma="median")
    assert same.sigma == 1.0
    np.testing.assert_array_equal(same.similarity, [1.0, 1.0, 1.0])


def test_unknown_kernel_and_normalize_raise():
    reps = make_reps()
    with pytest.raises(ValueError, match="kernel"):
        layer_similarity(reps, 0, kernel="nope")
    with pytest.raises(ValueError, match="normalize"):
        layer_similarity(reps, 0, normalize_mode="nope")


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("t", [1.0, 0.1, 5.0])
def test_softmax_weights_matches_reference(t):
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 1, size=(6, 5))
    s[:, 3] = 1.0
    w = softmax_weights(s, temperature=t)
    assert w.shape == s.shape
    for i in range(s.shape[0]):
        np.testing.assert_allclose(w[i], ref_softmax(s[i], t), rtol=1e-12)
        assert sum(w[i]) == pytest.approx(1.0, abs=1e-12)
    # 1-D input: one layer
    np.testing.assert_allclose(softmax_weights(s[0], temperature=t), ref_softmax(s[0], t), rtol=1e-12)


def test_softmax_temperature_sharpens_and_flattens():
    s = np.array([[0.2, 0.5, 1.0]])
    sharp, flat = softmax_weights(s, 0.01)[0], softmax_weights(s, 100.0)[0]
    assert sharp[2] > 0.999
    np.testing.assert_allclose(flat, [1 / 3] * 3, atol=3e-3)


# ----------------------------------------------------------------------------- saturation


def test_saturated_layers():
    sim = np.array([
        [1.0, 1.0, 1.0, 1.0],          # all others > 0.999 (embeddings untouched): saturated
        [1e-9, 1.0, 0.0, 1e-7],        # all others < 1e-6: saturated
        [0.5, 1.0, 0.0, 0.0],          # contrast: not saturated
        [0.9995, 1.0, 0.9999, 0.998],  # one other below 0.999: not saturated
        [1e-9, 1.0, 0.9999, 1e-9],     # mixed: not saturated
    ])
    assert saturated_layers(sim, new_index=1) == [0, 1]
    # the new model's own column is ignored: moving the 1.0 column changes nothing
    assert saturated_layers(np.array([[1.0, 0.0, 0.0]]), new_index=0) == [0]
    assert saturated_layers(np.array([[0.0, 1.0, 0.0]]), new_index=0) == []


@pytest.mark.parametrize("k", [2, 3, 5])
def test_design_saturation_observation_raw_large_norms_sigma_one(k):
    """docs/design.md (Saturation): raw vectors with large norms and sigma = 1 -> exp(-d^2/2) = 0 for every
    other model, so the new model gets e/(e+K-1) and every other model 1/(e+K-1); an
    untouched layer (distance 0) gives uniform weights. Both layers are flagged."""
    rng = np.random.default_rng(k)
    n, h, new_index = 20, 16, k - 1
    deep = rng.normal(size=(n, h)) * 3000.0  # norms ~ 12,000: the deep blocks' regime (550-750, docs/design.md) and beyond
    deep_reps = [deep + rng.normal(size=(n, h)) * 300.0 for _ in range(k)]  # distances ~ 1,700
    emb = rng.normal(size=(n, h))
    emb_reps = [emb.copy() for _ in range(k)]
    sims = []
    for reps in (deep_reps, emb_reps):
        ls = layer_similarity(reps, new_index, kernel="rbf", sigma=1.0, normalize_mode="none")
        sims.append(ls.similarity)
    sims = np.array(sims)
    w = softmax_weights(sims)
    e = math.e
    expect_deep = [1 / (e + k - 1)] * k
    expect_deep[new_index] = e / (e + k - 1)
    np.testing.assert_allclose(w[0], expect_deep, rtol=1e-12)
    np.testing.assert_allclose(w[1], [1 / k] * k, rtol=1e-12)
    assert saturated_layers(sims, new_index) == [0, 1]
    # L2 normalisation restores some contrast in the deep layer (not saturated any more)
    l2 = layer_similarity(deep_reps, new_index, kernel="rbf", sigma=1.0, normalize_mode="l2").similarity
    assert saturated_layers(l2[None, :], new_index) == []
    assert (np.delete(l2, new_index) > 0.9).all()  # ... but the weights approach uniform


# ------------------------------------------------ kernels built for per-layer contrast


def test_shift_kernel_matches_reference():
    """cos(r^q - r^0, r^N - r^0) per sample, averaged; the base itself has not moved (0)."""
    reps = make_reps(seed=3, k=4, n=6, h=5)
    base = reps[0]
    got = layer_similarity(reps, 3, kernel="shift", base=base)
    for q in range(4):
        if q == 3:
            assert got.similarity[q] == 1.0
            continue
        vals = []
        for d in range(6):
            a = [float(reps[q][d][j]) - float(base[d][j]) for j in range(5)]
            b = [float(reps[3][d][j]) - float(base[d][j]) for j in range(5)]
            na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
            vals.append(0.0 if na == 0 or nb == 0 else sum(u * v for u, v in zip(a, b)) / (na * nb))
        assert got.similarity[q] == pytest.approx(sum(vals) / 6, abs=1e-12)
    assert got.similarity[0] == 0.0
    with pytest.raises(ValueError, match="needs the base"):
        layer_similarity(reps, 3, kernel="shift")


def test_shift_kernel_normalises_the_base_like_the_others():
    reps = make_reps(seed=4, k=3, n=5, h=4, scale=100.0)
    got = layer_similarity(reps, 2, kernel="shift", normalize_mode="l2", base=reps[0])
    l2 = [ref_normalize(r, "l2", reps[2]) for r in reps]
    ref = layer_similarity(l2, 2, kernel="shift", normalize_mode="none", base=l2[0])
    np.testing.assert_allclose(got.similarity, ref.similarity, rtol=0, atol=1e-12)


def test_relative_distance_kernel_matches_reference():
    reps = make_reps(seed=5, k=4, n=7, h=5, scale=50.0)
    got = layer_similarity(reps, 2, kernel="relative_distance")
    dist = [sum(math.sqrt(sqd(reps[2][d], reps[q][d])) for d in range(7)) / 7 for q in range(4)]
    others = sorted(dist[q] for q in range(4) if q != 2)
    med = (others[1])  # three others: the middle one
    expect = [-dist[q] / med for q in range(4)]
    expect[2] = 0.0
    np.testing.assert_allclose(got.similarity, expect, rtol=1e-12, atol=1e-12)
    # scale-free: every representation times 1000 gives the same similarities
    big = layer_similarity([r * 1000 for r in reps], 2, kernel="relative_distance")
    np.testing.assert_allclose(big.similarity, got.similarity, rtol=1e-9, atol=1e-12)


def test_unbounded_kernels_never_flag_saturation():
    from recall_ray.core.similarity import layer_weights

    layers = [make_reps(seed=s, k=3, n=5, h=4, scale=1e4) for s in range(3)]  # raw RBF would saturate
    assert layer_weights(layers, 2, kernel="rbf").saturated == (0, 1, 2)
    lw = layer_weights(layers, 2, kernel="relative_distance", temperature=0.5)
    assert lw.saturated == ()
    for i, reps in enumerate(layers):
        s = layer_similarity(reps, 2, kernel="relative_distance").similarity
        np.testing.assert_allclose(lw.weight[i], ref_softmax(list(s), 0.5), rtol=1e-12)
    shifted = layer_weights(layers, 2, kernel="shift", base_per_layer=[r[0] for r in layers])
    assert shifted.saturated == () and np.allclose(shifted.weight.sum(axis=1), 1.0)
