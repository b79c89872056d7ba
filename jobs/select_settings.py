"""Choose merge settings on the validation split (never on test) by running a study once
per candidate setting, one parameter after another.

    python jobs/select_settings.py --config configs/selection/multi.yaml

Writes <run_dir>/selection.csv, selection.md (every candidate's validation scores) and
selected.yaml (the chosen overrides), and prints them. Resumes like the studies: a rerun
recomputes only what changed. Joins RAY_ADDRESS if set, else starts local Ray. Exit status
0 on success; otherwise one line on stderr (2: bad input, found before any work; 1: a failure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's recall_ray, not whichever one pip installed
from recall_ray.cli import guarded, pin_checkout, publish_step, setup_logging  # noqa: E402

pin_checkout(REPO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--publish", metavar="DIR", help="then copy selection.csv, selection.md, selected.yaml and the"
                   " stage times into DIR (e.g. docs/results/selection)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    t0 = time.perf_counter()

    def run():
        from recall_ray.studies.registry import STUDIES, run_study
        from recall_ray.studies.selection import load_selection, write_selection
        from recall_ray.io.storage import RunDir

        cfg = load_selection(args.config)
        table, chosen = run_study(cfg)
        write_selection(RunDir(cfg.run_dir), table, chosen, args.config)
        return cfg, table, chosen, STUDIES["selection"]

    status, out = guarded("select_settings", args.verbose, run)
    if status:
        return status
    cfg, table, chosen, study = out
    print("\n=== validation scores of every candidate (primary metric, mean over tasks) ===")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print("\nchosen:", ", ".join(f"{k}={v}" for k, v in chosen.items()))
    print(f"\nrun directory: {cfg.run_dir} (selection.csv, selection.md, selected.yaml); {time.perf_counter() - t0:.0f}s")
    if args.publish:
        return publish_step("select_settings", args.verbose, lambda: study.publish(cfg.run_dir, args.publish),
                            args.publish)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
