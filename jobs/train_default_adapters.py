"""Train the LoRA adapters that the embedded default of jobs/merge.py merges.

    python jobs/train_default_adapters.py [--tasks sst2 medmcqa ag_news] [--steps 60]

Each adapter is trained on the builtin SmolLM2-135M-Instruct base through the same Ray
Train step as `jobs/finetune.py` (recall_ray.finetune.finetune_lora), seeded, and written
to adapters/<task>/ (a few MB each, committed), so the default merge needs no training.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "medmcqa", "ag_news")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=str(REPO / "adapters"))
    p.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from recall_ray.builtin_models import builtin_model_dir
    from recall_ray.config import FinetuneConfig
    from recall_ray.finetune import finetune_lora
    from recall_ray.templates import load_task_records

    base = builtin_model_dir("smollm2-135m-instruct")
    cfg = FinetuneConfig(steps=args.steps, batch_size=8, max_length=128, seed=0)
    ray.init(address="local", include_dashboard=False)
    try:
        for task in args.tasks:
            out = Path(args.out) / task
            if out.exists():
                if not args.force:
                    print(f"{out} exists; skipping (use --force to retrain)")
                    continue
                shutil.rmtree(out)
            records = load_task_records(str(REPO / "data" / task / "train.jsonl"), task, cfg.max_samples)
            t0 = time.perf_counter()
            finetune_lora(str(base), records, cfg, str(out), str(REPO / "runs" / "adapter_training"), task=task)
            print(f"{task}: adapter in {out} ({time.perf_counter() - t0:.0f}s)")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
