"""The peak-memory figure a process reports is its own, not its parent's."""

import subprocess
import sys

import numpy as np
import pytest


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_peak_grows_with_touched_memory():
    """In a fresh process: the peak (VmHWM) of the test process itself is whatever earlier tests
    made it, and would not grow for a block smaller than that."""
    code = ("import numpy as np; from recall_ray.procmem import peak_rss_mb, status_mb; "
            "before = peak_rss_mb(); block = np.ones(64 * 1024**2 // 8); after = peak_rss_mb(); "
            "print(before, after, status_mb('VmRSS'))")  # 64 MiB, every page touched
    before, after, rss = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                   check=True).stdout.split())
    assert after - before > 60, (before, after)
    assert rss <= after


def test_a_child_of_a_large_parent_reports_its_own_peak():
    """ru_maxrss survives execve on Linux: a child started by this process, while it holds
    a large block, would report at least the block. peak_rss_mb is the child's own."""
    block = np.ones(400 * 1024**2 // 8)  # 400 MiB touched here, in the parent
    code = ("import resource; from recall_ray.procmem import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, maxrss = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert maxrss > 400  # the inherited figure this module exists to avoid
    assert own < 200, own  # a bare interpreter and the module
    del block
