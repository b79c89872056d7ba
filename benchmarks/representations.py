"""The representation stage at the floor: its steady-state samples/s against a bare
transformers loop doing the same work on the same samples, in the same process's machine.

    python benchmarks/representations.py [--samples 192] [--repeats 3] [--batch 16]

Side A is recall_ray.cluster.representations.extract (one Ray Data actor pool on a local Ray
started once; the actor writes its Parquet parts); side B, in this process, a plain loop:
the same tokenizer call (padding, truncation at 128), the decoder's hidden states, the
masked mean in float32 (core.pooling.mean_pool), batches of the same size, the same torch
threads. Sides alternate, each repeated; medians reported. "Steady state" leaves out the
pool's start-up (actor start and model load): the time from the first batch answered to the
last, scaled to all samples. The CPU the actor process used in steady state is reported
too (its user + system seconds over the wall seconds).

Writes benchmarks/results/representations.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, progress_marks, setup, steady_seconds


def bare_loop(model_dir: str, texts: list[str], batch: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.cluster.representations import hidden_states_of
    from recall_ray.core.pooling import mean_pool

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            mean_pool(hidden_states_of(lm, enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    return time.perf_counter() - t0


def ours(model, items: list[dict], batch: int, out: Path) -> tuple[float, float]:
    """(total seconds, steady-state seconds) of the stage on `items`."""
    from recall_ray.cluster.representations import extract
    from recall_ray.io.storage import RunDir

    with progress_marks() as marks:
        t0 = time.perf_counter()
        extract([model], items, RunDir(str(out)), ["reps/m"], max_length=128, exclude_first_token=False,
                dtype="float32", batch_size=batch, num_actors="auto")
        total = time.perf_counter() - t0
    return total, steady_seconds(marks, len(items))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "representations"))
    args = p.parse_args()
    model_dir, model = setup(args.model)
    from recall_ray.cluster.runtime import ray_runtime
    from recall_ray.config import RayConfig
    from recall_ray.core.templates import load_task_records

    records = load_task_records(str(REPO / "data" / "ag_news" / "train.jsonl"), "ag_news", args.samples)
    items = [{"sample_idx": i, "sample_id": r["sample_id"], "text": r["prompt"] + r["target"]}
             for i, r in enumerate(records)]
    threads = os.cpu_count() or 1
    a_tot, a_steady, b = [], [], []
    with ray_runtime(RayConfig(object_store_memory=256 * 1024**2)), tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternate the sides
            tot, steady = ours(model, items, args.batch, Path(tmp) / f"a{r}")
            a_tot.append(tot)
            a_steady.append(steady)
            b.append(bare_loop(model_dir, [it["text"] for it in items], args.batch, threads))
            print(json.dumps({"repeat": r, "ours_total_s": tot, "ours_steady_s": steady, "bare_s": b[-1]}), flush=True)
    n = len(items)
    row = {"samples": n, "batch": args.batch, "threads": threads, "cpus": os.cpu_count(),
           "ours_samples_per_s_steady": n / statistics.median(a_steady),
           "ours_samples_per_s_with_startup": n / statistics.median(a_tot),
           "bare_samples_per_s": n / statistics.median(b)}
    row["ratio_steady"] = row["ours_samples_per_s_steady"] / row["bare_samples_per_s"]
    row["ratio_with_startup"] = row["ours_samples_per_s_with_startup"] / row["bare_samples_per_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"median": row, "repeats": {"ours_total_s": a_tot,
                                                    "ours_steady_s": a_steady, "bare_s": b}}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "| samples | ours samples/s (steady) | ours samples/s (with start-up) | bare loop samples/s |"
        " ratio steady | ratio with start-up |\n|---:|---:|---:|---:|---:|---:|\n"
        f"| {n} | {row['ours_samples_per_s_steady']:.2f} | {row['ours_samples_per_s_with_startup']:.2f} |"
        f" {row['bare_samples_per_s']:.2f} | {row['ratio_steady']:.2f} | {row['ratio_with_startup']:.2f} |\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
