"""The local Ray runtime a job starts for itself (pipeline.connect_ray)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

SCRIPT = textwrap.dedent("""
    import ray
    from recall_ray.config import RayConfig
    from recall_ray.pipeline import connect_ray

    assert connect_ray(RayConfig(num_cpus=1, object_store_memory=128 * 1024**2))

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

        def state_of(self, actor_id):
            # what Ray Train's placement-group cleaner asks about its controller, from a worker
            from ray.util.state import get_actor

            found = get_actor(actor_id, timeout=20)
            return found.state if found else None

    a, b = Probe.remote(), Probe.remote()
    ray.get([a.ping.remote(), b.ping.remote()])
    print("STATE", ray.get(b.state_of.remote(a._actor_id.hex())))
    ray.shutdown()
""")


def test_workers_ask_their_own_runtime_about_actors_beside_another_ray(ray_session):
    """With a second Ray instance on the machine (here the test session's), a worker of a
    job's local runtime must still see its own live actors through the state API: Ray
    Train's placement-group cleaner removes a fine-tune's workers when it hears that the
    run's controller is not alive, which an auto-detected cluster address got wrong."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rr_rt_", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STATE ALIVE" in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])
