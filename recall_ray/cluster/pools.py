"""How many actors a pool gets and what each asks for, from the cluster's resources: the
one sizing rule for every actor pool of the project (representations, generation, merge).

On a machine without GPUs a pool must never take every CPU: Ray Data's read and write
tasks need one too, and a pool that holds them all hangs (seen on 2 cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolShape:
    size: int  # actors
    num_cpus: float  # logical CPUs each actor asks for
    num_gpus: int  # GPUs each actor asks for
    threads: int | None  # torch threads per actor (None: torch's default, on GPU actors)


def inference_pool(cluster: dict[str, float], requested: int | str, num_items: int) -> PoolShape:
    """A Ray Data pool of model actors: one GPU per actor when GPUs exist; otherwise CPU
    actors that leave at least one CPU free and share the cores as torch threads."""
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
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
    """Merge actors: half a CPU each (the work is reading and writing), at most one per
    layer group; `auto` leaves one CPU to the driver on nodes with more than two."""
    if requested != "auto":
        size = max(1, min(int(requested), num_groups))
    else:
        cpus = int(cluster.get("CPU", 1))
        size = max(1, min(num_groups, cpus - 1 if cpus > 2 else 1))
    return PoolShape(size, 0.5, 0, 1)
