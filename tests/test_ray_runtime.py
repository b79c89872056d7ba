"""The local Ray runtime a job starts for itself (pipeline.connect_ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

SCRIPT = textwrap.dedent("""
    import ray
    from recall_ray.config import RayConfig
    from recall_ray.cluster.runtime import connect_ray

    assert connect_ray(RayConfig(num_cpus=1, object_store_memory=128 * 1024**2))

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

        def niceness(self):
            import os

            return os.nice(0)

        def state_of(self, actor_id):
            # what Ray Train's placement-group cleaner asks about its controller, from a worker
            from ray.util.state import get_actor

            found = get_actor(actor_id, timeout=20)
            return found.state if found else None

    a, b = Probe.remote(), Probe.remote()
    ray.get([a.ping.remote(), b.ping.remote()])
    print("STATE", ray.get(b.state_of.remote(a._actor_id.hex())))
    print("NICE", ray.get(a.niceness.remote()))
    ray.shutdown()
""")


def test_workers_ask_their_own_runtime_about_actors_beside_another_ray(ray_session):
    """With a second Ray instance on the machine (here the test session's), a worker of a
    job's local runtime must still see its own live actors through the state API: Ray
    Train's placement-group cleaner removes a fine-tune's workers when it hears that the
    run's controller is not alive, which an auto-detected cluster address got wrong."""
    ray_tmp = tempfile.mkdtemp(prefix="rr_rt_", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STATE ALIVE" in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])
    assert "NICE 0" in out.stdout  # the job's workers run at its own priority, not Ray's default 15


def test_release_dashboard_puts_back_the_api_server_address(monkeypatch):
    """A runtime's dashboard address must not outlive it in the process's environment:
    Ray's state and job clients prefer RAY_API_SERVER_ADDRESS over any other address."""
    from recall_ray.cluster.runtime import own_dashboard, release_dashboard

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")
    port = own_dashboard()["dashboard_port"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    release_dashboard()
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    own_dashboard()
    release_dashboard()
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    release_dashboard()  # nothing left to put back: a no-op
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
