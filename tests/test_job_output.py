"""What a person running the job reads: one progress line per stage, the weight table and
the stage timings on the console; everything else (our records, Ray Data's) in the run
directory's job.log; nothing at all written for a bad input."""

from __future__ import annotations

import io
import logging



def test_progress_line_text():
    from recall_ray.progress import progress_text

    assert progress_text("reps_new", 50, 200, "samples", 10.0) == "reps_new: 50/200 samples (5.00/s, ETA 30s)"
    assert progress_text("reps_new", 200, 200, "samples", 100.0) == "reps_new: 200/200 samples in 1m40s (2.00/s)"
    assert progress_text("merge", 0, 3, "shards", 0.0) == "merge: 0/3 shards (0.00/s, ETA ?)"


def test_progress_prints_one_line_per_stage_when_not_a_terminal():
    from recall_ray.progress import Progress

    out = io.StringIO()
    p = Progress("typical", 31, "layers", stream=out, every_s=3600)
    for _ in range(31):
        p.update()
    p.close()  # a second close prints nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("typical: 31/31 layers in ")


def test_a_run_directory_uri_gets_every_record_when_the_job_ends_and_again_after(tmp_path, capsys):
    """A URI run directory (file:// here; a bucket alike) cannot be appended to: the job's
    end (guarded) writes every record so far, and a later upload (the exit hook) writes them
    all again with the later ones, never only the later ones. A log that cannot be written
    is one warning line, and the job's status stands."""
    from recall_ray.cli import RunLogHandler, guarded

    root = logging.getLogger()
    h = RunLogHandler()
    root.addHandler(h)
    logging.getLogger("recall_ray.x").setLevel(logging.DEBUG)
    run_dir = f"file://{tmp_path}"
    try:
        def body():
            logging.getLogger("recall_ray.x").info("run directory", extra={"run_dir": run_dir})
            logging.getLogger("recall_ray.x").info("during the job")
            return "done"

        assert guarded("t", False, body) == (0, "done")
        assert (tmp_path / "job.log").read_text().splitlines()[1].endswith("during the job")
        logging.getLogger("recall_ray.x").info("after the job")
        h.upload()
        lines = (tmp_path / "job.log").read_text().splitlines()
        assert [line.split(": ", 1)[1] for line in lines] == ["run directory", "during the job", "after the job"]

        h.path = f"file://{tmp_path}/missing/dir/job.log"  # a parent that does not exist
        logging.getLogger("recall_ray.x").info("one more")
        h.upload()
        h.upload()  # nothing new: no second warning
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"warning: the job's log could not be written to {h.path}: "), err
    finally:
        root.removeHandler(h)


def test_a_second_job_in_the_same_process_replaces_the_first_jobs_handlers():
    from recall_ray.cli import RunLogHandler, setup_logging

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        setup_logging(False)
        setup_logging(False)
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 2 and sum(isinstance(h, RunLogHandler) for h in added) == 1
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)


def test_run_log_holds_records_until_the_run_directory_exists(tmp_path):
    from recall_ray.cli import RunLogHandler

    logger = logging.getLogger("recall_ray.test_run_log")
    logger.setLevel(logging.DEBUG)
    h = RunLogHandler()
    logger.addHandler(h)
    try:
        logger.debug("before the run directory")
        assert not list(tmp_path.iterdir())  # nothing written yet (a bad input would stop here)
        logger.info("run directory", extra={"run_dir": str(tmp_path)})
        logger.info("after")
    finally:
        logger.removeHandler(h)
        h.close()
    text = (tmp_path / "job.log").read_text()
    assert text.index("before the run directory") < text.index("run directory") < text.index("after")


# The whole job's console and job.log, as a user runs it: tests/test_faults.py's driver test.
