"""RECALL merge job: base + experts + the new task's data -> one merged Hugging Face model.

    python jobs/merge.py                                  # embedded default (local Ray)
    python jobs/merge.py --config my.yaml --set typical.k=10
    ray job submit --working-dir . -- python jobs/merge.py --config configs/cluster-example.yaml

Exit code 0 on success; otherwise one line on stderr saying what is wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The embedded default: SmolLM2-135M-Instruct as the base, LoRA experts for SST-2 and
# MedMCQA, AG News as the new task; every adapter (the new task's too) is committed under
# adapters/ and was trained by jobs/train_default_adapters.py through the same Ray Train
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("filelock", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from recall_ray.config import load_config
        from recall_ray.pipeline import connect_ray, run_pipeline
        from recall_ray.report import weight_table_text

        overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
        cfg = load_config(args.config, overrides, defaults=None if args.config else DEFAULT_CONFIG)
        t0 = time.perf_counter()
        started = connect_ray(cfg)
        try:
            result = run_pipeline(cfg)
        finally:
            if started:
                import ray

                ray.shutdown()
    except KeyboardInterrupt:
        print("merge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with -v
        if args.verbose:
            logging.exception("merge failed")
        print(f"merge: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    print("\n=== RECALL merge done ===")
    print(f"merged model : {result.output}")
    print(f"run directory: {result.run_dir} (manifest.json, weights.csv/.parquet, plots/, typical.parquet)")
    print(f"typical samples: {result.typical_count}")
    print("\nper-layer merge weights:")
    print(weight_table_text(result.table))
    if result.saturated:
        print(f"\nWARNING: similarity saturated in {len(result.saturated)} of {result.table['layer'].nunique()} layers"
              " (weights are constant there); see README 'Similarity options'.")
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
