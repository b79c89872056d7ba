"""How many actors a pool gets and what each asks for: the one sizing rule for every actor
pool of the project (representations, generation, merge).

On a cluster that grows on request (`ray.autoscaler: true`: KubeRay's in-tree autoscaler, the
cluster launcher), a number in the config (`num_actors: 8`) is a target: the pool has that
many actors whatever is up when it starts, and `request_pool` asks the autoscaler for all of
them at once, so a cluster that starts with no workers grows for the job instead of the pool
being sized from the empty cluster. Elsewhere, and with `auto`, pools are sized from the
cluster's resources at that moment (a fixed machine never waits for CPUs that cannot come).

On a machine without GPUs a pool must never take every CPU: Ray Data's read tasks need one
too, and a pool that holds them all hangs (seen on 2 cores).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("recall_ray.pools")


@dataclass(frozen=True)
class PoolShape:
    size: int  # actors
    num_cpus: float  # logical CPUs each actor asks for
    num_gpus: int  # GPUs each actor asks for
    threads: int | None  # torch threads per actor (None: torch's default, on GPU actors)


# Set by cluster.runtime from the config's `ray.autoscaler`: the cluster grows on request.
AUTOSCALING = False


def inference_pool(cluster: dict[str, float], requested: int | str, num_items: int,
                   use_gpu: bool | None = None) -> PoolShape:
    """A Ray Data pool of model actors: one GPU per actor when GPUs exist (or `use_gpu`);
    otherwise CPU actors that leave at least one CPU free and share the cores as torch
    threads. On an autoscaling cluster (`AUTOSCALING`) a numeric target larger than what is
    up now gives each actor one GPU (`use_gpu`, or GPUs seen) or one CPU, which the
    autoscaler then provides."""
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 0))
    if AUTOSCALING and requested != "auto":
        size = max(1, min(int(requested), num_items))
        if use_gpu or gpus:
            if size > gpus:  # GPUs still to come
                return PoolShape(size, 1.0, 1, None)
        elif cpus < size + 1:  # CPUs still to come; one stays free for the read tasks
            return PoolShape(size, 1.0, 0, 1)
    cpus = max(cpus, 1.0)
    if gpus > 0:
        size = max(1, min(gpus if requested == "auto" else min(int(requested), gpus), num_items))
        # At most one CPU per GPU actor, and never every CPU: read tasks need one too.
        return PoolShape(size, min(1.0, max(0.5, cpus - 1.0) / size), 1, None)
    if requested == "auto":
        size = max(1, int(cpus // 4)) if cpus >= 8 else 1
    else:
        size = int(requested)
    size = max(1, min(size, num_items))
    per_actor = max(0.5, cpus - 1.0) / size  # logical CPUs; one stays free for read tasks
    # torch threads: the actor's share of the cores (on 2 cores, one actor uses both).
    return PoolShape(size, per_actor, 0, max(1, int(math.floor(cpus / size))))


def merge_pool(cluster: dict[str, float], requested: int | str, num_groups: int) -> PoolShape:
    """Merge actors: half a CPU each in the placement group (the work is reading and
    adding), at most one per layer group; `auto` leaves one CPU to the driver on nodes with
    more than two. Each actor runs torch on its share of the cluster's cores (the
    elementwise sums are memory-bound but still gain from a second thread)."""
    cpus = int(cluster.get("CPU", 1))
    if requested != "auto":
        size = max(1, min(int(requested), num_groups))
    else:
        size = max(1, min(num_groups, cpus - 1 if cpus > 2 else 1))
    return PoolShape(size, 0.5, 0, max(1, cpus // size))


def request_pool(shape: PoolShape) -> None:
    """On an autoscaling cluster, ask for a whole pool at once: one bundle per actor, a hint
    that persists until `release_requests`."""
    if AUTOSCALING:
        bundle = {"CPU": shape.num_cpus, **({"GPU": float(shape.num_gpus)} if shape.num_gpus else {})}
        _request([bundle] * shape.size)


def release_requests() -> None:
    """Withdraw the job's requests, so that the autoscaler may remove idle workers."""
    if AUTOSCALING:
        _request([])


def _request(bundles: list[dict]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # no autoscaler to ask (a local runtime): the pool starts as it can
        log.debug("no autoscaler request (%s: %s)", type(e).__name__, e)
