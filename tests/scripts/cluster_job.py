"""Run jobs/merge.py on a simulated three-node Ray cluster (a head with no CPUs and two
one-CPU workers, two_node_merge.three_node_cluster) and print, as JSON, the job's exit
status and the nodes that did its work.

    python tests/scripts/cluster_job.py <config.yaml>

Run as a subprocess by tests/test_object_storage.py: a Cluster is its own Ray runtime (the
test session shares one), and its nodes inherit this process's environment, the AWS_*
variables of the test S3 server included.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(config: str) -> None:
    import importlib.util

    import ray

    from two_node_merge import three_node_cluster

    repo = Path(__file__).resolve().parents[2]
    cluster = three_node_cluster(tempfile.mkdtemp(prefix="rr_cluster_", dir="/tmp"))
    os.environ["RAY_ADDRESS"] = cluster.address  # the job joins it (cluster.runtime.connect_ray)
    try:
        spec = importlib.util.spec_from_file_location("merge_job", repo / "jobs" / "merge.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        status = job.main(["--config", config])
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]] if ray.is_initialized() else []
        print(json.dumps({"status": status, "num_nodes": len(nodes)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
