"""Setting selection on the validation split: overrides, scoring, tie rule, and that each
parameter's choice is fixed for the next (with a scenario runner that records its configs)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from conftest import REPO
from recall_ray.config import ConfigError
from recall_ray.studies.registry import load_study as load_scenario
from recall_ray.studies.selection import (
    SelectionConfig,
    assignments,
    best_index,
    candidate_score,
    final_step_rows,
    load_selection,
    run_selection,
)


def test_assignments_round_trip_through_set_parsing():
    from recall_ray.config import apply_override

    values = {"recall.similarity.sigma": "median", "baselines.lam": 0.5, "include_base": [True, False],
              "methods": ["ties", "dare_average"]}
    tree: dict = {}
    for a in assignments(values):
        apply_override(tree, a)
    assert tree == {"recall": {"similarity": {"sigma": "median"}}, "baselines": {"lam": 0.5},
                    "include_base": [True, False], "methods": ["ties", "dare_average"]}


def test_best_index_takes_the_first_of_a_tie():
    assert best_index([1.0, 3.0, 3.0, 2.0]) == 1
    assert best_index([5.0]) == 0
    assert best_index([2.0, 1.0]) == 0


def test_candidate_score_averages_methods_and_variants():
    table = pd.DataFrame({"variant": ["a", "a", "b", "b"], "model": ["ties", "base", "ties", "x"],
                          "mean": [10.0, 99.0, 30.0, 50.0]})
    assert candidate_score(table, ["ties"]) == pytest.approx(20.0)
    assert candidate_score(table, ["ties", "x"]) == pytest.approx((10 + 30 + 50) / 3)
    with pytest.raises(ValueError, match="no row for"):
        candidate_score(table, ["missing"])


def test_each_choice_is_fixed_for_the_next_parameter(tmp_path):
    cfg = SelectionConfig.model_validate({
        "scenario": str(REPO / "configs" / "scenarios" / "multi.yaml"),
        "run_dir": str(tmp_path / "sel"),
        "set": ["include_base=[true]"],
        "parameters": [
            {"name": "lam", "methods": ["task_arithmetic"],
             "values": [{"baselines.lam": 1.0}, {"baselines.lam": 0.5}, {"baselines.lam": 0.3}]},
            {"name": "density", "methods": ["ties"],
             "values": [{"baselines.ties_density": 0.2}, {"baselines.ties_density": 0.5}]},
        ],
    })
    seen = []

    def fake_run(sc):
        seen.append(sc)
        b = sc.baselines
        # task arithmetic peaks at lam 0.5; TIES scores the same at both densities (a tie)
        score = {"task_arithmetic": 50 - 40 * abs(b.lam - 0.5), "ties": 40.0}[sc.methods[0]]
        return SimpleNamespace(table=pd.DataFrame({"variant": ["with_base"], "model": sc.methods[:1],
                                                   "mean": [score]}))

    table, chosen = run_selection(cfg, fake_run, load_scenario)
    assert chosen == {"baselines.lam": 0.5, "baselines.ties_density": 0.2}
    assert [s.baselines.lam for s in seen] == [1.0, 0.5, 0.3, 0.5, 0.5]  # lam 0.5 fixed for TIES
    assert all(s.evaluate.split == "validation" and s.include_base == [True] for s in seen)
    assert all(s.run_dir == str(tmp_path / "sel") for s in seen)
    assert table["chosen"].tolist() == [False, True, False, True, False]
    assert list(table["candidate"][:3]) == ["baselines.lam=1.0", "baselines.lam=0.5", "baselines.lam=0.3"]


def test_each_candidate_is_paired_with_the_first_on_the_same_samples(tmp_path):
    """The scenario leaves its predictions in <run_dir>/<variant>/eval/; each candidate's are
    paired with the first candidate's, sample by sample, over every variant and task (a
    lead of a few samples is noise: its p-value says so)."""
    import json
    import math

    run_dir = tmp_path / "sel"
    cfg = SelectionConfig.model_validate({
        "scenario": str(REPO / "configs" / "scenarios" / "multi.yaml"), "run_dir": str(run_dir),
        "set": ["include_base=[true, false]"],
        "parameters": [{"name": "T", "methods": ["recall"],
                        "values": [{"recall.similarity.temperature": t} for t in (1.0, 0.5, 0.1)]}]})
    # per candidate, which of 10 samples per (variant, task) it gets right; the base is
    # scored beside it and must not count
    right = {1.0: set(range(5)), 0.5: set(range(9)), 0.1: set(range(3, 7))}

    def fake_run(sc):
        t = sc.recall.similarity.temperature
        for variant in ("with_base", "without_base"):
            d = run_dir / variant / "eval"
            d.mkdir(parents=True, exist_ok=True)
            lines = []
            for task, (yes, no) in {"sst2": ("positive", "negative"), "ag_news": ("World", "Sports")}.items():
                for i in range(10):
                    lines.append({"model": "recall", "task": task, "sample_id": str(i), "references": [yes],
                                  "prediction": yes if i in right[t] else no})
                    lines.append({"model": "base", "task": task, "sample_id": str(i), "references": [yes],
                                  "prediction": yes})
            (d / "predictions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        mean = 100 * len(right[t]) / 10
        return SimpleNamespace(table=pd.DataFrame({"variant": ["with_base", "without_base"], "model": ["recall"] * 2,
                                                   "mean": [mean, mean]}))

    # an evaluation left in the directory by an earlier run (another variant) is not a candidate's
    stale = run_dir / "older_variant" / "eval"
    stale.mkdir(parents=True)
    (stale / "predictions.jsonl").write_text("\n".join(json.dumps(
        {"model": "recall", "task": "sst2", "sample_id": str(i), "references": ["positive"], "prediction": "negative"})
        for i in range(50)) + "\n")
    table, chosen = run_selection(cfg, fake_run, load_scenario)
    assert chosen == {"recall.similarity.temperature": 0.5}

    def sign_p(a, b):  # two-sided exact binomial, written out
        n = a + b
        return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2 ** n) if n else 1.0

    # 2 variants x 2 tasks = 4 blocks of 10 samples
    first = right[1.0]
    for t in (0.5, 0.1):
        only_this, only_first = 4 * len(right[t] - first), 4 * len(first - right[t])
        rows = table[table["candidate"] == f"recall.similarity.temperature={t}"]
        assert len(rows) == 2  # one per variant, both carrying the pooled comparison
        for row in rows.itertuples():
            assert row.paired_n == 40  # this run's variants only: the stale evaluation is not read
            assert (row.only_this, row.only_first) == (only_this, only_first)
            assert row.p_vs_first == pytest.approx(sign_p(only_this, only_first))
    assert table.iloc[:2]["only_this"].isna().all()  # the first candidate has nothing to be paired with
    lead = table[table["candidate"] == "recall.similarity.temperature=0.5"].iloc[0]
    assert (lead["only_this"], lead["only_first"]) == (16, 0) and lead["p_vs_first"] < 0.001

    from recall_ray.io.storage import RunDir
    from recall_ray.studies.selection import write_selection

    write_selection(RunDir(str(tmp_path / "out")), table, chosen, "sel.yaml")
    written = pd.read_csv(tmp_path / "out" / "selection.csv", dtype=str, keep_default_na=False)
    assert written["only_this"].tolist() == ["", "", "16", "16", "8", "8"]
    assert written["p_vs_first"].tolist()[2] == f"{sign_p(16, 0):.3g}"  # 3.05e-05, not 0.00
    md = (tmp_path / "out" / "selection.md").read_text()
    assert "NA" not in md and "nan" not in md  # the first candidate's cells are blank


ONE_SHOT_SELECTIONS = sorted(
    p.name for p in (REPO / "configs" / "selection").glob("*.yaml")
    if yaml.safe_load((REPO / yaml.safe_load(p.read_text())["scenario"]).read_text())["scenario"] != "sequential")


@pytest.mark.parametrize("name", ONE_SHOT_SELECTIONS)
def test_the_committed_selection_configs_load_and_every_candidate_validates(name):
    assert "multi.yaml" in ONE_SHOT_SELECTIONS
    cfg = load_selection(str(REPO / "configs" / "selection" / name))
    from recall_ray.studies.selection import candidate_overrides

    for p in cfg.parameters:
        for v in p.values:
            sc = load_scenario(str(REPO / cfg.scenario), candidate_overrides(cfg, p, v, {}))
            assert sc.evaluate.split == "validation" and sc.methods == p.methods


def test_bad_selection_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_selection(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"scenario": "x.yaml", "run_dir": "r", "parameters": []}))
    with pytest.raises(ConfigError, match="parameters"):
        load_selection(str(bad))
    bad.write_text(yaml.safe_dump({"scenario": "x.yaml", "run_dir": "r",
                                   "parameters": [{"name": "p", "methods": ["ties"], "values": [{}]}]}))
    with pytest.raises(ConfigError, match="at least one key"):
        load_selection(str(bad))


def test_write_and_publish_selection(tmp_path):
    from recall_ray.studies.selection import publish_selection, write_selection
    from recall_ray.io.storage import RunDir

    table = pd.DataFrame({"parameter": ["lam", "lam"], "candidate": ["baselines.lam=1.0", "baselines.lam=0.5"],
                          "chosen": [False, True], "mean": [10.0, 20.0]})
    write_selection(RunDir(str(tmp_path / "run")), table, {"baselines.lam": 0.5}, "sel.yaml")
    chosen = yaml.safe_load((tmp_path / "run" / "selected.yaml").read_text())
    assert chosen == {"baselines.lam": 0.5}
    names = publish_selection(str(tmp_path / "run"), str(tmp_path / "pub"))
    assert sorted(p.name for p in (tmp_path / "pub").iterdir()) == sorted(names)
    assert pd.read_csv(tmp_path / "pub" / "selection.csv")["chosen"].tolist() == [False, True]
    with pytest.raises(FileNotFoundError, match="no finished selection"):
        publish_selection(str(tmp_path / "nothing"), str(tmp_path / "pub2"))


def test_final_step_rows_of_a_sequential_table():
    table = pd.DataFrame({"step": [1, 1, 2, 2], "method": ["seqft", "ewc", "seqft", "ewc"],
                          "sst2": [80.0, 80.0, 40.0, 70.0], "medmcqa": [None, None, 30.0, 20.0],
                          "mean_seen": [80.0, 80.0, 35.0, 45.0]})
    rows = final_step_rows(table)
    assert rows["model"].tolist() == ["seqft", "ewc"] and rows["mean"].tolist() == [35.0, 45.0]
    assert candidate_score(rows, ["ewc"]) == 45.0


def test_the_committed_ewc_selection_runs_sequential_candidates(tmp_path):
    """configs/selection/ewc.yaml: every candidate a valid sequential config of the paper's
    five tasks on the validation split (no `methods` override: a sequential config has
    none), and the selection scores EWC's last step (with a runner that records its configs)."""
    cfg = load_selection(str(REPO / "configs" / "selection" / "ewc.yaml"))
    cfg = cfg.model_copy(update={"scenario": str(REPO / cfg.scenario), "run_dir": str(tmp_path / "sel")})
    seen = []

    def fake_run(sc):
        seen.append(sc)
        lam = sc.ewc.lam  # EWC peaks at lambda 100 here; SeqFT is the same whatever lambda
        return SimpleNamespace(table=pd.DataFrame({
            "step": [1, 1, 2, 2], "method": ["seqft", "ewc"] * 2, "sst2": [80.0, 80.0, 40.0, 60.0],
            "medmcqa": [None, None, 30.0, 40.0 - abs(lam - 100) / 1000], "mean_seen": [80.0, 80.0, 35.0, 50.0 - abs(lam - 100) / 1000]}))

    table, chosen = run_selection(cfg, fake_run, load_scenario)
    assert chosen == {"ewc.lam": 100.0}
    assert [s.ewc.lam for s in seen] == [0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    for s in seen:
        assert s.scenario == "sequential" and s.tasks == ["sst2", "squad_v2", "medmcqa", "iwslt2017_en_fr", "race"]
        assert s.chains == [] and s.seqft and s.ewc.enabled and s.evaluate.split == "validation"
        assert s.evaluate.max_samples == 50
    assert table["model"].tolist() == ["ewc"] * 6 and table["chosen"].tolist() == [False] * 3 + [True] + [False] * 2


def test_ewc_penalty_share_reaches_the_selection_table(tmp_path):
    """A sequential candidate's ewc_penalty.csv (written by the study) becomes the EWC row's
    penalty share columns: the mean and the largest share over the penalised steps."""
    from recall_ray.studies.selection import ewc_penalty_columns
    from recall_ray.studies.sequential import ewc_penalty_table

    metas = [(2, "medmcqa", {"final_loss": 0.9, "ewc": {"lambda": 10.0, "final_penalty": 0.1}}),
             (3, "race", {"final_loss": 0.5, "ewc": {"lambda": 10.0, "final_penalty": 0.5}})]
    t = ewc_penalty_table(metas)
    assert t["penalty_share"].tolist() == pytest.approx([0.1 / 1.0, 0.5 / 1.0])
    t.to_csv(tmp_path / "ewc_penalty.csv", index=False)
    assert ewc_penalty_columns(tmp_path) == pytest.approx({"ewc_penalty_share": 0.3, "ewc_penalty_share_max": 0.5})
    assert ewc_penalty_columns(tmp_path / "none") == {}
