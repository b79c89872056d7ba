"""Run the merge stage on a simulated two-node Ray cluster (ray.cluster_utils.Cluster) and
print, as JSON, where each shard was written and the sha256 of every output file.

Modes: two_nodes, one_node, and lose_node: two worker nodes, and the one whose merge actor
reaches a paused fault point (recall_ray.cluster.faults; the marker is written by the test)
is removed from the cluster while it merges; the merge must finish on the other node.

Run as a subprocess by tests/test_merge_cluster.py and tests/test_faults.py: a Cluster is its
own Ray runtime, and a test session shares one runtime, so this one lives in its own process.
"""

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def three_node_cluster(tmp: str):
    """A simulated cluster on this machine: a head with no CPUs (so every task and actor
    runs on a worker) and two worker nodes of one CPU each, its own Ray runtime."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    # Cluster.add_node writes the head's address to <default temp dir>/ray_current_cluster
    # whatever temp_dir it was given, and fails on a fresh machine where no Ray ever made that
    # directory (a test run alone there, before anything else started Ray).
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": tmp,
                                                           "object_store_memory": 128 * 1024**2})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=128 * 1024**2)
    cluster.wait_for_nodes()
    return cluster


def main(model_dirs: list[str], weights_file: str, output: str, mode: str, one_shard_per_group: bool) -> None:
    import ray

    from recall_ray.cluster.merge import run_merge
    from recall_ray.core.merge_methods import MergeMethod
    from recall_ray.io.models import resolve_model
    from recall_ray.validate import check_models

    tmp = tempfile.mkdtemp(prefix="rr_cluster_", dir="/tmp")
    if mode in ("two_nodes", "lose_node"):
        cluster = three_node_cluster(tmp)
        ray.init(address=cluster.address)
    else:
        cluster = None
        ray.init(num_cpus=2, object_store_memory=128 * 1024**2, _temp_dir=tmp, include_dashboard=False)
    removed = []
    if mode == "lose_node":
        threading.Thread(target=remove_paused_node, args=(cluster, removed), daemon=True).start()
    try:
        models = [resolve_model(f"m{i}", d, model_dirs[0]) for i, d in enumerate(model_dirs)]
        ms = check_models(models)
        w = np.load(weights_file)
        report = run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), output, overwrite=False,
                           num_actors=2, placement="PACK" if mode == "one_node" else "SPREAD",
                           side_dir=model_dirs[0], max_shard_bytes=1 if one_shard_per_group else 2 * 1024**3)
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(output).iterdir())}
        print(json.dumps({"nodes": sorted({s["node_id"] for s in report.shards}), "hashes": hashes,
                          "events": report.events,
                          "num_nodes": len([n for n in ray.nodes() if n["Alive"]]), "removed": removed}))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def remove_paused_node(cluster, removed: list, pattern: str = "merge-shard-*.reached") -> None:
    """Wait for an actor to reach the paused fault point (a merge actor's, or `pattern`),
    then remove its node."""
    import psutil

    faults = Path(os.environ["RECALL_RAY_FAULTS"])
    deadline = time.time() + 300
    while time.time() < deadline:
        reached = list(faults.glob(pattern))
        if reached:
            pid = int(reached[0].read_text())
            parents = {p.pid for p in psutil.Process(pid).parents()}
            for node in cluster.worker_nodes:
                raylet = node.all_processes["raylet"][0].process.pid
                if raylet in parents:
                    cluster.remove_node(node)
                    removed.append(reached[0].name)
                    return
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:] == ["one_shard_per_group"])
