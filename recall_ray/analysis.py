"""Analysis of a finished run directory: its tables read back, and the paper's figures as
matplotlib Figures (for notebooks/analysis.ipynb and for PNG files). The numbers are
computed by recall_ray.core.analysis.

- per-layer similarity of every model to the new model, and the merge weights (Figure 6
  and the weights behind every merge), from `weights.csv`;
- similarity between adjacent layers of one model (Figure 7), from `reps/<model>/`;
- the forgetting curve of a sequential run (Figure 5), from its `scores.csv`.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from .core.analysis import (  # noqa: F401  (the numbers, re-exported for notebooks)
    adjacent_layer_similarity,
    forgetting_table,
    paired_comparison,
    paired_counts,
    sign_test,
    weight_summary,
)
from .io.reps_parquet import layer_column, read_layer
from .io.storage import is_staging_name


def adjacent_table(run_dir: str | Path) -> pd.DataFrame:
    """`adjacent_layer_similarity` of every model with finished representations in the run
    (temporary folders skipped): columns model, layer (the upper layer i+1), similarity."""
    import pyarrow.parquet as pq

    rows = []
    for model_dir in sorted(Path(run_dir, "reps").iterdir()):
        # a killed run can leave a half-written `<model>.tmp-<hex>` (or a hidden staging
        # sibling) beside the finished ones; every such name carries storage.TMP_MARK
        if not model_dir.is_dir() or is_staging_name(model_dir.name):
            continue
        names = set(pq.read_schema(next(model_dir.glob("*.parquet"))).names)
        num = 0
        while layer_column(num) in names:
            num += 1
        layers = [read_layer(str(model_dir), i)[1] for i in range(num)]
        for i, s in enumerate(adjacent_layer_similarity(layers), start=1):
            rows.append({"model": model_dir.name, "layer": i, "similarity": s})
    return pd.DataFrame(rows)



# -------------------------------------------------------------------------------- plots

def _axes(title: str, xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt  # the caller's backend: inline in notebooks, Agg when headless

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_lines(table: pd.DataFrame, x: str, y: str, by: str, title: str, ylabel: str, xlabel: str | None = None):
    """One line per value of `by` (models, methods, tasks) over `x`."""
    fig, ax = _axes(title, xlabel or x, ylabel)
    for key in dict.fromkeys(table[by]):
        sub = table[table[by] == key].sort_values(x)
        ax.plot(sub[x], sub[y], marker="o", markersize=3, label=str(key))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_forgetting(scores: pd.DataFrame, primary: dict[str, str]):
    """Mean primary score over the tasks seen so far, per method, against the step."""
    table = forgetting_table(scores, primary)
    fig = plot_lines(table, "step", "mean_seen", "method", "forgetting curve", "mean score on tasks seen so far",
                     "step (tasks learned)")
    from matplotlib.ticker import MaxNLocator

    fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps
    return fig


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def option_hits(predictions: pd.DataFrame, data_dir: str | Path, split: str = "test") -> pd.DataFrame:
    """Per general-ability record of an evaluation's predictions (predictions.jsonl: model,
    task, sample_id, option_logprobs as the list of each option's summed log-probability,
    references), whether each metric's choice (core.metrics.OPTION_RULES: acc, acc_norm) is
    the correct option: model, task, sample_id, metric, hit. The options' lengths come from
    the task's records in `data_dir` (the same continuations the evaluation scored)."""
    from .core.metrics import OPTION_RULES, TASK_METRICS, option_picks
    from .evaluate import build_items

    general = [t for t in dict.fromkeys(predictions["task"]) if TASK_METRICS[t].by_options]
    options = {(i.task, i.sample_id): i.options for i in build_items(data_dir, general, split, None)}
    rows = []
    for _, p in predictions[predictions["task"].isin(general)].iterrows():
        key = (p["task"], str(p["sample_id"]))
        if key not in options:
            raise ValueError(f"{p['task']} sample {key[1]} is not in the {split} split under {data_dir}")
        picks = option_picks([[s] for s in p["option_logprobs"]], options[key])
        rows += [{"model": p["model"], "task": p["task"], "sample_id": key[1], "metric": m,
                  "hit": int(str(picks[m]) == p["references"][0])} for m in OPTION_RULES]
    return pd.DataFrame(rows, columns=["model", "task", "sample_id", "metric", "hit"])


def option_intervals(hits: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each (model, task, metric) score of `option_hits` in percent with its 95%
    percentile-bootstrap interval (core.analysis.intervals, seeded) and n."""
    from .core.analysis import intervals

    rows = []
    for (model, task, metric), g in hits.groupby(["model", "task", "metric"], sort=False):
        value, lo, hi = intervals({task: g["hit"].to_numpy()}, seed=seed)[task]
        rows.append({"model": model, "task": task, "metric": metric, "value": value, "lo": lo, "hi": hi,
                     "n": len(g)})
    return pd.DataFrame(rows)
