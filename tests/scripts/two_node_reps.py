"""Run the representation stage (a Ray Data actor pool) on a simulated cluster of two
worker nodes (ray.cluster_utils.Cluster) and remove the node whose actor reaches a paused
fault point (the marker is written by the test) while it holds a batch. Ray Data restarts
the actor on the other node from its constructor arguments, which it keeps in the object
store (the case Ray's core_worker.cc warns about: "has constructor arguments in the object
store and max_restarts > 0 ... the actor restart will fail" if they are lost). Prints, as
JSON, the sha256 of every Parquet part, the events (cluster.events) and the nodes left.

    python tests/scripts/two_node_reps.py MODEL_DIR OUT
"""

import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(model_dir: str, out: str) -> None:
    import ray

    from recall_ray.cluster.representations import extract
    from recall_ray.cluster.runtime import quiet_ray_data
    from recall_ray.core.templates import load_task_records
    from recall_ray.io.models import resolve_model
    from recall_ray.io.storage import RunDir
    from two_node_merge import remove_paused_node, three_node_cluster

    repo = Path(__file__).resolve().parents[2]
    tmp = tempfile.mkdtemp(prefix="rr_cluster_", dir="/tmp")
    cluster = three_node_cluster(tmp)  # one actor of 1 CPU fits either worker node
    ray.init(address=cluster.address, log_to_driver=False)
    quiet_ray_data()
    removed: list = []
    threading.Thread(target=remove_paused_node, args=(cluster, removed, "reps-*.reached"), daemon=True).start()
    try:
        model = resolve_model("m", model_dir, model_dir)
        records = load_task_records(str(repo / "data" / "sst2" / "train.jsonl"), "sst2", 24)
        items = [{"sample_idx": i, "sample_id": r["sample_id"], "text": r["prompt"] + r["target"]}
                 for i, r in enumerate(records)]
        events = extract([model], items, RunDir(out), ["reps/m"], max_length=48, exclude_first_token=False,
                         dtype="float32", batch_size=8, num_actors=1).events
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out, "reps", "m").iterdir())}
        print(json.dumps({"hashes": hashes, "events": events, "removed": removed,
                          "num_nodes": len([n for n in ray.nodes() if n["Alive"]])}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
