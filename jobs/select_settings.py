"""Choose merge settings on the validation split (never on test) by running a scenario once
per candidate setting, one parameter after another.

    python jobs/select_settings.py --config configs/selection/multi.yaml

Writes <run_dir>/selection.csv, selection.md (every candidate's validation scores) and
selected.yaml (the chosen overrides), and prints them. Resumes like the scenarios: a rerun
recomputes only what changed. Joins RAY_ADDRESS if set, else starts local Ray. Exit status
0 on success; otherwise one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--publish", metavar="DIR", help="then copy selection.csv, selection.md, selected.yaml and the"
                   " stage times into DIR (e.g. docs/results/selection)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    from recall_ray.cli import guarded, ray_runtime, setup_logging

    setup_logging(args.verbose)
    t0 = time.perf_counter()

    def run():
        from recall_ray import scenarios, sequential
        from recall_ray.selection import candidate_overrides, load_selection, run_selection, write_selection
        from recall_ray.storage import RunDir

        cfg = load_selection(args.config)
        first = []
        for param in cfg.parameters:  # every candidate's config is checked before Ray starts
            for values in param.values:
                first.append(scenarios.load_scenario(cfg.scenario, candidate_overrides(cfg, param, values, {})))
        kind = sequential if first[0].scenario == "sequential" else scenarios
        kind.preflight(first[0])

        def run_one(sc):
            return sequential.run_sequential(sc) if sc.scenario == "sequential" else scenarios.run_scenario(sc)

        with ray_runtime(first[0].ray):
            table, chosen = run_selection(cfg, run_one, scenarios.load_scenario)
        write_selection(RunDir(cfg.run_dir), table, chosen, args.config)
        return cfg, table, chosen

    status, out = guarded("select_settings", args.verbose, run)
    if status:
        return status
    cfg, table, chosen = out
    print("\n=== validation scores of every candidate (primary metric, mean over tasks) ===")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print("\nchosen:", ", ".join(f"{k}={v}" for k, v in chosen.items()))
    print(f"\nrun directory: {cfg.run_dir} (selection.csv, selection.md, selected.yaml); {time.perf_counter() - t0:.0f}s")
    if args.publish:
        from recall_ray.selection import publish_selection
        from recall_ray.cli import publish_step

        return publish_step("select_settings", args.verbose, lambda: publish_selection(cfg.run_dir, args.publish),
                            args.publish)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
