"""How often the job reads its inputs, and the NaN/Inf check folded into those reads: the
representation stage's loads read every tensor once through the project's reader and test
it; the merge reads it once more; nothing else reads the weights (docs/design.md, "Bad
input"; docs/scaling.md)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA, make_lora, make_tiny_llama
from recall_ray.config import build_config
from recall_ray.io.models import LoadedModelSlot, load_causal_lm, load_causal_lm_read, resolve_model
from recall_ray.pipeline import run_pipeline


def tensor_bytes(model_dir: Path, pattern: str = "*.safetensors") -> int:
    """The tensor data of a directory's safetensors files: each file's size less its 8-byte
    length and its JSON header (read here with struct, not with the project's reader)."""
    total = 0
    for f in sorted(Path(model_dir).glob(pattern)):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - n
    return total


def _poison(model_dir: Path, file: str, name: str, value: float) -> None:
    f = model_dir / file
    sd = load_file(f)
    sd[name] = sd[name].clone()
    sd[name].view(-1)[1] = value
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_has_nonfinite_agrees_with_numpy(dtype):
    """The exponent-bit test against numpy's isfinite (on exact float64 copies), for values at
    the edges: the largest finite value, subnormals, -0, and each of NaN, +Inf and -Inf alone."""
    import numpy as np

    from recall_ray.io.models import has_nonfinite

    info = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4], dtype=dtype)
    assert not has_nonfinite(edge) and np.isfinite(edge.double().numpy()).all()
    g = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = (torch.randn(1000, generator=g) * 100).to(dtype)
        t[int(torch.randint(0, 1000, (1,), generator=g))] = bad
        assert has_nonfinite(t) == (not np.isfinite(t.double().numpy()).all()) == True  # noqa: E712
        strided = t.reshape(10, 100)[:, ::2]
        assert has_nonfinite(strided) == (not np.isfinite(strided.double().numpy()).all())
    assert not has_nonfinite(torch.empty(0, dtype=dtype))


def _same_params(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tie,dtype,load_dtype", [(True, torch.float32, torch.float32),
                                                  (False, torch.bfloat16, torch.float32),
                                                  (False, torch.float32, torch.bfloat16)])
def test_read_load_equals_transformers_load(tmp_path, tie, dtype, load_dtype):
    d = make_tiny_llama(tmp_path / "m", tie=tie, dtype=dtype)
    m = resolve_model("m", str(d), str(d))
    lm, read = load_causal_lm_read(m, load_dtype, check_finite=True)
    _same_params(lm, load_causal_lm(m, load_dtype))
    assert read.weights_read and read.finite and read.bytes_read == tensor_bytes(d)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, load_causal_lm(m, load_dtype)(ids).logits)


def test_read_load_of_adapter_folds_and_counts(tmp_path, tiny_dir):
    make_lora(tiny_dir, tmp_path / "a")
    m = resolve_model("a", str(tmp_path / "a"), str(tiny_dir))
    lm, read = load_causal_lm_read(m, torch.float32, check_finite=True)
    _same_params(lm, load_causal_lm(m, torch.float32))
    # the base's tensors once, the adapter's once (its few MB, not once per target)
    assert read.bytes_read == tensor_bytes(tiny_dir) + tensor_bytes(tmp_path / "a") and read.finite


def test_read_load_names_nan_and_inf(tmp_path, tiny_dir):
    d = tmp_path / "bad"
    shutil.copytree(tiny_dir, d)
    _poison(d, "model.safetensors", "model.layers.1.mlp.up_proj.weight", float("nan"))
    _poison(d, "model.safetensors", "model.norm.weight", float("-inf"))
    m = resolve_model("bad", str(d), str(d))
    _, read = load_causal_lm_read(m, torch.float32, check_finite=True)
    assert read.weights_nonfinite == ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert read.adapter_nonfinite == [] and not read.finite
    _, unchecked = load_causal_lm_read(m, torch.float32, check_finite=False)
    assert unchecked.finite and unchecked.bytes_read == read.bytes_read and unchecked.check_seconds == 0.0


def test_slot_swap_checks_the_adapter_and_counts_its_reads(tmp_path, tiny_dir):
    """Moving to the next LoRA expert reads that adapter's tensors once (tested) and its
    targets' base tensors; a NaN in its lora_B is reported under the adapter's path."""
    from recall_ray.io.models import read_adapter

    make_lora(tiny_dir, tmp_path / "a0", seed=0)
    make_lora(tiny_dir, tmp_path / "a1", seed=1, targets=("q_proj",))
    lb = next(n for n in read_adapter(tmp_path / "a1").infos if "lora_B" in n)
    _poison(tmp_path / "a1", "adapter_model.safetensors", lb, float("inf"))
    models = [resolve_model(f"a{i}", str(tmp_path / f"a{i}"), str(tiny_dir)) for i in range(2)]
    slot = LoadedModelSlot(models, torch.float32, "cpu", padding_side="right", check_finite=True)
    slot.get(0)
    first = slot.take_read(0)
    assert first.finite and first.bytes_read == tensor_bytes(tiny_dir) + tensor_bytes(tmp_path / "a0")
    assert slot.take_read(0) is None  # reported once
    slot.get(1)
    swap = slot.take_read(1)
    assert slot.swaps == 1 and not swap.weights_read
    assert swap.adapter_nonfinite == [f"{tmp_path / 'a1'}:{lb}"] and swap.weights_nonfinite == []
    base = json.loads((tiny_dir / "model.safetensors").read_bytes()[8:8 + struct.unpack(
        "<Q", (tiny_dir / "model.safetensors").read_bytes()[:8])[0]])
    nbytes = lambda n: base[n]["data_offsets"][1] - base[n]["data_offsets"][0]  # noqa: E731
    q = [n for n in base if n.endswith("q_proj.weight")]
    v = [n for n in base if n.endswith("v_proj.weight")]
    # a1's targets (q_proj) folded from the base, a0's v_proj given back the base's values
    assert swap.bytes_read == tensor_bytes(tmp_path / "a1") + sum(map(nbytes, q)) + sum(map(nbytes, v))


def test_slot_does_not_test_weights_an_earlier_stage_tested(tmp_path, tiny_dir):
    """A LoRA expert's base, tested by an earlier stage (reps_new's load of a LoRA new model),
    is not tested again by each actor of the next stage that loads it: a NaN planted in the
    base is not looked for there, while the adapter's own tensors still are; without the
    earlier test, the same load finds it."""
    from recall_ray.io.models import read_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    _poison(base, "model.safetensors", "model.layers.0.mlp.down_proj.weight", float("nan"))
    make_lora(base, tmp_path / "a")
    lb = sorted(n for n in read_adapter(tmp_path / "a").infos if "lora_B" in n)[0]
    _poison(tmp_path / "a", "adapter_model.safetensors", lb, float("inf"))
    m = resolve_model("a", str(tmp_path / "a"), str(base))
    reads = {}
    for tested in ((), (m.weights_dir,)):
        slot = LoadedModelSlot([m], torch.float32, "cpu", padding_side="right", check_finite=True, tested=tested)
        slot.get(0)
        reads[tested] = slot.take_read(0)
    assert reads[()].weights_nonfinite == ["model.layers.0.mlp.down_proj.weight"]
    assert reads[(m.weights_dir,)].weights_nonfinite == []
    assert reads[()].adapter_nonfinite == reads[(m.weights_dir,)].adapter_nonfinite == [f"{tmp_path / 'a'}:{lb}"]
    assert reads[()].bytes_read == reads[(m.weights_dir,)].bytes_read  # read all the same, for the forwards


def test_each_input_read_twice_with_full_experts(tiny_run, tiny_dir, tiny_experts):
    """The finished tiny job (base, e0, new; one representation actor on 2 cores): the
    representation loads read each model's tensors once, the merge once more, and no
    stage reads them for the NaN/Inf check or for the fingerprints (in a new run directory
    the keys are made from the pieces the loads kept)."""
    cfg, _ = tiny_run
    stages = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())["stages"]
    first = json.loads((Path(cfg.run_dir).parent / "first_manifest.json").read_text())
    assert first["inputs"]["fingerprint_bytes_read"] == 0
    sizes = {"base": tensor_bytes(tiny_dir), "e0": tensor_bytes(tiny_experts[0]),
             "new": tensor_bytes(tiny_experts[1])}
    assert stages["reps_new"]["result"]["bytes_read"] == sizes["new"]
    pool = next(s["result"] for k, s in stages.items()
                if k.startswith("reps_") and "pool_models" in (s["result"] or {}))
    assert pool["bytes_read"] == {"base": sizes["base"], "e0": sizes["e0"]}
    assert sum(s["bytes_read"] for s in stages["merge"]["result"]["shards"]) == sum(sizes.values())
    finite = stages["finite_check"]
    assert finite["result"]["weight_sets"] == 3 and finite["result"]["tested_now"] == 3


def _job(tmp: Path, base: Path, experts: list[Path], new: Path) -> dict:
    return {
        "run_dir": str(tmp / "run"),
        "output": str(tmp / "out" / "merged"),
        "base": {"name": "base", "path": str(base)},
        "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)],
        "new_model": {"name": "new", "path": str(new)},
        "task": {"data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 16},
        "typical": {"k": 3},
    }


def _refused(tmp: Path, tree: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as e:
        run_pipeline(build_config(tree))
    assert "\n" not in str(e.value)
    assert not (tmp / "out").exists() or not list((tmp / "out").iterdir()), "output or staging left behind"
    assert not Path(tree["run_dir"]).exists(), "a run directory was left behind for a bad input"


def test_nan_in_a_lora_expert_found_by_its_load(tmp_path, tiny_dir, tiny_experts, ray_session):
    """An adapter's own tensors are tested when the representation actor swaps it in: the
    job stops with the one-line error, after the pool, and leaves nothing behind."""
    from recall_ray.io.models import read_adapter

    make_lora(tiny_dir, tmp_path / "lora")
    lb = sorted(n for n in read_adapter(tmp_path / "lora").infos if "lora_B" in n)[0]
    _poison(tmp_path / "lora", "adapter_model.safetensors", lb, float("nan"))
    _refused(tmp_path, _job(tmp_path, tiny_dir, [tmp_path / "lora"], tiny_experts[1]),
             rf"model 'e0' has NaN or Inf in 1 tensor\(s\).*{lb}.*retrain it or drop it")


def test_nan_in_the_base_named_as_the_base(tmp_path, tiny_dir, ray_session):
    """A LoRA new model is loaded on the base in reps_new: a NaN in the base's weights is
    named as the base's, not the adapter's."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    _poison(base, "model.safetensors", "model.layers.0.mlp.down_proj.weight", float("inf"))
    make_lora(base, tmp_path / "new")
    make_lora(base, tmp_path / "e0", seed=3)
    _refused(tmp_path, _job(tmp_path, base, [tmp_path / "e0"], tmp_path / "new"),
             r"model 'base' has NaN or Inf in 1 tensor\(s\).*model\.layers\.0\.mlp\.down_proj")
