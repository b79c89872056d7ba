"""What each job prints, run as a user runs it (its own process, joining the cluster's Ray as
under `ray job submit`, tiny models, a few steps): its progress lines and its result on the console, nothing of Ray's
or its workers' (their records and output go to the job's log file), and its working files
where its own arguments say. The merge job's console: tests/test_faults.py's driver test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DATA, REPO

# Lines a job must not print: Ray's C++ logger, Ray's Python loggers, workers' forwarded
# output, library warnings, INFO records.
FOREIGN = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\]|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s"
                     r"|\((\w+ )?pid=\d+|core_worker|Warning:|\bINFO\b")
# What a job may print on stderr: its own warnings, nothing else.
OWN_STDERR = re.compile(r"^\d\d:\d\d:\d\d (WARNING|ERROR) recall_ray\.")


def foreign(out: str, err: str) -> list[str]:
    return ([line for line in out.splitlines() if FOREIGN.search(line)]
            + [line for line in err.splitlines() if line.strip() and not OWN_STDERR.match(line)])


def start_job(job: str, *args: str, cwd: Path, join: str | None = None) -> subprocess.Popen:
    """The job in its own process: with its own local Ray, or joining the cluster at `join`
    (RAY_ADDRESS, as under `ray job submit`)."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rr_job_", dir="/tmp"),
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}  # a shared machine can take minutes to start it
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RECALL_RAY_FAULTS"):
        env.pop(var, None)
    if join is not None:
        env["RAY_ADDRESS"] = join
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_dir, tiny_experts, ray_session) -> dict[str, tuple[Path, Finished]]:
    """The jobs, each in its own process, one after the other, each joining the test session's
    Ray (RAY_ADDRESS, what a user of `ray job submit` sees). A job that starts its own local
    Ray prints through the same code (cluster.runtime.ray_runtime, cli.setup_logging): that
    console is tests/test_faults.py's driver test, the merge job's. Starting a local Ray per
    job here cost about 25 s of 2 CPUs each (133 s for these jobs, three of them with their
    own Ray), and side by side on the session's 2 CPUs the joined jobs' pools cannot start
    (Ray Data warns "Cluster resources are not enough" on the console)."""
    join = ray_session.get_runtime_context().gcs_address
    dirs = {name: tmp_path_factory.mktemp(f"job_{name}")
            for name in ("finetune", "evaluate", "train_adapters", "scenario", "select_settings")}
    ft = dirs["finetune"]
    cfg = {"base": str(tiny_dir), "out": str(dirs["train_adapters"] / "adapters"), "split": "train",
           "finetune": {"steps": 1, "batch_size": 2, "max_samples": 4, "max_length": 48, "r": 2},
           "tasks": {"sst2": {}}}
    (dirs["train_adapters"] / "adapters.yaml").write_text(json.dumps(cfg))
    # the single scenario (the expert with its base) of one expert, merged by the average, one test record
    scenario = {"scenario": "single", "run_dir": str(dirs["scenario"] / "run"), "base": str(tiny_dir),
                "data_dir": str(DATA), "tasks": ["sst2"], "experts": str(dirs["scenario"] / "experts"),
                "methods": ["average"],
                "evaluate": {"max_samples": 1, "batch_size": 4}}
    (dirs["scenario"] / "experts").mkdir()
    os.symlink(tiny_experts[0], dirs["scenario"] / "experts" / "sst2")
    (dirs["scenario"] / "scenario.yaml").write_text(json.dumps(scenario))
    # a selection of one parameter, one value of task arithmetic's lambda, on that scenario
    selection = {"scenario": str(dirs["scenario"] / "scenario.yaml"), "run_dir": str(dirs["select_settings"] / "run"),
                 "set": ["evaluate.max_samples=1"],
                 "parameters": [{"name": "lam", "methods": ["task_arithmetic"],
                                 "values": [{"baselines.lam": 0.5}]}]}
    (dirs["select_settings"] / "selection.yaml").write_text(json.dumps(selection))
    commands = {
        "finetune": ("finetune", "--base", str(tiny_dir), "--data", str(DATA / "sst2" / "train.jsonl"), "--template",
                     "sst2", "--out", str(ft / "adapters" / "mine"), "--set", "finetune.steps=2", "--set",
                     "finetune.batch_size=2", "--set", "finetune.max_samples=8", "--set", "finetune.max_length=48",
                     "--set", "finetune.r=2"),
        "evaluate": ("evaluate", "--base", str(tiny_dir), "--model", f"e0={tiny_experts[0]}", "--tasks", "sst2",
                     "--max-samples", "4", "--out", str(dirs["evaluate"] / "eval")),
        "train_adapters": ("train_adapters", "--config", str(dirs["train_adapters"] / "adapters.yaml"), "--run-dir",
                           str(dirs["train_adapters"] / "work")),
        "scenario": ("scenario", "--config", str(dirs["scenario"] / "scenario.yaml")),
        "select_settings": ("select_settings", "--config", str(dirs["select_settings"] / "selection.yaml")),
    }
    done = {}
    for name, command in commands.items():
        proc = start_job(*command, cwd=dirs[name], join=join)
        try:
            out, err = proc.communicate(timeout=600)  # read as it runs: a full pipe would block it
        finally:
            if proc.poll() is None:
                proc.kill()
        done[name] = (dirs[name], Finished(proc.returncode, out, err))
    return done


def test_finetune_job_console_and_working_files(jobs):
    tmp_path, proc = jobs["finetune"]
    out = tmp_path / "adapters" / "mine"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign(proc.stdout, proc.stderr) == [], proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("finetune sst2: 2/2 steps in ") and lines[1] == f"adapter written to {out}"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "recall_ray.json"]  # README.md: PEFT's card
    work = Path(f"{out}.run")  # its working files beside --out, none under runs/ of the working directory
    assert sorted(p.name for p in work.iterdir()) == ["job.log", "ray_train"]
    assert not (tmp_path / "runs").exists()
    assert "(RayTrainWorker pid=" in (work / "job.log").read_text()  # what the console did not show


def test_evaluate_job_console(jobs):
    tmp_path, proc = jobs["evaluate"]
    out = tmp_path / "eval"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign(proc.stdout, proc.stderr) == [], proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # one progress line when done, and before it one every 30 s of a slow machine (none on an idle one)
    progress = [line for line in lines if line.startswith("evaluate (1 models): ")]
    assert progress and re.match(r"evaluate \(1 models\): (\d+)/\1 rows in ", progress[-1]), proc.stdout
    assert all("ETA" in line for line in progress[:-1]) and len(lines) - len(progress) < 11, proc.stdout
    log = (out / "job.log").read_text()
    assert "core_worker.cc" in log and "has constructor arguments in the object store" in log  # Ray's line, here


def test_train_adapters_job_console_and_working_files(jobs):
    tmp_path, proc = jobs["train_adapters"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign(proc.stdout, proc.stderr) == [], proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("finetune sst2: 1/1 steps in ") and lines[1].startswith(
        f"sst2: adapter in {tmp_path / 'adapters' / 'sst2'} ("), proc.stdout
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["job.log", "ray_train"]


def test_scenario_job_console(jobs):
    tmp_path, proc = jobs["scenario"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign(proc.stdout, proc.stderr) == [], proc.stdout + proc.stderr
    assert re.search(r"^merge average: 1/1 shards in ", proc.stdout, re.M), proc.stdout
    assert "=== single scenario: primary metric per task" in proc.stdout, proc.stdout
    run = tmp_path / "run"
    # Ray's "Connecting to existing Ray cluster" records are not on the console (`foreign`): they
    # were, as warnings, before the join passed configure_logging=False
    assert (run / "table.md").is_file() and not (tmp_path / "runs").exists()


def test_select_settings_job_console(jobs):
    tmp_path, proc = jobs["select_settings"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign(proc.stdout, proc.stderr) == [], proc.stdout + proc.stderr
    assert proc.stdout.count("merge task_arithmetic: 1/1 shards in ") == 1, proc.stdout  # the one candidate
    assert "baselines.lam" in proc.stdout, proc.stdout  # the chosen setting, printed
    assert (tmp_path / "run" / "selected.yaml").is_file() and not (tmp_path / "runs").exists()
