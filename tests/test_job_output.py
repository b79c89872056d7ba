"""What a person running the job reads: one progress line per stage, the weight table and
the stage timings on the console; everything else (our records, Ray Data's) in the run
directory's job.log; nothing at all written for a bad input."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

from conftest import DATA, REPO


def test_progress_line_text():
    from recall_ray.progress import progress_text

    assert progress_text("reps_new", 50, 200, "samples", 10.0) == "reps_new: 50/200 samples (5.00/s, ETA 30s)"
    assert progress_text("reps_new", 200, 200, "samples", 100.0) == "reps_new: 200/200 samples in 1m40s (2.00/s)"
    assert progress_text("merge", 0, 3, "shards", 0.0) == "merge: 0/3 shards (0.00/s, ETA ?)"


def test_progress_prints_one_line_per_stage_when_not_a_terminal():
    from recall_ray.progress import Progress

    out = io.StringIO()
    p = Progress("typical", 31, "layers", stream=out, every_s=3600)
    for _ in range(31):
        p.update()
    p.close()  # a second close prints nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("typical: 31/31 layers in ")


def test_run_log_holds_records_until_the_run_directory_exists(tmp_path):
    from recall_ray.cli import RunLogHandler

    logger = logging.getLogger("recall_ray.test_run_log")
    logger.setLevel(logging.DEBUG)
    h = RunLogHandler()
    logger.addHandler(h)
    try:
        logger.debug("before the run directory")
        assert not list(tmp_path.iterdir())  # nothing written yet (a bad input would stop here)
        logger.info("run directory", extra={"run_dir": str(tmp_path)})
        logger.info("after")
    finally:
        logger.removeHandler(h)
        h.close()
    text = (tmp_path / "job.log").read_text()
    assert text.index("before the run directory") < text.index("run directory") < text.index("after")


def test_job_console_is_progress_table_and_timings(tmp_path, tiny_dir, tiny_experts):
    """The whole job in its own process and its own local Ray, as a user runs it: stdout is
    one line per stage and the summary, stderr holds no Ray Data progress dumps, and the
    run directory's job.log has the detail."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "base": {"name": "base", "path": str(tiny_dir)},
        "experts": [{"name": "e0", "path": str(tiny_experts[0])}],
        "new_model": {"name": "new", "path": str(tiny_experts[1])},
        "task": {"name": "sst2", "data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 24},
        "typical": {"k": 3},
        "representations": {"batch_size": 8},
        "ray": {"num_cpus": 2, "object_store_memory": 128 * 1024**2},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="rr_job_", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(tmp_path / "job.yaml")],
                              capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    for stage in ("finite check (NaN/Inf): 3/3 weight sets in", "reps_new: 24/24 samples in",
                  "typical (KMeans per layer): 3/3 layers in", "reps of base, e0: ", "merge recall: 1/1 shards in"):
        assert sum(line.startswith(stage) for line in out) == 1, (stage, proc.stdout)
    assert "per-layer merge weights:" in proc.stdout and "stage timings:" in proc.stdout
    assert len(out) < 40, proc.stdout
    err = proc.stderr.splitlines()
    # no Ray Data progress dumps or records, none of the job's own INFO records (they are in
    # job.log); what Ray's processes print themselves (a worker's notice at exit) may remain
    assert not [line for line in err if "logging_progress" in line or "Execution plan" in line
                or " INFO recall_ray" in line or " INFO ray.data" in line], proc.stderr
    log = (tmp_path / "run" / "job.log").read_text()
    assert "stage reps_new: done" in log and "Execution plan of Dataset" in log
