"""Our evaluation against lm-evaluation-harness on the same prompts: prompts per second of
each evaluator's log-likelihood scoring of the closed-label tasks.

    python benchmarks/harness.py [--samples 16] [--repeats 3] [--model builtin:smollm2-135m-instruct]

Both sides run in this process, on the same model, the same torch threads, batch 16, and the
same prompts and options (recall_ray.harness writes lm-eval's configs from our items, and
checks that lm-eval renders every prompt as we do):
  ours     recall_ray.cluster.generation.EvalWorker (the Ray Data callable of our evaluation)
           called on every item's `choice` row: one forward per prompt, options from its
           cached keys and values (core.loglik);
  lm-eval  lm_eval.simple_evaluate with its HFLM on our task configs (one forward per
           prompt and option; its task building and data loading included, as a user runs it).
Model loading is outside the timings (a warm-up call loads ours; HFLM loads at construction).
The sides alternate, each repeated; medians are reported, of wall time and of this process's
CPU time (on a shared machine the wall time depends on the other users; the CPU time much
less). No Ray: this measures the evaluators, not the cluster.

Writes benchmarks/results/harness.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import REPO, setup

TASKS = ["sst2", "ag_news", "medmcqa", "race"]


def ours(model, items) -> tuple[float, float]:
    """(wall, CPU) seconds of our EvalWorker scoring `items` (its model loaded before the clocks start)."""
    import numpy as np

    from recall_ray.cluster.generation import EvalWorker

    def batch(chunk):
        return {"model": np.zeros(len(chunk), dtype=int), "row": np.arange(len(chunk)),
                "kind": np.array(["choice"] * len(chunk), dtype=object),
                "prompt": np.array([i.prompt for i in chunk], dtype=object),
                "max_new_tokens": np.zeros(len(chunk), dtype=int),
                "options": np.array([json.dumps(list(i.options)) for i in chunk], dtype=object)}

    worker = EvalWorker([model])
    worker(batch(items[:1]))  # loads the model
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(items), 16):  # Ray Data's batches of 16
        worker(batch(items[i:i + 16]))
    return time.perf_counter() - t0, time.process_time() - c0


def lm_eval_side(lm, plan) -> tuple[float, float]:
    """(wall, CPU) seconds of lm-eval's simple_evaluate on our configs of the same items."""
    from recall_ray import harness
    from recall_ray.cluster.harness import WHERE, run_lm_eval

    files = harness.config_files(plan.raw, plan.templates, WHERE)
    t0, c0 = time.perf_counter(), time.process_time()
    run_lm_eval(lm, plan.task_names, files, {}, False)
    return time.perf_counter() - t0, time.process_time() - c0


def figure(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ours_prompts_per_cpu_s"] for r in rows], 0.4, label="recall-ray")
    ax.bar([i + 0.2 for i in x], [r["lm_eval_prompts_per_cpu_s"] for r in rows], 0.4, label="lm-eval 0.4")
    ax.set_xticks(list(x), [r["task"] for r in rows])
    ax.set_ylabel("prompts per CPU-second (median)")
    ax.set_title("log-likelihood scoring, same prompts, same model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(rows, out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| task | prompts | options | recall-ray prompts/s | lm-eval prompts/s | ratio | recall-ray prompts/CPU-s"
             " | lm-eval prompts/CPU-s | ratio (CPU) | load average |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['prompts']} | {r['options']} | {r['ours_prompts_per_s']:.3f}"
              f" | {r['lm_eval_prompts_per_s']:.3f} | {r['ratio']:.2f} | {r['ours_prompts_per_cpu_s']:.3f}"
              f" | {r['lm_eval_prompts_per_cpu_s']:.3f} | {r['ratio_cpu']:.2f} | {r['load_average_1m']:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    figure(rows, out.with_suffix(".png"))
    print("\n".join(lines), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "harness"))
    args = p.parse_args()
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(k, "1")
    _, model = setup(args.model)
    import lm_eval
    import torch

    from recall_ray import harness
    from recall_ray.cluster.harness import lm_eval_model

    threads = torch.get_num_threads()
    lm = lm_eval_model(model, "float32", batch_size=16, device="cpu")
    rows = []
    for task in args.tasks:
        plan = harness.plan([task], REPO / "data", "test", args.samples, "default")
        a, b = [], []
        for r in range(args.repeats):  # alternate the sides, starting with each in turn
            for side in (("ours", "lm") if r % 2 == 0 else ("lm", "ours")):
                if side == "ours":
                    a.append(ours(model, plan.items))
                else:
                    b.append(lm_eval_side(lm, plan))
        n = len(plan.items)
        row = {"task": task, "prompts": n, "options": len(plan.items[0].options),
               "ours_s": [w for w, _ in a], "lm_eval_s": [w for w, _ in b],
               "ours_cpu_s": [c for _, c in a], "lm_eval_cpu_s": [c for _, c in b],
               "load_average_1m": os.getloadavg()[0],  # the machine is shared: wall time depends on the others
               "ours_prompts_per_s": n / statistics.median(w for w, _ in a),
               "lm_eval_prompts_per_s": n / statistics.median(w for w, _ in b),
               "ours_prompts_per_cpu_s": n / statistics.median(c for _, c in a),
               "lm_eval_prompts_per_cpu_s": n / statistics.median(c for _, c in b)}
        row["ratio"] = row["ours_prompts_per_s"] / row["lm_eval_prompts_per_s"]
        row["ratio_cpu"] = row["ours_prompts_per_cpu_s"] / row["lm_eval_prompts_per_cpu_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, Path(args.out), {"samples": args.samples, "repeats": args.repeats, "model": args.model,
                                     "torch_threads": threads, "cpus": os.cpu_count(), "lm_eval": lm_eval.__version__,
                                     "batch_size": 16, "dtype": "float32"})  # after each task: a stopped run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
