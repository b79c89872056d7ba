"""Merge methods (linear, task arithmetic, TIES, DARE) against plain float64 numpy references
written here, their bit-exactness on identical models, their loading pattern, validation,
and the weight builders.

Test data for the sparsifying kinds lives on a binary grid (`grid_models`): the base on
multiples of 2^-7, deltas on distinct multiples of 2^-14, weights on multiples of 2^-4. Every
delta, weighted delta and sign vote is then exact in float32, so the float32 code and the
float64 reference take the same decisions (which entries survive the top-k trim, which sign
is elected, including exact zero votes) and differ only by the rounding of the final values.
Within one model the delta magnitudes are distinct (no ties in |delta| unless a test builds
them on purpose: `test_ties_magnitude_ties_keep_lowest_index`).
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from recall_ray.core.merge_methods import (
    KINDS,
    MergeMethod,
    cocktail_weights,
    dare_seed,
    layer_constant,
    task_vector_weights,
    uniform_weights,
)

SHAPE = (64, 48)
TASK_KINDS = ["task_arithmetic", "ties", "dare_linear", "dare_ties"]


# ---------------------------------------------------------------- data and references


def grid_models(k: int, seed: int, shape=SHAPE) -> list[torch.Tensor]:
    """K float32 tensors, exact on a binary grid (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    base = rng.integers(-512, 512, size=n) / 2**7
    out = [base]
    for _ in range(k - 1):
        mags = rng.permutation(n) + 1  # distinct magnitudes 1..n
        signs = rng.choice([-1.0, 1.0], size=n)
        out.append(base + signs * mags / 2**14)
    return [torch.from_numpy(t.reshape(shape).astype(np.float32)) for t in out]


def grid_weights(k: int, seed: int) -> list[float]:
    rng = np.random.default_rng(1000 + seed)
    return [0.0] + list(rng.integers(1, 17, size=k - 1) / 16)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def topk_keep(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES trim by a full stable sort: the k largest |delta|, lower index first on ties."""
    flat = delta.ravel()
    keep = np.zeros(flat.size, dtype=bool)
    if density >= 1:
        keep[:] = True
    else:
        k = max(1, int(density * flat.size))
        keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return keep.reshape(delta.shape)


def ref_task_vectors(tensors, w, *, lam=1.0, normalize=False, consensus=False, keep=None, rescale=1.0):
    """Generalized task arithmetic in float64, written out plainly.

    keep[q]: boolean mask of the entries of delta_q that survive sparsification (None: all);
    rescale: factor applied to the kept entries (1/p for DARE)."""
    base = f64(tensors[0])
    ds = []
    for q in range(1, len(tensors)):
        delta = f64(tensors[q]) - base
        if keep is not None:
            delta = np.where(keep[q], delta * rescale, 0.0)
        ds.append((q, w[q] * delta))
    if consensus:
        vote = sum(d for _, d in ds)
        sign = np.where(vote >= 0, 1.0, -1.0)
        mixed = np.zeros_like(base)
        divisor = np.zeros_like(base)
        for q, d in ds:
            agree = np.sign(d) == sign  # zeros never agree
            mixed += np.where(agree, d, 0.0)
            divisor += np.where(agree, w[q], 0.0)
        divisor[divisor == 0] = 1.0
    else:
        mixed = sum(d for _, d in ds)
        divisor = sum(w[1:])
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def assert_close(got: torch.Tensor, ref: np.ndarray, atol=1e-6, rtol=1e-6):
    g = f64(got)
    err = np.abs(g - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{bad.sum()} entries off, max err {err.max():.3g}"


def loader(tensors):
    return lambda q: tensors[q]


def recover_dare_mask(name: str, q: int, seed: int, density: float, shape=SHAPE) -> np.ndarray:
    """DARE's keep-mask of model q for tensor `name`, read off a single-model merge: base 0,
    model q all ones, weight 1, lam 1, no normalisation, so the output is keep / density.
    The mask is documented to depend only on (seed, name, q) and the shape, not on the
    values, K or the other weights, so this is the mask a real merge uses."""
    tensors = [torch.zeros(shape)] * q + [torch.ones(shape)]
    w = [[0.0] * q + [1.0]]
    out = MergeMethod("m", "dare_linear", w, density=density, seed=seed).merge_tensor(loader(tensors), 0, name)
    vals = np.unique(f64(out))
    assert set(vals.tolist()) <= {0.0, float(np.float32(1 / density))}, vals
    return f64(out) != 0


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize("k", [2, 3, 5])
def test_linear_matches_float64(k):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(*SHAPE, generator=g)
    tensors = [base] + [base + 0.1 * torch.randn(*SHAPE, generator=g) for _ in range(k - 1)]
    rng = np.random.default_rng(k)
    rows = rng.dirichlet(np.ones(k), size=2)
    rows[1, 0] = 0.0  # the base may have weight 0; rows are renormalised
    m = MergeMethod("recall", "linear", rows)
    for group in range(2):
        w = rows[group] / rows[group].sum()
        ref = sum(w[q] * f64(tensors[q]) for q in range(k))
        assert_close(m.merge_tensor(loader(tensors), group, "x"), ref)


# ---------------------------------------------------------------- task arithmetic and TIES


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.75, -0.5])
@pytest.mark.parametrize("k", [2, 4])
def test_task_arithmetic_matches_float64(k, lam, normalize):
    tensors = grid_models(k, seed=k)
    w = grid_weights(k, seed=k)
    got = MergeMethod("ta", "task_arithmetic", [w], lam=lam, normalize=normalize).merge_tensor(loader(tensors), 0, "x")
    assert_close(got, ref_task_vectors(tensors, w, lam=lam, normalize=normalize))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.6])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01, 1e-6])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_ties_matches_float64(k, density, lam, normalize):
    tensors = grid_models(k, seed=10 + k)
    w = grid_weights(k, seed=k)
    if k == 5:
        w[2] = 0.0  # a model with weight 0 takes no part (its d_q is 0 and never agrees)
    got = MergeMethod("ties", "ties", [w], density=density, lam=lam, normalize=normalize).merge_tensor(
        loader(tensors), 0, "x")
    base = f64(tensors[0])
    keep = {q: topk_keep(f64(tensors[q]) - base, density) for q in range(1, k)}
    assert_close(got, ref_task_vectors(tensors, w, lam=lam, normalize=normalize, consensus=True, keep=keep))
    if density < 1:  # the trim keeps exactly k = max(1, int(density * numel)) entries
        assert all(v.sum() == max(1, int(density * v.size)) for v in keep.values())


def test_ties_sign_election_and_disjoint_mean_by_hand():
    """Three entries, three models, worked out by hand: votes +, - and exactly 0 (-> +)."""
    base = torch.zeros(3)
    t1 = torch.tensor([2.0, -1.0, 1.0])
    t2 = torch.tensor([-1.0, -3.0, -1.0])
    t3 = torch.tensor([1.0, 2.0, 0.0])
    got = MergeMethod("t", "ties", [[0, 1, 1, 1]], normalize=True).merge_tensor(loader([base, t1, t2, t3]), 0, "x")
    # entry 0: vote 2 -> +, agreeing 2 and 1, mean 1.5; entry 1: vote -2 -> -, agreeing -1, -3: -2;
    # entry 2: vote 0 -> +, agreeing 1 only (0 never agrees): 1
    assert got.tolist() == [1.5, -2.0, 1.0]
    got = MergeMethod("t", "ties", [[0, 1, 1, 1]], normalize=False).merge_tensor(loader([base, t1, t2, t3]), 0, "x")
    assert got.tolist() == [3.0, -4.0, 1.0]


def test_ties_magnitude_ties_keep_lowest_index():
    """Repeated magnitudes at the cut: the entries with the lowest flat index are kept (a
    stable sort), so the selection depends on the values alone."""
    base = torch.zeros(8)
    t1 = torch.tensor([1.0, -2.0, 2.0, 1.0, -1.0, 2.0, 0.0, 0.0])
    for density, expected in [(0.125, [0, -2, 0, 0, 0, 0, 0, 0]), (0.25, [0, -2, 2, 0, 0, 0, 0, 0]),
                              (0.5, [1, -2, 2, 0, 0, 2, 0, 0]), (0.75, [1, -2, 2, 1, -1, 2, 0, 0])]:
        got = MergeMethod("t", "ties", [[0, 1]], density=density).merge_tensor(loader([base, t1]), 0, "x")
        assert got.tolist() == expected, density
        keep = topk_keep(t1.numpy().astype(np.float64), density)
        assert got.tolist() == np.where(keep, t1.numpy(), 0).tolist()


# ---------------------------------------------------------------- DARE


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_density_one_is_task_arithmetic_and_ties(normalize):
    tensors = grid_models(4, seed=3)
    w = grid_weights(4, seed=3)
    run = lambda kind: MergeMethod("m", kind, [w], density=1.0, lam=0.8, normalize=normalize).merge_tensor(
        loader(tensors), 0, "x")
    assert torch.equal(run("dare_linear"), run("task_arithmetic"))
    assert torch.equal(run("dare_ties"), run("ties"))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_rescale(density):
    shape = (100_000,)
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(shape)
    delta = torch.rand(shape, generator=g) + 0.5  # no zero deltas: a zero output means dropped
    w = 0.75
    out = MergeMethod("d", "dare_linear", [[0.0, w]], density=density, seed=3).merge_tensor(
        loader([base, delta]), 0, "layers.0.w")
    kept = f64(out) != 0
    assert abs(kept.mean() - density) < 0.01
    ref = np.where(kept, f64(delta) / density * w, 0.0)
    assert_close(out, ref)


def test_dare_mask_reproducible_and_keyed():
    tensors = grid_models(3, seed=5)
    m = MergeMethod("d", "dare_linear", [[0.0, 1.0, 1.0]], density=0.5, seed=11)
    a = m.merge_tensor(loader(tensors), 0, "layers.0.q")
    assert torch.equal(a, m.merge_tensor(loader(tensors), 0, "layers.0.q"))
    assert not torch.equal(a, m.merge_tensor(loader(tensors), 0, "layers.0.k"))
    m2 = MergeMethod("d", "dare_linear", [[0.0, 1.0, 1.0]], density=0.5, seed=12)
    assert not torch.equal(a, m2.merge_tensor(loader(tensors), 0, "layers.0.q"))
    masks = {(name, q, s): recover_dare_mask(name, q, s, 0.5) for name in ["a", "b"] for q in [1, 2] for s in [0, 1]}
    keys = list(masks)
    for i, x in enumerate(keys):  # every (name, q, seed) draws its own mask
        for y in keys[i + 1:]:
            assert (masks[x] != masks[y]).mean() > 0.3, (x, y)
    # the mask does not depend on the values, K or the other weights: a 3-model merge uses it
    keep = {q: recover_dare_mask("layers.0.q", q, 11, 0.5) for q in [1, 2]}
    assert_close(a, ref_task_vectors(tensors, [0.0, 1.0, 1.0], keep=keep, rescale=2.0))


def test_dare_seed_is_stable():
    """Pinned: the mask seed is a stable hash of (seed, name, q) (not python's per-process
    salted hash), so a DARE merge is the same in every process, shard layout and release."""
    assert dare_seed(0, "model.layers.0.mlp.up_proj.weight", 1) == 4933960470733692658
    assert 0 <= dare_seed(2**40, "x" * 300, 7) < 2**63
    assert len({dare_seed(s, n, q) for s in (0, 1) for n in ("a", "b") for q in (1, 2)}) == 8


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_linear_matches_float64(density, normalize):
    tensors = grid_models(4, seed=21)
    w = grid_weights(4, seed=21)
    got = MergeMethod("d", "dare_linear", [w], density=density, lam=0.9, normalize=normalize, seed=4).merge_tensor(
        loader(tensors), 0, "blk.1")
    keep = {q: recover_dare_mask("blk.1", q, 4, density) for q in range(1, 4)}
    assert_close(got, ref_task_vectors(tensors, w, lam=0.9, normalize=normalize, keep=keep, rescale=1 / density))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_dare_ties_matches_float64(density, normalize):
    """numpy TIES' election and disjoint mean applied to the same DARE masks (recovered from
    single-model merges, see `recover_dare_mask`)."""
    tensors = grid_models(4, seed=31)
    w = grid_weights(4, seed=31)
    got = MergeMethod("d", "dare_ties", [w], density=density, lam=1.0, normalize=normalize, seed=9).merge_tensor(
        loader(tensors), 0, "blk.2")
    keep = {q: recover_dare_mask("blk.2", q, 9, density) for q in range(1, 4)}
    # densities 1/2^j keep delta/p on the grid, so the float32 votes are exact like the float64
    # ones (with 0.3 or 0.7 a vote that is exactly 0 in float64 can round to -tiny in float32
    # and elect the other sign; dare_linear covers those densities)
    ref = ref_task_vectors(tensors, w, normalize=normalize, consensus=True, keep=keep, rescale=1 / density)
    assert_close(got, ref)


# ---------------------------------------------------------------- exactness, dtypes, loading


def method(kind: str, k: int, **kw) -> MergeMethod:
    w = [[1.0 / k] * k] if kind == "linear" else [[0.0] + [0.5] * (k - 1)]
    return MergeMethod(kind, kind, w, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_identical_models_give_base_bit_for_bit(kind, dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(*SHAPE, generator=g) * 3).to(dtype)
    tensors = [base.clone() for _ in range(4)]
    m = method(kind, 4, density=0.5 if kind != "linear" else 1.0, lam=0.7, normalize=True)
    got = m.merge_tensor(loader(tensors), 0, "x")
    assert got.dtype == dtype
    assert torch.equal(got, base)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_out_dtype_is_one_rounding_of_float32(kind, out_dtype):
    tensors = grid_models(3, seed=41)
    m = method(kind, 3, density=0.5 if kind != "linear" else 1.0, lam=0.9)
    got = m.merge_tensor(loader(tensors), 0, "x", out_dtype=out_dtype)
    full = m.merge_tensor(loader(tensors), 0, "x")
    assert got.dtype == out_dtype and full.dtype == torch.float32
    assert torch.equal(got, full.to(out_dtype))


def test_bf16_inputs_default_to_bf16_output():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(*SHAPE, generator=g).to(torch.bfloat16)
    tensors = [base] + [(base.float() + 0.05 * torch.randn(*SHAPE, generator=g)).to(torch.bfloat16) for _ in range(2)]
    w = [0.0, 0.5, 0.25]
    got = MergeMethod("ta", "task_arithmetic", [w]).merge_tensor(loader(tensors), 0, "x")
    assert got.dtype == torch.bfloat16
    ref = ref_task_vectors(tensors, w)
    assert_close(got, ref, atol=1e-6, rtol=2.0**-8)  # one bf16 rounding of the float32 result


@pytest.mark.parametrize("kind", KINDS)
def test_loader_tensors_not_modified(kind):
    for dtype in (torch.float32, torch.bfloat16):
        tensors = [t.to(dtype) for t in grid_models(3, seed=51)]
        saved = [t.clone() for t in tensors]
        method(kind, 3, density=0.5 if kind != "linear" else 1.0, lam=0.5, normalize=True).merge_tensor(
            loader(tensors), 0, "x")
        assert all(torch.equal(a, b) for a, b in zip(tensors, saved))


@pytest.mark.parametrize("kind", KINDS)
def test_load_counts(kind):
    tensors = grid_models(4, seed=61)
    calls = [0] * 4

    def counting(q):
        calls[q] += 1
        return tensors[q]

    method(kind, 4, density=0.5 if kind != "linear" else 1.0).merge_tensor(counting, 0, "x")
    assert calls[0] == 1  # the base once
    if kind in ("ties", "dare_ties"):  # two passes: the sign vote, then the sum
        assert all(1 <= c <= 2 for c in calls[1:]), calls
    else:
        assert calls[1:] == [1, 1, 1], calls


def test_groups_use_their_own_row():
    tensors = grid_models(3, seed=71)
    m = MergeMethod("ta", "task_arithmetic", [[0, 1, 0], [0, 0, 1]])
    assert torch.equal(m.merge_tensor(loader(tensors), 0, "x"), tensors[1])
    assert torch.equal(m.merge_tensor(loader(tensors), 1, "x"), tensors[2])
    with pytest.raises(ValueError, match="group 2 out of range"):
        m.merge_tensor(loader(tensors), 2, "x")


# ---------------------------------------------------------------- the description itself


def test_weights_stored_as_float_tuples():
    a = MergeMethod("r", "linear", np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32))
    b = MergeMethod("r", "linear", [[0.25, 0.75], [0.5, 0.5]])
    c = MergeMethod("r", "linear", [np.array([0.25, 0.75]), (0.5, 0.5)])
    assert a == b == c and hash(a) == hash(b) == hash(c)
    assert a.weights == ((0.25, 0.75), (0.5, 0.5)) and type(a.weights[0][0]) is float
    assert pickle.loads(pickle.dumps(a)) == a
    assert (a.num_groups, a.num_models) == (2, 2)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(kind="soup"), "unknown merge kind 'soup'"),
    (dict(weights=[[0.5, 0.5], [1.0]]), "rectangular"),
    (dict(weights=[0.5, 0.5]), "must still be wrapped"),
    (dict(weights=[]), "non-empty"),
    (dict(weights=np.ones(3)), "2-D"),
    (dict(weights=[[1.0]]), "at least 2 models"),
    (dict(weights=[[0.5, math.nan]]), "finite"),
    (dict(weights=[[0.5, math.inf]]), "finite"),
    (dict(weights=[[1.5, -0.5]]), "non-negative"),
    (dict(weights=[[0.0, 0.0]]), "not all zero"),
    (dict(kind="ties", weights=[[1.0, 0.0, 0.0]]), "at least one > 0"),
    (dict(kind="dare_ties", weights=[[0.0, 1.0, -0.5]]), "non-negative"),
    (dict(kind="ties", density=0.0), "density must be in (0, 1]"),
    (dict(kind="ties", density=1.5), "density must be in (0, 1]"),
    (dict(kind="dare_linear", density=math.nan), "density must be in (0, 1]"),
    (dict(kind="task_arithmetic", lam=math.inf), "lam must be a finite"),
    (dict(label=""), "label"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_validation_errors(kwargs, phrase):
    args = dict(label="m", kind="linear", weights=[[0.5, 0.5]]) | kwargs
    with pytest.raises(ValueError) as e:
        MergeMethod(**args)
    assert phrase in str(e.value)


def test_task_kinds_ignore_base_weight():
    # column 0 is the base's weight, which has no task vector: any finite value is accepted
    MergeMethod("t", "ties", [[-3.0, 1.0]])
    MergeMethod("t", "task_arithmetic", [[5.0, 0.0, 1.0]])


# ---------------------------------------------------------------- weight builders


def test_uniform_weights():
    w = uniform_weights(3, 4)
    assert w.shape == (3, 4) and np.allclose(w, 0.25)
    w = uniform_weights(2, 4, include_base=False)
    assert np.array_equal(w[:, 0], [0.0, 0.0]) and np.allclose(w[:, 1:], 1 / 3)
    assert np.allclose(w.sum(axis=1), 1.0)
    MergeMethod("avg", "linear", w)  # usable as is
    with pytest.raises(ValueError):
        uniform_weights(2, 1)


def test_layer_constant():
    w = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    got = layer_constant(w)
    expected_row = [(0.2 + 0.6 + 0.1) / 3, (0.8 + 0.4 + 0.9) / 3]
    assert got.shape == (3, 2)
    for g in range(3):
        assert np.allclose(got[g], expected_row, rtol=0, atol=1e-15)
    assert np.allclose(got.sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        layer_constant(np.ones(3))


def test_cocktail_weights():
    losses, t = [2.0, 1.0, 3.5], 0.5
    e = [math.exp(-x / t) for x in losses]
    assert np.allclose(cocktail_weights(losses, t), [x / sum(e) for x in e], rtol=1e-12, atol=0)
    # large losses: exp(-loss/T) underflows to 0 for every model; the weights must not be 0/0
    big = [2000.0, 2001.0, 2003.0]
    got = cocktail_weights(big, 1.0)
    e = [math.exp(-(x - 2000.0)) for x in big]  # softmax is shift invariant
    assert np.isfinite(got).all() and np.allclose(got, [x / sum(e) for x in e], rtol=1e-12, atol=0)
    assert np.allclose(cocktail_weights([-5000.0, -5000.0], 0.1), [0.5, 0.5])
    for bad in ([1.0, math.nan], [math.inf, 1.0], []):
        with pytest.raises(ValueError, match="losses"):
            cocktail_weights(bad, 1.0)
    for temp in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            cocktail_weights([1.0, 2.0], temp)


def test_task_vector_weights():
    w = task_vector_weights(2, 3, weight=0.4)
    assert np.array_equal(w, [[0.0, 0.4, 0.4], [0.0, 0.4, 0.4]])
    MergeMethod("ties", "ties", w)  # usable as is
    with pytest.raises(ValueError):
        task_vector_weights(2, 3, weight=0.0)
