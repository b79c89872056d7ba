"""The run manifest: config, input fingerprints, library versions, and per-stage status,
key and timing. A stage whose key (a hash of its inputs and settings) matches a finished
run, and whose outputs still exist, is skipped: a rerun after a failure resumes."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from dataclasses import dataclass
from typing import Any, Callable

from .io.storage import RunDir, filesystem

log = logging.getLogger("recall_ray.manifest")

LIBRARIES = ("recall-ray", "torch", "transformers", "peft", "ray", "safetensors", "scikit-learn", "numpy", "pyarrow")


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def _exists(path: str) -> bool:
    from pyarrow.fs import FileType

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != FileType.NotFound


@dataclass(frozen=True)
class StageRun:
    """What `Manifest.run` did: the stage's key (for the keys of the stages downstream of
    it), its result (recorded in the manifest), and whether it was reused."""

    key: str
    result: Any
    skipped: bool


def stage_complete(stage: dict) -> bool:
    """Whether a recorded stage finished: `done`, or `publishing` (its result recorded just
    before its output was moved into place, see Manifest.publishing) with that move made:
    the staging directory gone and every output there. A process killed between the move
    and the record leaves the second."""
    status = stage.get("status")
    if status == "publishing":
        return not _exists(stage["staging"]) and all(_exists(o) for o in stage.get("outputs", []))
    return status == "done"


def recorded_stages(run_dir: str) -> dict[str, dict]:
    """The stages an existing run directory's manifest records, read without creating
    anything ({} when there is no manifest): for checks that must leave no trace."""
    fs, root = filesystem(run_dir)
    path = f"{root.rstrip('/')}/{Manifest.FILE}"
    from pyarrow.fs import FileType

    if fs.get_file_info(path).type != FileType.File:
        return {}
    with fs.open_input_stream(path) as f:
        return json.loads(f.read()).get("stages", {})


class Manifest:
    FILE = "manifest.json"

    def __init__(self, run_dir: RunDir, config: dict):
        self.run_dir = run_dir
        old = json.loads(run_dir.read_text(self.FILE)) if run_dir.exists(self.FILE) else {}
        self.data: dict = {
            "config": config,
            "versions": library_versions(),
            "inputs": old.get("inputs", {}),
            "stages": old.get("stages", {}),
            "events": old.get("events", []),
            "created": old.get("created", _now()),
        }
        self.timings: dict[str, dict] = {}  # this run only: seconds and whether skipped
        self.save()
        # the job's log (cli.RunLogHandler) goes here from now on
        log.info("run directory %s", run_dir.root, extra={"run_dir": run_dir.root})

    def save(self) -> None:
        self.data["updated"] = _now()
        self.run_dir.write_json(self.FILE, self.data)

    def record_inputs(self, inputs: dict[str, Any]) -> None:
        self.data["inputs"].update(inputs)
        self.save()

    def done(self, name: str, key: str) -> bool:
        s = self.data["stages"].get(name)
        return bool(s and stage_complete(s) and s.get("key") == key and all(_exists(o) for o in s.get("outputs", [])))

    def publishing(self, name: str, result: Any, staging: str) -> None:
        """Record a running stage's result just before its output is moved into place from
        `staging`: if the process dies between the move and `run` recording the stage done,
        a rerun finds the output there and the staging gone, and takes the stage as done
        (`stage_complete`) instead of refusing an output it does not know."""
        self.data["stages"][name].update(status="publishing", result=result, staging=staging)
        self.save()

    def record(self, name: str, key_parts: Any, seconds: float, reused: bool, result: Any = None) -> StageRun:
        """Record a stage that ran before this manifest existed (an input check that must
        leave no trace when it fails), with the seconds it took."""
        key = stable_hash(key_parts)
        if not reused:
            self.data["stages"][name] = {"status": "done", "key": key, "finished": _now(), "outputs": [],
                                         "seconds": round(seconds, 3), "result": result}
            self.save()
        self.timings[name] = {"seconds": seconds, "skipped": reused}
        return StageRun(key, result, reused)

    def run(self, name: str, key_parts: Any, outputs: list[str], fn: Callable[[], Any]) -> StageRun:
        """Run `fn` unless the stage is done with the same key; record status and timing.
        `key_parts` may be a function, called once `fn` has run: for a stage that nothing
        recorded can match (a new run directory), whose key needs what its own work reads."""
        later = callable(key_parts)
        key = None if later else stable_hash(key_parts)
        if not later and self.done(name, key):
            stage = self.data["stages"][name]
            if stage["status"] == "publishing":  # published by a run that stopped before recording it
                log.warning("stage %s: its output was moved into place by an interrupted run (%s); recorded as"
                            " done now", name, ", ".join(outputs))
                stage.update(status="done", finished=_now())
                stage.pop("staging", None)
                result = stage.get("result")
                self._add_events(name, [*((result.get("events") or []) if isinstance(result, dict) else []),
                                        {"kind": "published_before_interruption", "outputs": outputs}])
                self.save()
            log.info("stage %s: inputs unchanged, reusing %s", name, ", ".join(outputs) or "its result")
            self.timings[name] = {"seconds": 0.0, "skipped": True}
            return StageRun(key, self.data["stages"][name].get("result"), True)
        self.data["stages"][name] = {"status": "running", "key": key, "started": _now(), "outputs": outputs}
        self.save()
        t0 = time.perf_counter()
        try:
            result = fn()
        except BaseException as e:
            self.data["stages"][name].update(status="failed", error=f"{type(e).__name__}: {e}"[:2000], finished=_now())
            self.save()
            raise
        seconds = time.perf_counter() - t0
        if later:
            key = stable_hash(key_parts())
        self.data["stages"][name].update(status="done", key=key, finished=_now(), seconds=round(seconds, 3),
                                         result=result)
        self.data["stages"][name].pop("staging", None)
        if isinstance(result, dict):
            self._add_events(name, result.get("events") or [])
        self.save()
        self.timings[name] = {"seconds": seconds, "skipped": False}
        log.info("stage %s: done in %.1fs", name, seconds)
        return StageRun(key, result, False)


    def _add_events(self, stage: str, events: list[dict]) -> None:
        """The run's list of what it survived (actor restarts, retries, resumed work), with
        the stage and the time it was recorded: `events` in manifest.json."""
        self.data["events"].extend({"stage": stage, "recorded": _now(), **e} for e in events)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
