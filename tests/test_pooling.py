"""Mean pooling against a float64 loop reference, the Parquet layout round trip, and the
actor-pool resource shape. No Ray is started."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recall_ray.cluster.pools import inference_pool
from recall_ray.core.pooling import mean_pool
from recall_ray.io.reps_parquet import read_layer, reps_table

LENGTHS = [6, 3, 1, 4, 2]
T = 6


def make_mask(lengths, t, side):
    m = torch.zeros(len(lengths), t, dtype=torch.int64)
    for b, n in enumerate(lengths):
        if side == "right":
            m[b, :n] = 1
        else:
            m[b, t - n:] = 1
    return m


def ref_pool(hidden, mask, exclude_first):
    """[B, L+1, H] float64: mean over real tokens, optionally without each sample's first real
    token unless it is its only one."""
    mask = mask.numpy()
    b_, t_ = mask.shape
    h_ = hidden[0].shape[-1]
    out = np.zeros((b_, len(hidden), h_))
    for li, h in enumerate(hidden):
        hh = h.to(torch.float64).numpy()
        for b in range(b_):
            real = [t for t in range(t_) if mask[b, t] == 1]
            if exclude_first and len(real) > 1:
                real = real[1:]
            acc = np.zeros(h_)
            for t in real:
                acc += hh[b, t]
            out[b, li] = acc / len(real)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("exclude_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_pool_matches_reference(side, exclude_first, dtype):
    g = torch.Generator().manual_seed(0)
    layers, h = 4, 5
    hidden = [(torch.randn(len(LENGTHS), T, h, generator=g) * (li + 1) * 10).to(dtype) for li in range(layers)]
    # padding positions hold garbage that must not leak into the mean
    mask = make_mask(LENGTHS, T, side)
    for li in range(layers):
        hidden[li][mask == 0] = torch.tensor(1e4, dtype=dtype)
    got = mean_pool(hidden, mask, exclude_first_token=exclude_first)
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.float32
    assert got.shape == (len(LENGTHS), layers, h)
    ref = ref_pool(hidden, mask, exclude_first)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-5)
    # the single-token sample keeps its token either way
    single = LENGTHS.index(1)
    pos = 0 if side == "right" else T - 1
    for li in range(layers):
        np.testing.assert_array_equal(got[single, li], hidden[li][single, pos].to(torch.float32).numpy())
    # exclude_first really changes the result for multi-token samples
    other = mean_pool(hidden, mask, exclude_first_token=not exclude_first)
    assert not np.allclose(got[0], other[0])


def test_mean_pool_does_not_modify_mask():
    mask = make_mask([3, 2], 4, "left")
    before = mask.clone()
    mean_pool([torch.randn(2, 4, 3)], mask, exclude_first_token=True)
    assert torch.equal(mask, before)


def test_reps_table_schema_and_parquet_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    n, layers, h = 11, 3, 4
    reps = rng.normal(size=(n, layers, h)).astype(np.float32)
    idx = np.arange(100, 100 + n)
    ids = [f"s{i}" for i in idx]
    table = reps_table(idx, ids, reps)
    assert table.schema.field("sample_idx").type == pa.int64()
    assert table.schema.field("sample_id").type == pa.string()
    for i in range(layers):
        t = table.schema.field(f"layer_{i}").type
        assert pa.types.is_fixed_size_list(t), t
        assert t.list_size == h
        assert t.value_type == pa.float32()
        got = np.array(table.column(f"layer_{i}").to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(got, reps[:, i, :])
    assert table.column("sample_id").to_pylist() == ids

    # two files, rows shuffled, as Ray Data writes them
    perm = rng.permutation(n)
    d = tmp_path / "reps"
    d.mkdir()
    pq.write_table(table.take(pa.array(perm[:5])), d / "part-1.parquet")
    pq.write_table(table.take(pa.array(perm[5:])), d / "part-0.parquet")
    assert sum(n.startswith("layer_") for n in pq.read_schema(d / "part-0.parquet").names) == layers
    for i in range(layers):
        sidx, x = read_layer(str(d), i)
        np.testing.assert_array_equal(sidx, idx)
        assert x.shape == (n, h)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, reps[:, i, :])


# ----------------------------------------------------------------------------- inference_pool


def test_inference_pool_two_cpus_auto_leaves_one_free():
    p = inference_pool({"CPU": 2.0}, "auto", num_items=100)
    assert p.size == 1
    assert p.num_gpus == 0
    assert p.num_cpus * p.size <= 2.0 - 1.0
    assert p.num_cpus > 0
    assert p.threads >= 1


@pytest.mark.parametrize("cpus", [1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0])
@pytest.mark.parametrize("requested", ["auto", 1, 2, 3, 8])
@pytest.mark.parametrize("items", [1, 5, 1000])
def test_inference_pool_cpu_never_takes_every_cpu(cpus, requested, items):
    p = inference_pool({"CPU": cpus}, requested, num_items=items)
    assert p.num_gpus == 0
    assert 1 <= p.size <= items
    if requested != "auto":
        assert p.size == min(requested, items)
    assert p.num_cpus > 0
    assert p.num_cpus * p.size <= cpus - 0.5 + 1e-9
    assert p.threads >= 1


@pytest.mark.parametrize("cluster,requested,items,size", [
    ({"CPU": 16.0, "GPU": 2.0}, "auto", 100, 2),
    ({"CPU": 16.0, "GPU": 4.0}, 2, 100, 2),
    ({"CPU": 16.0, "GPU": 4.0}, 8, 100, 4),
    ({"CPU": 16.0, "GPU": 4.0}, "auto", 3, 3),
    ({"CPU": 64.0, "GPU": 8.0}, "auto", 1000, 8),
])
def test_inference_pool_gpu_one_per_actor(cluster, requested, items, size):
    p = inference_pool(cluster, requested, num_items=items)
    assert p.num_gpus == 1
    assert p.size == size
    assert p.num_cpus * p.size <= cluster["CPU"] - 0.5


@pytest.mark.parametrize("cluster", [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 4.0}])
def test_inference_pool_gpu_leaves_a_cpu_when_cpus_are_scarce(cluster):
    p = inference_pool(cluster, "auto", num_items=100)
    assert p.num_gpus == 1
    assert p.num_cpus * p.size <= cluster["CPU"] - 0.5


# ----------------------------------------------------------------- autoscaling targets


def test_targets_on_an_autoscaling_cluster_are_not_cut_to_what_is_up(monkeypatch):
    """A cluster that starts with no workers: a numeric target keeps its size (one CPU, or
    one GPU, per actor) and the whole pool is asked of the autoscaler at once; a fixed
    machine keeps cutting the pool to its CPUs (it never waits for CPUs that cannot come)."""
    from recall_ray.cluster import pools

    asked = []
    import ray.autoscaler.sdk as sdk

    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None, **kw: asked.append(bundles))
    fixed = inference_pool({"CPU": 2.0}, 3, num_items=100)
    assert fixed.num_cpus * fixed.size <= 1.0 + 1e-9  # cut to the machine
    pools.request_pool(fixed)
    assert asked == []  # no autoscaler to ask
    monkeypatch.setattr(pools, "AUTOSCALING", True)
    empty = inference_pool({"CPU": 0.0}, 3, num_items=100)
    assert (empty.size, empty.num_cpus, empty.num_gpus) == (3, 1.0, 0)
    gpu = inference_pool({"CPU": 4.0}, 4, num_items=100, use_gpu=True)
    assert (gpu.size, gpu.num_gpus) == (4, 1)
    pools.request_pool(empty)
    pools.request_pool(gpu)
    merge = pools.merge_pool({"CPU": 0.0}, 6, num_groups=31)
    pools.request_pool(merge)
    pools.release_requests()
    assert asked == [[{"CPU": 1.0}] * 3, [{"CPU": 1.0, "GPU": 1.0}] * 4, [{"CPU": 0.5}] * 6, []]
    assert inference_pool({"CPU": 64.0}, 4, num_items=100).num_cpus == pytest.approx(63.0 / 4)  # room enough
