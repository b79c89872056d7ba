"""Analysis functions against plain numpy / hand-made tables, and the notebook executed on
a tiny finished run so that it cannot rot."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from recall_ray.analysis import (adjacent_layer_similarity, adjacent_table, forgetting_table, paired_comparison,
                                 sign_test, weight_summary)


def test_adjacent_layer_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(7, 5)) for _ in range(4)]
    layers[2][3] = 0.0  # a zero vector: cosine 0, not NaN
    got = adjacent_layer_similarity(layers)
    expect = []
    for i in range(3):
        cos = []
        for a, b in zip(layers[i], layers[i + 1]):
            na, nb = np.sqrt((a * a).sum()), np.sqrt((b * b).sum())
            cos.append(0.0 if na == 0 or nb == 0 else float((a * b).sum() / (na * nb)))
        expect.append(sum(cos) / len(cos))
    assert np.allclose(got, expect, atol=1e-12)
    assert adjacent_layer_similarity([layers[0], layers[0]])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two layers"):
        adjacent_layer_similarity(layers[:1])


def test_forgetting_table_averages_seen_tasks_only():
    rows = []
    # step 1 learns a, step 2 learns b; task b's score at step 1 is before it was learned
    for method, vals in {"recall": {(1, "a"): 80, (1, "b"): 10, (2, "a"): 70, (2, "b"): 60},
                         "seqft": {(1, "a"): 80, (1, "b"): 12, (2, "a"): 30, (2, "b"): 66}}.items():
        for (step, task), v in vals.items():
            rows.append({"step": step, "trained": "a" if step == 1 else "b", "method": method, "task": task,
                         "metric": "accuracy", "value": v})
            rows.append({"step": step, "trained": "a" if step == 1 else "b", "method": method, "task": task,
                         "metric": "other", "value": -1})
    table = forgetting_table(pd.DataFrame(rows), {"a": "accuracy", "b": "accuracy"})
    got = {(r.method, r.step): r.mean_seen for r in table.itertuples()}
    assert got == {("recall", 1): 80, ("recall", 2): 65, ("seqft", 1): 80, ("seqft", 2): 48}


def test_weight_summary_matches_a_plain_computation():
    rng = np.random.default_rng(3)
    layers, models = 5, ["base", "e0", "new"]
    raw = rng.random((layers, len(models)))
    w = raw / raw.sum(axis=1, keepdims=True)
    sat = [True, False, False, True, False]
    rows = [{"layer": i, "model": m, "weight": w[i, q], "saturated": sat[i]} for q, m in enumerate(models)
            for i in reversed(range(layers))]  # unsorted on purpose
    got = weight_summary(pd.DataFrame(rows))
    assert list(got["model"]) == models
    for q, m in enumerate(models):
        col = [float(w[i, q]) for i in range(layers)]
        row = got[got["model"] == m].iloc[0]
        assert row["mean"] == pytest.approx(sum(col) / layers, abs=1e-12)
        assert (row["min"], row["max"]) == (min(col), max(col))
        assert row["spread"] == pytest.approx(max(col) - min(col), abs=1e-12)
        assert row["argmax_layer"] == col.index(max(col))
        assert row["saturated_layers"] == 2
    with pytest.raises(ValueError, match="saturated"):
        weight_summary(pd.DataFrame(rows).drop(columns="saturated"))


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (3, 0), (0, 3), (4, 9), (7, 19), (10, 10), (1, 30), (52, 10),
                                           (600, 500), (3000, 2800)])
def test_sign_test_equals_scipys_exact_binomial_test(only_a, only_b):
    from scipy.stats import binomtest

    want = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert sign_test(only_a, only_b) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_paired_comparison_counts_each_sample_once_against_a_plain_count():
    rng = np.random.default_rng(7)
    rows, truth = [], {}
    for task, labels in (("sst2", ["positive", "negative"]), ("medmcqa", ["A", "B", "C", "D"])):
        for i in range(25):
            ref = labels[rng.integers(len(labels))]
            for model in ("recall", "average", "expert"):
                if model == "expert" and task == "sst2":
                    continue  # scored on medmcqa only, like an expert on its own task
                pred = ref if rng.random() < 0.5 else (None if rng.random() < 0.3 else labels[0])
                truth[(model, task, str(i))] = int(pred == ref)
                rows.append({"model": model, "task": task, "sample_id": str(i), "prediction": pred, "references": [ref]})
    preds = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # any order

    def plain(a, b, tasks):
        keys = [(t, str(i)) for t in tasks for i in range(25)]
        both = sum(truth[(a, t, i)] and truth[(b, t, i)] for t, i in keys)
        oa = sum(truth[(a, t, i)] and not truth[(b, t, i)] for t, i in keys)
        ob = sum(not truth[(a, t, i)] and truth[(b, t, i)] for t, i in keys)
        return len(keys), both, oa, ob

    got = paired_comparison(preds, "recall", "average").set_index("task")
    assert list(got.index) == [t for t in dict.fromkeys(preds.loc[preds["model"] == "recall", "task"])] + ["all"]
    for task, tasks in (("sst2", ["sst2"]), ("medmcqa", ["medmcqa"]), ("all", ["sst2", "medmcqa"])):
        n, both, oa, ob = plain("recall", "average", tasks)
        row = got.loc[task]
        assert (row["n"], row["both"], row["only_a"], row["only_b"], row["neither"]) == (n, both, oa, ob, n - both - oa - ob)
        assert row["score_a"] == pytest.approx(100.0 * (both + oa) / n)
        assert row["p_value"] == pytest.approx(sign_test(oa, ob))
    only = paired_comparison(preds, "recall", "expert")  # the shared samples only: one task, no "all" row
    assert list(only["task"]) == ["medmcqa"] and only["n"].iloc[0] == 25
    with pytest.raises(ValueError, match="no predictions of model 'nobody'"):
        paired_comparison(preds, "recall", "nobody")


def test_adjacent_table_reads_every_model_of_a_run(tiny_run):
    cfg, _ = tiny_run
    table = adjacent_table(cfg.run_dir)
    assert set(table["model"]) == {"base", "e0", "new"}
    assert sorted(table["layer"].unique()) == [1, 2]  # 3 representation layers -> 2 adjacent pairs
    assert table["similarity"].between(-1, 1).all()


def test_adjacent_table_skips_what_a_killed_write_left(tiny_run, tmp_path):
    """A run killed while writing a model's representations leaves `reps/<model>.tmp-<hex>`
    (and a finished rerun does not remove it): the table is the finished models' alone, the
    same rows as the clean run's, not the partial one as an extra model."""
    cfg, _ = tiny_run
    reps = tmp_path / "reps"
    shutil.copytree(Path(cfg.run_dir) / "reps", reps)
    shutil.copytree(reps / "new", reps / "new.tmp-b48ca156")  # as the killed run left it
    shutil.copytree(reps / "e0", reps / ".e0.tmp-x1y2z3")  # a hidden staging sibling
    got = adjacent_table(tmp_path)
    assert set(got["model"]) == {"base", "e0", "new"}
    pd.testing.assert_frame_equal(got, adjacent_table(cfg.run_dir))


def test_notebook_runs_on_a_tiny_run(tiny_run, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    cfg, _ = tiny_run
    seq = tmp_path / "scores.csv"
    pd.DataFrame([{"step": s, "trained": t, "method": "recall", "task": t2, "metric": "accuracy", "value": v}
                  for s, t, t2, v in [(1, "sst2", "sst2", 60.0), (2, "ag_news", "sst2", 55.0),
                                      (2, "ag_news", "ag_news", 40.0)]]).to_csv(seq, index=False)
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"RUN_DIR = {str(cfg.run_dir)!r}\nSEQUENCE_SCORES = {str(seq)!r}"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 4  # similarity, weights, adjacent layers, forgetting curve
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
