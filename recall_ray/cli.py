"""What every job entry point (jobs/*.py) shares: this checkout's package, logging, one-line
errors, the publish step. The Ray runtime is recall_ray.cluster.runtime.ray_runtime."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

# Exit statuses: bad input (config, data, models, an existing output) is found before any
# work and exits 2; a failure in the work itself exits 1; an interrupt 130.
BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130


def pin_checkout(repo: Path) -> None:
    """Make this checkout's recall_ray the one the job and its local Ray workers import.

    A job runs as `python jobs/x.py`, so Python puts jobs/ (not the checkout) on sys.path and
    would import whichever recall_ray pip installed, perhaps another clone's. The job puts
    its checkout first on sys.path before importing recall_ray; this checks it worked and
    puts the checkout on PYTHONPATH, which the workers of a local Ray runtime inherit. (On
    a cluster, `ray job submit --working-dir .` ships the checkout to every worker.)"""
    import recall_ray

    here = Path(recall_ray.__file__).resolve().parent
    if here != repo.resolve() / "recall_ray":
        raise ImportError(f"this job belongs to {repo} but imported recall_ray from {here}: run it in a fresh process")
    paths = [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(repo)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE = "job.log"


class RunLogHandler(logging.Handler):
    """Every record of the job, in `<run_dir>/job.log`. The run directory is not known (nor
    created) when the job starts, and must not be created for a bad input: records are held
    in memory until a record carries `run_dir` (the manifest logs one when it creates the
    run directory), then written there, with everything after. The first run directory
    announced wins (a study's, not those of the RECALL runs nested in it). A URI run
    directory gets its log when the job ends."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self.held: list[str] = []
        self.path: str | None = None
        self.file = None
        self.uploaded = 0  # records of `held` already in a URI run directory's log

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.INFO and record.name.split(".")[0] == "ray":
            return  # Ray's own debug records (a scheduling report a second) would be most of the file
        try:
            line = self.format(record) + "\n"
        except Exception:  # a record that cannot be formatted must not stop the job
            return
        run_dir = getattr(record, "run_dir", None)
        if self.path is None and run_dir:
            self.path = f"{str(run_dir).rstrip('/')}/{LOG_FILE}"
            if "://" not in self.path:
                self.file = open(self.path, "a", encoding="utf-8")
                self.file.writelines(self.held)
                self.held = []
            else:
                # uploaded when the job ends (guarded) and, for records that come after, when
                # the process ends: registered now, after pyarrow's own exit hook that shuts its
                # S3 client down, so that it runs first (atexit runs in reverse); logging's
                # shutdown, which would close this handler, runs after both
                import atexit

                atexit.register(self.upload)
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        else:
            self.held.append(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        else:
            self.upload()
        super().close()

    def upload(self) -> None:
        """A URI run directory's log: every record so far, written whole (an object store
        cannot append), when the job ends and again at exit if records came after. A log
        that cannot be written is said in one line: the job's own outcome stands."""
        if self.path is None or "://" not in self.path or len(self.held) == self.uploaded:
            return
        from .io.storage import filesystem

        try:
            fs, path = filesystem(self.path)
            with fs.open_output_stream(path) as f:
                f.write("".join(self.held).encode())
            self.uploaded = len(self.held)
        except Exception as e:  # any failure (storage, a bad URI): the log must not change the job's outcome
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"warning: the job's log could not be written to {self.path}: {first}", file=sys.stderr)
            self.uploaded = len(self.held)  # said once, not again at exit


def setup_logging(verbose: bool) -> None:
    """The job's console shows warnings, progress lines (recall_ray.progress) and the
    summary; every record (ours, Ray Data's) goes to the run directory's job.log. With
    -v the console shows the records too."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    remove_job_logging()  # a second job in the same process (a notebook, a test) replaces the first's
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    run_log = RunLogHandler()
    console.job_handler = run_log.job_handler = True
    root.addHandler(console)
    root.addHandler(run_log)
    for noisy in ("filelock", "urllib3", "matplotlib", "PIL", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # model loading bars, here and in the workers of a local Ray runtime (which inherit it)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def remove_job_logging(upload: bool = True) -> None:
    """Take setup_logging's handlers off the root logger and close them: a URI run
    directory's log is uploaded first, unless `upload` is False (its storage is gone)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "job_handler", False)]:
        root.removeHandler(handler)
        if isinstance(handler, RunLogHandler) and not upload:
            handler.path = None  # nothing for close() or the exit hook to upload
        handler.close()


def is_bad_input(err: BaseException) -> bool:
    """Errors the checks raise before any work: a wrong config, data, model or output."""
    return isinstance(err, (ValueError, FileExistsError, FileNotFoundError, ImportError))


def guarded(job: str, verbose: bool, body: Callable[[], Any]) -> tuple[int, Any]:
    """(0, body()) on success; otherwise one line `<job>: error: ...` on stderr (the traceback
    too with -v) and (BAD_INPUT or FAILED, None), or (INTERRUPTED, None)."""
    try:
        return 0, body()
    except KeyboardInterrupt:
        print(f"{job}: interrupted", file=sys.stderr)
        return INTERRUPTED, None
    except Exception as e:
        if verbose:
            logging.exception("%s failed", job)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{job}: error: {type(e).__name__}: {first}", file=sys.stderr)
        return (BAD_INPUT if is_bad_input(e) else FAILED), None
    finally:
        # a run directory on a bucket gets its log now, while the job's storage is surely
        # there, not only at exit
        for handler in logging.getLogger().handlers:
            if isinstance(handler, RunLogHandler):
                handler.upload()


def publish_step(job: str, verbose: bool, publish: Callable[[], list[str]], dest: str) -> int:
    """After a job: copy its published files into `dest`; 0, or the failure's exit status."""
    status, names = guarded(job, verbose, publish)
    if not status:
        print(f"published {', '.join(names)} to {dest}")
    return status
