"""Train a set of LoRA adapters described by one YAML config, one per task.

    python jobs/train_adapters.py --config configs/adapters/default.yaml   # adapters/{sst2,medmcqa,ag_news}
    python jobs/train_adapters.py --config configs/adapters/repro.yaml     # adapters/repro/<task>

Each adapter is trained on the config's base through the same Ray Train step as
`jobs/finetune.py` (recall_ray.finetune.finetune_lora), seeded, on the config's split of
`data/<task>/` (`train` holds out the validation tail, see recall_ray/splits.py), and
written to <out>/<task>/ (a few MB, committed), so that merges and tables can be
regenerated without training. Existing adapters are kept unless --force.

Config keys: base, out, split, finetune (FinetuneConfig fields shared by every task),
tasks ({task: {FinetuneConfig overrides}}).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--tasks", nargs="+", help="train only these tasks of the config")
    p.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from recall_ray.config import FinetuneConfig
    from recall_ray.models import resolve_path
    from recall_ray.splits import load_split

    spec = yaml.safe_load(Path(args.config).read_text())
    unknown = set(spec) - {"base", "out", "split", "finetune", "tasks"}
    if unknown:
        print(f"train_adapters: error: unknown config keys {sorted(unknown)}", file=sys.stderr)
        return 2
    tasks: dict = spec["tasks"]
    chosen = args.tasks or list(tasks)
    missing = [t for t in chosen if t not in tasks]
    if missing:
        print(f"train_adapters: error: tasks {missing} are not in {args.config} (it has {list(tasks)})", file=sys.stderr)
        return 2
    # Validate every task's settings and data before training anything.
    plans = []
    for task in chosen:
        cfg = FinetuneConfig(**{**spec.get("finetune", {}), **(tasks[task] or {})})
        records = load_split(REPO / "data", task, spec.get("split", "train"), max_samples=cfg.max_samples)
        plans.append((task, cfg, records))
    base = resolve_path(spec["base"])
    out_root = REPO / spec["out"]

    from recall_ray.cli import ray_runtime
    from recall_ray.config import RayConfig
    from recall_ray.finetune import finetune_lora

    # joins RAY_ADDRESS when set, else local Ray with its own dashboard (pipeline.own_dashboard:
    # a fine-tune beside another Ray instance on the machine must not be killed as orphaned)
    with ray_runtime(RayConfig()):
        for task, cfg, records in plans:
            out = out_root / task
            if out.exists():
                if not args.force:
                    print(f"{out} exists; skipping (use --force to retrain)")
                    continue
                shutil.rmtree(out)
            t0 = time.perf_counter()
            finetune_lora(str(base), records, cfg, str(out), str(REPO / "runs" / "adapter_training"), task=task)
            print(f"{task}: adapter in {out} ({time.perf_counter() - t0:.0f}s, {len(records)} records)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
