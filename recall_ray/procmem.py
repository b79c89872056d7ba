"""This process's memory, as Linux reports it in /proc/self/status (the merge actors' and
the benchmarks' peak-memory figures).

The peak is VmHWM, the high-water mark of this process image's own resident set. Not
getrusage's ru_maxrss: Linux carries that across execve, so a process started by a large
parent (a benchmark that built its models before starting the measured run) would report
the parent's peak as its own. ru_maxrss is the fallback where /proc is missing."""

from __future__ import annotations

import resource


def status_mb(field: str) -> float | None:
    """A `kB` field of /proc/self/status (`VmHWM`, `RssAnon`, ...) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process image's peak resident set in MiB."""
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_anon_mb() -> float | None:
    """Anonymous resident memory (tensors, runtime; no file-backed pages) in MiB."""
    return status_mb("RssAnon")
