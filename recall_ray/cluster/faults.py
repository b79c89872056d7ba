"""Test hooks that fail a process at a named point, once, when a test asks for it.

A test sets RECALL_RAY_FAULTS to a directory (before Ray starts, so that every worker
inherits it) and writes a marker file named after a point, holding the action:

    exit       the process exits at once (os._exit, no clean-up: as if killed)
    ENOSPC     an OSError "no space left on device" is raised there (likewise EROFS, EDQUOT)
    pause      a file `<point>.reached` is written and the process waits (up to 10 minutes)
               for the test to kill it, or its node

The first process to reach the point takes the marker (an atomic unlink), so a retried task
runs through. Without the variable, or without a marker, a point costs one environment lookup.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

ENV = "RECALL_RAY_FAULTS"


def fault_point(name: str) -> None:
    root = os.environ.get(ENV)
    if not root:
        return
    marker = Path(root) / name
    try:
        action = marker.read_text().strip() or "exit"
        marker.unlink()  # only one process takes it
    except FileNotFoundError:
        return
    (Path(root) / f"{name}.reached").write_text(str(os.getpid()))
    if action == "exit":
        os._exit(137)
    if action == "pause":
        time.sleep(600)
        os._exit(137)
    code = getattr(errno, action, None)
    if code is None:
        raise ValueError(f"fault marker {marker}: unknown action {action!r} (exit, pause, or an errno name)")
    raise OSError(code, f"{os.strerror(code)} (fault injected at {name})")
