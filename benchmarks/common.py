"""What the paired benchmarks share: the environment of a local run, the model under test,
and the stage's own progress counts as timestamps (for its steady-state rate)."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def setup(model: str):
    """(model directory, ResolvedModel) of `model`, after the local-run environment."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from recall_ray.cli import setup_logging
    from recall_ray.io.models import resolve_model, resolve_path

    setup_logging(False)
    model_dir = resolve_path(model)
    return model_dir, resolve_model("m", model_dir, model_dir)


@contextmanager
def progress_marks() -> Iterator[list[tuple[float, int]]]:
    """(time, units) of every progress update the stages report inside the block."""
    import recall_ray.cluster.generation as generation
    import recall_ray.progress as progress

    marks: list[tuple[float, int]] = []
    real = progress.Progress

    class Timed(real):
        def update(self, n: int = 1) -> None:
            marks.append((time.perf_counter(), n))
            super().update(n)

    progress.Progress = generation.Progress = Timed
    try:
        yield marks
    finally:
        progress.Progress = generation.Progress = real


def steady_seconds(marks: list[tuple[float, int]], total: int) -> float | None:
    """Seconds for `total` units at the rate from the first answered batch to the last (the
    pool's start-up, its actor start and model load, left out). None when the answers came
    in fewer than three bursts, or the first burst held more than half of them: the pool
    answered in bulk and no rate can be read (take more samples)."""
    first_t = marks[0][0]
    first_n = sum(n for t, n in marks if t == first_t)
    rest = sum(n for _, n in marks) - first_n
    if len({t for t, _ in marks}) < 3 or first_n > total / 2:
        return None
    return (marks[-1][0] - first_t) * total / max(1, rest)
