"""Analysis of finished runs, the numbers behind the paper's figures: pure functions of
arrays and tables (numpy / pandas in, numpy / pandas out). The plots and the readers of a
run directory are in recall_ray.analysis.

- per-layer similarity of every model to the new model, and the merge weights (Figure 6
  and the weights behind every merge), from `weights.csv`;
- similarity between adjacent layers of one model (Figure 7), from `reps/<model>/`;
- the forgetting curve of a sequential run (Figure 5), from its `scores.csv`;
- how much each model's merge weight moves across layers (`weight_summary`): a per-layer
  merge only differs from its layer-constant ablation where this spread is large.
- paired comparisons of two models on the same test samples (`paired_comparison`): how
  many samples only one of them gets right, and the exact sign test on those, since at a
  few dozen samples per task most differences between merges are within noise.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def adjacent_layer_similarity(layers: list[np.ndarray]) -> np.ndarray:
    """Mean over samples of the cosine between a sample's representations at layers i and
    i+1, for i = 0..L-1: how much each block changes the representation.

    layers: [n, H] arrays, one per layer (0 = embeddings), rows the same samples in order.
    A zero vector has cosine 0 with anything (instead of NaN).
    """
    if len(layers) < 2:
        raise ValueError(f"need at least two layers, got {len(layers)}")
    out = []
    for a, b in zip(layers[:-1], layers[1:]):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"layers have different shapes {a.shape} and {b.shape}")
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.divide((a * b).sum(axis=1), den, out=np.zeros(len(a)), where=den > 0)
        out.append(float(cos.mean()))
    return np.array(out)


def forgetting_table(scores: pd.DataFrame, primary: dict[str, str]) -> pd.DataFrame:
    """From a sequential run's long scores (step, method, task, metric, value; the task
    learned at step t is `trained`), the mean primary score over the tasks learned so far,
    per method and step: the forgetting curve's y values."""
    need = {"step", "trained", "method", "task", "metric", "value"}
    if not need <= set(scores.columns):
        raise ValueError(f"scores need columns {sorted(need)}, got {sorted(scores.columns)}")
    prim = scores[[primary.get(t) == m for t, m in zip(scores["task"], scores["metric"])]]
    learned_at = scores.groupby("trained")["step"].min().to_dict()
    prim = prim[[learned_at.get(t, np.inf) <= s for t, s in zip(prim["task"], prim["step"])]]
    return (prim.groupby(["method", "step"])["value"].mean().rename("mean_seen").reset_index()
            .sort_values(["method", "step"], ignore_index=True))


def weight_summary(weights: pd.DataFrame) -> pd.DataFrame:
    """Per model, its RECALL weight over the layers of one merge (a `weights.csv`: columns
    layer, model, weight, saturated): mean (the weight `recall_layer_constant` gives it in
    every layer), min, max, spread (max - min), the layer of its largest weight, and the
    number of saturated layers (every model's similarity to the new model was 0 or 1 there,
    so the softmax gave that layer the weights of a constant). Models in first-seen order."""
    need = {"layer", "model", "weight", "saturated"}
    if not need <= set(weights.columns):
        raise ValueError(f"weights need columns {sorted(need)}, got {sorted(weights.columns)}")
    rows = []
    for model in dict.fromkeys(weights["model"]):
        m = weights[weights["model"] == model].sort_values("layer")
        w = m["weight"].to_numpy(dtype=np.float64)
        rows.append({"model": model, "mean": w.mean(), "min": w.min(), "max": w.max(), "spread": w.max() - w.min(),
                     "argmax_layer": int(m["layer"].to_numpy()[int(np.argmax(w))]),
                     "saturated_layers": int(m["saturated"].astype(bool).sum())})
    return pd.DataFrame(rows)


def paired_counts(both: int, only_a: int, only_b: int, neither: int) -> dict:
    """A paired comparison's row from its four counts: n, the counts, each side's score
    (percent right) and the sign test on the discordant samples."""
    both, only_a, only_b, neither = int(both), int(only_a), int(only_b), int(neither)
    n = both + only_a + only_b + neither
    return {"n": n, "both": both, "only_a": only_a, "only_b": only_b, "neither": neither,
            "score_a": 100.0 * (both + only_a) / n, "score_b": 100.0 * (both + only_b) / n,
            "p_value": sign_test(only_a, only_b)}


def sign_test(only_a: int, only_b: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of the discordant pairs: the
    probability, if both models were equally good, of a split at least this uneven."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    # integer over integer: exact, and no float overflow of 2.0**n past n = 1023 discordant pairs
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_comparison(predictions: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Model `a` against model `b` on the samples both were scored on (predictions.jsonl:
    model, task, sample_id, prediction, references), on each task's primary metric: per
    task and over all of them ("all"), n, both right, only a, only b, neither, each one's
    score (%) on these samples, and the sign test's p-value on (only a, only b)."""
    from .metrics import sample_hits

    need = {"model", "task", "sample_id", "prediction", "references"}
    if not need <= set(predictions.columns):
        raise ValueError(f"predictions need columns {sorted(need)}, got {sorted(predictions.columns)}")
    hits = {}
    for model in (a, b):
        mine = predictions[predictions["model"] == model]
        if mine.empty:
            raise ValueError(f"no predictions of model {model!r}; models: {sorted(set(predictions['model']))}")
        for task, sub in mine.groupby("task", sort=False):
            preds = [x if isinstance(x, str) else None for x in sub["prediction"]]  # NaN: pandas' None
            for sid, h in zip(sub["sample_id"], sample_hits(task, preds, list(sub["references"]))):
                hits[(model, task, str(sid))] = h
    tasks = list(dict.fromkeys(predictions.loc[predictions["model"] == a, "task"]))
    rows = []
    pooled = np.zeros(4, dtype=int)  # both, only a, only b, neither
    for task in tasks:
        ids = [k[2] for k in hits if k[0] == a and k[1] == task and (b, task, k[2]) in hits]
        if not ids:
            continue
        ha = np.array([hits[(a, task, i)] for i in ids])
        hb = np.array([hits[(b, task, i)] for i in ids])
        counts = np.array([(ha & hb).sum(), (ha & (1 - hb)).sum(), ((1 - ha) & hb).sum(), ((1 - ha) & (1 - hb)).sum()])
        pooled += counts
        rows.append((task, counts))
    if not rows:
        raise ValueError(f"models {a!r} and {b!r} share no scored sample")
    if len(rows) > 1:
        rows.append(("all", pooled))
    out = [{"task": task, **paired_counts(*counts)} for task, counts in rows]
    return pd.DataFrame(out).assign(a=a, b=b)[["a", "b", "task", "n", "both", "only_a", "only_b", "neither",
                                                 "score_a", "score_b", "p_value"]]


# -------------------------------------------------------------------------- intervals

BOOTSTRAP_SAMPLES = 2000


def bootstrap_means(hits: dict[str, np.ndarray], n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0
                    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Percentile-bootstrap replicates of each task's score and of their mean, resampling
    each task's samples (with replacement, independently per task, tasks in sorted order)
    from one seeded generator. hits[task]: 0/1 (or real-valued) per-sample scores. Returns
    (the estimates, the replicates), both keyed by task and "mean" (the mean of the task
    scores), in percent."""
    if not hits or any(len(np.asarray(v)) == 0 for v in hits.values()):
        raise ValueError("every task needs at least one sample to bootstrap")
    rng = np.random.default_rng(seed)
    est, reps = {}, {}
    for task in sorted(hits):
        x = 100.0 * np.asarray(hits[task], dtype=np.float64)
        est[task] = float(x.mean())
        reps[task] = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    est["mean"] = float(np.mean([est[t] for t in hits]))
    reps["mean"] = np.mean([reps[t] for t in hits], axis=0)
    return est, reps


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(replicates, dtype=np.float64), [a, 1.0 - a])
    return float(lo), float(hi)


def intervals(hits: dict[str, np.ndarray], n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95,
              groups: dict[str, list[str]] | None = None) -> dict[str, tuple[float, float, float]]:
    """(estimate, low, high) of each task's score and of "mean" over tasks; `groups` adds the
    mean over a subset of the tasks under its own name (e.g. "unseen": every task but the
    one fine-tuned on), from the same replicates."""
    est, reps = bootstrap_means(hits, n_boot, seed)
    for name, tasks in (groups or {}).items():
        if not tasks:
            continue
        est[name] = float(np.mean([est[t] for t in tasks]))
        reps[name] = np.mean([reps[t] for t in tasks], axis=0)
    return {k: (est[k], *percentile_interval(reps[k], level)) for k in est}
