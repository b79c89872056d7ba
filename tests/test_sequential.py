"""The sequential scenario on tiny models: fine-tune, merge with what came before, score
seen tasks; SeqFT and the RECALL chain checked against float64 folds written here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, float64_state, reference_group
from recall_ray.sequential import SequentialConfig, run_sequential, sequence_table


def _fold(state: dict[str, np.ndarray], adapter: Path) -> dict[str, np.ndarray]:
    """W + (alpha / r) * B @ A for every LoRA pair, in float64 (PEFT's default scaling)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = {k: v.to(torch.float64).numpy() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    out = dict(state)
    for k, a in lora.items():
        if not k.endswith("lora_A.weight"):
            continue
        b = lora[k.replace("lora_A", "lora_B")]
        name = re.sub(r"^base_model\.model\.", "", k).replace(".lora_A.weight", ".weight")
        out[name] = state[name] + scale * (b @ a)
    return out


@pytest.fixture(scope="module")
def seq(tmp_path_factory, tiny_dir, ray_session):
    cfg = SequentialConfig.model_validate({
        "scenario": "sequential", "run_dir": str(tmp_path_factory.mktemp("seq") / "run"), "base": str(tiny_dir),
        "data_dir": str(DATA), "tasks": ["sst2", "ag_news"], "chains": ["recall"], "seqft": True,
        "finetune": {"steps": 2, "batch_size": 4, "max_samples": 8, "max_length": 48, "learning_rate": 0.05},
        "recall": {"max_samples": 12, "max_length": 48, "typical": {"k": 2}, "similarity": {"sigma": "median"},
                   "representations": {"batch_size": 12}},
        "evaluate": {"max_samples": 1, "batch_size": 4},
    })
    return cfg, run_sequential(cfg)


def test_scores_cover_the_tasks_seen_so_far(seq):
    cfg, result = seq
    s = result.scores
    assert set(s.loc[s["step"] == 1, "task"]) == {"sst2"}
    assert set(s.loc[s["step"] == 2, "task"]) == {"sst2", "ag_news"}
    assert set(s["method"]) == {"recall", "seqft"}
    assert list(s.loc[s["step"] == 2, "trained"].unique()) == ["ag_news"]
    run = Path(cfg.run_dir)
    for f in ("scores.csv", "table.md", "plots/forgetting.png", "plots/step2_recall_weights.png"):
        assert (run / f).exists(), f


def test_seqft_is_the_chain_of_exact_folds(seq, tiny_dir):
    cfg, _ = seq
    run = Path(cfg.run_dir)
    s1 = _fold(float64_state(tiny_dir), run / "step1" / "finetune" / "recall" / "adapter")  # step 1 shares E_1
    got1 = float64_state(run / "step1" / "seqft" / "model")
    s2 = _fold(got1, run / "step2" / "finetune" / "seqft" / "adapter")
    got2 = float64_state(run / "step2" / "seqft" / "model")
    for name in got1:
        assert np.allclose(got1[name], s1[name], atol=1e-6), name
        assert np.allclose(got2[name], s2[name], atol=1e-6), name
    assert any(not np.allclose(got2[n], got1[n]) for n in got1)  # step 2 learned something


def test_recall_chain_merges_base_previous_and_new(seq, tiny_dir):
    cfg, _ = seq
    run = Path(cfg.run_dir)
    base = float64_state(tiny_dir)
    e1 = _fold(base, run / "step1" / "finetune" / "recall" / "adapter")
    w1 = pd.read_csv(run / "step1" / "recall" / "recall" / "weights.csv")
    m1 = float64_state(run / "step1" / "recall" / "recall" / "merged")
    col1 = {"base": base, "sst2": e1}
    for name, t in m1.items():
        g = reference_group(name, 2)
        rows = w1[w1["layer"] == g]
        assert np.allclose(t, sum(r.weight * col1[r.model][name] for r in rows.itertuples()), atol=1e-6), name
    # step 2 fine-tuned from M_1 and merged base, M_1 and E_2
    adapter2 = run / "step2" / "finetune" / "recall" / "adapter"
    from recall_ray.safetensors_io import content_fingerprint

    assert json.loads((adapter2 / "recall_ray.json").read_text())["base_fingerprint"] == \
        content_fingerprint(str(run / "step1" / "recall" / "recall" / "merged"))
    e2 = _fold(m1, adapter2)
    w2 = pd.read_csv(run / "step2" / "recall" / "recall" / "weights.csv")
    assert set(w2["model"]) == {"base", "previous", "ag_news"}
    col2 = {"base": base, "previous": m1, "ag_news": e2}
    for name, t in float64_state(run / "step2" / "recall" / "recall" / "merged").items():
        rows = w2[w2["layer"] == reference_group(name, 2)]
        assert np.allclose(t, sum(r.weight * col2[r.model][name] for r in rows.itertuples()), atol=1e-5), name


def test_rerun_recomputes_nothing(seq):
    cfg, _ = seq
    again = run_sequential(cfg)
    assert all(t["skipped"] for t in again.timings.values()), again.timings


def test_sequence_table_means_seen_tasks():
    scores = pd.DataFrame([
        {"step": 1, "trained": "sst2", "method": "recall", "task": "sst2", "metric": "accuracy", "value": 70.0},
        {"step": 2, "trained": "squad_v2", "method": "recall", "task": "sst2", "metric": "accuracy", "value": 60.0},
        {"step": 2, "trained": "squad_v2", "method": "recall", "task": "squad_v2", "metric": "exact_match", "value": 20.0},
        {"step": 2, "trained": "squad_v2", "method": "recall", "task": "squad_v2", "metric": "f1", "value": 35.0},
    ])
    t = sequence_table(scores).set_index(["step", "method"])
    assert t.loc[(1, "recall"), "mean_seen"] == 70.0
    assert t.loc[(2, "recall"), "mean_seen"] == 40.0
    assert np.isnan(t.loc[(1, "recall"), "squad_v2"])


def test_bad_sequential_configs():
    with pytest.raises(ValueError, match="without repeats"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2", "sst2"]})
    with pytest.raises(ValueError, match="unknown chains"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2"], "chains": ["x"]})
    with pytest.raises(ValueError, match="nothing to run"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2"], "chains": [],
                                         "seqft": False})
    with pytest.raises(ValueError, match="tasks must be a non-empty"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": []})
