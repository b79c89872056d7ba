"""Train a set of LoRA adapters described by one YAML config, one per task.

    python jobs/train_adapters.py --config configs/adapters/default.yaml   # adapters/{sst2,medmcqa,ag_news}
    python jobs/train_adapters.py --config configs/adapters/repro.yaml     # adapters/repro/<task>

Each adapter is trained on the config's base through the same Ray Train step as
`jobs/finetune.py` (recall_ray.finetune.finetune_lora), seeded, on the config's split of
`data/<task>/` (`train` holds out the validation tail, see recall_ray/io/splits.py), and
written to <out>/<task>/ (a few MB, committed), so that merges and tables can be
regenerated without training. Existing adapters are kept unless --force.

Config keys: base (a Hugging Face directory or builtin:<name>), out, split, finetune
(FinetuneConfig fields shared by every task), tasks ({task: {FinetuneConfig overrides}}).
The console shows one progress line per adapter; job.log and Ray Train's runs and
checkpoints (ray_train/) go to --run-dir (default runs/adapter_training).

A budget ladder: with `finetune.snapshot_every: N`, every N-th step's adapter is kept in
runs/ladders/<config name>/<task>/step-NNNNNNN/ (a loadable adapter with its recall_ray.json),
and a later run of the same config with more `steps` (and --force) goes on from the newest
snapshot instead of starting over (recall_ray.cluster.finetune.finetune_lora). On a machine
without the ladder's snapshots, `--force --warm-start` goes on from the existing adapter
(<out>/<task>, an earlier rung) instead of from step 0: its weights, the optimizer's moments
restarted at zero (they are kept only in the snapshots); its recall_ray.json records warm_start.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's recall_ray, not whichever one pip installed
from recall_ray.cli import guarded, pin_checkout, setup_logging  # noqa: E402

pin_checkout(REPO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--tasks", nargs="+", help="train only these tasks of the config")
    p.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    p.add_argument("--warm-start", action="store_true",
                   help="with --force and a ladder (snapshot_every): when the ladder has no snapshot at or past the"
                        " existing adapter's steps, go on from that adapter with the optimizer restarted")
    p.add_argument("--run-dir", default=str(REPO / "runs" / "adapter_training"),
                   help="job.log and Ray Train's runs and checkpoints (ray_train/)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    def run() -> None:
        import logging

        from recall_ray.cluster.finetune import finetune_lora
        from recall_ray.config import ConfigError, FinetuneConfig, RayConfig, load_tree
        from recall_ray.io.models import resolve_path
        from recall_ray.io.splits import load_split

        spec = load_tree(args.config, (), "adapters config")
        unknown = set(spec) - {"base", "out", "split", "finetune", "tasks"}
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)} (known: base, out, split, finetune, tasks)")
        tasks: dict = spec["tasks"]
        chosen = args.tasks or list(tasks)
        missing = [t for t in chosen if t not in tasks]
        if missing:
            raise ConfigError(f"tasks {missing} are not in {args.config} (it has {list(tasks)})")
        # Every task's settings and data are checked before anything is trained.
        plans = []
        for task in chosen:
            cfg = FinetuneConfig(**{**spec.get("finetune", {}), **(tasks[task] or {})})
            records = load_split(REPO / "data", task, spec.get("split", "train"), max_samples=cfg.max_samples)
            plans.append((task, cfg, records))
            if args.warm_start and not (args.force and cfg.snapshot_every):
                raise ConfigError(f"--warm-start goes on from an existing adapter along a ladder: it needs --force"
                                  f" and finetune.snapshot_every (task {task} has {cfg.snapshot_every})")
        base = resolve_path(spec["base"])
        out_root = REPO / spec["out"]
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        logging.getLogger("recall_ray.finetune").info("run directory %s", args.run_dir, extra={"run_dir": args.run_dir})
        from recall_ray.cluster.runtime import ray_runtime

        with ray_runtime(RayConfig()):
            for task, cfg, records in plans:
                out = out_root / task
                warm = None
                if out.exists():
                    if not args.force:
                        print(f"{out} exists; skipping (use --force to retrain)")
                        continue
                    if args.warm_start:  # kept beside the run: --force makes room for the new adapter
                        warm = Path(tempfile.mkdtemp(prefix=f"warm-start-{task}-", dir=args.run_dir))
                        shutil.copytree(out, warm / task)
                    shutil.rmtree(out)
                t0 = time.perf_counter()
                ladder = REPO / "runs" / "ladders" / Path(args.config).stem / task if cfg.snapshot_every else None
                try:
                    finetune_lora(str(base), records, cfg, str(out), str(Path(args.run_dir, "ray_train")), task=task,
                                  snapshot_dir=str(ladder) if ladder else None,
                                  warm_start=str(warm / task) if warm else None)
                finally:
                    if warm is not None:
                        if not out.exists():  # the run failed: the adapter it would have replaced goes back
                            shutil.move(warm / task, out)
                        shutil.rmtree(warm, ignore_errors=True)
                print(f"{task}: adapter in {out} ({time.perf_counter() - t0:.0f}s, {len(records)} records)", flush=True)

    return guarded("train_adapters", args.verbose, run)[0]


if __name__ == "__main__":
    sys.exit(main())
