"""What every job entry point (jobs/*.py) shares: logging, one-line errors, the Ray runtime."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .config import RayConfig


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("filelock", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(job: str, verbose: bool, body: Callable[[], Any]) -> tuple[int, Any]:
    """(0, body()) on success; otherwise one line `<job>: error: ...` on stderr (the traceback
    too with -v) and (1, None), or (130, None) when interrupted."""
    try:
        return 0, body()
    except KeyboardInterrupt:
        print(f"{job}: interrupted", file=sys.stderr)
        return 130, None
    except Exception as e:
        if verbose:
            logging.exception("%s failed", job)
        print(f"{job}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1, None


@contextmanager
def ray_runtime(ray_cfg: RayConfig) -> Iterator[None]:
    """Join the cluster (or start local Ray) for the block; stop only a runtime started here."""
    from .pipeline import connect_ray

    started = connect_ray(ray_cfg)
    try:
        yield
    finally:
        if started:
            import ray

            from .pipeline import release_dashboard

            ray.shutdown()
            release_dashboard()


def publish_step(job: str, verbose: bool, publish: Callable[[], list[str]], dest: str) -> int:
    """After a job: copy its published files into `dest`; 0, or the failure's exit status."""
    status, names = guarded(job, verbose, publish)
    if not status:
        print(f"published {', '.join(names)} to {dest}")
    return status
