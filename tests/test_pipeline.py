"""The whole RECALL job on tiny random models on the shared local Ray runtime: outputs,
numbers against a float64 reference, loading and generating, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import DATA, float64_state, reference_group
from recall_ray.config import build_config
from recall_ray.pipeline import run_pipeline


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_outputs_are_complete(run):
    cfg, result = run
    out = Path(result.output)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "README.md", "tokenizer.json", "generation_config.json"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    run_dir = Path(cfg.run_dir)
    for rel in ("manifest.json", "weights.csv", "weights.parquet", "typical.parquet", "plots/similarity.png",
                "plots/weights.png", "reps/new", "reps/base", "reps/e0"):
        assert (run_dir / rel).exists(), rel
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "staging directory left behind"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert set(manifest["inputs"]["models"]) == {"base", "e0", "new"}
    assert manifest["versions"]["ray"] != "not installed"


def test_typical_samples_cover_every_layer(run):
    cfg, result = run
    typ = pd.read_parquet(Path(cfg.run_dir) / "typical.parquet")
    assert typ["sample_idx"].is_unique
    layers = {int(l) for ls in typ["chosen_by_layers"] for l in ls}
    assert layers == set(range(3))  # embeddings + 2 blocks
    per_layer = {l: sum(l in ls for ls in typ["chosen_by_layers"]) for l in layers}
    assert all(v == cfg.typical.k for v in per_layer.values())  # k distinct samples per layer
    assert result.typical_count == len(typ)


def test_weights_match_reference(run):
    """Recompute similarities and weights from the Parquet representations in float64."""
    cfg, result = run
    run_dir = Path(cfg.run_dir)
    typ = pd.read_parquet(run_dir / "typical.parquet")["sample_idx"].tolist()
    table = pd.read_csv(run_dir / "weights.csv")
    labels = ["base", "e0", "new"]

    def layer(label: str, i: int) -> np.ndarray:
        df = pd.read_parquet(run_dir / "reps" / label).set_index("sample_idx")
        return np.stack([np.asarray(df.loc[s, f"layer_{i}"], dtype=np.float64) for s in typ])

    for i in range(3):
        reps = {lbl: layer(lbl, i) for lbl in labels}
        d = {lbl: np.sqrt(((reps["new"] - reps[lbl]) ** 2).sum(1)) for lbl in labels}
        pooled = np.concatenate([d["base"], d["e0"]])
        sigma = np.median(pooled) if np.median(pooled) > 0 else 1.0
        sims = np.array([np.mean(np.exp(-d[lbl] ** 2 / (2 * sigma**2))) for lbl in labels])
        expect = np.exp(sims) / np.exp(sims).sum()
        got = table[table["layer"] == i].set_index("model").loc[labels]
        np.testing.assert_allclose(got["similarity"].to_numpy(), sims, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got["weight"].to_numpy(), expect, rtol=1e-6)
        np.testing.assert_allclose(got["sigma"].to_numpy(), sigma, rtol=1e-6)


def test_merged_tensors_match_reference(run, tiny_dir, tiny_experts):
    cfg, result = run
    table = pd.read_csv(Path(cfg.run_dir) / "weights.csv")
    w = table.pivot(index="layer", columns="model", values="weight")
    inputs = {"base": float64_state(tiny_dir), "e0": float64_state(tiny_experts[0]), "new": float64_state(tiny_experts[1])}
    merged = float64_state(Path(result.output))
    assert set(merged) == set(inputs["base"])
    for name, got in merged.items():
        g = reference_group(name, 2)
        expect = sum(w.loc[g, lbl] * inputs[lbl][name] for lbl in inputs)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6, err_msg=name)


def test_output_loads_and_generates(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = run
    model = AutoModelForCausalLM.from_pretrained(result.output)
    tok = AutoTokenizer.from_pretrained(result.output)
    enc = tok("a fine film", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_rerun_recomputes_nothing(run):
    cfg, first = run
    before = (Path(first.output) / "model.safetensors.index.json").stat().st_mtime_ns
    again = run_pipeline(cfg)
    assert again.timings and all(t["skipped"] for t in again.timings.values()), again.timings
    assert (Path(first.output) / "model.safetensors.index.json").stat().st_mtime_ns == before


def test_changed_setting_recomputes_only_downstream(run, tmp_path):
    cfg, first = run
    changed = build_config({**cfg.model_dump(mode="json"), "similarity": {"sigma": 2.0}, "overwrite": True})
    again = run_pipeline(changed)
    t = again.timings
    assert t["reps_new"]["skipped"] and t["typical"]["skipped"] and t["reps_base"]["skipped"]
    assert not t["weights"]["skipped"] and not t["merge"]["skipped"]


def test_a_run_copies_the_representations_another_run_made_with_the_same_key(run, tmp_path):
    """A run that weighs without the base and with another sigma, given tiny_run's directory
    in reuse_from (after one that does not exist), copies its reps_new, typical and reps
    stages: the same bytes, recorded as copied, with none of the other run's bytes_read; no
    representation pool runs. Its weights are the float64 reference on the copied
    representations. A stage of another key is not taken from there."""
    from types import SimpleNamespace

    from recall_ray.io.storage import RunDir
    from recall_ray.manifest import stable_hash
    from recall_ray.pipeline import _done_elsewhere

    cfg, _ = run
    a = Path(cfg.run_dir)
    tree = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("output", "evaluate")}
    tree.update(run_dir=str(tmp_path / "b"), include_base=False, similarity={"sigma": 2.0},
                reuse_from=[str(tmp_path / "nowhere"), str(a)])
    b = run_pipeline(build_config(tree))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
    for stage in ("reps_new", "typical", "reps_base", "reps_e0"):
        record = manifest[stage]["result"]
        assert record["copied_from"] == str(a) and "bytes_read" not in record, (stage, record)
        assert not b.timings[stage]["skipped"]
    for rel in ("typical.parquet", "reps/new", "reps/base", "reps/e0"):
        here, there = tmp_path / "b" / rel, a / rel
        files = sorted(p.relative_to(there) for p in ([there] if there.is_file() else there.rglob("*")) if p.is_file())
        assert files and all((here / f if f != Path(".") else here).read_bytes() == (there / f).read_bytes()
                             for f in files), rel
    typ = pd.read_parquet(a / "typical.parquet")["sample_idx"].tolist()
    table = pd.read_csv(tmp_path / "b" / "weights.csv")
    for i in range(3):
        reps = {lbl: pd.read_parquet(a / "reps" / lbl).set_index("sample_idx") for lbl in ("e0", "new")}
        x = {lbl: np.stack([np.asarray(df.loc[s_, f"layer_{i}"], dtype=np.float64) for s_ in typ])
             for lbl, df in reps.items()}
        sims = np.array([np.mean(np.exp(-((x["new"] - x[lbl]) ** 2).sum(1) / (2 * 2.0**2))) for lbl in ("e0", "new")])
        got = table[table["layer"] == i].set_index("model").loc[["e0", "new"]]
        np.testing.assert_allclose(got["weight"].to_numpy(), np.exp(sims) / np.exp(sims).sum(), rtol=1e-6)
        assert "base" not in set(table["model"])
    # another key, or a directory without the stage: not taken
    fake = SimpleNamespace(run_dir=RunDir(str(tmp_path / "c")), cfg=SimpleNamespace(reuse_from=[str(a)]))
    out = [fake.run_dir.uri("typical.parquet")]
    key = json.loads((a / "manifest.json").read_text())["stages"]["typical"]["key"]
    assert _done_elsewhere(fake, "typical", key, out)[0] == str(a)
    assert _done_elsewhere(fake, "typical", stable_hash(["another key"]), out) is None
    assert _done_elsewhere(fake, "no_such_stage", key, out) is None


def test_run_dir_and_output_as_filesystem_uris(tmp_path, tiny_dir, tiny_experts, ray_session):
    """run_dir and output given as pyarrow URIs (file:// here, s3:// on a cluster)."""
    cfg = build_config({
        "run_dir": f"file://{tmp_path}/run", "output": f"file://{tmp_path}/out",
        "base": {"path": str(tiny_dir)},
        "experts": [{"name": "e0", "path": str(tiny_experts[0])}],
        "new_model": {"name": "new", "path": str(tiny_experts[1])},
        "task": {"data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 24},
        "typical": {"k": 3},
    })
    run_pipeline(cfg)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "run" / "weights.parquet").is_file() and (tmp_path / "run" / "reps" / "new").is_dir()
    again = run_pipeline(cfg)
    assert all(t["skipped"] for t in again.timings.values()), again.timings


def test_progress_names_a_long_model_list_by_count_and_ends():
    from recall_ray.pipeline import _names

    assert _names(["base", "e0"]) == "base, e0"
    assert _names([f"e{i:03d}" for i in range(48)]) == "48 models (e000, e001, e002, ..., e047)"
