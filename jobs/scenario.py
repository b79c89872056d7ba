"""Run one study of the paper from one YAML config: RECALL and every baseline merged by the
same actors, every model scored, one table.

    python jobs/scenario.py --config configs/scenarios/multi.yaml [--set evaluate.max_samples=20]

Studies: single (each expert with its base, paper Table 1), multi (all experts with and
without the base, Table 2), sequential (tasks learned in order, each step fine-tuned and
merged with what came before, against sequential fine-tuning; Table 7, Figure 5). Writes
<run_dir>/scores.csv, table.csv, table.md and plots/, and resumes: rerun it and only what
changed is recomputed. Joins RAY_ADDRESS if set, else starts local Ray. Exit status 0 on
success; otherwise one line on stderr (2: bad input, found before any work; 1: a failure).
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--publish", metavar="DIR", help="then copy the tables, scores, stage times and plots into DIR"
                   " (e.g. docs/results/multi)")
    p.add_argument("--export-adapters", metavar="DIR", help="sequential only: then copy every step's adapter into DIR"
                   " (e.g. adapters/sequential), the config's `adapters:` for regenerating the tables without"
                   " retraining")
    p.add_argument("--export-only", action="store_true",
                   help="with --export-adapters: run nothing, only export what the run directory holds (its finished"
                   " fine-tunes and the newest snapshot of an unfinished one), e.g. after a stopped run, to go on"
                   " on another machine")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.export_only and not args.export_adapters:
        p.error("--export-only exports: name where with --export-adapters DIR")
    if args.export_only and args.publish:
        p.error("--export-only runs nothing, so there are no finished tables to publish: drop --publish")
    setup_logging(args.verbose)
    t0 = time.perf_counter()

    def run():
        from recall_ray.config import ConfigError
        from recall_ray.studies.registry import load_study, run_study, study_of

        cfg = load_study(args.config, args.overrides)
        kind = study_of(cfg).kind
        if kind == "selection":
            raise ConfigError(f"{args.config} is a selection config: run it with jobs/select_settings.py")
        if args.export_adapters and kind != "sequential":
            raise ConfigError(f"--export-adapters is for sequential studies (they train adapters), not {kind}: drop it")
        return cfg, None if args.export_only else run_study(cfg)

    status, out = guarded("scenario", args.verbose, run)
    if status:
        return status
    cfg, result = out

    def export() -> int:
        from recall_ray.studies.sequential import export_adapters

        return publish_step("scenario", args.verbose, lambda: export_adapters(cfg.run_dir, args.export_adapters),
                            args.export_adapters)

    if args.export_only:  # a stopped run's pieces, carried as they are (the run is not resumed)
        return export()
    print(f"\n=== {cfg.scenario} scenario: primary metric per task ({cfg.evaluate.split} split,"
          f" {cfg.evaluate.max_samples} samples per task) ===")
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print(f"\nrun directory: {cfg.run_dir} (scores.csv, table.csv, table.md, plots/); {time.perf_counter() - t0:.0f}s")
    if args.export_adapters:
        status = export()
        if status:
            return status
    if args.publish:
        from recall_ray.studies.registry import study_of

        study = study_of(cfg)
        return publish_step("scenario", args.verbose, lambda: study.publish(cfg.run_dir, args.publish), args.publish)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
