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
