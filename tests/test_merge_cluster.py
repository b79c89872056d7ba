"""The merge stage: bit-for-bit identity for K identical models, the float64 reference for
random per-layer weights, and the same bytes on two simulated nodes as on one."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import REPO, make_lora
from recall_ray.cluster.merge import run_merge
from recall_ray.core.merge_methods import MergeMethod
from recall_ray.io.models import resolve_model
from recall_ray.validate import check_models


def _load(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_identical_models_merge_bit_for_bit(tmp_path, tiny_dir, ray_session):
    copies = [tiny_dir] + [shutil.copytree(tiny_dir, tmp_path / f"c{i}") for i in range(2)]
    models = [resolve_model(f"m{i}", str(d), str(tiny_dir)) for i, d in enumerate(copies)]
    ms = check_models(models)
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=ms.grouping.num_groups)  # random weights, rows sum to 1
    run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), str(tmp_path / "out"), overwrite=False, num_actors=2)
    src, got = _load(tiny_dir), _load(tmp_path / "out")
    assert set(src) == set(got)
    for name in src:
        assert got[name].dtype == src[name].dtype
        assert torch.equal(got[name].view(torch.int32), src[name].view(torch.int32)), name


def test_bf16_models_merge_to_float64_reference(tmp_path, ray_session):
    from conftest import make_tiny_llama, perturbed_copy

    base = make_tiny_llama(tmp_path / "b", layers=3, dtype=torch.bfloat16, tie=False)
    others = [perturbed_copy(base, tmp_path / f"p{i}", seed=i) for i in range(2)]
    dirs = [base, *others]
    models = [resolve_model(f"m{i}", str(d), str(base)) for i, d in enumerate(dirs)]
    ms = check_models(models)
    w = np.random.default_rng(1).dirichlet(np.ones(3), size=ms.grouping.num_groups)
    run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), str(tmp_path / "out"), overwrite=False, num_actors=2)
    got = _load(tmp_path / "out")
    states = [_load(d) for d in dirs]
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        m = re.match(r"model\.layers\.(\d+)\.", name)
        g = 0 if name == "model.embed_tokens.weight" else int(m.group(1)) + 1 if m else 3
        expect = sum(w[g, q] * states[q][name].to(torch.float64).numpy() for q in range(3))
        # bf16 output: one rounding of the float32 sum (relative 2^-8)
        np.testing.assert_allclose(t.to(torch.float64).numpy(), expect, rtol=2**-7, atol=1e-6, err_msg=name)


def test_two_nodes_same_bytes_as_one(tmp_path, tiny_dir, tiny_experts, ray_session):
    """Actors on two simulated nodes write the same bytes as actors on one (the test
    session's runtime)."""
    dirs = [tiny_dir, *tiny_experts]
    w = np.random.default_rng(2).dirichlet(np.ones(3), size=3)
    np.save(tmp_path / "w.npy", w)
    script = REPO / "tests" / "scripts" / "two_node_merge.py"
    proc = subprocess.run([sys.executable, str(script), ",".join(map(str, dirs)), str(tmp_path / "w.npy"),
                           str(tmp_path / "two"), "two_nodes"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_nodes"] == 3  # head (0 CPUs) + two workers
    assert len(out["nodes"]) == 2, "the two merge actors should run on different nodes"
    models = [resolve_model(f"m{i}", str(d), str(dirs[0])) for i, d in enumerate(dirs)]
    ms = check_models(models)
    run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), str(tmp_path / "one"), False,
              num_actors=2, placement="PACK", side_dir=str(dirs[0]))
    one = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "one").iterdir())}
    assert out["hashes"] == one


def _lora(base: Path, out: Path, seed: int, targets=("q_proj", "v_proj")) -> Path:
    make_lora(base, out, seed=seed, scale=0.3, targets=targets)
    return out


def _folded64(base_state: dict, adapter: Path) -> dict:
    """Base + (alpha / r) * B @ A in float64, written plainly from the adapter's tensors."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(adapter / "adapter_model.safetensors")
    out = {k: v.to(torch.float64).numpy() for k, v in base_state.items()}
    for k, a in lora.items():
        if "lora_A" in k:
            name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = lora[k.replace("lora_A", "lora_B")].to(torch.float64).numpy()
            out[name] = out[name] + cfg["lora_alpha"] / cfg["r"] * (b @ a.to(torch.float64).numpy())
    return out


def test_lora_experts_merge_from_their_low_rank_products(tmp_path, tiny_dir, ray_session):
    """LoRA experts on the base's own weights: the merge adds w_q * scale_q * B_q A_q to the
    base, read once, and equals the fold-then-merge float64 reference; a tensor no adapter
    touches comes back as the base bit for bit. Linear (RECALL) and TIES weights."""
    adapters = [_lora(tiny_dir, tmp_path / f"a{i}", seed=10 + i, targets=("q_proj", "v_proj") if i else ("q_proj",))
                for i in range(3)]
    models = [resolve_model("base", str(tiny_dir), str(tiny_dir))] + [
        resolve_model(f"a{i}", str(a), str(tiny_dir)) for i, a in enumerate(adapters)]
    ms = check_models(models)
    base_state = _load(tiny_dir)
    states = [{k: v.to(torch.float64).numpy() for k, v in base_state.items()}] + [_folded64(base_state, a) for a in adapters]
    w = np.random.default_rng(3).dirichlet(np.ones(4), size=ms.grouping.num_groups)
    run_merge(models, ms.grouping, ms.infos, MergeMethod("recall", "linear", w), str(tmp_path / "lin"), False)
    got = _load(tmp_path / "lin")
    touched = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
               for a in adapters for k in load_file(a / "adapter_model.safetensors") if "lora_A" in k}
    for name, t in got.items():
        g = ms.grouping.groups[name]
        expect = sum(w[g, q] * states[q][name] for q in range(4))
        np.testing.assert_allclose(t.to(torch.float64).numpy(), expect, rtol=1e-6, atol=1e-6, err_msg=name)
        if name not in touched:
            assert torch.equal(t, base_state[name]), name
    assert touched and len(touched) < len(got)
    # TIES: trim, elect, disjoint mean of the low-rank deltas, against float64 fold-then-merge
    from recall_ray.core.merge_methods import task_vector_weights

    ties = MergeMethod("ties", "ties", task_vector_weights(ms.grouping.num_groups, 4), density=0.5, normalize=True)
    run_merge(models, ms.grouping, ms.infos, ties, str(tmp_path / "ties"), False)
    got = _load(tmp_path / "ties")
    for name in touched:
        deltas = [states[q][name] - states[0][name] for q in range(1, 4)]
        trimmed = []
        for d in deltas:
            k = max(1, int(0.5 * d.size))
            keep = np.zeros(d.size, dtype=bool)
            keep[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = True
            trimmed.append(np.where(keep.reshape(d.shape), d, 0.0))
        sign = np.where(sum(trimmed) >= 0, 1.0, -1.0)
        agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
        num = sum(np.where(a, t, 0.0) for a, t in zip(agree, trimmed))
        den = np.maximum(sum(a.astype(float) for a in agree), 1.0)
        np.testing.assert_allclose(got[name].to(torch.float64).numpy(), states[0][name] + num / den, rtol=1e-5,
                                   atol=1e-6, err_msg=name)
