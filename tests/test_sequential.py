"""The sequential scenario on tiny models: fine-tune, merge with what came before, score
seen tasks; SeqFT and the RECALL chain checked against float64 folds written here; the EWC
line (penalised fine-tunes, accumulated Fishers) on the same run."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, float64_state, load_job, reference_group
from recall_ray.config import ConfigError
from recall_ray.studies.sequential import (SequentialConfig, export_adapters, find_prebuilt, kept_delta, preflight,
                                           run_sequential, sequence_table, start_keys)


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
        "merge_with": ["previous", "previous_and_base"],
        "ewc": {"enabled": True, "lam": 1000.0, "fisher_samples": 3},
        # snapshots every step: operational, so no stage key or adapter changes with it
        "finetune": {"steps": 2, "batch_size": 4, "max_samples": 8, "max_length": 48, "learning_rate": 0.05,
                     "snapshot_every": 1},
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
    assert set(s["method"]) == {"recall", "recall_with_base", "seqft", "ewc"}
    assert list(s.loc[s["step"] == 2, "trained"].unique()) == ["ag_news"]
    run = Path(cfg.run_dir)
    for f in ("scores.csv", "table.md", "plots/forgetting.png", "plots/step2_recall_weights.png",
              "plots/step2_recall_with_base_weights.png", "kept_delta.csv", "kept_delta_summary.csv"):
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


def _merged_reference(weights: pd.DataFrame, models: dict[str, dict[str, np.ndarray]], merged: Path, atol: float,
                      groups: int = 2) -> None:
    """Every merged tensor equals sum_q w[g, q] * theta_q over the models of weights.csv, in float64."""
    got = float64_state(merged)
    assert got
    for name, t in got.items():
        rows = weights[weights["layer"] == reference_group(name, groups)]
        assert np.isclose(rows["weight"].sum(), 1.0)
        assert np.allclose(t, sum(r.weight * models[r.model][name] for r in rows.itertuples()), atol=atol), name


def test_recall_chain_merges_previous_and_new_only(seq, tiny_dir):
    """The paper's protocol (merge_with: previous): step 1 merges base and E_1 (shared by both
    chains), step 2 merges M_1 and E_2 alone: no weight row for the base, and the merged
    tensors are w_prev * M_1 + w_new * E_2 (float64 reference from weights.csv)."""
    cfg, _ = seq
    run = Path(cfg.run_dir)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    # one step-1 merge and one step-2 fine-tune serve both chains (the same M_1 to start from)
    assert not (run / "step1" / "recall_with_base").exists()
    assert "step2/finetune_recall_with_base" not in stages and "step2/finetune_recall" in stages
    m1 = float64_state(run / "step1" / "recall" / "recall" / "merged")
    e2 = _fold(m1, run / "step2" / "finetune" / "recall" / "adapter")
    w2 = pd.read_csv(run / "step2" / "recall" / "recall" / "weights.csv")
    assert set(w2["model"]) == {"previous", "ag_news"}  # the base is the reference, not a merged model
    _merged_reference(w2, {"previous": m1, "ag_news": e2}, run / "step2" / "recall" / "recall" / "merged", 1e-5)
    with_base = pd.read_csv(run / "step2" / "recall_with_base" / "recall" / "weights.csv")
    assert not with_base[with_base["model"] != "base"]["weight"].equals(w2["weight"])  # two different merges


def test_recall_with_base_chain_merges_base_previous_and_new(seq, tiny_dir):
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
    from recall_ray.io.safetensors_io import content_fingerprint

    assert json.loads((adapter2 / "recall_ray.json").read_text())["base_fingerprint"] == \
        content_fingerprint(str(run / "step1" / "recall" / "recall" / "merged"))
    e2 = _fold(m1, adapter2)
    w2 = pd.read_csv(run / "step2" / "recall_with_base" / "recall" / "weights.csv")
    assert set(w2["model"]) == {"base", "previous", "ag_news"}
    _merged_reference(w2, {"base": base, "previous": m1, "ag_news": e2},
                      run / "step2" / "recall_with_base" / "recall" / "merged", 1e-5)


def test_kept_delta_by_hand():
    """Three steps of one layer group: task 1 learned at 0.6 of its delta; step 2 weighs the
    base 0.2 (so every earlier delta keeps 0.8) and the new task 0.5; step 3 does not weigh
    the base (the paper's two-model merge: nothing earlier decays) and gives the new task 0.4.
    Unnormalised rows count as their normalised share."""
    w = lambda rows: pd.DataFrame([{"layer": 0, "model": m, "weight": x} for m, x in rows])
    steps = [("a", w([("base", 0.4), ("a", 0.6)])),
             ("b", w([("base", 0.2), ("previous", 0.3), ("b", 0.5)])),
             ("c", w([("previous", 1.2), ("c", 0.8)]))]  # normalised: 0.6, 0.4
    got = kept_delta(steps).set_index(["task", "after_step"])["kept"]
    want = {("a", 1): 0.6, ("a", 2): 0.6 * 0.8, ("b", 2): 0.5, ("a", 3): 0.6 * 0.8, ("b", 3): 0.5, ("c", 3): 0.4}
    assert len(got) == len(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    with pytest.raises(ValueError, match="no row for its task 'x'"):
        kept_delta([("x", w([("base", 0.5), ("a", 0.5)]))])


def test_kept_delta_file_is_the_chains_weights(seq):
    """kept_delta.csv recomputed here from each chain's published weights: the two-model
    chain keeps task 1's step-1 share after step 2, the three-model chain (1 - w_base) of it."""
    cfg, _ = seq
    run = Path(cfg.run_dir)
    kept = pd.read_csv(run / "kept_delta.csv")
    w1 = pd.read_csv(run / "step1" / "recall" / "recall" / "weights.csv").set_index(["layer", "model"])["weight"]
    for chain in ("recall", "recall_with_base"):
        w2 = pd.read_csv(run / "step2" / chain / "recall" / "weights.csv").set_index(["layer", "model"])["weight"]
        rows = kept[(kept["chain"] == chain) & (kept["task"] == "sst2") & (kept["after_step"] == 2)]
        assert len(rows) == 3  # the tiny model's layer groups
        for r in rows.itertuples():
            decay = 1.0 - (w2[(r.layer, "base")] if chain == "recall_with_base" else 0.0)
            assert r.kept == pytest.approx(w1[(r.layer, "sst2")] * decay, abs=1e-6)
        new = kept[(kept["chain"] == chain) & (kept["task"] == "ag_news")]
        assert np.allclose(new["kept"], [w2[(g, "ag_news")] for g in new["layer"]], atol=1e-6)
    summary = pd.read_csv(run / "kept_delta_summary.csv")
    assert set(summary["chain"]) == {"recall", "recall_with_base"} and len(summary) == 6


def _fisher_reference(model_dir: Path, task: str, n: int) -> dict[str, torch.Tensor]:
    """ewc.diagonal_fisher run here, in process, on the first n train records of `task`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.core.ewc import diagonal_fisher, target_weight_names
    from recall_ray.core.sft import tokenize_records
    from recall_ray.io.splits import load_split

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = tokenize_records(tok, load_split(DATA, task, "train", max_samples=n), 48)
    names = target_weight_names([k for k, _ in model.named_parameters()], ["q_proj", "v_proj"])
    return diagonal_fisher(model, examples, names, tok.pad_token_id)


def test_ewc_line_shares_step_1_then_trains_with_the_accumulated_fisher(seq):
    cfg, result = seq
    run = Path(cfg.run_dir)
    table = result.table.set_index(["step", "method"])
    assert {(1, "ewc"), (2, "ewc")} <= set(table.index) and not np.isnan(table.loc[(2, "ewc"), "mean_seen"])
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    # step 1: no Fisher yet, so EWC is SeqFT's S_1 (no fine-tune or fold of its own)
    assert "step1/finetune_ewc" not in stages and "step1/ewc_fold" not in stages
    assert {"step1/ewc_fisher", "step2/finetune_ewc", "step2/ewc_fold", "step2/ewc_fisher"} <= set(stages)
    s1 = run / "step1" / "seqft" / "model"
    f1 = load_file(run / "step1" / "ewc" / "fisher.safetensors")
    ref1 = _fisher_reference(s1, "sst2", 3)
    assert f1.keys() == ref1.keys() and len(f1) == 4  # q and v of both layers
    assert all(torch.allclose(f1[k], ref1[k], rtol=1e-4, atol=1e-9) for k in f1)
    # step 2: E^ewc_2 starts from S_1 like SeqFT's, with the penalty of F_1: a different adapter
    ewc_ad, seq_ad = run / "step2" / "finetune" / "ewc" / "adapter", run / "step2" / "finetune" / "seqft" / "adapter"
    meta = json.loads((ewc_ad / "recall_ray.json").read_text())
    assert meta["base_fingerprint"] == json.loads((seq_ad / "recall_ray.json").read_text())["base_fingerprint"]
    fisher_bytes = (run / "step1" / "ewc" / "fisher.safetensors").read_bytes()
    assert meta["ewc"]["fisher_sha256"] == hashlib.sha256(fisher_bytes).hexdigest()
    assert meta["ewc"]["lambda"] == 1000.0
    a, b = load_file(ewc_ad / "adapter_model.safetensors"), load_file(seq_ad / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_B" in k)
    # S^ewc_2 is S_1 with E^ewc_2 folded in; F_2 = F_1 + the Fisher of S^ewc_2 on ag_news
    got = float64_state(run / "step2" / "ewc" / "model")
    want = _fold(float64_state(s1), ewc_ad)
    assert all(np.allclose(got[n], want[n], atol=1e-6) for n in got)
    f2 = load_file(run / "step2" / "ewc" / "fisher.safetensors")
    ref2 = _fisher_reference(run / "step2" / "ewc" / "model", "ag_news", 3)
    assert all(torch.allclose(f2[k], f1[k] + ref2[k], rtol=1e-4, atol=1e-9) for k in f1)


def test_rerun_recomputes_nothing(seq):
    cfg, _ = seq
    again = run_sequential(cfg)
    assert all(t["skipped"] for t in again.timings.values()), again.timings


def test_a_stopped_fine_tune_goes_on_from_its_snapshot(seq):
    """With finetune.snapshot_every, every fine-tune of the sequence snapshots in its step's
    folder. A run stopped after a fine-tune's last snapshot, before its stage was recorded,
    goes on from that snapshot: with steps 1 and 2 trapped to fail, the stage is run again
    and gives the same adapter bit for bit, and nothing after it changes."""
    from conftest import FAULTS
    from recall_ray.cluster.finetune import snapshot_path, snapshot_steps

    cfg, _ = seq
    run = Path(cfg.run_dir)
    stage = "step2/finetune_recall"
    manifest = json.loads((run / "manifest.json").read_text())
    adapter = Path(manifest["stages"][stage]["result"]["adapter"])
    snaps = [d for d in (run / "step2" / "finetune" / "recall" / "snapshots").iterdir()]
    assert len(snaps) == 1 and snapshot_steps(str(snaps[0])) == [1, 2]
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert (Path(snapshot_path(str(snaps[0]), 2)) / "adapter_model.safetensors").read_bytes() == weights
    del manifest["stages"][stage]  # stopped before the stage was recorded
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(adapter)
    for k in (1, 2):  # a fine-tune that started over would fail at once
        (FAULTS / f"finetune-step-{k}").write_text("ENOSPC")
    try:
        again = run_sequential(cfg)
    finally:
        for k in (1, 2):
            (FAULTS / f"finetune-step-{k}").unlink(missing_ok=True)
    assert not again.timings[stage]["skipped"]
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights
    assert all(t["skipped"] for name, t in again.timings.items() if name != stage), again.timings


def test_exported_adapters_regenerate_a_step_without_training(seq, tmp_path):
    """export_adapters copies every fine-tune with its stage key; a new run given them reuses
    each one whose key and starting model match: no Ray Train run, the same adapter bytes,
    the same folded model bit for bit and the same scores. Here a SeqFT-only run of step 1,
    whose shared fine-tune the first run named after its RECALL chain: found by key."""
    cfg, result = seq
    run = Path(cfg.run_dir)
    exported = export_adapters(run, tmp_path / "adapters")
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert exported == sorted(n for n in stages if "/finetune_" in n) == [
        "step1/finetune_recall", "step2/finetune_ewc", "step2/finetune_recall", "step2/finetune_seqft"]
    for name in exported:
        d = tmp_path / "adapters" / name
        assert sorted(f.name for f in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "recall_ray.json", "stage.json"]
        assert json.loads((d / "stage.json").read_text())["key"] == stages[name]["key"]
        assert (d / "adapter_model.safetensors").read_bytes() == (
            Path(stages[name]["result"]["adapter"]) / "adapter_model.safetensors").read_bytes()

    again = cfg.model_copy(update={"run_dir": str(tmp_path / "again"), "tasks": ["sst2"], "chains": [],
                                   "ewc": cfg.ewc.model_copy(update={"enabled": False}),
                                   "adapters": str(tmp_path / "adapters")})
    res = run_sequential(again)
    st = json.loads((tmp_path / "again" / "manifest.json").read_text())["stages"]["step1/finetune_seqft"]
    assert st["result"]["prebuilt"] == str(tmp_path / "adapters" / "step1" / "finetune_recall")
    assert not (tmp_path / "again" / "step1" / "finetune" / "seqft" / "ray_train").exists()  # nothing trained
    a = tmp_path / "again" / "step1" / "finetune" / "seqft" / "adapter" / "adapter_model.safetensors"
    assert a.read_bytes() == (run / "step1" / "finetune" / "recall" / "adapter" / "adapter_model.safetensors").read_bytes()
    new_model, old_model = (float64_state(r / "step1" / "seqft" / "model") for r in (tmp_path / "again", run))
    assert new_model.keys() == old_model.keys() and all(np.array_equal(new_model[k], old_model[k]) for k in new_model)
    want = result.scores[(result.scores["step"] == 1) & (result.scores["method"] == "seqft")]
    pd.testing.assert_frame_equal(res.scores.reset_index(drop=True), want.reset_index(drop=True))


def test_an_export_adds_to_its_folder_and_loses_no_adapter(seq, tmp_path):
    """An adapters folder is shared: another run's exports sit beside this run's (the EWC
    selection's under adapters/sequential_paper/selection_ewc/), and two configs sharing a
    run directory name their steps alike. Exporting keeps the first untouched, sets a
    same-named export of another fine-tune aside (renamed by its key, still found by it),
    and a second export of the same run changes no byte and leaves no staging folder."""
    cfg, _ = seq
    stages = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())["stages"]
    dest = tmp_path / "adapters"
    beside = dest / "selection_ewc" / "lam_1" / "step2" / "finetune_ewc"
    beside.mkdir(parents=True)
    (beside / "stage.json").write_text(json.dumps({"stage": "step2/finetune_ewc", "key": "beside", "base_key": "beside"}))
    other = dest / "step1" / "finetune_recall"  # another config's step 1, under the same stage name
    other.mkdir(parents=True)
    (other / "stage.json").write_text(json.dumps({"stage": "step1/finetune_recall", "key": "0123456789abcdef",
                                                  "base_key": "0123456789abcdef"}))
    (other / "adapter_model.safetensors").write_bytes(b"another fine-tune")

    def files() -> dict:
        return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}

    exported = export_adapters(cfg.run_dir, dest)
    assert json.loads((beside / "stage.json").read_text())["key"] == "beside"
    aside = dest / "step1" / "finetune_recall.01234567"
    assert (aside / "adapter_model.safetensors").read_bytes() == b"another fine-tune"
    for name in exported:
        assert json.loads((dest / name / "stage.json").read_text())["key"] == stages[name]["key"]
    first = files()
    assert export_adapters(cfg.run_dir, dest) == exported and files() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # no staging folder left
    assert sorted(p.name for p in (dest / "step1").iterdir()) == ["finetune_recall", "finetune_recall.01234567"]


def test_a_finished_export_retires_the_snapshot_export_of_the_same_fine_tune(tmp_path):
    """Once a fine-tune carried as <stage>.partial has finished, exporting it removes that
    partial (the same base key), and keeps a partial of another fine-tune under that name."""
    run, dest = tmp_path / "run", tmp_path / "adapters"

    def stage(name: str, key: str) -> dict:
        adapter = run / name / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(key.encode())
        return {"status": "done", "key": key, "result": {"adapter": str(adapter), "base_key": key}}

    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stages": {"step1/finetune_recall": stage("step1/finetune_recall", "k1"),
                                                              "step2/finetune_recall": stage("step2/finetune_recall", "k2")}}))
    for name, key in (("step1/finetune_recall", "k1"), ("step2/finetune_recall", "another")):
        part = dest / f"{name}.partial"
        part.mkdir(parents=True)
        (part / "stage.json").write_text(json.dumps({"stage": name, "key": key, "base_key": key, "partial": True}))
    assert export_adapters(run, dest) == ["step1/finetune_recall", "step2/finetune_recall"]
    assert not (dest / "step1" / "finetune_recall.partial").exists()
    assert (dest / "step2" / "finetune_recall.partial").is_dir()
    assert (dest / "step2" / "finetune_recall" / "adapter_model.safetensors").read_bytes() == b"k2"


def test_an_exported_adapter_is_used_only_on_its_own_starting_model(seq, tiny_experts, tmp_path):
    cfg, _ = seq
    export_adapters(cfg.run_dir, tmp_path / "adapters")
    stage = json.loads((tmp_path / "adapters" / "step1" / "finetune_recall" / "stage.json").read_text())
    start = str(Path(cfg.base).resolve())
    assert find_prebuilt(str(tmp_path / "adapters"), stage["key"], start) == tmp_path / "adapters" / "step1" / "finetune_recall"
    assert find_prebuilt(str(tmp_path / "adapters"), "another key", start) is None
    assert find_prebuilt(str(tmp_path / "adapters"), stage["key"], str(tiny_experts[0])) is None  # another start
    assert find_prebuilt(None, stage["key"], start) is None
    # a second copy of the export: the one that fits is found, whichever comes first
    shutil.copytree(tmp_path / "adapters", tmp_path / "two" / "b")
    shutil.copytree(tmp_path / "adapters", tmp_path / "two" / "a")
    meta = tmp_path / "two" / "a" / "step1" / "finetune_recall" / "recall_ray.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_fingerprint": "another model"}))
    assert find_prebuilt(str(tmp_path / "two"), stage["key"], start) == tmp_path / "two" / "b" / "step1" / "finetune_recall"
    meta.unlink()
    with pytest.raises(ConfigError, match="without the recall_ray.json.*export it again"):
        find_prebuilt(str(tmp_path / "two"), stage["key"], start)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        export_adapters(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ValueError, match="not a directory of exported step adapters"):
        preflight(cfg.model_copy(update={"adapters": str(tmp_path / "missing")}))


def test_a_half_finished_fine_tune_is_carried_to_another_machine(seq, tiny_experts, tmp_path):
    """A machine that stops in the middle of a fine-tune leaves only its snapshots. Machine A
    here: the run's manifest with step 2's RECALL fine-tune still running and its snapshot
    folder holding step 1 of 2. export_adapters carries that snapshot (<stage>.partial/, an
    adapter labelled with its step); a run on machine B, given the export, goes on from it (a
    warm start) and trains only step 2: step 1 is trapped to fail. Its stage key, and so
    everything after it, names the warm start; on a third machine B's export is the finished
    adapter, keyed by the same warm start."""
    import hashlib

    from conftest import FAULTS
    from recall_ray.cluster.finetune import snapshot_path
    from recall_ray.io.safetensors_io import content_fingerprint
    from recall_ray.studies.sequential import carried_start, find_partial

    cfg, _ = seq
    run, stage = Path(cfg.run_dir), "step2/finetune_recall"
    manifest = json.loads((run / "manifest.json").read_text())
    a = tmp_path / "a"  # machine A as it was when it stopped
    manifest["stages"][stage] = {"status": "running", "key": manifest["stages"][stage]["key"]}
    (snaps,) = (run / "step2" / "finetune" / "recall" / "snapshots").iterdir()
    a_snaps = a / "step2" / "finetune" / "recall" / "snapshots" / snaps.name
    shutil.copytree(snaps, a_snaps, ignore=shutil.ignore_patterns("recall_ray.json"))  # labelled only at the end
    shutil.rmtree(snapshot_path(str(a_snaps), 2))
    (a / "manifest.json").write_text(json.dumps(manifest))

    exported = export_adapters(a, tmp_path / "adapters")
    assert "step2/finetune_recall.partial" in exported and "step2/finetune_recall" not in exported
    part = tmp_path / "adapters" / "step2" / "finetune_recall.partial"
    meta, marker = (json.loads((part / f).read_text()) for f in ("recall_ray.json", "stage.json"))
    assert meta["steps"] == marker["step"] == 1 and marker["partial"] is True
    assert marker["key"] == marker["base_key"] == manifest["stages"][stage]["key"]  # A had no warm start
    weights = (part / "adapter_model.safetensors").read_bytes()
    assert weights == (Path(snapshot_path(str(a_snaps), 1)) / "adapter_model.safetensors").read_bytes()
    ft = cfg.finetune_for("ag_news")
    assert find_partial(str(tmp_path / "adapters"), marker["base_key"], str(tiny_experts[0]), ft, "ag_news",
                        0.0) is None  # another starting model: trained from step 1
    a_start = run / "step1" / "recall" / "recall" / "merged"  # A's step-1 merge, labelled with its stage key
    assert find_partial(str(tmp_path / "adapters"), marker["base_key"], str(a_start), ft, "ag_news", 0.0)[0] == part
    # A computed that merge with other last bits than B will: the export records A's bits. B's
    # start carries the same label, so the export still fits (relabelled); an unlabelled copy does not.
    meta_file = part / "recall_ray.json"
    meta_file.write_text(json.dumps({**meta, "base_fingerprint": "A's last bits"}))
    unlabelled = shutil.copytree(a_start, tmp_path / "unlabelled", ignore=shutil.ignore_patterns("recall_ray_made_by.json"))
    assert find_partial(str(tmp_path / "adapters"), marker["base_key"], str(unlabelled), ft, "ag_news", 0.0) is None

    b_cfg = cfg.model_copy(update={"run_dir": str(tmp_path / "b"), "chains": ["recall"], "merge_with": ["previous"],
                                   "seqft": False, "ewc": cfg.ewc.model_copy(update={"enabled": False}),
                                   "adapters": str(tmp_path / "adapters")})
    (FAULTS / "finetune-step-1").write_text("ENOSPC")  # a fine-tune that started over would fail at once
    try:
        run_sequential(b_cfg)
        st = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
        assert st["step1/finetune_recall"]["result"]["prebuilt"]  # step 1: the finished export
        got = st[stage]
        assert got["result"]["warm_start"] == str(part) and got["result"]["base_key"] == marker["base_key"]
        assert got["key"] != marker["key"]  # not the uninterrupted run's adapter, nor anything after it
        b_adapter = Path(got["result"]["adapter"])
        warm = json.loads((b_adapter / "recall_ray.json").read_text())["warm_start"]
        carried_meta = json.loads((b_adapter.parent / "carried_start" / "recall_ray.json").read_text())
        b_start = str(tmp_path / "b" / "step1" / "recall" / "recall" / "merged")  # RECALL's merge of step 1
        assert carried_meta["base_fingerprint"] == content_fingerprint(b_start)
        assert carried_meta["trained_on_base_fingerprint"] == "A's last bits"
        assert warm["step"] == 1 and warm["adapter_sha256"] == hashlib.sha256(weights).hexdigest()

        export_adapters(tmp_path / "b", tmp_path / "adapters_b")
    finally:
        (FAULTS / "finetune-step-1").unlink(missing_ok=True)
    # B's export on a third machine: the finished adapter, found by the base key, with the warm
    # start that keys it as B keyed it (a run given it copies it: test_exported_adapters_...)
    b_marker = json.loads((tmp_path / "adapters_b" / stage / "stage.json").read_text())
    assert b_marker["key"] == got["key"] and b_marker["base_key"] == marker["base_key"]
    prebuilt, partial, carried = carried_start(str(tmp_path / "adapters_b"), marker["base_key"], b_start, None, ft,
                                               "ag_news", 0.0)
    assert prebuilt == tmp_path / "adapters_b" / stage and partial is None and carried == warm
    assert (prebuilt / "adapter_model.safetensors").read_bytes() == (b_adapter / "adapter_model.safetensors").read_bytes()
    # and A's export on a machine that has its own snapshots further on: those, exactly
    assert carried_start(str(tmp_path / "adapters"), marker["base_key"], b_start, str(snaps), ft, "ag_news",
                         0.0) == (None, None, None)


def test_step_1_is_keyed_by_the_base_weights(tiny_dir, tiny_experts, tmp_path):
    """A run directory resumed with another base must not reuse step 1's fine-tune: the
    lines' starting key is the base's weights, equal for a byte copy, not its name."""
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "copy"))
    keys = start_keys(str(tiny_dir), ["recall", "seqft"])
    assert keys["recall"] == keys["seqft"] == start_keys(str(copy), ["x"])["x"]
    assert start_keys(str(tiny_experts[0]), ["recall"])["recall"] != keys["recall"]


def _seq_hits(rows):
    return pd.DataFrame([{"step": st, "method": m, "task": t, "sample_id": str(i), "hit": h}
                         for st, m, t, hits in rows for i, h in enumerate(hits)])


def test_sequence_table_means_seen_tasks():
    hits = _seq_hits([(1, "recall", "sst2", [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]),
                      (2, "recall", "sst2", [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]),
                      (2, "recall", "squad_v2", [1, 0, 0, 0, 1, 0, 0, 0, 0, 0])])
    t = sequence_table(hits, ["sst2", "squad_v2"]).set_index(["step", "method"])
    assert t.loc[(1, "recall"), "mean_seen"] == 70.0
    assert t.loc[(2, "recall"), "mean_seen"] == 40.0
    assert np.isnan(t.loc[(1, "recall"), "squad_v2"]) and "mean_all" not in t.columns
    assert t.loc[(2, "recall"), "mean_seen_lo"] < 40.0 < t.loc[(2, "recall"), "mean_seen_hi"]


def test_sequence_table_in_the_papers_table_7_form():
    """Every step scored on every task: the mean over all of them beside the seen-so-far one."""
    hits = _seq_hits([(1, "seqft", "sst2", [1, 1, 1, 1]), (1, "seqft", "squad_v2", [0, 0, 0, 1]),
                      (2, "seqft", "sst2", [1, 0, 0, 1]), (2, "seqft", "squad_v2", [1, 1, 0, 1])])
    t = sequence_table(hits, ["sst2", "squad_v2"]).set_index(["step", "method"])
    assert t.loc[(1, "seqft"), "mean_seen"] == 100.0 and t.loc[(1, "seqft"), "mean_all"] == 62.5
    assert t.loc[(2, "seqft"), "mean_seen"] == t.loc[(2, "seqft"), "mean_all"] == 62.5


def test_sequence_table_keeps_the_general_sets_in_their_own_column():
    """The general-ability sets scored at every step: "mean_all" and "mean_seen" stay over
    the sequence's tasks, "general" is the mean over the general sets."""
    hits = _seq_hits([(1, "seqft", "sst2", [1, 1, 1, 1]), (1, "seqft", "squad_v2", [0, 0, 0, 1]),
                      (1, "seqft", "arc_easy", [1, 0, 1]), (1, "seqft", "hellaswag", [0, 0, 1, 1, 1]),
                      (2, "seqft", "sst2", [1, 0, 0, 1]), (2, "seqft", "squad_v2", [1, 1, 0, 1]),
                      (2, "seqft", "arc_easy", [0, 0, 1]), (2, "seqft", "hellaswag", [0, 0, 0, 1, 1])])
    t = sequence_table(hits, ["sst2", "squad_v2"]).set_index(["step", "method"])
    assert t.loc[(1, "seqft"), "mean_seen"] == 100.0 and t.loc[(1, "seqft"), "mean_all"] == 62.5
    assert t.loc[(1, "seqft"), "general"] == pytest.approx((100.0 * 2 / 3 + 60.0) / 2)
    assert t.loc[(2, "seqft"), "mean_all"] == 62.5
    assert t.loc[(2, "seqft"), "general"] == pytest.approx((100.0 / 3 + 40.0) / 2)


def test_bad_sequential_configs():
    with pytest.raises(ValueError, match="without repeats"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2", "sst2"]})
    with pytest.raises(ValueError, match="merge_with must list"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2"],
                                         "merge_with": ["previous", "previous"]})
    one = SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2"],
                                           "merge_with": "previous_and_base"})
    assert one.chain_lines() == [("recall_with_base", "recall", True)]
    with pytest.raises(ValueError, match="unknown chains"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2"], "chains": ["x"]})
    with pytest.raises(ValueError, match="nothing to run"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": ["sst2"], "chains": [],
                                         "seqft": False})
    with pytest.raises(ValueError, match="tasks must be a non-empty"):
        SequentialConfig.model_validate({"scenario": "sequential", "run_dir": "r", "tasks": []})
    ewc_only = {"scenario": "sequential", "run_dir": "r", "tasks": ["sst2", "race"], "chains": [], "seqft": False,
                "ewc": {"enabled": True}}
    assert SequentialConfig.model_validate(ewc_only).ewc.lam == 1.0
    with pytest.raises(ValueError, match="same finetune.target_modules"):
        SequentialConfig.model_validate({**ewc_only, "task_finetune": {"race": {"target_modules": ["q_proj"]}}})
    with pytest.raises(ValueError, match="unknown config key|Extra inputs"):
        SequentialConfig.model_validate({**ewc_only, "ewc": {"enabled": True, "lambda": 1.0}})


def test_ewc_at_lambda_0_is_seqft_and_trains_nothing_of_its_own(seq, tmp_path):
    """Lambda 0 weighs no penalty: the EWC line computes no Fisher and shares SeqFT's
    fine-tunes and folds (one stage each, found here among the first run's exports, so
    nothing is trained), and its scores are SeqFT's at every step."""
    cfg, _ = seq
    export_adapters(cfg.run_dir, tmp_path / "adapters")
    zero = cfg.model_copy(update={"run_dir": str(tmp_path / "zero"), "chains": [],
                                  "ewc": cfg.ewc.model_copy(update={"lam": 0.0}), "adapters": str(tmp_path / "adapters")})
    res = run_sequential(zero)
    stages = json.loads((tmp_path / "zero" / "manifest.json").read_text())["stages"]
    assert not [n for n in stages if "ewc" in n], sorted(stages)
    assert not list((tmp_path / "zero").rglob("ray_train"))  # SeqFT's fine-tunes came from the exports
    s = res.scores.set_index(["step", "task", "metric"])
    pd.testing.assert_series_equal(s[s["method"] == "ewc"]["value"], s[s["method"] == "seqft"]["value"])
    assert set(res.scores["step"]) == {1, 2}


def test_a_step_exported_on_another_machine_is_reused_on_its_recomputed_start(seq, tmp_path):
    """A chain's step-2 fine-tune starts from the step-1 merge, which another machine computes
    with other last bits. The run labels every merge and fold it writes with its stage key
    (write_made_by), so that start keeps its identity, the fine-tune its key, and the export
    is found and relabelled to the recomputed start; an unlabelled model of other bytes is
    still refused (test above)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from recall_ray.io.models import made_by
    from recall_ray.io.safetensors_io import content_fingerprint
    from recall_ray.studies.sequential import relabel_start

    cfg, _ = seq
    run = Path(cfg.run_dir)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    ft = stages["step2/finetune_recall"]
    exported = export_adapters(run, tmp_path / "adapters")
    assert "step2/finetune_recall" in exported
    labelled = [p.parent for p in run.rglob("recall_ray_made_by.json")]
    assert labelled and all(made_by(str(d)) for d in labelled)
    m1 = next(d for d in labelled if "step1" in str(d) and (d / "config.json").is_file() and "recall" in str(d))
    base_key = ft["result"]["base_key"]
    assert find_prebuilt(str(tmp_path / "adapters"), base_key, str(m1)) is not None  # here: the same bytes

    elsewhere = tmp_path / "elsewhere"  # the step-1 merge as another machine computes it
    shutil.copytree(m1, elsewhere)
    f = sorted(elsewhere.glob("*.safetensors"))[0]
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * (1 + 1e-7)
    save_file(tensors, str(f), metadata={"format": "pt"})
    (elsewhere / "recall_ray_made_by.json").unlink()
    assert content_fingerprint(str(elsewhere)) != content_fingerprint(str(m1))
    assert find_prebuilt(str(tmp_path / "adapters"), base_key, str(elsewhere)) is None  # unlabelled: refused

    from recall_ray.io.models import write_made_by
    write_made_by(str(elsewhere), made_by(str(m1)))  # what the run writes after recomputing it
    found = find_prebuilt(str(tmp_path / "adapters"), base_key, str(elsewhere))
    assert found == tmp_path / "adapters" / "step2" / "finetune_recall"
    copy = tmp_path / "copy"
    shutil.copytree(found, copy)
    relabel_start(copy, str(elsewhere))
    meta = json.loads((copy / "recall_ray.json").read_text())
    assert meta["base_fingerprint"] == content_fingerprint(str(elsewhere))
    assert meta["trained_on_base_fingerprint"] == content_fingerprint(str(m1))
    assert (copy / "adapter_model.safetensors").read_bytes() == (found / "adapter_model.safetensors").read_bytes()


def test_export_only_carries_a_stopped_run_without_resuming_it(seq, tmp_path, capsys):
    """`jobs/scenario.py --export-adapters DIR --export-only` after a stopped run: the same
    export as export_adapters, and nothing run (the manifest and every file of the run
    directory unchanged, no Ray started: none is needed)."""
    import yaml

    cfg, _ = seq
    config = tmp_path / "seq.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = Path(cfg.run_dir)

    def tree(root: Path) -> dict:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    before = tree(run)
    job = load_job("scenario")
    status = job.main(["--config", str(config), "--export-adapters", str(tmp_path / "cli"), "--export-only"])
    out = capsys.readouterr()
    assert status == 0, out.err[-2000:]
    assert tree(run) == before
    assert "=== sequential scenario" not in out.out  # no table: nothing ran
    expected = export_adapters(cfg.run_dir, tmp_path / "direct")
    assert f"published {', '.join(expected)} to {tmp_path / 'cli'}" in out.out
    assert tree(tmp_path / "cli") == tree(tmp_path / "direct")


def test_export_only_refuses_what_it_cannot_do(tmp_path, capsys):
    """--export-only needs --export-adapters, runs nothing so has nothing to --publish, and
    only a sequential study trains adapters: each is a usage error (exit 2) before any work."""
    job = load_job("scenario")
    for argv, said in ((["--export-only"], "--export-adapters DIR"),
                       (["--export-only", "--export-adapters", "x", "--publish", "y"], "drop --publish")):
        with pytest.raises(SystemExit) as stop:
            job.main(["--config", "configs/scenarios/forgetting_sequential.yaml", *argv])
        assert stop.value.code == 2 and said in capsys.readouterr().err
    status = job.main(["--config", str(Path(__file__).parents[1] / "configs/scenarios/multi.yaml"), "--export-adapters",
                       str(tmp_path / "x"), "--export-only"])
    assert status == 2 and "for sequential studies" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
