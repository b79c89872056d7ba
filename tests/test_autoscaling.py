"""The job on an autoscaling cluster that starts with no workers: its pools are sized from
the config's targets and asked of the autoscaler, and the job completes on nodes that joined
for it (Ray's AutoscalingCluster, the fake multi-node provider, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from conftest import DATA, REPO


def _kill_session(marks: list[str]) -> None:
    """Every process of that cluster (never `ray stop`: it would stop every Ray here)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and any(m in line for m in marks):
                p.kill()
        except psutil.Error:
            pass


def test_job_grows_an_empty_autoscaling_cluster_and_completes(tmp_path, tiny_dir, tiny_experts):
    cfg = {"run_dir": str(tmp_path / "run"), "base": {"name": "base", "path": str(tiny_dir)},
           "experts": [{"name": "e0", "path": str(tiny_experts[0])}],
           "new_model": {"name": "new", "path": str(tiny_experts[1])},
           "task": {"name": "sst2", "data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 16},
           "typical": {"k": 2}, "representations": {"batch_size": 8, "num_actors": 1},
           "merge": {"num_actors": 1}}
    (tmp_path / "job.json").write_text(json.dumps(cfg))
    temp_dir = tempfile.mkdtemp(prefix="rr_as_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    session = None
    try:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "autoscaling_job.py"),
                               str(tmp_path / "job.json"), temp_dir], capture_output=True, text=True, timeout=500,
                              env=env, cwd=tmp_path)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        session = next((line["session"] for line in lines if "session" in line), None)
    finally:
        _kill_session([temp_dir] + ([session] if session else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = lines[-1]
    assert out["nodes_before"] == [{"cpus": 0}]  # the head alone, with no CPUs: nothing can run there
    assert len(out["nodes_after"]) >= 2  # worker nodes the autoscaler added for the job
    assert out["merge_nodes"] and out["head"] not in out["merge_nodes"]
    assert (tmp_path / "run" / "merged" / "model.safetensors.index.json").is_file()
