"""Evaluation at the floor: the evaluation stage's steady-state prompts/s against a bare
transformers loop doing the same scoring on the same prompts, per task.

    python benchmarks/evaluation.py [--samples 48] [--repeats 3] [--model builtin:smollm2-135m-instruct]

Side A is recall_ray.evaluate.evaluate_models (one Ray Data actor pool on a local Ray
started once, batch 16); side B, in this process, a plain loop over the same prompts in
batches of 16 with the same torch threads: for closed-label tasks one forward of each
prompt and the log-softmax of its last position over the options' first tokens (every
option is one token, except AG News's "Sci/Tech", which gets one forward per option), and
for SQuAD 2.0 and IWSLT `generate` with the same budget. The two sides alternate, each
repeated; the medians are reported. "Steady state" excludes the pool's start-up (its actor
start and model load): the time from the first answered batch to the last. Also measured:
the cost per prompt of each closed task under the old protocol (greedy generation).

Writes benchmarks/results/evaluation.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import REPO, progress_marks, setup, steady_seconds

TASKS = ["sst2", "ag_news", "medmcqa", "race", "squad_v2", "iwslt2017_en_fr"]


def bare_loop(model_dir: str, items, batch: int, threads: int) -> float:
    """Seconds of a plain transformers loop scoring `items` the same way (model loaded before)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.core.metrics import max_new_tokens

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        if chunk[0].options:
            opts = [tok(o, add_special_tokens=False)["input_ids"] for o in chunk[0].options]
            seqs = []
            if all(len(o) == 1 for o in opts):
                seqs = [tok(it.prompt)["input_ids"] for it in chunk]
            else:
                seqs = [tok(it.prompt)["input_ids"] + o for it in chunk for o in opts]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), tok.pad_token_id or 0)
            mask = torch.zeros_like(ids)
            for b, s in enumerate(seqs):  # left-padded: the last position is every row's own
                ids[b, width - len(s):], mask[b, width - len(s):] = torch.tensor(s), 1
            with torch.inference_mode():  # only the last position's logits, as a careful loop would
                logits = lm(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
                torch.log_softmax(logits[:, -1].float(), -1)
        else:
            tok.padding_side = "left"
            enc = tok([it.prompt for it in chunk], padding=True, return_tensors="pt")
            with torch.inference_mode():
                lm.generate(**enc, max_new_tokens=max_new_tokens(chunk[0].task), do_sample=False,
                            pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t0


def ours(model, items, batch: int) -> tuple[float, float]:
    """(total seconds, steady-state seconds) of the evaluation stage on `items`."""
    from recall_ray.evaluate import evaluate_models

    with progress_marks() as marks:
        t0 = time.perf_counter()
        evaluate_models([model], [items[0].task], REPO / "data", items=items, batch_size=batch)
        total = time.perf_counter() - t0
    return total, steady_seconds(marks, sum(len(i.kinds) for i in items))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "evaluation"))
    args = p.parse_args()
    model_dir, model = setup(args.model)
    from recall_ray.cluster.runtime import ray_runtime
    from recall_ray.config import RayConfig
    from recall_ray.evaluate import build_items

    threads = os.cpu_count() or 1
    rows = []
    with ray_runtime(RayConfig(object_store_memory=256 * 1024**2)):
        for task in args.tasks:
            items = build_items(REPO / "data", [task], "test", args.samples, "loglik")
            gen_items = build_items(REPO / "data", [task], "test", args.samples, "generate")
            a_tot, a_steady, b, old = [], [], [], []
            for r in range(args.repeats):  # alternate the sides
                tot, steady = ours(model, items, 16)
                a_tot.append(tot)
                a_steady.append(steady)
                b.append(bare_loop(model_dir, items, 16, threads))
                if items[0].options and r == 0:  # the old protocol: greedy generation, once
                    old.append(ours(model, gen_items, 16)[1])
            n = len(items)
            steady = None if None in a_steady else statistics.median(a_steady)
            row = {"task": task, "prompts": n, "protocol": items[0].protocol,
                   # with start-up where no steady rate could be read (see common.steady_seconds)
                   "steady": steady is not None,
                   "ours_s_per_prompt": (steady if steady is not None else statistics.median(a_tot)) / n,
                   "ours_total_s_per_prompt": statistics.median(a_tot) / n,
                   "bare_s_per_prompt": statistics.median(b) / n,
                   "generate_protocol_s_per_prompt": (old[0] / n) if old and old[0] is not None else None}
            row["ratio_prompts_per_s"] = row["bare_s_per_prompt"] / row["ours_s_per_prompt"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"samples": args.samples, "repeats": args.repeats, "model": args.model, "threads": threads,
            "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| task | protocol | ours s/prompt (steady) | ours s/prompt (with start-up) | bare loop s/prompt |"
             " ratio (ours/bare prompts/s) | generate protocol s/prompt |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = f"{r['generate_protocol_s_per_prompt']:.3f}" if r["generate_protocol_s_per_prompt"] else ""
        star = "" if r["steady"] else " (with start-up)"
        lines.append(f"| {r['task']} | {r['protocol']} | {r['ours_s_per_prompt']:.3f}{star} | {r['ours_total_s_per_prompt']:.3f}"
                     f" | {r['bare_s_per_prompt']:.3f} | {r['ratio_prompts_per_s']:.2f} | {g} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
