"""Inputs, run directory and output on an object store (issue 21, items 1-2), against a real
S3 server (moto's server mode, `s3_store` in conftest.py): the readers read in place (the
header, then each tensor by a range read), the fingerprints and every input check work on
URIs before Ray starts, and bad input on a bucket gets the same one-line errors as on disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, REPO, S3_ENV, load_job, small_finetune_cfg, tiny_run_tree
from recall_ray.io.models import ModelTensors, load_causal_lm_read, resolve_model
from recall_ray.io.safetensors_io import content_fingerprint, list_weight_files, model_fingerprint, tensor_infos


def test_a_model_on_the_bucket_reads_as_on_disk_by_range_reads(s3_store, tiny_dir):
    """Same tensors, same fingerprints (they name the model's content, not its place), and
    reading one tensor reads its bytes only, not the file."""
    uri = s3_store.uri("models/base")
    assert [p.name for p in list_weight_files(uri)] == [p.name for p in list_weight_files(tiny_dir)]
    assert model_fingerprint(uri) == model_fingerprint(tiny_dir)
    assert content_fingerprint(uri) == content_fingerprint(tiny_dir)
    remote = ModelTensors(resolve_model("base", uri, uri))
    local = load_file(tiny_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(remote.get(name), local[name])
    assert remote.reader.bytes_read == remote.infos[name].nbytes < (tiny_dir / "model.safetensors").stat().st_size / 4
    assert tensor_infos(list_weight_files(uri))[name].offset == tensor_infos(list_weight_files(tiny_dir))[name].offset
    # a load from the bucket makes the same fingerprint of the pieces it read (the job's keys)
    _, read = load_causal_lm_read(resolve_model("base", uri, uri))
    assert read.fingerprint == model_fingerprint(tiny_dir)


def _job_tree(s3_store, run: str, experts: list[str], new: str = "models/new") -> dict:
    return {
        "run_dir": s3_store.uri(f"runs/{run}"),
        "output": s3_store.uri(f"out/{run}"),
        "base": {"name": "base", "path": s3_store.uri("models/base")},
        "experts": [{"name": f"e{i}", "path": p if "://" in p else s3_store.uri(p)} for i, p in enumerate(experts)],
        "new_model": {"name": "new", "path": s3_store.uri(new)},
        "task": {"name": "sst2", "data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 40},
        "typical": {"k": 4},
    }


def _refused_before_ray(tmp_path: Path, monkeypatch, capsys, tree: dict) -> str:
    """Run jobs/merge.py on `tree` with Ray unstartable; the one line it exits with."""
    import recall_ray.cluster.runtime as runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(runtime, "connect_ray", no_ray)
    (tmp_path / "job.yaml").write_text(json.dumps(tree))
    assert load_job("merge").main(["--config", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("merge: error:"), err
    return err[-1]


@pytest.mark.parametrize("breakage, message", [
    ("missing key", r"model 'e0': s3://recall-ray-test/models/no_such_expert does not exist"),
    ("truncated object", r"model\.safetensors: .*truncated or corrupt"),
    ("no credentials", r"StorageError: no credentials for s3://recall-ray-test: set AWS_ACCESS_KEY_ID"),
    ("no bucket", r"StorageError: bucket 'no-such-bucket' does not exist"),
    ("secret in the URI", r"StorageError: a s3:// location in the config carries a credential"),
])
def test_bad_input_on_the_bucket_is_one_line_before_ray(tmp_path, monkeypatch, capsys, s3_store, tiny_experts,
                                                        breakage, message):
    experts = ["models/e0"]
    if breakage == "missing key":
        experts = ["models/no_such_expert"]
    elif breakage == "truncated object":
        import shutil

        cut = shutil.copytree(tiny_experts[0], tmp_path / "cut")
        f = cut / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        experts = [s3_store.put_dir(cut, f"bad/{tmp_path.name}/cut")]
    elif breakage == "no credentials":
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    elif breakage == "no bucket":
        experts = ["s3://no-such-bucket/models/e0"]
    else:
        experts = ["s3://AKIAEXAMPLE:wJalrSECRET@recall-ray-test/models/e0"]
    line = _refused_before_ray(tmp_path, monkeypatch, capsys, _job_tree(s3_store, tmp_path.name, experts))
    assert re.search(message, line), line
    assert "wJalrSECRET" not in line and S3_ENV["AWS_SECRET_ACCESS_KEY"] not in line  # no secret echoed
    from recall_ray.io.storage import output_exists

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # to look: nothing was written on the bucket
        monkeypatch.setenv(k, S3_ENV[k])
    assert not output_exists(s3_store.uri(f"runs/{tmp_path.name}"))
    assert not output_exists(s3_store.uri(f"out/{tmp_path.name}"))


def _tensors(folder) -> dict[str, bytes]:
    """Every tensor of a merged model (any shard layout), as its stored bytes."""
    import pyarrow.fs as pafs

    from recall_ray.io.storage import filesystem

    fs, root = filesystem(str(folder))
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.path.endswith(".safetensors"):
            from safetensors.torch import load

            with fs.open_input_stream(info.path) as f:
                out.update({k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in load(f.read()).items()})
    return out


def test_the_job_with_everything_on_the_bucket_gives_the_local_bytes(tmp_path, s3_store, tiny_run):
    """The whole job on the simulated three-node cluster, its inputs, run_dir and output on
    the S3 server: the merged tensors are byte-identical to the same job run from local
    directories (the session's `tiny_run`: same models, data and settings), and so are the
    evaluation's scores; no secret in its log."""
    import subprocess
    import sys

    local_cfg, _ = tiny_run
    tree = {**tiny_run_tree(*(s3_store.uri(k) for k in ("runs/job", "models/base", "models/e0", "models/new"))),
            "output": s3_store.uri("out/job")}
    (tmp_path / "job.yaml").write_text(json.dumps(tree))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "cluster_job.py"), str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"status": 0, "num_nodes": 3}, (out, proc.stderr[-3000:])
    remote, local = _tensors(tree["output"]), _tensors(local_cfg.output_dir)
    assert remote.keys() == local.keys() and len(local) > 10
    assert [n for n in local if remote[n] != local[n]] == []
    from recall_ray.io.storage import RemotePath

    # the evaluation stage too (the new model, the average baseline and the merge, read from
    # the bucket): the same scores
    assert RemotePath(f"{tree['run_dir']}/eval/scores.csv").read_text() == \
        (Path(local_cfg.run_dir) / "eval" / "scores.csv").read_text()
    log = RemotePath(f"{tree['run_dir']}/job.log").read_text()
    assert "merge" in log and S3_ENV["AWS_SECRET_ACCESS_KEY"] not in log + proc.stderr + proc.stdout
    # what was copied to a local cache for transformers is said, with the size
    assert re.search(r"copying \d+ file\(s\) of s3://recall-ray-test/models/base \([\d.]+ MB\) to the local cache", log)


def test_the_job_fine_tunes_its_new_model_with_everything_on_the_bucket(s3_store, two_runs, ray_session):
    """No new model given, the base, run_dir and output on the bucket: Ray Train keeps its run
    and checkpoints in the bucket's run directory, the adapter is built on the driver and
    uploaded whole, and the stages read it from there. Its tensors are the bytes of the same
    fine-tune run from local directories (`two_runs`' plain run: same records and settings);
    a rerun reuses it."""
    from recall_ray.config import build_config
    from recall_ray.io.storage import RemotePath
    from recall_ray.pipeline import run_pipeline

    settings = {k: v for k, v in small_finetune_cfg().model_dump().items()
                if k in ("steps", "batch_size", "r", "alpha", "learning_rate", "max_length", "seed")}
    cfg = build_config({
        "run_dir": s3_store.uri("runs/finetune"), "output": s3_store.uri("out/finetune"),
        "base": {"path": s3_store.uri("models/base")},
        "experts": [{"name": "e0", "path": s3_store.uri("models/e0")}],
        "task": {"data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 20},
        "typical": {"k": 3},
        "finetune": {**settings, "max_samples": 16},
    })
    result = run_pipeline(cfg)
    adapter = RemotePath(f"{cfg.run_dir}/finetune/adapter")
    local = Path(two_runs[1][0])
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (adapter / "adapter_model.safetensors").read_bytes() == (local / "adapter_model.safetensors").read_bytes()
    assert not result.timings["finetune"]["skipped"]
    assert set(result.table["model"]) == {"base", "e0", "new"}
    manifest = json.loads(RemotePath(f"{cfg.run_dir}/manifest.json").read_text())
    assert manifest["inputs"]["models"]["new"] == {**manifest["inputs"]["models"]["new"], "kind": "adapter",
                                                   "path": str(adapter), "base_check": "fingerprint"}
    assert "base_check" not in manifest["inputs"]["models"]["e0"]  # a full model: nothing to tie
    assert (RemotePath(cfg.output_dir) / "model.safetensors.index.json").is_file()
    assert any(p.name.startswith("checkpoint") or p.name.startswith("finetune-")
               for p in RemotePath(f"{cfg.run_dir}/finetune/ray_train").iterdir())  # Ray Train's run, on the bucket
    again = run_pipeline(cfg)
    assert again.timings["finetune"]["skipped"] and again.timings["merge"]["skipped"]


def test_a_whole_model_copied_to_the_cache_says_how_far_it_is(s3_store, tiny_dir, tmp_path, monkeypatch, capsys):
    """transformers reads only local files: a whole model from the bucket is copied to the
    cache once, with a progress line in MB as it goes (every line here: no time between
    them), and the copy holds the model's bytes; a second call reuses it, silently."""
    import recall_ray.io.storage as storage

    monkeypatch.setenv("RECALL_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(storage, "COPY_PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(storage, "COPY_CHUNK", 1 << 16)
    monkeypatch.setattr(storage, "COPY_UNIT", (10**4, "x 10 kB"))  # the tiny model is 0.4 MB
    uri = s3_store.uri("models/base")
    copy = Path(storage.local_copy(uri))
    lines = capsys.readouterr().out.splitlines()
    total = sum(p.stat().st_size for p in tiny_dir.iterdir() if p.is_file())
    units = -(-total // 10**4)
    done = [int(re.fullmatch(rf"copy of {uri} to the cache: (\d+)/{units} x 10 kB .*", line).group(1)) for line in lines]
    assert len(done) >= 5 and done == sorted(done) and done[-1] == units and " kB in " in lines[-1]
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == \
        {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    assert storage.local_copy(uri) == str(copy) and capsys.readouterr().out == ""
