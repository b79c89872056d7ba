"""Gather the base's evaluation jobs (runs/general_base/<task>/, the commands in README.md beside
this file) into docs/results/general_base/: scores.csv, scores.md, intervals.csv (95% bootstrap
intervals, whose point estimates must equal the jobs' scores) and intervals_first200.csv.

    python docs/results/general_base/gather.py arc_easy piqa hellaswag    # from the repository root
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this checkout's recall_ray

import pandas as pd

from recall_ray.analysis import option_hits, option_intervals
from recall_ray.evaluate import wide_table
from recall_ray.report import markdown_table

tasks = sys.argv[1:]
src, dest = Path("runs/general_base"), Path("docs/results/general_base")
dest.mkdir(parents=True, exist_ok=True)
scores = pd.concat([pd.read_csv(src / t / "scores.csv") for t in tasks], ignore_index=True)
preds = pd.concat([pd.DataFrame([json.loads(l) for l in (src / t / "predictions.jsonl").read_text().splitlines() if l.strip()])
                   for t in tasks], ignore_index=True)
scores.to_csv(dest / "scores.csv", index=False, float_format="%.4f")
(dest / "scores.md").write_text(markdown_table(wide_table(scores).reset_index()))
iv = option_intervals(option_hits(preds, "data"))
# the intervals' point estimates are the job's own scores
merged = iv.merge(scores, on=["model", "task", "metric"], suffixes=("", "_job"))
assert len(merged) == len(iv) and (abs(merged["value"] - merged["value_job"]) < 1e-9).all(), merged
iv.to_csv(dest / "intervals.csv", index=False, float_format="%.2f")
print(iv.to_string())
first = pd.concat([g.iloc[:200] for _, g in preds.groupby("task", sort=False)], ignore_index=True)
option_intervals(option_hits(first, "data")).to_csv(dest / "intervals_first200.csv", index=False, float_format="%.2f")
