"""Faults survived, with the same bytes out: each test fails a process at a known point
(recall_ray.cluster.faults: a marker file the process takes when it gets there, or a pause
the test waits for before it kills) and compares the output with an undisturbed run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, FAULTS, REPO


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def mark(point: str, action: str = "exit") -> Path:
    marker = FAULTS / point
    marker.write_text(action)
    return FAULTS / f"{point}.reached"


@pytest.fixture
def three(tiny_dir, tiny_experts):
    from recall_ray.io.models import resolve_model
    from recall_ray.validate import check_models

    models = [resolve_model(f"m{i}", str(d), str(tiny_dir)) for i, d in enumerate([tiny_dir, *tiny_experts])]
    ms = check_models(models)
    w = np.random.default_rng(5).dirichlet(np.ones(3), size=ms.grouping.num_groups)
    return models, ms, w


def _merge(three, out: Path, **kw):
    from recall_ray.cluster.merge import run_merge
    from recall_ray.core.merge_methods import MergeMethod

    models, ms, w = three
    return run_merge(models, ms.grouping, ms.infos, MergeMethod("t", "linear", w), str(out), False, num_actors=1,
                     max_shard_bytes=1, **kw)  # one shard per layer group, one actor: shards in turn


def test_merge_actor_killed_mid_shard_is_restarted_and_retries_it(tmp_path, three, ray_session, caplog):
    """The restart and the retry are said on one line and listed in the report's events."""
    calm = _merge(three, tmp_path / "calm")
    assert calm.events == []
    reached = mark("merge-shard-model-00002-of-00003.safetensors")
    with caplog.at_level("WARNING", logger="recall_ray.merge"):
        killed = _merge(three, tmp_path / "killed")
    assert reached.exists(), "the fault point was never reached"
    assert hashes(tmp_path / "killed") == hashes(tmp_path / "calm")
    node = killed.shards[0]["node_id"]
    assert killed.events == [{"kind": "actor_restart", "actor": 0, "node": node, "previous_node": node,
                              "shard": "model-00002-of-00003.safetensors", "restarts_left": 2, "retries_left": 2}]
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [f"merge t: merge actor 1 of 1 restarted on node {node[:8]} (restart 1 of 3); shard"
                     " model-00002-of-00003.safetensors retried (2 retries left)"], lines


def test_merge_actor_killed_mid_shard_with_the_output_on_a_bucket(tmp_path, three, ray_session, s3_store):
    """Output on the test S3 server: the actor killed mid-shard leaves no partial object on
    the bucket (a shard is written locally and uploaded whole), and the retried merge gives
    the bytes of an undisturbed local one."""
    import pyarrow.fs as pafs

    from recall_ray.io.storage import filesystem

    calm = tmp_path / "calm"
    _merge(three, calm)
    out = s3_store.uri(f"faults/{tmp_path.name}/merged")
    reached = mark("merge-shard-model-00002-of-00003.safetensors")
    killed = _merge(three, out)
    assert reached.exists(), "the fault point was never reached"
    assert [e["kind"] for e in killed.events] == ["actor_restart"]
    fs, root = filesystem(s3_store.uri(f"faults/{tmp_path.name}"))
    objects = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                objects[info.path[len(root) + 1:]] = hashlib.sha256(f.read()).hexdigest()
    assert objects == {f"merged/{k}": v for k, v in hashes(calm).items()}  # nothing else: no partial, no staging


def test_representation_actor_killed_mid_stage_gives_identical_parquet(tmp_path, tiny_experts, ray_session):
    """The stage's actor dies before writing its second batch's part; Ray Data restarts it
    and retries the batch, and the Parquet parts equal, byte for byte, those the same writer
    makes undisturbed (run here in this process, batch by batch)."""
    from recall_ray.cluster.representations import RepresentationWriter, extract
    from recall_ray.core.templates import load_task_records
    from recall_ray.io.models import resolve_model
    from recall_ray.io.storage import RunDir

    model = resolve_model("m", str(tiny_experts[0]), str(tiny_experts[0]))
    records = load_task_records(str(DATA / "sst2" / "train.jsonl"), "sst2", 24)
    items = [{"sample_idx": i, "sample_id": r["sample_id"], "text": r["prompt"] + r["target"]}
             for i, r in enumerate(records)]
    reached = mark("reps-0-part-000000008.parquet")  # the second batch, before its part is written
    events = extract([model], items, RunDir(str(tmp_path / "killed")), ["reps/m"], max_length=48,
                     exclude_first_token=False, dtype="float32", batch_size=8, num_actors=1).events
    assert reached.exists()
    # the restart is said once (cluster.events), naming the first part written after it: the
    # batches the actor held are retried in no fixed order, and Ray Data need not hand the
    # actor its blocks in order either (CI saw part 0 come after the restart)
    assert [(e["kind"], e["restarts"], e["retries_left"]) for e in events] == [("actor_restart", 1, "unlimited")]
    writer = RepresentationWriter(str(tmp_path / "calm"), model, 48, False, "float32")
    for start in range(0, 24, 8):
        chunk = items[start:start + 8]
        writer({k: np.array([it[k] for it in chunk], dtype=object if k != "sample_idx" else np.int64)
                for k in ("sample_idx", "sample_id", "text")})
    calm, killed = hashes(tmp_path / "calm"), hashes(tmp_path / "killed" / "reps" / "m")
    assert len(calm) == 3 and killed == calm
    assert events[0]["shard"] in calm


def test_full_output_filesystem_is_a_clear_error_and_leaves_nothing(tmp_path, three, ray_session):
    reached = mark("merge-shard-model-00002-of-00003.safetensors", "ENOSPC")
    with pytest.raises(OSError, match=r"output filesystem of .*out is full .*free space or choose another"):
        _merge(three, tmp_path / "out", resume_key="k" * 64)
    assert reached.exists()
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []  # no staging either


def test_unwritable_output_is_refused_before_any_work(tmp_path, tiny_dir, tiny_experts):
    from recall_ray.config import build_config
    from recall_ray.pipeline import preflight
    from recall_ray.io.storage import NotWritableError

    try:  # sysfs refuses new files, even for root; elsewhere the test has nothing to show
        fd, p = tempfile.mkstemp(dir="/sys")
        os.close(fd)
        os.remove(p)
        pytest.skip("/sys accepts files on this machine")
    except OSError:
        pass
    tree = {"run_dir": str(tmp_path / "run"), "output": "/sys/recall-ray-out",
            "base": {"path": str(tiny_dir)}, "new_model": {"name": "new", "path": str(tiny_experts[1])},
            "task": {"data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 8},
            "typical": {"k": 2}}
    with pytest.raises(NotWritableError, match=r"cannot write /sys/recall-ray-out: /sys refuses new files"):
        preflight(build_config(tree))
    assert not (tmp_path / "run").exists()


def test_a_worker_node_lost_during_the_merge(tmp_path, tiny_dir, tiny_experts, ray_session):
    """Two simulated worker nodes; the node whose merge actor is mid-shard is removed: the
    actor restarts on the other node, retries the shard, and the bytes equal an undisturbed
    merge (here, on the test session's runtime)."""
    from recall_ray.cluster.merge import run_merge
    from recall_ray.core.merge_methods import MergeMethod
    from recall_ray.io.models import resolve_model
    from recall_ray.validate import check_models

    dirs = [tiny_dir, *tiny_experts]
    w = np.random.default_rng(6).dirichlet(np.ones(3), size=3)
    np.save(tmp_path / "w.npy", w)
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "merge-shard-model-00001-of-00003.safetensors").write_text("pause")
    env = {**os.environ, "RECALL_RAY_FAULTS": str(faults)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "two_node_merge.py"),
                           ",".join(map(str, dirs)), str(tmp_path / "w.npy"), str(tmp_path / "lost"), "lose_node",
                           "one_shard_per_group"], capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["removed"] == ["merge-shard-model-00001-of-00003.safetensors.reached"]
    assert out["num_nodes"] == 2  # head + the node that was left
    [event] = out["events"]  # the restart said once: the shard, the node lost and the node it moved to
    assert event["kind"] == "actor_restart" and event["shard"] == "model-00001-of-00003.safetensors"
    assert event["node"] in out["nodes"] and event["previous_node"] not in out["nodes"]
    assert (event["restarts_left"], event["retries_left"]) == (2, 2)
    models = [resolve_model(f"m{i}", str(d), str(dirs[0])) for i, d in enumerate(dirs)]
    ms = check_models(models)
    run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), str(tmp_path / "calm"), False,
              num_actors=2, side_dir=str(dirs[0]), max_shard_bytes=1)
    assert out["hashes"] == {k: v for k, v in hashes(tmp_path / "calm").items()}


def test_a_worker_node_lost_during_the_representations(tmp_path, tiny_experts, ray_session):
    """Ray's core_worker.cc says of every Ray Data pool actor that it "has constructor
    arguments in the object store and max_restarts > 0 ... the actor restart will fail" if
    they are lost. Measured here: two simulated worker nodes; the node whose representation
    actor holds a batch is removed; Ray Data restarts the actor on the other node from those
    arguments (the driver keeps them, in its own node's object store, for the whole stage),
    the stage ends, the restart is reported, and the Parquet parts equal an undisturbed
    writer's byte for byte. The line is Ray's general caution, not a failure of this job:
    it goes to job.log (cluster.runtime.native_stderr_to_log)."""
    from recall_ray.cluster.representations import RepresentationWriter
    from recall_ray.core.templates import load_task_records

    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "reps-0-part-000000008.parquet").write_text("pause")
    env = {**os.environ, "RECALL_RAY_FAULTS": str(faults)}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "two_node_reps.py"), str(tiny_experts[0]),
                           str(tmp_path / "lost")], capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the JSON line; the raylet's note of the retried task may be printed after it
    out = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    assert out["removed"] == ["reps-0-part-000000008.parquet.reached"] and out["num_nodes"] == 2  # head + one
    assert [(e["kind"], e["restarts"]) for e in out["events"]] == [("actor_restart", 1)]
    from recall_ray.io.models import resolve_model

    model = resolve_model("m", str(tiny_experts[0]), str(tiny_experts[0]))
    records = load_task_records(str(DATA / "sst2" / "train.jsonl"), "sst2", 24)
    items = [{"sample_idx": i, "sample_id": r["sample_id"], "text": r["prompt"] + r["target"]}
             for i, r in enumerate(records)]
    writer = RepresentationWriter(str(tmp_path / "calm"), model, 48, False, "float32")
    for start in range(0, 24, 8):
        chunk = items[start:start + 8]
        writer({k: np.array([it[k] for it in chunk], dtype=object if k != "sample_idx" else np.int64)
                for k in ("sample_idx", "sample_id", "text")})
    assert out["hashes"] == hashes(tmp_path / "calm")


def _kill_session(ray_tmp: str) -> None:
    """The Ray processes a killed driver left behind (they run with its temp dir); never
    `ray stop`, which would stop every Ray on the machine."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(ray_tmp in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except psutil.Error:
            pass


def test_driver_killed_during_the_merge_resumes_the_unfinished_shards(tmp_path, tiny_dir, tiny_experts, ray_session):
    """The job, run as a user runs it (its own process and local Ray), is killed (SIGKILL)
    after the merge's first shard; the rerun keeps that shard (its manifest says so and the
    console says it once) and merges the others, and dies right after moving the merged model
    into place, before the manifest records it; the third run (same command, no --overwrite)
    takes that output as its own, and the model equals an undisturbed run's bit for bit. On
    the way, what the person running it reads: one progress line per stage, the weight table
    and the timings on the console, no Ray Data progress dumps or records there; the detail
    in the run directory's job.log. The two reruns join the test session's Ray, as a driver
    lost on a cluster is rerun there (`ray job submit`): a local Ray each would cost two more
    Ray starts (issue 22: the suite's time)."""
    from recall_ray.config import build_config
    from recall_ray.pipeline import run_pipeline

    tree = {"base": {"name": "base", "path": str(tiny_dir)}, "experts": [{"name": "e0", "path": str(tiny_experts[0])}],
            "new_model": {"name": "new", "path": str(tiny_experts[1])},
            "task": {"name": "sst2", "data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 16},
            "typical": {"k": 2}, "representations": {"batch_size": 8},
            "merge": {"num_actors": 1, "max_shard_bytes": 1}}
    calm = run_pipeline(build_config({**tree, "run_dir": str(tmp_path / "calm")}))
    job = {**tree, "run_dir": str(tmp_path / "job"), "ray": {"num_cpus": 2, "object_store_memory": 128 * 1024**2}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "merge-driver-after-shard").write_text("pause")
    ray_tmp = tempfile.mkdtemp(prefix="rr_kill_", dir="/tmp")
    env = {**os.environ, "RECALL_RAY_FAULTS": str(faults), "RAY_TMPDIR": ray_tmp}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    cmd = [sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(tmp_path / "job.yaml")]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, text=True)
        deadline = time.time() + 300
        while not (faults / "merge-driver-after-shard.reached").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        first_out, first_err = proc.communicate(timeout=60)
    finally:
        _kill_session(ray_tmp)
    stage = json.loads((tmp_path / "job" / "manifest.json").read_text())["stages"]["merge"]
    assert stage["status"] == "running"  # killed mid-stage
    (faults / "merge-after-publish").write_text("exit")  # the rerun dies between the move and the record
    joined = {**env, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=joined, cwd=tmp_path)
    assert again.returncode == 137 and (faults / "merge-after-publish.reached").exists(), again.stderr[-3000:]
    stage = json.loads((tmp_path / "job" / "manifest.json").read_text())["stages"]["merge"]
    out = Path(stage["result"]["output"])
    assert stage["status"] == "publishing" and out.is_dir()  # in place, not recorded done
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=joined, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    stage = manifest["stages"]["merge"]
    assert stage["status"] == "done" and stage["result"]["resumed_shards"] == ["model-00001-of-00003.safetensors"]
    assert hashes(out) == hashes(Path(calm.output))
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]  # the staging moved into place
    assert [(e["stage"], e["kind"], e.get("shard")) for e in manifest["events"]] == [
        ("merge", "resumed_shard", "model-00001-of-00003.safetensors"), ("merge", "published_before_interruption", None)]
    resumed = [line for line in again.stderr.splitlines() if "kept: an earlier, interrupted run" in line]
    assert len(resumed) == 1 and "merge recall: shard model-00001-of-00003.safetensors kept" in resumed[0], again.stderr
    assert "stage merge: its output was moved into place by an interrupted run" in third.stderr, third.stderr

    # what the console showed: one line per stage (the first run's stages, then the rerun's merge)
    first, second = first_out.splitlines(), again.stdout.splitlines()
    for stage_line in ("finite check (NaN/Inf): 3/3 weight sets in", "reps_new: 16/16 samples in",
                       "typical (KMeans per layer): 3/3 layers in", "reps of base, e0: "):
        assert sum(line.startswith(stage_line) for line in first) == 1, (stage_line, first_out)
    assert sum(line.startswith("merge recall: 3/3 shards in") for line in second) == 1, again.stdout
    assert "per-layer merge weights:" in third.stdout and "stage timings:" in third.stdout
    assert len(third.stdout.splitlines()) < 40
    for err in (first_err, again.stderr, third.stderr):
        assert not [line for line in err.splitlines() if "logging_progress" in line or "Execution plan" in line
                    or " INFO recall_ray" in line or " INFO ray.data" in line or "core_worker" in line], err
    log = (tmp_path / "job" / "job.log").read_text()
    assert "stage reps_new: done" in log and "Execution plan of Dataset" in log
    assert "core_worker.cc" in log and "has constructor arguments in the object store" in log  # Ray's C++ line
