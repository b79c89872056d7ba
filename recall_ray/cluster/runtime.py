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

import os
import socket
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
        ray.init(address=address)
        quiet_ray_data()
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
    return True


def quiet_ray_data() -> None:
    """Ray Data's console output becomes the job's: no progress bars or periodic progress
    dumps (the job prints one progress line per stage, recall_ray.progress), and its INFO
    records go to the job's log file (the root logger's file handlers) instead of the console."""
    import logging

    from ray.data import DataContext
    from ray.util.debug import log_once

    DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # its one-time "progress bars disabled" warning
    data_log = logging.getLogger("ray.data")
    for h in data_log.handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
    for h in logging.getLogger().handlers:  # propagate is off for ray.data: hand it the job's files
        if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
            if h not in data_log.handlers:
                data_log.addHandler(h)


@contextmanager
def ray_runtime(ray_cfg: RayConfig) -> Iterator[None]:
    """Join the cluster (or start local Ray) for the block; stop only a runtime started here
    (`ray.shutdown`, never `ray stop`, which would kill every Ray process on the machine)."""
    from . import pools

    started = connect_ray(ray_cfg)
    pools.AUTOSCALING = ray_cfg.autoscaler
    try:
        yield
    finally:
        pools.release_requests()
        pools.AUTOSCALING = False
        if started:
            import ray

            ray.shutdown()
            release_dashboard()


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
