"""One progress line per stage for the person running a job: done/total, rate and ETA.

On a terminal the line is rewritten in place; otherwise (a log file, `ray job submit`) a
line is printed when the stage ends and at most every `every_s` seconds while it runs, so a
long stage still shows it is moving without flooding the output. The detail of each stage
goes to the job's log file (recall_ray.cli.setup_logging), not here.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("recall_ray.progress")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def progress_text(stage: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """`stage: done/total unit (rate/s, ETA t)`, or `... in t` once done."""
    rate = done / elapsed if elapsed > 0 else 0.0
    head = f"{stage}: {done}/{total} {unit}"
    if done >= total:
        return f"{head} in {_duration(elapsed)} ({rate:.2f}/s)"
    eta = _duration((total - done) / rate) if rate > 0 else "?"
    return f"{head} ({rate:.2f}/s, ETA {eta})"


class Progress:
    """Counts `total` units of one stage; `update(n)` as they complete, `close()` at the end."""

    enabled = True  # jobs print progress; library callers (tests) may turn it off

    def __init__(self, stage: str, total: int, unit: str, stream: TextIO | None = None, every_s: float = 30.0):
        self.stage, self.total, self.unit = stage, max(0, int(total)), unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + int(n))
        now = time.perf_counter()
        if self.done >= self.total:
            self.close()
        elif self.tty or now - self.last >= self.every_s:
            self.last = now
            self._show(end="")

    def _show(self, end: str) -> None:
        text = progress_text(self.stage, self.done, self.total, self.unit, time.perf_counter() - self.t0)
        log.debug(text)
        if not Progress.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._show(end="\n")
