"""Each sequential model paired with the base on the same records (sign test), per step.

The sequential scenario scores its lines (RECALL, SeqFT, EWC, ...) after every step, not the
base: the base's answers on the same records come from the committed score caches of the
long experts' runs, scored with the same prompts and protocol: the five tasks at 200 test
samples from score_cache/forgetting_multi/, the three general-ability sets at all 500 test
records from score_cache/forgetting_single/. Every model's records must be the base's (the
script stops if not). The counting is the project's own (analysis.paired_comparison, and
studies.common.general_per_eval for the general sets pooled), so paired_base.csv here has the
columns of every other published paired_base.csv: per step (`eval`), per model (`b`) and task,
`only_a` right for the base alone, `only_b` for the model alone; task "all" pools every
scored task, "general" the three general-ability sets.

    python jobs/scenario.py --config configs/scenarios/forgetting_sequential.yaml   # runs/forgetting_sequential
    python docs/results/forgetting_sequential/paired_base.py                         # then this: paired_base.csv
"""
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from recall_ray.analysis import paired_comparison  # noqa: E402
from recall_ray.core.templates import is_general  # noqa: E402
from recall_ray.studies.common import general_per_eval, read_predictions  # noqa: E402

RUN = ROOT / "runs/forgetting_sequential"
# cache -> whether it holds the base's general-ability sets (True) or its five tasks (False)
CACHES = {ROOT / "score_cache/forgetting_multi": False, ROOT / "score_cache/forgetting_single": True}


def base_predictions() -> pd.DataFrame:
    """The base's predictions: each task from the cache that scored it at the sequential's size."""
    parts = []
    for cache, general in CACHES.items():
        for f in sorted(cache.glob("*.predictions.jsonl")):
            with open(f) as fh:
                first = json.loads(fh.readline())
            if first["model"] == "base" and is_general(first["task"]) == general:
                parts.append(read_predictions(f))
    if not parts:
        raise SystemExit(f"no base predictions in {', '.join(map(str, CACHES))}")
    base = pd.concat(parts, ignore_index=True)
    dup = base.duplicated(["task", "sample_id"])
    if dup.any():
        raise SystemExit(f"the caches score the base twice on {dup.sum()} records: which one is meant?")
    return base


def main() -> None:
    base = base_predictions()
    records = {t: set(map(str, g["sample_id"])) for t, g in base.groupby("task")}
    evals = sorted(RUN.glob("step*/eval/predictions.jsonl"), key=lambda f: int(f.parts[-3].removeprefix("step")))
    if not evals:
        raise SystemExit(f"{RUN} holds no step evaluation: run the scenario first")
    tables = []
    for f in evals:
        step = f.parts[-3]
        preds = read_predictions(f)
        for (model, task), g in preds.groupby(["model", "task"], sort=False):
            if set(map(str, g["sample_id"])) != records.get(task, set()):
                raise SystemExit(f"{step} {model} {task}: not the base's records "
                                 f"({len(g)} against {len(records.get(task, ()))})")
        both = pd.concat([base, preds], ignore_index=True)
        tables += [paired_comparison(both, "base", m).assign(eval=step) for m in dict.fromkeys(preds["model"])]
    out = pd.concat(tables, ignore_index=True)
    out = out[["eval", *[c for c in out.columns if c != "eval"]]]
    out = pd.concat([out, general_per_eval(out)], ignore_index=True)
    dest = Path(__file__).with_name("paired_base.csv")
    out.to_csv(dest, index=False, float_format="%.4f")
    print(out[out["task"].isin(["all", "general"])].to_string(index=False))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
