"""The merge stage: bit-for-bit identity for K identical models, the float64 reference for
random per-layer weights, and the same bytes on two simulated nodes as on one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import REPO
from recall_ray.cluster.merge import run_merge
from recall_ray.core.merge_methods import MergeMethod
from recall_ray.models import resolve_model
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


def test_two_nodes_same_bytes_as_one(tmp_path, tiny_dir, tiny_experts):
    """Actors on two simulated nodes write the same bytes as actors on one."""
    dirs = ",".join(str(d) for d in [tiny_dir, *tiny_experts])
    w = np.random.default_rng(2).dirichlet(np.ones(3), size=3)
    np.save(tmp_path / "w.npy", w)
    script = REPO / "tests" / "scripts" / "two_node_merge.py"
    outs = {}
    for mode in ("two_nodes", "one_node"):
        proc = subprocess.run([sys.executable, str(script), dirs, str(tmp_path / "w.npy"), str(tmp_path / mode), mode],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outs["two_nodes"]["num_nodes"] == 3  # head (0 CPUs) + two workers
    assert len(outs["two_nodes"]["nodes"]) == 2, "the two merge actors should run on different nodes"
    assert outs["two_nodes"]["hashes"] == outs["one_node"]["hashes"]
    assert any(n.endswith(".safetensors") for n in outs["one_node"]["hashes"])
