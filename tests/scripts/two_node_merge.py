"""Run the merge stage on a simulated two-node Ray cluster (ray.cluster_utils.Cluster) and
print, as JSON, where each shard was written and the sha256 of every output file.

Run as a subprocess by tests/test_merge_cluster.py: a Cluster is its own Ray runtime, and a
test session shares one runtime, so this one lives in its own process.
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main(model_dirs: list[str], weights_file: str, output: str, mode: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from recall_ray.cluster.merge import run_merge
    from recall_ray.core.merge_methods import MergeMethod
    from recall_ray.models import resolve_model
    from recall_ray.validate import check_models

    tmp = tempfile.mkdtemp(prefix="rr_cluster_", dir="/tmp")
    if mode == "two_nodes":
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": tmp,
                                                               "object_store_memory": 128 * 1024**2})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=128 * 1024**2)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
    else:
        cluster = None
        ray.init(num_cpus=2, object_store_memory=128 * 1024**2, _temp_dir=tmp, include_dashboard=False)
    try:
        models = [resolve_model(f"m{i}", d, model_dirs[0]) for i, d in enumerate(model_dirs)]
        ms = check_models(models)
        w = np.load(weights_file)
        report = run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), output, overwrite=False, num_actors=2,
                           placement="SPREAD" if mode == "two_nodes" else "PACK", side_dir=model_dirs[0])
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(output).iterdir())}
        print(json.dumps({"nodes": sorted({s["node_id"] for s in report.shards}), "hashes": hashes,
                          "num_nodes": len([n for n in ray.nodes() if n["Alive"]])}))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4])
