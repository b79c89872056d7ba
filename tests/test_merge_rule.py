"""The per-tensor merge rule against float64 numpy, its bit-exactness on identical inputs,
its loading pattern, and the shard planner."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from recall_ray.core.architectures import Grouping
from recall_ray.cluster.merge import plan_shards
from recall_ray.core.merge_rule import weighted_merge
from recall_ray.io.safetensors_io import TensorInfo

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# one unit in the last place, relative (2^-mantissa bits)
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def ref_merge(tensors: list[torch.Tensor], weights) -> np.ndarray:
    """sum_q w_q theta_q in float64 with the weights renormalised, entry by entry."""
    w = [float(x) for x in weights]
    total = sum(w)
    out = np.zeros(tuple(tensors[0].shape), dtype=np.float64)
    for q, t in enumerate(tensors):
        out += (w[q] / total) * t.to(torch.float64).numpy()
    return out


def assert_close_to_ref(got: torch.Tensor, ref: np.ndarray, dtype: torch.dtype):
    g = got.to(torch.float64).numpy()
    # float32 accumulation + one rounding to the output dtype: at most ~1 ulp of the dtype
    tol = 1.01 * ULP[dtype] * np.abs(ref) + (2e-6 if dtype != torch.float32 else 1e-6)
    bad = np.abs(g - ref) > tol
    assert not bad.any(), f"{bad.sum()} entries off; max err {np.abs(g - ref).max()}"


def loader(tensors):
    return lambda q: tensors[q].clone()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("ref", [0, 1])
def test_weighted_merge_matches_float64(dtype, k, ref):
    g = torch.Generator().manual_seed(k * 10 + ref)
    base = torch.randn(13, 11, generator=g)
    # fine-tuned copies: base + deltas of different sizes (one large, to exercise the non-delta path)
    tensors = [(base + torch.randn(13, 11, generator=g) * s).to(dtype) for s in [0.01, 0.1, 1.0, 0.05, 0.3, 0.02][:k]]
    w = np.random.default_rng(k + 100 * ref).dirichlet(np.ones(k))
    got = weighted_merge(loader(tensors), list(w), ref=ref)
    assert got.dtype == dtype
    assert got.shape == tensors[0].shape
    assert_close_to_ref(got, ref_merge(tensors, w), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_float32_keeps_full_precision(dtype):
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(20, generator=g).to(dtype) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    got = weighted_merge(loader(tensors), w, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_merge(tensors, w), rtol=1e-6, atol=1e-7)


def test_weights_are_renormalised():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(8, 5, generator=g) for _ in range(3)]
    raw = [2.0, 6.0, 2.0]
    got = weighted_merge(loader(tensors), raw)
    assert_close_to_ref(got, ref_merge(tensors, raw), torch.float32)
    # and not simply summed with the raw weights (which would be ~10x larger)
    assert torch.allclose(got, weighted_merge(loader(tensors), [0.2, 0.6, 0.2]), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 4, 6])
def test_identical_models_give_back_the_same_bits(dtype, k):
    g = torch.Generator().manual_seed(k)
    t = (torch.randn(9, 7, generator=g) * 3).to(dtype)
    t[0, :3] = -0.0
    t[1, 0] = 0.0
    t[2, 1] = torch.finfo(dtype).max
    t[2, 2] = torch.finfo(dtype).tiny
    t[3, :] = torch.tensor([1 / 3.0]).to(dtype)  # a value that is not exact in binary
    assert torch.signbit(t[0, 0]) and t[0, 0] == 0
    for trial in range(5):
        w = np.random.default_rng(trial + 10 * k).dirichlet(np.ones(k) * 0.5)
        for ref in (0, k - 1):
            got = weighted_merge(lambda q: t.clone(), list(w), ref=ref)
            assert got.dtype == dtype
            assert torch.equal(got.view(BITS[dtype]), t.view(BITS[dtype])), (w, ref)


@pytest.mark.parametrize("bad", [[-0.1, 1.1], [float("nan"), 1.0], [0.0, 0.0], [], [float("inf"), 1.0], [1.0, -0.0, -1e-9]])
def test_invalid_weights_raise(bad):
    calls = []
    t = torch.ones(3)
    with pytest.raises(ValueError, match="weights"):
        weighted_merge(lambda q: calls.append(q) or t, bad)
    assert calls == []  # refused before any tensor is loaded


@pytest.mark.parametrize("weights,ref,expected", [
    ([0.5, 0.0, 0.5, 0.0], 0, {0: 1, 2: 1}),
    ([0.0, 0.5, 0.5, 0.0], 0, {0: 1, 1: 1, 2: 1}),  # reference loaded even with weight 0
    ([0.25, 0.25, 0.25, 0.25], 2, {0: 1, 1: 1, 2: 1, 3: 1}),
    ([0.0, 0.0, 1.0], 2, {2: 1}),
])
def test_load_called_once_per_used_model(weights, ref, expected):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 4, generator=g) for _ in weights]
    calls: dict[int, int] = {}

    def load(q):
        calls[q] = calls.get(q, 0) + 1
        return tensors[q].clone()

    got = weighted_merge(load, weights, ref=ref)
    assert calls == expected
    assert_close_to_ref(got, ref_merge(tensors, weights), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_at_most_one_loaded_copy_alive_besides_the_reference(dtype):
    """Memory claim: the reference, the accumulator and one loaded copy, whatever K is."""
    k = 6
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(64, 64, generator=g).to(dtype) for _ in range(k)]
    alive: set[int] = set()
    peak = []

    def load(q):
        peak.append(len(alive))
        t = tensors[q].clone()
        alive.add(q)
        weakref.finalize(t, alive.discard, q)
        return t

    weighted_merge(load, [1 / k] * k, ref=0)
    # when model q is loaded, only the reference's copy may still be alive
    assert max(peak) <= 1, peak


# ----------------------------------------------------------------------------- plan_shards


def fake(sizes: list[int]) -> tuple[Grouping, dict[str, TensorInfo]]:
    """Groups with the given byte sizes, each split into 1-3 tensors."""
    groups, infos = {}, {}
    rng = np.random.default_rng(len(sizes))
    for gi, size in enumerate(sizes):
        parts = int(rng.integers(1, 4))
        cuts = [size // parts] * (parts - 1)
        cuts.append(size - sum(cuts))
        for j, nb in enumerate(cuts):
            name = f"g{gi}.t{j}"
            groups[name] = gi
            infos[name] = TensorInfo(name, "F32", (nb // 4,), "/x.safetensors", nb)
    return Grouping(groups=groups, tied=(), num_groups=len(sizes)), infos


def check_plan(sizes, requested):
    grouping, infos = fake(sizes)
    shards = plan_shards(grouping, infos, requested)
    n_groups = len(sizes)
    assert len(shards) == max(1, min(requested, n_groups))
    flat = [g for s in shards for g in s]
    assert flat == list(range(n_groups))  # every group exactly once, in order
    for s in shards:
        assert s, shards  # non-empty
        assert s == list(range(s[0], s[-1] + 1))  # contiguous
    total = sum(sizes)
    per = [sum(sizes[g] for g in s) for s in shards]
    assert sum(per) == total
    # roughly balanced: no shard exceeds the even share by more than the largest group
    assert max(per) <= total / len(shards) + max(sizes), (sizes, requested, shards)
    return shards, per


def test_plan_shards_equal_groups_exact():
    shards, per = check_plan([100] * 10, 3)
    assert [len(s) for s in shards] == [4, 3, 3]
    shards, _ = check_plan([100] * 8, 4)
    assert shards == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_plan_shards_caps_at_group_count_and_single():
    shards, _ = check_plan([5, 1000, 5], 10)
    assert shards == [[0], [1], [2]]
    shards, _ = check_plan([5, 1000, 5], 1)
    assert shards == [[0, 1, 2]]


def test_plan_shards_realistic_model_layout():
    # big embedding group, L equal blocks, last group = block + norm + head
    sizes = [5000] + [1000] * 30
    sizes[-1] += 5000
    for requested in (1, 2, 3, 4, 7, 16, 31, 40):
        shards, per = check_plan(sizes, requested)
        if 1 < requested <= 8:
            assert max(per) / min(per) < 2.5, per


@pytest.mark.parametrize("seed", range(30))
def test_plan_shards_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    sizes = [int(x) * 4 for x in rng.integers(0, 2000, size=n)]
    if seed % 5 == 0:
        sizes[int(rng.integers(0, n))] = 400_000  # one huge group
    check_plan(sizes, int(rng.integers(1, 12)))


def test_plan_shards_empty_groups():
    check_plan([0, 0, 0, 0], 2)
    check_plan([0, 400, 0, 0, 400], 3)


@pytest.mark.parametrize("q", [0, 1, 2])
def test_one_hot_weights_return_that_model_bit_for_bit(q):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(8, 5, generator=g) * (i + 1) for i in range(3)]
    w = [0.0, 0.0, 0.0]
    w[q] = 2.5  # renormalised to 1
    got = weighted_merge(lambda i: tensors[i], w, ref=0)
    assert torch.equal(got, tensors[q])
    assert got.data_ptr() != tensors[q].data_ptr()  # a copy: the caller may free or modify it


def test_low_rank_deltas_are_used_without_loading_those_models():
    """A model that gives its delta directly (a LoRA expert on the reference's weights) is
    never loaded, an UNCHANGED one adds nothing, and the sum equals the loaded one."""
    from recall_ray.core.merge_rule import UNCHANGED

    rng = np.random.default_rng(7)
    ref = torch.tensor(rng.normal(size=(5, 4)), dtype=torch.float32)
    deltas = [None, torch.tensor(rng.normal(size=(5, 4)) * 0.1, dtype=torch.float32), UNCHANGED]
    full = [ref, ref + deltas[1], ref.clone()]
    loaded = []

    def load(q):
        loaded.append(q)
        return full[q]

    w = [0.2, 0.5, 0.3]
    got = weighted_merge(load, w, delta=lambda q: deltas[q].clone() if isinstance(deltas[q], torch.Tensor)
                         else deltas[q])
    assert loaded == [0]  # the reference only
    expect = ref.double().numpy() + 0.5 * deltas[1].double().numpy()
    np.testing.assert_allclose(got.double().numpy(), expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.numpy(), weighted_merge(lambda q: full[q], w).numpy(), rtol=1e-6, atol=1e-6)
    unchanged = weighted_merge(load, w, delta=lambda q: None if q == 0 else UNCHANGED)
    assert torch.equal(unchanged, ref)  # nothing added: the reference bit for bit
