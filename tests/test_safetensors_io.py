"""Safetensors I/O: the streaming shard writer, header validation, weight-file discovery
and fingerprints."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recall_ray.io.safetensors_io import (
    CheckpointError,
    StreamingShardWriter,
    TORCH_TO_ST,
    list_weight_files,
    model_fingerprint,
    read_header,
    tensor_infos,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 3, generator=g).to(torch.float16),
        "d.i64": torch.arange(-4, 5, dtype=torch.int64),
        "e.scalar": torch.tensor(3.25),
        "f.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "g.empty_f32": torch.zeros(5, 0),
        "h.odd": torch.randn(3, generator=g).to(torch.float16),  # 6 bytes: later offsets unaligned
        "i.neg0": torch.tensor([-0.0, 0.0, float("inf")]),
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def plan_of(tensors):
    return [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def test_streaming_writer_roundtrip(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model-00001-of-00001.safetensors"
    w = StreamingShardWriter(path, plan_of(tensors), metadata={"format": "pt", "who": "test"})
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    back = load_file(str(path))
    assert list(back) == list(tensors) or set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype, n
        assert back[n].shape == t.shape, n
        assert torch.equal(bits(back[n]), bits(t)), n  # bit for bit, -0.0 included
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    # our own header reader agrees, and the data starts 8-byte aligned
    header, raw = read_header(path)
    assert len(raw) % 8 == 0
    assert {k for k in header if k != "__metadata__"} == set(tensors)
    infos = tensor_infos([path])
    for n, t in tensors.items():
        assert infos[n].nbytes == t.numel() * t.element_size()
        assert infos[n].shape == tuple(t.shape)
    assert path.stat().st_size == 8 + len(raw) + sum(t.numel() * t.element_size() for t in tensors.values())


def test_streaming_writer_non_contiguous_input(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # non-contiguous view
    path = tmp_path / "x.safetensors"
    w = StreamingShardWriter(path, [("t", "F32", (4, 3))])
    w.write("t", t)
    w.close()
    assert torch.equal(load_file(str(path))["t"], t)


def test_streaming_writer_rejects_wrong_order_dtype_shape_and_missing(tmp_path):
    tensors = sample_tensors()
    plan = plan_of(tensors)
    w = StreamingShardWriter(tmp_path / "a.safetensors", plan)
    with pytest.raises(RuntimeError, match="a.f32"):
        w.write("b.bf16", tensors["b.bf16"])  # out of plan order
    w._f.close()  # abandon this writer

    # same dtype and shape, only the order differs: still refused
    w = StreamingShardWriter(tmp_path / "c.safetensors", [("x", "F32", (2,)), ("y", "F32", (2,))])
    with pytest.raises(RuntimeError, match="expected x"):
        w.write("y", torch.zeros(2))
    w.write("x", torch.zeros(2))
    w.write("y", torch.ones(2))
    w.close()
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["y"], torch.ones(2))

    w = StreamingShardWriter(tmp_path / "b.safetensors", [("x", "BF16", (2,))])
    with pytest.raises(RuntimeError):
        w.write("x", torch.zeros(2))  # wrong dtype
    with pytest.raises(RuntimeError):
        w.write("x", torch.zeros(3, dtype=torch.bfloat16))  # wrong shape
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def saved(tmp_path, name="model.safetensors"):
    tensors = {"w": torch.randn(4, 4), "b": torch.randn(4).to(torch.bfloat16)}
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_read_header_truncated_file_names_it(tmp_path):
    path = saved(tmp_path)
    read_header(path)  # intact: fine
    data = path.read_bytes()
    for cut in (1, 7, 40):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:-cut])
        with pytest.raises(CheckpointError) as e:
            read_header(bad)
        assert str(bad) in str(e.value)
    # cut inside the header
    bad = tmp_path / "cut_header.safetensors"
    bad.write_bytes(data[:20])
    with pytest.raises(CheckpointError) as e:
        read_header(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("content", [
    b"",
    b"abc",
    b"\xff" * 64,  # header length far too large
    bytes(range(256)) * 4,
    struct.pack("<Q", 5) + b"{notj" + b"\0" * 10,  # not JSON
    struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",  # not UTF-8
    struct.pack("<Q", 2) + b"{}" + b"",  # empty but valid header: fine (checked below)
    struct.pack("<Q", 60) + json.dumps({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}).encode()[:60].ljust(60) + b"\0",
])
def test_read_header_garbage_names_file(tmp_path, content):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(content)
    if content == struct.pack("<Q", 2) + b"{}":
        assert read_header(bad)[0] == {}
        return
    with pytest.raises(CheckpointError) as e:
        read_header(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("header", [
    b"[1, 2]",                                                   # JSON, but not an object
    b'"text"',
    b'{"x": 5}',                                                 # tensor entry not an object
    b'{"x": {"dtype": "F32", "shape": [1]}}',                    # no data_offsets
    b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": 4}}',  # malformed data_offsets
])
def test_read_header_valid_json_wrong_structure_is_checkpoint_error(tmp_path, header):
    bad = tmp_path / "weird.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        read_header(bad)
    assert str(bad) in str(e.value)


def test_list_weight_files_pickle_only(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        list_weight_files(tmp_path)
    assert "allow_pickle" in str(e.value) and "pytorch_model.bin" in str(e.value)
    assert list_weight_files(tmp_path, allow_pickle=True) == [tmp_path / "pytorch_model.bin"]
    infos = tensor_infos(list_weight_files(tmp_path, allow_pickle=True))
    assert infos["w"].shape == (2,) and infos["w"].dtype == "F32"


def test_list_weight_files_prefers_safetensors_and_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        list_weight_files(tmp_path / "empty")
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.ones(1)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(1)}, str(d / "model-00002-of-00002.safetensors"))
    torch.save({}, d / "pytorch_model.bin")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert [p.name for p in list_weight_files(d)] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        list_weight_files(d)


def test_model_fingerprint(tmp_path):
    def write(d, tensors):
        d.mkdir(exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"))
        return model_fingerprint(d)

    base = {"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    fp1 = write(tmp_path / "m1", base)
    assert fp1 == model_fingerprint(tmp_path / "m1")  # stable across calls
    assert fp1 == write(tmp_path / "m2", {k: v.clone() for k, v in base.items()})  # same layout elsewhere
    assert len(fp1) == 64
    # same byte size, different shape
    assert fp1 != write(tmp_path / "m3", {"a": torch.zeros(4, 3), "b": base["b"]})
    assert fp1 != write(tmp_path / "m4", {"a": torch.zeros(3, 5), "b": base["b"]})
    assert fp1 != write(tmp_path / "m5", {"a": torch.zeros(3, 4, dtype=torch.float16).float(), "b": base["b"].float()})

    # the same shapes with other values: a model retrained in place must not reuse stale stages
    big = {"w": torch.zeros(64, 1024), "v": torch.zeros(8)}  # 256 KiB: first and last 4 KiB are sampled
    fp_big = write(tmp_path / "m6", big)
    for where in ((0, 0), (-1, -1), (10, 5)):
        other = {k: t.clone() for k, t in big.items()}
        other["w"][where] = 1.0
        changed = write(tmp_path / f"m7_{where[0]}_{where[1]}", other)
        # a change in the first or last 4 KiB of a tensor is seen; one in its middle is not
        assert (changed != fp_big) == (where != (10, 5)), where
    small = {k: t.clone() for k, t in big.items()}
    small["v"][3] = 2.0
    assert write(tmp_path / "m8", small) != fp_big


def test_read_header_size_mismatch_is_checkpoint_error(tmp_path):
    """A byte range that does not match shape x dtype is refused before any read."""
    header = b'{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'
    bad = tmp_path / "size.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"spans 8 bytes"):
        read_header(bad)
