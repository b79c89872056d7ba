"""The Ray runtime of a job: join a cluster (`ray job submit`, RAY_ADDRESS, or the config's
address) or start a private local one, and give it back when the job ends. Every job
(jobs/*.py) and the test session start Ray through here.

A local runtime gets its own dashboard on a free port of 127.0.0.1 and the job's processes
are pointed at it (`own_dashboard`): Ray Train's placement-group cleaner asks the state API,
from inside the cluster, every second whether the run's controller is alive, and removes
the workers' placement group when told it is not. Left to find "the" local cluster
itself, it fails without a dashboard and, with another Ray instance on the machine (a test
suite, a second job), can ask that one, hear "no such actor" and kill a healthy fine-tune
(seen after 15 min of training here).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from ..config import RayConfig

_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_replaced_api_server: list[str | None] = []  # what each own_dashboard() call replaced


def connect_ray(ray_cfg: RayConfig) -> bool:
    """Join a cluster (config address or RAY_ADDRESS, as under `ray job submit`) or start a
    local runtime. Returns True when this process started Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # configure_logging=False: Ray's own INFO records ("Connecting to existing Ray cluster
        # ...") go through the job's logging like ours (the console shows warnings), not to
        # the console through a handler of Ray's
        ray.init(address=address, configure_logging=False)
        quiet_ray_data()
        worker_output_to_log()
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a laptop run needs no token auth
    # Ray starts its workers at niceness 15, so any other busy process on the machine takes
    # their cores: beside one, an actor ran at half a bare loop's speed (its second torch
    # thread starved). The job's workers are the job: they run at its own priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # address="local": a new instance, never someone else's `ray start` cluster on this host.
    ray.init(address="local", num_cpus=ray_cfg.num_cpus, object_store_memory=ray_cfg.object_store_memory,
             configure_logging=False, **own_dashboard())
    quiet_ray_data()
    worker_output_to_log()
    return True


worker_log = logging.getLogger("recall_ray.ray_workers")  # not under "ray": its records do not propagate


def worker_output_to_log() -> None:
    """What Ray's workers and actors print (Ray Train's controller and worker ranks, a
    library's warning in an actor) goes to the job's log as `(<actor> pid=N) line` records,
    not to the console: the job's console shows its own progress lines, warnings and
    summary. Ray forwards the workers' output to the driver through one dispatcher; its
    console printer is swapped for ours."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")  # Ray's: prints every line on the driver's console
    dispatcher.remove_handler("recall_ray_worker_log")
    dispatcher.add_handler("recall_ray_worker_log", _worker_lines)


def _worker_lines(data: dict) -> None:
    from ray._private.worker import filter_autoscaler_events

    lines = data.get("lines") or []
    if data.get("pid") == "autoscaler":  # its status report every few seconds: only its events, as Ray prints
        lines = filter_autoscaler_events(lines)
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{', ip=' + data['ip'] if data.get('ip') else ''})"
    for line in lines:
        worker_log.info("%s %s", prefix, line)


def quiet_ray_data() -> None:
    """Ray's console output becomes the job's: no Ray Data progress bars or periodic progress
    dumps (the job prints one progress line per stage, recall_ray.progress), and the INFO
    records of Ray's Python loggers (Ray Data's execution, Ray Train's run) go to the job's
    log file (the root logger's other handlers) instead of the console, which keeps their
    warnings."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # its one-time "progress bars disabled" warning
    for name in ("ray", "ray.data"):  # propagate is off for both: hand them the job's files
        ray_log = logging.getLogger(name)
        for h in ray_log.handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
        for h in logging.getLogger().handlers:
            if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
                if h not in ray_log.handlers:
                    ray_log.addHandler(h)


@contextmanager
def ray_runtime(ray_cfg: RayConfig) -> Iterator[None]:
    """Join the cluster (or start local Ray) for the block; stop only a runtime started here
    (`ray.shutdown`, never `ray stop`, which would kill every Ray process on the machine).
    While it is up, the C++ log lines of Ray's core worker go to the job's log, not the
    console (`native_stderr_to_log`)."""
    import ray

    from . import pools

    with native_stderr_to_log(enabled=not ray.is_initialized()):
        started = connect_ray(ray_cfg)
        pools.AUTOSCALING = ray_cfg.autoscaler
        try:
            yield
        finally:
            pools.release_requests()
            pools.AUTOSCALING = False
            if started:
                ray.shutdown()
                release_dashboard()


# `[2026-12-03 13:53:28,642 E 6582 6582] core_worker.cc:2465: ...`: a line of Ray's C++ logger
_NATIVE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ ([DIWEF]) \d+ \d+\] (.*)$")
# What Ray's core worker says of every Ray Data pool actor (its constructor arguments are refs
# the driver holds for the whole stage, in its own node's object store); measured harmless by
# tests/test_faults.py::test_a_worker_node_lost_during_the_representations.
_CTOR_ARGS = "has constructor arguments in the object store and max_restarts > 0"
native_log = logging.getLogger("recall_ray.ray_native")


def native_line(line: str) -> None:
    """One line the process's native code wrote to its stderr, as a record: Ray's C++ log
    lines at INFO (job.log only) unless fatal (F: ERROR, on the console too); a line that is
    not Ray's (another library's native warning) stays on the console as a WARNING."""
    line = line.rstrip("\n")
    if not line.strip():
        return
    m = _NATIVE_LINE.match(line)
    if m is None:
        native_log.warning("%s", line)
    elif m.group(1) == "F":
        native_log.error("%s", line)
    elif _CTOR_ARGS in m.group(2):
        native_log.info("%s (expected for Ray Data actor pools: the driver holds those arguments for the whole"
                        " stage, and a restarted actor gets them; see README 'What survives what')", line)
    else:
        native_log.info("%s", line)


@contextmanager
def native_stderr_to_log(enabled: bool = True) -> Iterator[None]:
    """Route what native code writes to file descriptor 2 through `native_line` (so into
    the job's log) for the block, while Python's own stderr (warnings, progress, the error
    line) still reaches the console.

    Ray's C++ core worker in the driver writes its ERROR-level lines straight to fd 2, and
    says of every Ray Data pool actor "has constructor arguments in the object store and
    max_restarts > 0 ... the actor restart will fail": Ray's general caution (issue 53727),
    which Ray Data's own pools always meet, not a failure of the job (see `_CTOR_ARGS`). fd 2
    becomes a pipe read by a thread; sys.stderr and the logging handlers that wrote to it
    move to a duplicate of the console's descriptor; all is put back at the end."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    console_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    old = sys.stderr
    console = os.fdopen(console_fd, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                        errors="backslashreplace")
    moved = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
             and not isinstance(h, logging.FileHandler) and getattr(h, "stream", None) is old]
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = console
    for h in moved:
        h.setStream(console)

    def forward() -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="backslashreplace") as pipe:
            for line in pipe:
                native_line(line)

    reader = threading.Thread(target=forward, name="native-stderr", daemon=True)
    reader.start()
    try:
        yield
    finally:
        os.dup2(console_fd, 2)  # the pipe's last writer closed: the reader sees its end
        reader.join(timeout=5)
        for h in moved:
            h.setStream(old)
        sys.stderr = old
        console.close()


def own_dashboard() -> dict:
    """ray.init arguments for a local runtime whose processes ask their own dashboard: a free
    port of 127.0.0.1, named by RAY_API_SERVER_ADDRESS in this process's environment, which
    the raylet and every worker inherit. Call it just before `ray.init`, and
    `release_dashboard` after `ray.shutdown`."""
    port = _free_port()
    _replaced_api_server.append(os.environ.get(_API_SERVER_ENV))
    os.environ[_API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def release_dashboard() -> None:
    """After `ray.shutdown` of a runtime started with `own_dashboard`: put back the
    RAY_API_SERVER_ADDRESS it replaced, so that Ray clients of this process (the state API,
    a later cluster join) do not ask a dashboard that no longer exists."""
    if _replaced_api_server:
        previous = _replaced_api_server.pop()
        if previous is None:
            os.environ.pop(_API_SERVER_ENV, None)
        else:
            os.environ[_API_SERVER_ENV] = previous


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
