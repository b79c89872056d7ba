"""RECALL merge job: base + experts + the new task's data -> one merged Hugging Face model.

    python jobs/merge.py                                  # embedded default (local Ray)
    python jobs/merge.py --config my.yaml --set typical.k=10
    ray job submit --working-dir . -- python jobs/merge.py --config configs/cluster-example.yaml

Exit code 0 on success; otherwise one line on stderr saying what is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's recall_ray, not whichever one pip installed
from recall_ray.cli import guarded, pin_checkout, setup_logging  # noqa: E402

pin_checkout(REPO)

# The embedded default: SmolLM2-135M-Instruct as the base, LoRA experts for SST-2 and
# MedMCQA, AG News as the new task; every adapter (the new task's too) is committed under
# adapters/ and was trained by jobs/train_adapters.py (configs/adapters/default.yaml) through the same Ray Train
# step. `--set finetune.enabled=true` fine-tunes the new task here instead.
DEFAULT_CONFIG = {
    "run_dir": "runs/default",
    "base": {"name": "base", "path": "builtin:smollm2-135m-instruct"},
    "experts": [
        {"name": "sst2", "path": str(REPO / "adapters" / "sst2")},
        {"name": "medmcqa", "path": str(REPO / "adapters" / "medmcqa")},
    ],
    "new_model": {"name": "ag_news", "path": str(REPO / "adapters" / "ag_news")},
    "task": {"name": "ag_news", "data": str(REPO / "data" / "ag_news" / "train.jsonl"), "template": "ag_news",
             "max_samples": 200, "max_length": 128},
    "finetune": {"steps": 60, "batch_size": 8, "max_samples": 2000},
    # The point of the merge, shown: the new model alone, the uniform average and the RECALL
    # merge scored side by side on held-out (test) samples of every task taking part.
    "evaluate": {"tasks": ["sst2", "medmcqa", "ag_news"], "split": "test", "max_samples": 32,
                 "data_dir": str(REPO / "data"), "baselines": ["average"]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the embedded SmolLM2 demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set typical.k=10 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    t0 = time.perf_counter()

    def run():
        from recall_ray.config import load_config

        overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
        cfg = load_config(args.config, overrides, defaults=None if args.config else DEFAULT_CONFIG)
        from recall_ray.pipeline import preflight, run_pipeline

        plan = preflight(cfg)  # every check that needs no forward pass, before Ray (or torch) is imported
        from recall_ray.cluster.runtime import ray_runtime

        with ray_runtime(cfg.ray):
            return run_pipeline(cfg, plan)

    status, result = guarded("merge", args.verbose, run)
    if status:
        return status
    from recall_ray.report import weight_table_text

    print("\n=== RECALL merge done ===")
    print(f"merged model : {result.output}")
    print(f"run directory: {result.run_dir} (manifest.json, weights.csv/.parquet, plots/, typical.parquet)")
    print(f"typical samples: {result.typical_count}")
    print("\nper-layer merge weights:")
    print(weight_table_text(result.table))
    if result.saturated:
        print(f"\nWARNING: similarity saturated in {len(result.saturated)} of {result.table['layer'].nunique()} layers"
              " (weights are constant there); see README 'Similarity options'.")
    if result.scores is not None:
        from recall_ray.evaluate import wide_table

        n = int(result.scores["n"].max())
        print(f"\nscores on held-out samples ({n} per task; 'ag_news' is the new model alone):")
        print(wide_table(result.scores).to_string(float_format=lambda v: f"{v:.1f}"))
    print("\nstage timings:")
    for name, t in result.timings.items():
        shown = "skipped (unchanged)" if t["skipped"] else f"{t['seconds']:.1f}s"
        print(f"  {name:<22} {shown}")
    if result.merge_peak_rss_mb:
        print(f"merge actor peak RSS: {result.merge_peak_rss_mb:.0f} MB (anonymous memory"
              f" {result.merge_peak_anon_mb:.0f} MB)")
    print(f"total: {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
