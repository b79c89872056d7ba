"""The RECALL job on an autoscaling cluster that starts with no worker nodes: Ray's own
AutoscalingCluster (the fake multi-node provider: its "nodes" are raylets on this machine)
with a head that has no CPUs, so every task and actor of the job runs on workers the
autoscaler adds for it. Prints, as JSON, the nodes before and after and where the merge ran.

Run as a subprocess by tests/test_autoscaling.py. Ray's AutoscalingCluster.start() runs
`ray stop --force` (which would stop every Ray on the machine, the test session's included)
and reads a config file the wheel does not ship, so this subclass writes its own config and
starts the head on a private port and temp dir; the test kills exactly its processes after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cluster(temp_dir: str, port: int):
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class PrivateAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            ip = ray._private.services.get_node_ip_address()
            return {
                "cluster_name": "fake_multinode", "max_workers": 4, "upscaling_speed": 1.0,
                "idle_timeout_minutes": 5,
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                             "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
                "available_node_types": {**worker_node_types, "ray.head.default": {
                    "resources": head_resources, "node_config": {}, "max_workers": 0}},
                "head_node_type": "ray.head.default", "auth": {}, "docker": {},
                **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")},
                "file_mounts": {}, "file_mounts_sync_continuously": False,
            }

        def start(self, _system_config=None, override_env=None):
            fd, path = tempfile.mkstemp(prefix="rr_autoscaling_", suffix=".json", dir=temp_dir)
            os.close(fd)
            Path(path).write_text(json.dumps(self._config))
            env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                   "RAY_TMPDIR": temp_dir}
            subprocess.check_call(["ray", "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                                   f"--autoscaling-config={path}", "--num-cpus=0",
                                   "--object-store-memory=100000000", "--include-dashboard=false",
                                   "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL)

    return PrivateAutoscalingCluster(
        head_resources={"CPU": 0},
        worker_node_types={"cpu_node": {"resources": {"CPU": 2, "object_store_memory": 150 * 1024**2},
                                        "node_config": {}, "min_workers": 0, "max_workers": 2}})


def main(config_file: str, temp_dir: str) -> None:
    import ray

    from recall_ray.cluster.runtime import ray_runtime
    from recall_ray.config import load_config
    from recall_ray.pipeline import preflight, run_pipeline

    port = free_port()
    make_cluster(temp_dir, port).start()
    cfg = load_config(config_file, [f"ray.address=127.0.0.1:{port}", "ray.autoscaler=true"])
    plan = preflight(cfg)
    with ray_runtime(cfg.ray):
        before = [n for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"session": ray._private.worker._global_node.session_name}), flush=True)
        result = run_pipeline(cfg, plan)
        manifest = json.loads(Path(cfg.run_dir, "manifest.json").read_text())
        after = [n for n in ray.nodes() if n["Alive"]]
        print(json.dumps({
            "nodes_before": [{"cpus": n["Resources"].get("CPU", 0)} for n in before],
            "nodes_after": [{"cpus": n["Resources"].get("CPU", 0), "id": n["NodeID"]} for n in after],
            "merge_nodes": sorted({s["node_id"] for s in manifest["stages"]["merge"]["result"]["shards"]}),
            "head": next(n["NodeID"] for n in after if n["Resources"].get("CPU", 0) == 0),
            "output": result.output,
        }), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1], sys.argv[2])
