"""LoRA folding: the pure fold against float64 numpy, and real PEFT adapters read through
ModelTensors against PEFT's own merge_and_unload() and against numpy."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_lora, make_tiny_llama
from recall_ray.core.lora import check_adapter_fits, fold_lora
from recall_ray.io.models import read_adapter
from recall_ray.io.models import ModelTensors, resolve_model
from recall_ray.io.safetensors_io import CheckpointError, list_weight_files, model_fingerprint, tensor_infos


def np64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def ref_fold(w, a, b, scale, fan_in_fan_out=False) -> np.ndarray:
    """W + scale * B @ A in float64 with explicit loops over the rank."""
    w, a, b = np64(w), np64(a), np64(b)
    delta = np.zeros((b.shape[0], a.shape[1]))
    for k in range(a.shape[0]):
        delta += np.outer(b[:, k], a[k, :])
    if fan_in_fan_out:
        delta = delta.T
    return w + scale * delta


# ----------------------------------------------------------------------------- pure fold


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("scale", [2.0, 0.5, 8 / math.sqrt(4)])
def test_fold_lora_matches_float64(w_dtype, ab_dtype, fan_in_fan_out, scale):
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, r = 12, 7, 3
    w_shape = (in_dim, out_dim) if fan_in_fan_out else (out_dim, in_dim)
    w = torch.randn(w_shape, generator=g).to(w_dtype)
    a = torch.randn(r, in_dim, generator=g).to(ab_dtype)
    b = torch.randn(out_dim, r, generator=g).to(ab_dtype)
    got = fold_lora(w, a, b, scale, fan_in_fan_out=fan_in_fan_out)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == w_shape
    ref = ref_fold(w, a, b, scale, fan_in_fan_out)
    np.testing.assert_allclose(np64(got), ref, rtol=1e-6, atol=1e-5)
    # the delta really matters (the test would catch a missing or mis-scaled delta)
    assert np.abs(ref - np64(w)).max() > 0.1
    # inputs untouched
    assert w.dtype == w_dtype and a.dtype == ab_dtype


def test_fold_lora_zero_b_returns_w_exactly():
    w = torch.randn(5, 4).to(torch.bfloat16)
    got = fold_lora(w, torch.randn(2, 4), torch.zeros(5, 2), 3.0)
    assert torch.equal(got, w.to(torch.float32))


# ----------------------------------------------------------------------------- real PEFT adapters


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("lora_base"), layers=2, hidden=64, tie=True)


def make_adapter(base: Path, out: Path, use_rslora: bool = False, seed: int = 0):
    """A PEFT LoRA adapter with random non-zero B; returns (adapter dir, PEFT-merged state dict)."""
    pm = make_lora(base, out, seed=seed, use_rslora=use_rslora)
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return out, merged


EXPECTED_TARGETS = {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in ("q", "v")}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_read_through_model_tensors_equals_peft_merge(base_dir, tmp_path, use_rslora):
    adapter_dir, merged = make_adapter(base_dir, tmp_path / "adapter", use_rslora=use_rslora)
    resolved = resolve_model("new", str(adapter_dir), str(base_dir))
    assert resolved.kind == "adapter"
    assert resolved.weights_dir == str(base_dir)

    adapter = read_adapter(adapter_dir)
    assert set(adapter.targets) == EXPECTED_TARGETS
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for t in adapter.targets.values():
        assert t.scale == pytest.approx(scale, rel=1e-15)
    base_infos = tensor_infos(list_weight_files(base_dir))
    check_adapter_fits(adapter, base_infos, model_fingerprint(base_dir), str(base_dir))  # no raise

    base_sd = load_file(str(base_dir / "model.safetensors"))
    ad_sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    mt = ModelTensors(resolved)
    for name, base_t in base_sd.items():
        got = mt.get(name)
        if name in EXPECTED_TARGETS:
            mod = "base_model.model." + name[: -len(".weight")]
            a, b = ad_sd[f"{mod}.lora_A.weight"], ad_sd[f"{mod}.lora_B.weight"]
            ref = ref_fold(base_t, a, b, scale)
            assert got.dtype == torch.float32
            np.testing.assert_allclose(np64(got), ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(got, merged[name], rtol=0, atol=1e-6)
            assert np.abs(ref - np64(base_t)).max() > 1e-2  # the adapter does change it
        else:
            assert torch.equal(got, base_t), name
            assert torch.equal(got, merged[name]), name


def test_resolve_model_kinds(base_dir, tmp_path):
    assert resolve_model("base", str(base_dir), str(base_dir)).kind == "hf"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model("x", str(tmp_path / "nope"), str(base_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        resolve_model("x", str(tmp_path / "empty"), str(base_dir))


def rewrite_adapter(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "adapter_model.safetensors"))
    sd = fn(sd)
    save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapter_that_does_not_fit_base_raises(base_dir, tmp_path):
    adapter_dir, _ = make_adapter(base_dir, tmp_path / "adapter")
    base_infos = tensor_infos(list_weight_files(base_dir))
    key_a = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")

    def wrong_in(sd):
        sd[key_a] = torch.randn(sd[key_a].shape[0], sd[key_a].shape[1] + 1)
        return sd

    def wrong_out(sd):
        sd[key_b] = torch.randn(sd[key_b].shape[0] + 2, sd[key_b].shape[1])
        return sd

    def wrong_rank(sd):
        sd[key_b] = torch.randn(sd[key_b].shape[0], sd[key_b].shape[1] + 1)
        return sd

    for i, fn in enumerate((wrong_in, wrong_out, wrong_rank)):
        bad = rewrite_adapter(adapter_dir, tmp_path / f"bad{i}", fn)
        with pytest.raises(CheckpointError) as e:
            check_adapter_fits(read_adapter(bad), base_infos, None, str(base_dir))
        assert "model.layers.1.self_attn.v_proj.weight" in str(e.value)

    # a base of another size (hidden 32): every target mismatches
    other = make_tiny_llama(tmp_path / "other_base", layers=2, hidden=32, tokenizer_dir=base_dir)
    with pytest.raises(CheckpointError, match="does not match"):
        check_adapter_fits(read_adapter(adapter_dir), tensor_infos(list_weight_files(other)), None, str(other))

    # a target the base does not have (base with one layer)
    one = make_tiny_llama(tmp_path / "one_layer", layers=1, hidden=64, tokenizer_dir=base_dir)
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn"):
        check_adapter_fits(read_adapter(adapter_dir), tensor_infos(list_weight_files(one)), None, str(one))

    # recorded base fingerprint differs from the base given
    (adapter_dir / "recall_ray.json").write_text(json.dumps({"base_fingerprint": "0" * 64}))
    with pytest.raises(CheckpointError, match="different base"):
        check_adapter_fits(read_adapter(adapter_dir), base_infos, model_fingerprint(base_dir), str(base_dir))


def test_adapter_with_unfoldable_tensors_is_refused(base_dir, tmp_path):
    adapter_dir, _ = make_adapter(base_dir, tmp_path / "adapter")

    def add_saved_module(sd):
        sd["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(3, 3)
        return sd

    bad = rewrite_adapter(adapter_dir, tmp_path / "bad", add_saved_module)
    with pytest.raises(CheckpointError, match="modules_to_save"):
        read_adapter(bad)

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="use_dora"):
        read_adapter(adapter_dir)


@pytest.mark.parametrize("check_finite", [False, True])
def test_loaded_model_slot_swaps_adapters_on_one_base_exactly(base_dir, tmp_path, check_finite):
    """Moving between LoRA adapters of one base (and the base itself) swaps their target
    parameters in place: after every move the model equals a fresh load, bit for bit (also
    when the slot reads and tests the weights itself, as the representation actors do)."""
    from recall_ray.io.models import LoadedModelSlot, load_causal_lm

    a, _ = make_adapter(base_dir, tmp_path / "a", seed=1)
    b, _ = make_adapter(base_dir, tmp_path / "b", seed=2)
    models = [resolve_model("a", str(a), str(base_dir)), resolve_model("b", str(b), str(base_dir)),
              resolve_model("base", str(base_dir), str(base_dir))]
    slot = LoadedModelSlot(models, torch.float32, "cpu", padding_side="right", check_finite=check_finite)
    for i in (0, 1, 2, 0, 2, 1):
        _, lm = slot.get(i)
        fresh = load_causal_lm(models[i])
        got, want = lm.state_dict(), fresh.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), models[i].label
    assert slot.swaps == 5  # one load, then every move a swap
