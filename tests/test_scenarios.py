"""Scenario jobs on tiny models: every baseline's merged tensors against a float64 numpy
reference, LM-Cocktail's weights from losses recomputed independently, the table, resume,
and bad scenario configs refused before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import DATA, REPO, float64_state, reference_group

from recall_ray.config import ConfigError
from recall_ray.studies.common import pooled_over_evals
from recall_ray.studies.oneshot import ScenarioConfig, preflight, run_scenario, variants
from recall_ray.studies.registry import load_study as load_scenario


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, tiny_experts):
    d = tmp_path_factory.mktemp("experts")
    os.symlink(tiny_experts[0], d / "sst2")
    os.symlink(tiny_experts[1], d / "ag_news")
    return d


def _cfg(tmp: Path, experts_dir: Path, tiny_dir: Path, **extra) -> ScenarioConfig:
    tree = {
        "scenario": "multi", "run_dir": str(tmp / "run"), "base": str(tiny_dir), "data_dir": str(DATA),
        "tasks": ["sst2", "ag_news"], "experts": str(experts_dir),
        "baselines": {"lam": 0.7, "ties_density": 0.5, "dare_drop": 0.5, "cocktail_examples": 4,
                      "cocktail_temperature": 0.5},
        "recall": {"max_samples": 24, "typical": {"k": 3}, "similarity": {"sigma": "median"},
                   "representations": {"batch_size": 8}},
        # every model also on two records of a general-ability set
        "evaluate": {"max_samples": 1, "batch_size": 4, "general_tasks": ["piqa"], "general_max_samples": 2},
        "include_base": [False],
    }
    tree.update(extra)
    return ScenarioConfig.model_validate(tree)


@pytest.fixture(scope="module")
def multi(tmp_path_factory, experts_dir, tiny_dir, ray_session):
    tmp = tmp_path_factory.mktemp("multi")
    cfg = _cfg(tmp, experts_dir, tiny_dir, recall_variants={"l2": {"similarity": {"preset": "validated"}}})
    return cfg, run_scenario(cfg)


def test_multi_table_has_every_variant_and_model(multi):
    cfg, result = multi
    rows = set(zip(result.table["variant"], result.table["model"]))
    for variant in ("without_base",):
        for model in ("base", "expert:sst2", "expert:ag_news", "recall", "recall_layer_constant", "average",
                      "task_arithmetic", "ties", "dare_average", "dare_task_arithmetic", "lm_cocktail"):
            assert (variant, model) in rows, (variant, model)
    run = Path(cfg.run_dir)
    for f in ("scores.csv", "table.csv", "table.md", "plots/without_base_weights.png", "plots/without_base_adjacent.png",
              "without_base/recall/weights.csv", "without_base/eval/predictions.jsonl",
              "without_base/merged/ties/mergekit.yaml", "without_base/recall/merged/mergekit.yaml"):
        assert (run / f).exists(), f
    # DARE+Avg with the base among the averaged models has no meaning without the base: no row
    assert ("without_base", "dare_average_with_base") not in rows
    assert not (run / "without_base" / "merged" / "dare_average_with_base").exists()
    # experts are scored on their own task only, and every model on the general-ability set
    s = result.scores
    assert set(s.loc[s["model"] == "expert:sst2", "task"]) == {"sst2", "piqa"}
    assert set(s.loc[s["model"] == "recall", "task"]) == {"sst2", "ag_news", "piqa"}
    piqa = s[s["task"] == "piqa"]
    assert set(piqa["n"]) == {2} and set(piqa["metric"]) == {"acc", "acc_norm"} and set(piqa["protocol"]) == {"loglik"}
    assert piqa["model"].nunique() == len(set(s["model"]))
    # "mean" over the scenario's tasks, "general" over the general-ability set
    t = result.table.set_index(["variant", "model"]).loc["without_base"]
    assert (t["general"] == t["piqa"]).all()
    recall = t.loc["recall"]
    assert recall["mean"] == pytest.approx((recall["sst2"] + recall["ag_news"]) / 2)


@pytest.mark.parametrize("variant,include_base", [("without_base", False)])
def test_merged_tensors_match_float64_reference(multi, tiny_dir, tiny_experts, variant, include_base):
    cfg, _ = multi
    run = Path(cfg.run_dir) / variant
    base, e_sst2, e_ag = float64_state(tiny_dir), float64_state(tiny_experts[0]), float64_state(tiny_experts[1])
    models = [base, e_sst2, e_ag]  # merge order: base, old experts, the new task's expert
    layers = 2
    w = pd.read_csv(run / "recall" / "weights.csv")
    label = {"base": 0, "sst2": 1, "ag_news": 2}
    W = np.zeros((layers + 1, 3))
    for r in w.itertuples():
        W[r.layer, label[r.model]] = r.weight
    const = W.mean(axis=0)
    lam = 0.7
    for name, t in float64_state(run / "merged" / "average").items():
        parts = models if include_base else models[1:]
        assert np.allclose(t, sum(m[name] for m in parts) / len(parts), atol=1e-6), name
    for name, t in float64_state(run / "recall" / "merged").items():
        g = reference_group(name, layers)
        assert np.allclose(t, sum(W[g, q] * models[q][name] for q in range(3)), atol=1e-6), name
    for name, t in float64_state(run / "merged" / "recall_layer_constant").items():
        assert np.allclose(t, sum(const[q] * models[q][name] for q in range(3)), atol=1e-6), name
    for name, t in float64_state(run / "merged" / "task_arithmetic").items():
        expect = base[name] + lam * ((e_sst2[name] - base[name]) + (e_ag[name] - base[name]))
        assert np.allclose(t, expect, atol=1e-5), name
    # TIES and DARE: the rules are checked in test_merge_methods; here they must be real merges
    for method in ("ties", "dare_average", "dare_task_arithmetic"):
        st = float64_state(run / "merged" / method)
        assert set(st) == set(base)
        assert any(not np.array_equal(st[n], base[n]) for n in st), method


def test_recall_variant_rows_are_recall_with_their_own_similarity(multi, tiny_dir, tiny_experts):
    """A recall_variants entry is a second RECALL merge with its similarity (here the
    validated preset, L2 and T 0.02): rows recall_l2 and recall_l2_layer_constant, each
    merged tensor the float64 sum of its own weights.csv, scored beside recall."""
    cfg, result = multi
    run = Path(cfg.run_dir) / "without_base"
    rows = set(zip(result.table["variant"], result.table["model"]))
    assert {("without_base", "recall_l2"), ("without_base", "recall_l2_layer_constant")} <= rows
    main = pd.read_csv(run / "recall" / "weights.csv")
    w = pd.read_csv(run / "recall_l2" / "recall" / "weights.csv")
    manifest = yaml.safe_load((run / "recall_l2" / "recall" / "manifest.json").read_text())
    assert manifest["config"]["similarity"]["normalize"] == "l2" and manifest["config"]["similarity"]["temperature"] == 0.02
    assert not np.allclose(w["weight"], main["weight"])  # another similarity, other weights
    models = {"sst2": float64_state(tiny_experts[0]), "ag_news": float64_state(tiny_experts[1])}
    const = w.groupby("model")["weight"].mean()
    for name, t in float64_state(run / "recall_l2" / "recall" / "merged").items():
        rows_g = w[w["layer"] == reference_group(name, 2)]
        assert np.allclose(t, sum(r.weight * models[r.model][name] for r in rows_g.itertuples()), atol=1e-6), name
    for name, t in float64_state(run / "recall_l2" / "merged" / "recall_layer_constant").items():
        assert np.allclose(t, sum(const[m] * models[m][name] for m in models), atol=1e-6), name
    # the scenario's tasks, and the general-ability set the fixture scores every model on
    assert set(result.scores.loc[result.scores["model"] == "recall_l2", "task"]) == {"sst2", "ag_news", "piqa"}
    assert (Path(cfg.run_dir) / "plots" / "without_base_recall_l2_weights.png").exists()


def test_lm_cocktail_weights_come_from_independent_losses(multi, tiny_dir, tiny_experts):
    """Loss per answer token recomputed with HF's own `labels=` loss, one example at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.io.splits import load_split

    cfg, _ = multi
    examples = load_split(DATA, "ag_news", "train", max_samples=4)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    losses = []
    for d in (tiny_dir, tiny_experts[0], tiny_experts[1]):
        lm = AutoModelForCausalLM.from_pretrained(d).eval()
        total, count = 0.0, 0
        for r in examples:
            p = tok(r["prompt"])["input_ids"]
            t = tok(r["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p + t)[-128:]
            labels = [-100] * (len(ids) - len(t)) + t
            with torch.no_grad():
                out = lm(torch.tensor([ids]), labels=torch.tensor([labels]))
            total += float(out.loss) * len(t)
            count += len(t)
        losses.append(total / count)
    base, e1, e2 = float64_state(tiny_dir), float64_state(tiny_experts[0]), float64_state(tiny_experts[1])
    for variant, parts in (("without_base", [1, 2]),):
        z = np.array([-losses[q] / 0.5 for q in parts])
        w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        got = float64_state(Path(cfg.run_dir) / variant / "merged" / "lm_cocktail")
        models = [base, e1, e2]
        for name, t in got.items():
            assert np.allclose(t, sum(wq * models[q][name] for wq, q in zip(w, parts)), atol=1e-5), name


def test_rerun_recomputes_nothing(multi):
    cfg, _ = multi
    again = run_scenario(cfg)
    assert again.timings and all(t["skipped"] for t in again.timings.values()), again.timings


def test_publish_copies_tables_plots_and_every_stage_time(multi, tmp_path):
    import json

    from recall_ray.studies.common import publish

    cfg, _ = multi
    names = publish(cfg.run_dir, tmp_path / "pub")
    out = tmp_path / "pub"
    assert {"table.md", "table.csv", "scores.csv", "stage_times.csv", "plots/without_base_weights.png",
            "weights/without_base.csv", "weights_summary.csv", "paired.csv", "paired_base.csv",
            "paired_layer_constant.csv"} <= set(names)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(names)
    src_weights = Path(cfg.run_dir) / "without_base" / "recall" / "weights.csv"
    assert (out / "weights" / "without_base.csv").read_bytes() == src_weights.read_bytes()
    # the summary, recomputed plainly from the per-layer weights
    w = pd.read_csv(src_weights)
    summary = pd.read_csv(out / "weights_summary.csv")
    # the named RECALL row (recall_variants) publishes its weights beside the main row's
    assert set(summary["merge"]) == {"without_base", "without_base_recall_l2"}
    assert (out / "weights" / "without_base_recall_l2.csv").read_bytes() == (
        Path(cfg.run_dir) / "without_base" / "recall_l2" / "recall" / "weights.csv").read_bytes()
    summary = summary[summary["merge"] == "without_base"]
    assert list(summary["model"]) == list(dict.fromkeys(w["model"]))
    for _, row in summary.iterrows():
        mine = w[w["model"] == row["model"]]
        vals = np.array(mine["weight"], dtype=np.float64)
        assert row["mean"] == pytest.approx(vals.sum() / len(vals), abs=1e-4)
        assert row["spread"] == pytest.approx(vals.max() - vals.min(), abs=1e-4)
        assert row["argmax_layer"] == int(mine["layer"].iloc[int(np.argmax(vals))])
        assert row["saturated_layers"] == int(mine["saturated"].sum())
    # RECALL paired against every other model of the evaluation; each side's score on the
    # shared samples is that model's score in the scenario's own table
    paired = pd.read_csv(out / "paired.csv")
    table = pd.read_csv(out / "table.csv").set_index(["variant", "model"])
    others = set(table.loc["without_base"].index) - {"recall"}
    assert set(paired["b"]) == others and set(paired["a"]) == {"recall"} and set(paired["eval"]) == {"without_base"}
    from recall_ray.analysis import sign_test

    for _, row in paired.iterrows():  # 3 significant digits, however small
        assert row["p_value"] == pytest.approx(sign_test(row["only_a"], row["only_b"]), rel=5e-3)
    for _, row in paired[~paired["task"].isin(["all", "general"])].iterrows():
        assert row["score_a"] == pytest.approx(table.loc[("without_base", "recall"), row["task"]], abs=0.01)
        assert row["score_b"] == pytest.approx(table.loc[("without_base", row["b"]), row["task"]], abs=0.01)
    # the base paired against every other model the same way: each expert's and merge's gain
    # or loss against it, counted again here from the predictions
    vs_base = pd.read_csv(out / "paired_base.csv")
    assert set(vs_base["a"]) == {"base"} and set(vs_base["b"]) == set(table.loc["without_base"].index) - {"base"}
    lines = (Path(cfg.run_dir) / "without_base" / "eval" / "predictions.jsonl").read_text().splitlines()
    preds = pd.DataFrame([json.loads(line) for line in lines if line.strip()])
    from recall_ray.core.metrics import sample_hits

    def hits(model: str, task: str) -> dict:
        mine = preds[(preds["model"] == model) & (preds["task"] == task)]
        return dict(zip(mine["sample_id"].astype(str), sample_hits(task, list(mine["prediction"]), list(mine["references"]))))

    for _, row in vs_base[~vs_base["task"].isin(["all", "general"])].iterrows():
        a, b = hits("base", row["task"]), hits(row["b"], row["task"])
        assert (row["only_a"], row["only_b"]) == (sum(a[i] and not b[i] for i in a), sum(b[i] and not a[i] for i in a))
        assert row["score_a"] == pytest.approx(table.loc[("without_base", "base"), row["task"]], abs=0.01)
        assert row["p_value"] == pytest.approx(sign_test(row["only_a"], row["only_b"]), rel=5e-3)
    # each RECALL row against its own layer-constant control, never against another's
    controls = pd.read_csv(out / "paired_layer_constant.csv")
    assert set(zip(controls["a"], controls["b"])) == {("recall", "recall_layer_constant"),
                                                      ("recall_l2", "recall_l2_layer_constant")}
    for _, row in controls[~controls["task"].isin(["all", "general"])].iterrows():
        a, b = hits(row["a"], row["task"]), hits(row["b"], row["task"])
        assert (row["only_a"], row["only_b"]) == (sum(a[i] and not b[i] for i in a), sum(b[i] and not a[i] for i in a))
        for side in ("a", "b"):
            assert row[f"score_{side}"] == pytest.approx(table.loc[("without_base", row[side]), row["task"]], abs=0.01)
    # each model's general row: its general-ability sets' counts summed
    from recall_ray.core.templates import is_general

    for table_ in (paired, vs_base, controls):
        general = table_[table_["task"] == "general"]
        assert set(general["b"]) == set(table_["b"]) and set(general["eval"]) == {"without_base"}
        for _, row in general.iterrows():
            sets = table_[(table_["b"] == row["b"]) & table_["task"].map(is_general).astype(bool)]
            assert len(sets) == len(cfg.evaluate.general_tasks) > 0
            for c in ("n", "both", "only_a", "only_b", "neither"):
                assert row[c] == sets[c].sum(), c
    times = pd.read_csv(out / "stage_times.csv")
    top = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())["stages"]
    want = {k: v["seconds"] for k, v in top.items()}
    for where in ("without_base/recall", "without_base/recall_l2/recall"):  # each RECALL run's own stages
        nested = json.loads((Path(cfg.run_dir) / where / "manifest.json").read_text())["stages"]
        want.update({f"{where}/{k}": v["seconds"] for k, v in nested.items()})
    got = dict(zip(times["stage"], times["seconds"]))
    assert set(got) == set(want)
    # written with one decimal: off by at most half a tenth, plus float64's error on that
    # difference (1.1 - 1.05 == 0.05000000000000004)
    off = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > 0.05 + 1e-9}
    assert not off
    with pytest.raises(FileNotFoundError, match="no table.csv"):
        publish(tmp_path / "empty", tmp_path / "pub2")


def test_publish_leaves_out_what_other_runs_left_in_a_shared_directory(multi, tmp_path):
    """A run directory shared with other runs (a selection's candidates, the same scenario
    with more variants) holds their variants' evaluations, weights, plots and stages as a
    cache. Publishing the last run gives that run's alone: here a copy of the directory gets
    a with_base variant that the recorded run (include_base: [false]) did not have."""
    import json
    import shutil

    from recall_ray.studies.common import publish

    cfg, _ = multi
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run, symlinks=True)
    shutil.copytree(run / "without_base", run / "with_base", symlinks=True)  # another run's variant
    for f in list((run / "plots").glob("without_base_*.png")):
        shutil.copy2(f, run / "plots" / f.name.replace("without_base", "with_base"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["with_base/evaluate"] = {**manifest["stages"]["without_base/evaluate"]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    names = publish(run, tmp_path / "pub")
    assert not [n for n in names if "with_base" in n.replace("without_base", "")], names
    assert "weights/without_base.csv" in names and "plots/without_base_weights.png" in names
    paired = pd.read_csv(tmp_path / "pub" / "paired.csv")
    assert set(paired["eval"]) == {"without_base"}
    assert set(pd.read_csv(tmp_path / "pub" / "weights_summary.csv")["merge"]) == {"without_base",
                                                                                   "without_base_recall_l2"}
    stages = pd.read_csv(tmp_path / "pub" / "stage_times.csv")["stage"]
    assert not stages.str.startswith("with_base/").any() and stages.str.startswith("without_base/").any()


def test_pooled_over_evals_sums_disjoint_variants_only():
    from recall_ray.analysis import sign_test

    def row(ev, b, task, both, oa, ob, neither):
        n = both + oa + ob + neither
        return {"eval": ev, "a": "recall", "b": b, "task": task, "n": n, "both": both, "only_a": oa, "only_b": ob,
                "neither": neither, "score_a": 100.0 * (both + oa) / n, "score_b": 100.0 * (both + ob) / n,
                "p_value": sign_test(oa, ob)}

    single = pd.DataFrame([row("sst2", "expert:sst2", "sst2", 5, 1, 4, 0), row("sst2", "average", "sst2", 6, 0, 1, 3),
                           row("race", "expert:race", "race", 2, 0, 3, 5), row("race", "average", "race", 1, 2, 0, 7)])
    got = pooled_over_evals(single).set_index("b")
    assert list(got.index) == ["expert", "average"] and set(got["eval"]) == {"all"}
    assert tuple(got.loc["expert", ["n", "both", "only_a", "only_b", "neither"]]) == (20, 7, 1, 7, 5)
    assert got.loc["expert", "score_b"] == pytest.approx(70.0) and got.loc["expert", "p_value"] == sign_test(1, 7)
    assert tuple(got.loc["average", ["n", "only_a", "only_b"]]) == (20, 2, 1)
    multi = pd.DataFrame([row("with_base", "average", "sst2", 5, 1, 1, 3), row("without_base", "average", "sst2", 5, 1, 1, 3)])
    assert pooled_over_evals(multi).empty  # the same samples in both variants: no pooling


def test_pooled_over_evals_gives_table_1_all_unseen_and_own_cells():
    """Table 1's grid: each variant (named after its fine-tuned task) scored on every task;
    the pooled counts are the plain sums over the chosen cells."""
    from recall_ray.analysis import sign_test

    cells = {("sst2", "sst2"): (5, 1, 4, 0), ("sst2", "race"): (2, 3, 1, 4),
             ("race", "sst2"): (6, 0, 2, 2), ("race", "race"): (1, 2, 0, 7)}
    rows = []
    for (ev, task), (both, oa, ob, neither) in cells.items():
        n = both + oa + ob + neither
        rows.append({"eval": ev, "a": "recall", "b": f"expert:{ev}", "task": task, "n": n, "both": both, "only_a": oa,
                     "only_b": ob, "neither": neither, "score_a": 0.0, "score_b": 0.0, "p_value": 1.0})
    got = pooled_over_evals(pd.DataFrame(rows)).set_index("task")
    assert list(got.index) == ["all", "unseen", "own"] and set(got["b"]) == {"expert"} and set(got["eval"]) == {"all"}
    want = {"all": list(cells), "unseen": [("sst2", "race"), ("race", "sst2")], "own": [("sst2", "sst2"), ("race", "race")]}
    for scope, keys in want.items():
        both, oa, ob, neither = (sum(cells[k][i] for k in keys) for i in range(4))
        n = both + oa + ob + neither
        assert tuple(got.loc[scope, ["n", "both", "only_a", "only_b", "neither"]]) == (n, both, oa, ob, neither)
        assert got.loc[scope, "score_a"] == pytest.approx(100.0 * (both + oa) / n)
        assert got.loc[scope, "p_value"] == sign_test(oa, ob)
    shared = pd.DataFrame(rows).assign(eval=lambda d: d["eval"].map({"sst2": "v1", "race": "v2"}))
    assert pooled_over_evals(shared).empty  # shared tasks, but variants not named after them (multi)


def _hits(rows):
    out = []
    for variant, model, task, hits in rows:
        out += [{"variant": variant, "model": model, "task": task, "sample_id": str(i), "hit": h}
                for i, h in enumerate(hits)]
    return pd.DataFrame(out)


def reference_interval(samples_by_task: dict, seed: int = 0, n_boot: int = 2000, combine=None):
    """The percentile bootstrap written plainly: tasks in sorted order, each resampled n_boot
    times from one generator, a replicate's statistic `combine` of the per-task means."""
    rng = np.random.default_rng(seed)
    reps = {}
    for task in sorted(samples_by_task):
        x = np.array(samples_by_task[task], dtype=float) * 100
        reps[task] = [x[rng.integers(0, len(x), size=len(x))].mean() for _ in range(n_boot)]
    stat = [combine({t: reps[t][b] for t in reps}) for b in range(n_boot)]
    return tuple(np.quantile(stat, [0.025, 0.975]))


def test_study_table_single_gathers_each_tasks_own_variant():
    from recall_ray.studies.oneshot import study_table

    cfg = ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2", "squad_v2"],
                                         "experts": "x"})
    recall = {"sst2": [1, 1, 0, 1, 1], "squad_v2": [0, 1, 0, 0, 0]}
    hits = _hits([("sst2", "recall", "sst2", recall["sst2"]), ("sst2", "expert:sst2", "sst2", [1, 1, 1, 1, 0]),
                  ("squad_v2", "recall", "squad_v2", recall["squad_v2"]),
                  ("squad_v2", "expert:squad_v2", "squad_v2", [0, 1, 1, 0, 0])])
    table, index = study_table(hits, cfg)
    assert index == ["model"]
    t = table.set_index("model")
    assert t.loc["recall", "sst2"] == 80.0 and t.loc["recall", "squad_v2"] == 20.0 and t.loc["recall", "mean"] == 50.0
    assert t.loc["expert", "mean"] == 60.0
    lo, hi = reference_interval(recall, combine=lambda m: (m["sst2"] + m["squad_v2"]) / 2)
    assert (t.loc["recall", "mean_lo"], t.loc["recall", "mean_hi"]) == pytest.approx((lo, hi))
    lo, hi = reference_interval(recall, combine=lambda m: m["sst2"])  # the same draws, one task's statistic
    assert (t.loc["recall", "sst2_lo"], t.loc["recall", "sst2_hi"]) == pytest.approx((lo, hi))
    assert t.loc["recall", "sst2_lo"] <= 80.0 <= t.loc["recall", "sst2_hi"]


def test_study_table_in_the_papers_table_1_form():
    """Every model on every task, the mean over all tasks and over the unseen ones, and the
    "all" rows averaging the fine-tuned tasks."""
    from recall_ray.studies.oneshot import study_table

    cfg = ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2", "race"],
                                         "experts": "x", "evaluate": {"all_tasks": True}})
    a = {("sst2", "sst2"): [1, 1, 1, 0], ("sst2", "race"): [0, 0, 1, 0],
         ("race", "sst2"): [1, 0, 0, 0], ("race", "race"): [1, 1, 0, 1]}
    hits = _hits([(v, "recall", t, h) for (v, t), h in a.items()])
    table, index = study_table(hits, cfg)
    assert index == ["fine_tuned", "model"]
    t = table.set_index(index)
    assert t.loc[("sst2", "recall"), "unseen"] == 25.0 and t.loc[("race", "recall"), "unseen"] == 25.0
    assert t.loc[("sst2", "recall"), "mean"] == 50.0 and t.loc[("race", "recall"), "mean"] == 50.0
    assert t.loc[("all", "recall"), "sst2"] == pytest.approx((75.0 + 25.0) / 2)
    assert t.loc[("all", "recall"), "unseen"] == 25.0
    lo, hi = reference_interval({k: a[("sst2", k)] for k in ("race", "sst2")}, combine=lambda m: m["race"])
    assert (t.loc[("sst2", "recall"), "unseen_lo"], t.loc[("sst2", "recall"), "unseen_hi"]) == pytest.approx((lo, hi))


def test_table_1_gets_a_general_column_beside_mean_and_unseen():
    """Table 1 with two general-ability sets: "mean" and "unseen" stay over the scenario's
    tasks, "general" is the mean over the general sets, each interval the plain bootstrap's
    (every task of the row resampled in sorted order from one generator)."""
    from recall_ray.studies.oneshot import study_table

    cfg = ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2", "race"],
                                         "experts": "x", "evaluate": {"all_tasks": True,
                                                                      "general_tasks": ["arc_easy", "piqa"]}})
    a = {("sst2", "sst2"): [1, 1, 1, 0], ("sst2", "race"): [0, 0, 1, 0], ("sst2", "arc_easy"): [1, 0, 1, 1, 0, 1],
         ("sst2", "piqa"): [1, 1, 0], ("race", "sst2"): [1, 0, 0, 0], ("race", "race"): [1, 1, 0, 1],
         ("race", "arc_easy"): [0, 0, 1, 0, 0, 1], ("race", "piqa"): [0, 1, 1]}
    hits = _hits([(v, "recall", t, h) for (v, t), h in a.items()])
    table, index = study_table(hits, cfg)
    t = table.set_index(index)
    mean = lambda xs: 100.0 * np.mean(xs)  # noqa: E731
    for ft in ("sst2", "race"):
        other = "race" if ft == "sst2" else "sst2"
        row = t.loc[(ft, "recall")]
        assert row["mean"] == pytest.approx((mean(a[(ft, "sst2")]) + mean(a[(ft, "race")])) / 2)
        assert row["unseen"] == pytest.approx(mean(a[(ft, other)]))
        assert row["general"] == pytest.approx((mean(a[(ft, "arc_easy")]) + mean(a[(ft, "piqa")])) / 2)
        samples = {task: a[(ft, task)] for task in ("sst2", "race", "arc_easy", "piqa")}
        lo, hi = reference_interval(samples, combine=lambda m: (m["arc_easy"] + m["piqa"]) / 2)
        assert (row["general_lo"], row["general_hi"]) == pytest.approx((lo, hi))
        lo, hi = reference_interval(samples, combine=lambda m: (m["sst2"] + m["race"]) / 2)
        assert (row["mean_lo"], row["mean_hi"]) == pytest.approx((lo, hi))
    assert t.loc[("all", "recall"), "general"] == pytest.approx(
        (t.loc[("sst2", "recall"), "general"] + t.loc[("race", "recall"), "general"]) / 2)
    names = [c for c in table.columns if not c.endswith(("_lo", "_hi"))]
    assert names == ["fine_tuned", "model", "sst2", "race", "arc_easy", "piqa", "mean", "unseen", "general"]


def test_single_table_counts_the_base_once_on_the_general_sets():
    """Each variant scores the base on the general-ability sets: the same samples, counted
    once; the experts' general column pools their variants."""
    from recall_ray.studies.oneshot import study_table

    cfg = ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2", "race"],
                                         "experts": "x", "evaluate": {"general_tasks": ["piqa"]}})
    base = [1, 0, 1, 1, 0]
    hits = _hits([("sst2", "base", "sst2", [1, 0]), ("sst2", "base", "piqa", base), ("race", "base", "race", [0, 0]),
                  ("race", "base", "piqa", base), ("sst2", "expert:sst2", "piqa", [0, 0, 0, 0, 1]),
                  ("race", "expert:race", "piqa", [1, 1, 0, 0, 0])])
    t = study_table(hits, cfg)[0].set_index("model")
    assert t.loc["base", "piqa"] == 60.0 and t.loc["base", "general"] == 60.0
    assert t.loc["base", "mean"] == pytest.approx((50.0 + 0.0) / 2)  # the scenario's tasks only
    lo, hi = reference_interval({"sst2": [1, 0], "race": [0, 0], "piqa": base}, combine=lambda m: m["piqa"])
    assert (t.loc["base", "piqa_lo"], t.loc["base", "piqa_hi"]) == pytest.approx((lo, hi))
    assert t.loc["expert", "piqa"] == pytest.approx(100.0 * 3 / 10)


def test_pooled_over_evals_gives_the_general_sets_their_own_row():
    from recall_ray.analysis import sign_test

    cells = {("sst2", "sst2"): (5, 1, 4, 0), ("sst2", "race"): (2, 3, 1, 4), ("sst2", "piqa"): (4, 2, 0, 4),
             ("race", "sst2"): (6, 0, 2, 2), ("race", "race"): (1, 2, 0, 7), ("race", "piqa"): (3, 1, 2, 4)}
    rows = []
    for (ev, task), (both, oa, ob, neither) in cells.items():
        rows.append({"eval": ev, "a": "recall", "b": f"expert:{ev}", "task": task, "n": both + oa + ob + neither,
                     "both": both, "only_a": oa, "only_b": ob, "neither": neither, "score_a": 0.0, "score_b": 0.0,
                     "p_value": 1.0})
    got = pooled_over_evals(pd.DataFrame(rows)).set_index("task")
    assert list(got.index) == ["all", "unseen", "own", "general"]
    want = {"all": [k for k in cells if k[1] != "piqa"], "unseen": [("sst2", "race"), ("race", "sst2")],
            "own": [("sst2", "sst2"), ("race", "race")], "general": [("sst2", "piqa"), ("race", "piqa")]}
    for scope, keys in want.items():
        both, oa, ob, neither = (sum(cells[k][i] for k in keys) for i in range(4))
        assert tuple(got.loc[scope, ["n", "both", "only_a", "only_b", "neither"]]) == (
            both + oa + ob + neither, both, oa, ob, neither)
        assert got.loc[scope, "p_value"] == sign_test(oa, ob)
    disjoint = pd.DataFrame([r for r in rows if r["task"] in (r["eval"], "piqa")])  # each merge on its own task
    got = pooled_over_evals(disjoint).set_index("task")
    assert list(got.index) == ["all", "general"] and got.loc["general", "n"] == 20


def test_each_evaluation_gets_a_general_row_pooling_its_general_sets():
    """paired_base.csv's forgetting test per expert: the general sets' counts of one
    evaluation summed, never another evaluation's, and none for the scenario's tasks."""
    from recall_ray.analysis import sign_test
    from recall_ray.studies.common import general_per_eval

    cells = {("sst2", "sst2"): (5, 1, 4, 0), ("sst2", "piqa"): (4, 2, 0, 4), ("sst2", "arc_easy"): (1, 6, 1, 2),
             ("race", "race"): (1, 2, 0, 7), ("race", "piqa"): (3, 1, 2, 4), ("race", "arc_easy"): (0, 0, 5, 5),
             ("all", "general"): (9, 9, 9, 9)}  # a pooled row already there: not counted again
    rows = [{"eval": ev, "a": "base", "b": f"expert:{ev}", "task": task, "n": sum(c), "both": c[0], "only_a": c[1],
             "only_b": c[2], "neither": c[3], "score_a": 0.0, "score_b": 0.0, "p_value": 1.0}
            for (ev, task), c in cells.items()]
    got = general_per_eval(pd.DataFrame(rows)).set_index("eval")
    assert sorted(got.index) == ["race", "sst2"] and set(got["task"]) == {"general"}
    for ev in ("sst2", "race"):
        both, oa, ob, neither = (cells[(ev, "piqa")][i] + cells[(ev, "arc_easy")][i] for i in range(4))
        assert tuple(got.loc[ev, ["n", "both", "only_a", "only_b", "neither"]]) == (
            both + oa + ob + neither, both, oa, ob, neither)
        assert got.loc[ev, "b"] == f"expert:{ev}" and got.loc[ev, "p_value"] == sign_test(oa, ob)
    assert general_per_eval(pd.DataFrame([r for r in rows if r["task"] in ("sst2", "race")])).empty


def test_general_sets_are_named_apart_from_the_scenarios_tasks(tmp_path, experts_dir, tiny_dir):
    with pytest.raises(ValueError, match="not general-ability sets"):
        ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2"], "experts": "x",
                                       "evaluate": {"general_tasks": ["sst2"]}})
    with pytest.raises(ValueError, match="twice"):
        ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2"], "experts": "x",
                                       "evaluate": {"general_tasks": ["piqa", "piqa"]}})
    with pytest.raises(ConfigError, match="general-ability sets, never fine-tuned on"):
        preflight(_cfg(tmp_path, experts_dir, tiny_dir, tasks=["sst2", "piqa"]))
    with pytest.raises(Exception, match="no validation split"):  # PIQA has a test file only
        preflight(_cfg(tmp_path, experts_dir, tiny_dir, evaluate={"split": "validation", "general_tasks": ["piqa"]}))


def test_single_scenario_variants():
    cfg = ScenarioConfig.model_validate({"scenario": "single", "run_dir": "r", "tasks": ["sst2", "race"],
                                         "experts": "adapters/repro"})
    vs = variants(cfg)
    assert [(v.name, v.experts, v.new_task, v.include_base, v.eval_tasks) for v in vs] == [
        ("sst2", (), "sst2", True, ("sst2",)), ("race", (), "race", True, ("race",))]


def test_bad_scenario_configs_are_refused(tmp_path, experts_dir, tiny_dir):
    def write(tree) -> str:
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump(tree))
        return str(p)

    good = {"scenario": "multi", "run_dir": str(tmp_path / "r"), "base": str(tiny_dir), "data_dir": str(DATA),
            "tasks": ["sst2", "ag_news"], "experts": str(experts_dir)}
    with pytest.raises(ConfigError, match="unknown methods \\['soup'\\]"):
        load_scenario(write({**good, "methods": ["recall", "soup"]}))
    with pytest.raises(ConfigError, match="unknown config key 'evaluate.maxsamples'"):
        load_scenario(write({**good, "evaluate": {"maxsamples": 3}}))
    with pytest.raises(ConfigError, match="at least two tasks"):
        load_scenario(write({**good, "tasks": ["sst2"]}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_scenario(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="no expert for tasks \\['medmcqa'\\]"):
        preflight(load_scenario(write({**good, "tasks": ["sst2", "medmcqa"]})))
    with pytest.raises(Exception, match="unknown task"):
        preflight(load_scenario(write({**good, "tasks": ["sst2", "nope"]})))
    with pytest.raises(ConfigError, match="recall.max_samples=5000 exceeds"):
        preflight(load_scenario(write({**good, "recall": {"max_samples": 5000}})))
    with pytest.raises(ConfigError, match="recall_variants name 'Bad-Name'"):
        load_scenario(write({**good, "recall_variants": {"Bad-Name": {"similarity": {"preset": "validated"}}}}))
    with pytest.raises(ConfigError, match="recall_variants.l2.only names \\['sst2'\\], not variants"):
        load_scenario(write({**good, "recall_variants": {"l2": {"similarity": {"preset": "validated"}, "only": ["sst2"]}}}))
    with pytest.raises(ConfigError, match="task_max_length must be > 8"):
        load_scenario(write({**good, "recall": {"task_max_length": {"race": 4}}}))
    assert not (tmp_path / "r").exists()


def test_the_committed_tables_use_the_jobs_default_similarity():
    """Every scenario's RECALL row is the job's default similarity (jobs/merge.py: the
    paper's literal setting); the passage tasks are represented at their fine-tune length."""
    from recall_ray.config import SimilarityConfig

    default = SimilarityConfig().key()
    names = sorted(p.stem for p in (REPO / "configs" / "scenarios").glob("*.yaml"))
    assert {"single", "multi", "sequential", "sequential_paper", "forgetting_single", "forgetting_multi"} <= set(names)
    for name in names:
        cfg = load_scenario(str(REPO / "configs" / "scenarios" / f"{name}.yaml"))
        assert cfg.recall.similarity.key() == default, name
        assert cfg.recall.max_length_for("race") == cfg.recall.max_length_for("squad_v2") == 256, name
    multi = load_scenario(str(REPO / "configs" / "scenarios" / "multi.yaml"))
    assert set(multi.recall_variants) == {"validated", "shift", "relative_distance"}
    assert "dare_average_with_base" in multi.methods and "dare_average" in multi.methods


def test_the_long_experts_scenarios_are_the_short_ones_plus_the_general_sets():
    """The two expert sets are compared under one protocol: each forgetting_* config is its
    short-expert twin but for the experts, the run directory and the general-ability sets
    (every one of them, at all 500 records)."""
    from recall_ray.core.templates import GENERAL_TASKS

    for name in ("single", "multi"):
        short = load_scenario(str(REPO / "configs" / "scenarios" / f"{name}.yaml")).model_dump()
        long = load_scenario(str(REPO / "configs" / "scenarios" / f"forgetting_{name}.yaml")).model_dump()
        assert long["experts"] == "adapters/forgetting" and long["run_dir"] != short["run_dir"]
        assert sorted(long["evaluate"].pop("general_tasks")) == sorted(GENERAL_TASKS)
        assert long["evaluate"]["general_max_samples"] is None
        short["evaluate"].pop("general_tasks")
        for k in ("experts", "run_dir"):
            long.pop(k), short.pop(k)
        assert long == short, name


def test_the_long_sequence_trains_each_task_at_its_long_experts_chosen_budget():
    """forgetting_sequential is the paper-order sequence (sequential_paper's tasks, RECALL
    settings and evaluation, plus the general-ability sets at all 500 records) with every step
    fine-tuned as the long expert of its task was (configs/adapters/forgetting.yaml) for the
    rung the budget rule chose (docs/results/forgetting_budget/budget.csv), and EWC at the
    lambda the sequential scenarios use."""
    import pandas as pd
    import yaml

    from recall_ray.core.templates import GENERAL_TASKS

    long = load_scenario(str(REPO / "configs" / "scenarios" / "forgetting_sequential.yaml"))
    paper = load_scenario(str(REPO / "configs" / "scenarios" / "sequential_paper.yaml"))
    assert long.tasks == paper.tasks and long.recall == paper.recall and long.run_dir != paper.run_dir
    assert long.merge_with == ["previous"] and long.chains == ["recall"] and long.seqft and long.ewc == paper.ewc
    ev = long.evaluate.model_dump()
    assert sorted(ev.pop("general_tasks")) == sorted(GENERAL_TASKS) and ev["general_max_samples"] is None
    short = paper.evaluate.model_dump()
    short.pop("general_tasks")
    assert ev == short
    experts = yaml.safe_load((REPO / "configs" / "adapters" / "forgetting.yaml").read_text())
    budget = pd.read_csv(REPO / "docs" / "results" / "forgetting_budget" / "budget.csv")
    chosen = budget[budget["chosen"]].set_index("task")["steps"]
    for task in long.tasks:
        want = {**experts["finetune"], **experts["tasks"][task], "steps": int(chosen[task])}
        got = long.finetune_for(task).model_dump()
        assert {k: got[k] for k in want if k != "snapshot_every"} == {
            k: v for k, v in want.items() if k != "snapshot_every"}, task


def test_the_forgetting_matrix_scores_the_cells_of_the_long_table_1():
    """The forgetting matrix shares forgetting_single's score cache: the same experts, base,
    evaluation and (for its first five tasks) the same tasks in the same order, plus AG News,
    with no merge."""
    single = load_scenario(str(REPO / "configs" / "scenarios" / "forgetting_single.yaml"))
    matrix = load_scenario(str(REPO / "configs" / "scenarios" / "forgetting_matrix.yaml"))
    assert matrix.methods == [] and matrix.recall_variants == {}
    assert matrix.tasks == [*single.tasks, "ag_news"]
    assert (matrix.experts, matrix.base, matrix.data_dir) == (single.experts, single.base, single.data_dir)
    assert matrix.evaluate == single.evaluate and matrix.run_dir != single.run_dir


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "scenarios").glob("*.yaml")))
def test_every_committed_scenario_config_loads_and_names_what_is_shipped(name):
    """The configs docs/results.md names must load as they are, and every input they name
    (experts, exported step adapters, data) must be in the repository."""
    repo = REPO
    cfg = load_scenario(str(repo / "configs" / "scenarios" / name), [])
    assert cfg.evaluate.split == "test" and cfg.evaluate.max_samples >= 100
    for t in cfg.tasks:
        assert (repo / cfg.data_dir / t / "test.jsonl").is_file()
        assert (repo / cfg.data_dir / t / "train.jsonl").is_file()
    for attr in ("experts", "adapters"):
        where = getattr(cfg, attr, None)
        if where is not None:
            assert (repo / where).is_dir(), f"{name}: {attr} {where} is not in the repository"
    if cfg.scenario != "sequential":
        assert all((repo / cfg.experts / t).is_dir() for t in cfg.tasks)
