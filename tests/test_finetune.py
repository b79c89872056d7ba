"""LoRA fine-tuning: pure label masking / data order, and two short Ray Train runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_finetune_cfg
from recall_ray.cluster.finetune import finetune_lora
from recall_ray.core.lora import META_FILE
from recall_ray.core.sft import IGNORE_INDEX, batch_schedule, build_example, collate, shard, tokenize_records

DATA = Path(__file__).resolve().parents[1] / "data"
M = IGNORE_INDEX


# ----------------------------------------------------------------------------- pure parts


def test_build_example_masks_prompt_and_appends_eos():
    ids, labels = build_example([1, 2, 3], [7, 8], eos_id=0, max_length=10)
    assert ids == [1, 2, 3, 7, 8, 0]
    assert labels == [M, M, M, 7, 8, 0]


def test_build_example_truncates_prompt_start_keeps_target():
    assert build_example([1, 2, 3, 4, 5], [7, 8], eos_id=0, max_length=5) == ([4, 5, 7, 8, 0], [M, M, 7, 8, 0])
    # one prompt token always stays; a too-long target loses its tail (then the EOS)
    assert build_example([1, 2, 3], [7, 8], eos_id=0, max_length=3) == ([3, 7, 8], [M, 7, 8])
    assert build_example([1, 2, 3], [7, 8, 9, 10], eos_id=0, max_length=4) == ([3, 7, 8, 9], [M, 7, 8, 9])


def test_collate_pads_right_with_ignored_labels():
    batch = collate([([1, 2, 3], [M, 3, 0]), ([4, 5], [M, 5])], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["labels"].tolist() == [[M, 3, 0], [M, 5, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_tokenize_records_loss_covers_exactly_target_and_eos(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rec = {"prompt": "### Input:\nit is good\n\n### Response:\n", "target": "positive"}
    (ids, labels), = tokenize_records(tok, [rec], max_length=128)
    p = tok(rec["prompt"], add_special_tokens=True)["input_ids"]
    t = tok(rec["target"], add_special_tokens=False)["input_ids"]
    assert ids == p + t + [tok.eos_token_id]
    assert labels == [M] * len(p) + t + [tok.eos_token_id]
    assert tok.decode([x for x in labels if x != M], skip_special_tokens=True) == "positive"


def test_batch_schedule_cycles_and_is_seeded():
    sched = batch_schedule(5, 4, steps=3, seed=0)
    assert [len(b) for b in sched] == [4, 4, 4]
    flat = [i for b in sched for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # whole epochs
    assert sched == batch_schedule(5, 4, steps=3, seed=0)
    assert sched != batch_schedule(5, 4, steps=3, seed=1)
    assert shard(list(range(7)), 1, 3) == [1, 4]


# ----------------------------------------------------------------------------- validation (no Ray)


cfg = small_finetune_cfg  # steps 3, batch 4, r 4, alpha 8, lr 1e-2, max_length 64, seed 0


RECORDS = [{"prompt": "p\n", "target": "t"}]


def test_refuses_existing_out_dir(tiny_dir, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        finetune_lora(str(tiny_dir), RECORDS, cfg(), str(out), str(tmp_path / "ray"))


def test_validates_before_work(tiny_dir, tmp_path):
    out, st = str(tmp_path / "a"), str(tmp_path / "ray")
    with pytest.raises(ValueError, match="no config.json"):
        finetune_lora(str(tmp_path), RECORDS, cfg(), out, st)
    with pytest.raises(ValueError, match="no training records"):
        finetune_lora(str(tiny_dir), [], cfg(), out, st)
    with pytest.raises(ValueError, match="needs GPUs"):
        finetune_lora(str(tiny_dir), RECORDS, cfg(deepspeed="ds.json"), out, st)
    with pytest.raises(ValueError, match="cannot be sharded over 2 workers"):
        finetune_lora(str(tiny_dir), RECORDS, cfg(num_workers=2), out, st)
    assert not os.path.exists(st)


# ----------------------------------------------------------------------------- Ray Train runs


# `two_runs` (two short fine-tunes of the tiny model on 16 SST-2 records, same seed, the
# second with an EWC penalty at lambda 0) is a session fixture in conftest.py, shared with
# tests/test_ewc.py.


def test_adapter_written_with_metadata(two_runs, tiny_dir):
    from recall_ray.io.safetensors_io import content_fingerprint

    root, (out, _), _ = two_runs
    assert {"adapter_config.json", "adapter_model.safetensors", META_FILE} <= set(os.listdir(out))
    meta = json.loads((Path(out) / META_FILE).read_text())
    assert meta["base_fingerprint"] == content_fingerprint(tiny_dir)
    assert meta["task"] == "sst2" and meta["steps"] == 3 and meta["seed"] == 0
    assert meta["final_loss"] > 0
    # cpus_per_worker "auto" on the session's 2 CPUs: the one worker gets both, as torch threads
    assert meta["torch_threads"] == 2
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temp dirs left behind
    # Ray Train kept its checkpoints under storage_dir
    assert list((root / "ray").glob("finetune-sst2-*/checkpoint_*/adapter_model.safetensors"))


def test_adapter_trained_and_loads_on_base(two_runs, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, (out, _), _ = two_runs
    tensors = load_file(str(Path(out) / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at 0: it trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(loaded) == len(lora_b)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
        assert not torch.equal(model(ids).logits, base_logits)


def test_same_seed_gives_identical_adapter(two_runs):
    """The same seed gives the same adapter bit for bit (the second run also carries an EWC
    penalty at lambda 0, which must change nothing: tests/test_ewc.py)."""
    _, (a, b), _ = two_runs
    ta, tb = load_file(str(Path(a) / "adapter_model.safetensors")), load_file(str(Path(b) / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((Path(p) / META_FILE).read_text()) for p in (a, b))
    assert "ewc" not in ma and mb.pop("ewc")["lambda"] == 0.0
    assert ma == mb


# ----------------------------------------------------------------------------- CLI errors (no Ray)


def load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_finetune", Path(__file__).resolve().parents[1] / "jobs" / "finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra, message", [
    (["--set", "finetune.rank=4"], "unknown config key 'finetune.rank'"),
    (["--set", "finetune.steps=0"], "config key 'finetune.steps': Input should be greater than 0"),
    (["--set", "steps=3"], "only finetune.* keys"),
    (["--set", "finetune.steps"], "expected key=value"),
    (["--template", "nope"], "unknown template 'nope'"),
])
def test_cli_rejects_bad_input_with_one_line(tiny_dir, tmp_path, capsys, extra, message):
    cli = load_cli()
    argv = ["--base", str(tiny_dir), "--data", str(DATA / "sst2/train.jsonl"), "--template", "sst2",
            "--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "run"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finetune: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()


def test_cli_refuses_existing_out(tiny_dir, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    argv = ["--base", str(tiny_dir), "--data", str(DATA / "sst2/train.jsonl"), "--template", "sst2", "--out", str(tmp_path / "a")]
    assert load_cli().main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_training_error_summary_names_first_failing_rank():
    import ray.train

    from recall_ray.cluster.finetune import training_error_summary

    err = ray.train.WorkerGroupError("long text", {1: KeyError("x"), 0: ValueError("Target modules {'nope'} not found\nmore")})
    assert training_error_summary(err) == "rank 0: ValueError: Target modules {'nope'} not found"
    assert training_error_summary(ray.train.ControllerError(RuntimeError("no resources"))) == "RuntimeError: no resources"


@pytest.mark.parametrize("kw, cluster, want", [
    ({}, 2.0, 2), ({}, 16.0, 16), ({"num_workers": 3}, 16.0, 5), ({"num_workers": 4}, 2.0, 1),
    ({"use_gpu": True, "num_workers": 4}, 64.0, 1), ({"cpus_per_worker": 3}, 2.0, 3),
])
def test_worker_cpus(kw, cluster, want):
    from recall_ray.cluster.finetune import worker_cpus

    assert worker_cpus(small_finetune_cfg(**kw), cluster) == want


def test_cpus_per_worker_must_be_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="positive integer or 'auto'"):
        small_finetune_cfg(cpus_per_worker=0)


def test_a_worker_killed_mid_training_resumes_from_its_checkpoint(two_runs, tiny_dir, sst2_records, tmp_path):
    """Checkpoints every step; the worker dies after step 2, before its checkpoint: Ray Train
    restarts it from step 1's checkpoint (weights, optimizer, dropout's random state), it
    redoes step 2, and the adapter equals an undisturbed run's bit for bit."""
    from conftest import FAULTS

    import threading
    import time

    _, (plain, _), _ = two_runs
    (FAULTS / "finetune-step-2").write_text("exit")

    def trap_step_one() -> None:
        """Once the first worker is dead, a worker that ran step 1 again (a restart from
        scratch, not from the checkpoint) would fail there."""
        deadline = time.time() + 300
        while not (FAULTS / "finetune-step-2.reached").exists() and time.time() < deadline:
            time.sleep(0.02)
        (FAULTS / "finetune-step-1").write_text("ENOSPC")

    trap = threading.Thread(target=trap_step_one, daemon=True)
    trap.start()
    cfg = small_finetune_cfg(checkpoint_every=1, max_failures=1)
    try:
        out = finetune_lora(str(tiny_dir), sst2_records, cfg, str(tmp_path / "a"), str(tmp_path / "ray"), task="sst2")
        trap.join(timeout=10)
        assert (FAULTS / "finetune-step-2.reached").exists(), "the worker was never killed"
        assert (FAULTS / "finetune-step-1").exists(), "step 1 ran again: the worker restarted from scratch"
    finally:
        (FAULTS / "finetune-step-1").unlink(missing_ok=True)
    assert (Path(out) / "adapter_model.safetensors").read_bytes() == \
        (Path(plain) / "adapter_model.safetensors").read_bytes()
    assert json.loads((Path(out) / META_FILE).read_text()) == json.loads((Path(plain) / META_FILE).read_text())
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(p.name for p in Path(plain).iterdir())


def test_a_longer_run_goes_on_from_the_ladders_snapshot_or_a_warm_start(two_runs, tiny_dir, sst2_records, tmp_path):
    """A 2-step run snapshots every step; a 3-step run given the same snapshot directory
    trains step 3 alone (step 1 is trapped to fail) and ends with the undisturbed 3-step
    run's adapter, bit for bit. Each snapshot holds a loadable adapter of its step.
    Warm-started from the 2-step adapter alone, in an empty ladder, a 3-step run trains step
    3 alone too (steps 1 and 2 trapped); its adapter and the ladder's step-3 snapshot record
    the warm start, and it is not the uninterrupted run's (Adam's moments restarted)."""
    import hashlib

    from conftest import FAULTS
    from recall_ray.cluster.finetune import WARM_START, snapshot_path, snapshot_steps

    _, (plain, _), _ = two_runs
    snaps = tmp_path / "snaps"
    finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(steps=2, snapshot_every=1), str(tmp_path / "two"),
                  str(tmp_path / "ray"), task="sst2", snapshot_dir=str(snaps))
    assert snapshot_steps(str(snaps)) == [1, 2]
    assert (Path(snapshot_path(str(snaps), 2)) / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    (FAULTS / "finetune-step-1").write_text("ENOSPC")  # a run that started over would fail at step 1
    try:
        out = finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(snapshot_every=1), str(tmp_path / "three"),
                            str(tmp_path / "ray"), task="sst2", snapshot_dir=str(snaps))
    finally:
        (FAULTS / "finetune-step-1").unlink(missing_ok=True)
    assert snapshot_steps(str(snaps)) == [1, 2, 3]
    assert [json.loads((Path(snapshot_path(str(snaps), k)) / META_FILE).read_text())["steps"] for k in (1, 2, 3)] \
        == [1, 2, 3]
    assert (Path(out) / "adapter_model.safetensors").read_bytes() == \
        (Path(plain) / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in snaps.iterdir() if p.name.startswith(".")] == []  # no temporary left

    two, warm_snaps = tmp_path / "two", tmp_path / "warm"
    for k in (1, 2):
        (FAULTS / f"finetune-step-{k}").write_text("ENOSPC")
    try:
        out = finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(snapshot_every=1), str(tmp_path / "w3"),
                            str(tmp_path / "ray"), task="sst2", snapshot_dir=str(warm_snaps), warm_start=str(two))
    finally:
        for k in (1, 2):
            (FAULTS / f"finetune-step-{k}").unlink(missing_ok=True)
    assert snapshot_steps(str(warm_snaps)) == [2, 3]
    weights = (two / "adapter_model.safetensors").read_bytes()
    assert (Path(snapshot_path(str(warm_snaps), 2)) / "adapter_model.safetensors").read_bytes() == weights
    record = json.loads((Path(out) / META_FILE).read_text())[WARM_START]
    assert record["step"] == 2 and record["adapter_sha256"] == hashlib.sha256(weights).hexdigest()
    assert json.loads((Path(snapshot_path(str(warm_snaps), 3)) / META_FILE).read_text())[WARM_START] == record
    assert WARM_START not in json.loads((Path(snapshot_path(str(warm_snaps), 2)) / META_FILE).read_text())
    assert (Path(out) / "adapter_model.safetensors").read_bytes() != \
        (Path(plain) / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="a warm start needs a snapshot directory"):
        finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(), str(tmp_path / "x"), str(tmp_path / "ray"),
                      task="sst2", warm_start=str(two))


def _saved_adapter(tiny_dir, cfg, out: Path, steps: int, **meta) -> dict:
    """A LoRA adapter of the tiny model with random (non-zero) weights, saved as finetune_lora
    saves one, with its recall_ray.json; returns its trainable tensors by parameter name."""
    from recall_ray.cluster.finetune import _load_lora_model

    model = _load_lora_model(str(tiny_dir), cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out), safe_serialization=True)
    (out / META_FILE).write_text(json.dumps({"base_fingerprint": "fp", "task": "sst2", "steps": steps,
                                             "final_loss": 0.5, "seed": cfg.seed, **meta}))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_warm_start_restores_the_adapters_weights_and_restarts_the_optimizer(tiny_dir, tmp_path):
    """The snapshot seeded from an adapter puts back exactly its weights (bit for bit, every
    LoRA tensor) and no optimizer moments or generator state; it is refused where the adapter
    is not an earlier rung of the training, and not written over a snapshot at or past it."""
    import hashlib

    from recall_ray.cluster.finetune import (RESUME_FILE, SNAPSHOT_META, WARM_START, _load_lora_model, _restore,
                                             ladder_warm_start, seed_snapshot, snapshot_path, warm_start_record)

    cfg = small_finetune_cfg(steps=5, snapshot_every=1)
    saved = _saved_adapter(tiny_dir, cfg, tmp_path / "rung", steps=2)
    record = warm_start_record(str(tmp_path / "rung"), cfg, "fp", "sst2")
    assert record["step"] == 2 and record["loss"] == 0.5
    assert record["adapter_sha256"] == hashlib.sha256((tmp_path / "rung" / "adapter_model.safetensors").read_bytes()
                                                      ).hexdigest()
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    assert seed_snapshot(str(snaps), str(tmp_path / "rung"), record)
    assert not seed_snapshot(str(snaps), str(tmp_path / "rung"), record)  # the ladder is at step 2 already
    state = torch.load(Path(snapshot_path(str(snaps), 2)) / RESUME_FILE, weights_only=False)
    model = _load_lora_model(str(tiny_dir), cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert _restore(state, model, optimizer) == (3, 0.5)
    restored = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(restored) == sorted(saved) and len(saved) > 0
    for n, t in saved.items():
        assert torch.equal(restored[n], t), n
    assert optimizer.state_dict()["state"] == {}
    meta = json.loads((Path(snapshot_path(str(snaps), 2)) / SNAPSHOT_META).read_text())
    assert meta[WARM_START] == record
    assert ladder_warm_start(str(snaps), 2) is None  # the seeded snapshot is the adapter itself
    assert ladder_warm_start(str(snaps), 3) == record

    # a warm start of an adapter that was itself warm-started keeps the earlier record
    meta = json.loads((tmp_path / "rung" / META_FILE).read_text())
    (tmp_path / "rung" / META_FILE).write_text(json.dumps({**meta, WARM_START: {"step": 1}}))
    assert warm_start_record(str(tmp_path / "rung"), cfg, "fp", "sst2") == {**record, "after": {"step": 1}}
    (tmp_path / "rung" / META_FILE).write_text(json.dumps(meta))

    with pytest.raises(ValueError, match=r"seed 0 \(this training: 1\)"):
        warm_start_record(str(tmp_path / "rung"), small_finetune_cfg(steps=5, seed=1), "fp", "sst2")
    with pytest.raises(ValueError, match="base 'fp'"):
        warm_start_record(str(tmp_path / "rung"), cfg, "other", "sst2")
    with pytest.raises(ValueError, match="fewer than finetune.steps"):
        warm_start_record(str(tmp_path / "rung"), small_finetune_cfg(steps=2), "fp", "sst2")
    with pytest.raises(ValueError, match="lacks adapter_config.json"):
        warm_start_record(str(tmp_path / "snaps"), cfg, "fp", "sst2")


def test_a_snapshot_directory_of_another_training_is_refused(ray_session, tiny_dir, sst2_records, tmp_path):
    from recall_ray.cluster.finetune import LADDER_FILE

    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / LADDER_FILE).write_text(json.dumps({"key": "another"}))
    with pytest.raises(ValueError, match="belongs to another training"):
        finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(), str(tmp_path / "a"), str(tmp_path / "ray"),
                      task="sst2", snapshot_dir=str(snaps))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="snapshot_every needs a snapshot directory"):
        finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(snapshot_every=2), str(tmp_path / "a"),
                      str(tmp_path / "ray"), task="sst2")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "adapters").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_committed_adapter_config_is_valid(path):
    """Each task's settings validate, its split exists, and a ladder's snapshots fall on every
    whole epoch of its split (ceil(records / batch) steps), which its steps end on."""
    import math

    import yaml

    from recall_ray.config import FinetuneConfig
    from recall_ray.io.splits import load_split

    spec = yaml.safe_load(path.read_text())
    assert set(spec) <= {"base", "out", "split", "finetune", "tasks"}
    for task, over in spec["tasks"].items():
        cfg = FinetuneConfig(**{**spec.get("finetune", {}), **(over or {})})
        records = load_split(DATA, task, spec.get("split", "train"), max_samples=cfg.max_samples)
        if cfg.snapshot_every:
            epoch = math.ceil(len(records) / cfg.batch_size)
            assert epoch % cfg.snapshot_every == 0 and cfg.steps % epoch == 0, task
