"""The expert budget rule (recall_ray.core.budget) against plain computations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recall_ray.core.budget import Rung, choose_rung, one_sided_sign_test


def test_one_sided_sign_test_is_the_binomial_tail():
    # by hand: 9 of 10 one way -> (C(10,9) + C(10,10)) / 1024
    assert one_sided_sign_test(9, 1) == pytest.approx(11 / 1024)
    assert one_sided_sign_test(0, 0) == 1.0
    assert one_sided_sign_test(0, 5) == 1.0
    # against a simulation-free float64 sum of the pmf
    n, k = 40, 27
    pmf = np.array([np.exp(np.sum(np.log(np.arange(n - i + 1, n + 1))) - np.sum(np.log(np.arange(1, i + 1))))
                    for i in range(n + 1)], dtype=np.float64) / 2.0**n
    assert one_sided_sign_test(k, n - k) == pytest.approx(pmf[k:].sum(), rel=1e-12)
    with pytest.raises(ValueError):
        one_sided_sign_test(-1, 2)


def test_the_smallest_rung_that_learns_and_forgets_is_chosen():
    learns_only = Rung(225, own_better=30, own_worse=5, general_worse=8, general_better=6)
    both = Rung(450, own_better=35, own_worse=4, general_worse=20, general_better=6)
    both_later = Rung(675, own_better=40, own_worse=3, general_worse=30, general_better=5)
    assert learns_only.p_learns < 0.05 and learns_only.p_forgets > 0.05
    assert choose_rung([both_later, learns_only, both]) == (both, True)


def test_no_rung_meeting_the_rule_takes_the_largest_and_says_so():
    a = Rung(225, 30, 5, 5, 5)
    b = Rung(450, 3, 3, 20, 2)  # forgets but does not learn
    assert choose_rung([a, b]) == (b, False)
    with pytest.raises(ValueError, match="no rungs"):
        choose_rung([])


def test_paired_counts_of_hits_and_of_log_likelihoods():
    from recall_ray.core.budget import paired_counts_of

    hits_e = np.array([True, True, False, False, True])
    hits_b = np.array([False, True, True, False, False])
    assert paired_counts_of(hits_e, hits_b) == (2, 1)  # samples 0 and 4; sample 2
    lp_e = np.array([-1.0, -2.0, -3.0, -0.5])
    lp_b = np.array([-1.5, -2.0, -2.0, -0.7])
    assert paired_counts_of(lp_e, lp_b) == (2, 1)  # ties count for neither
    with pytest.raises(ValueError, match="one length"):
        paired_counts_of(lp_e, lp_b[:3])


def _preds(rows: list[tuple[str, str, str, str]]) -> str:
    """predictions.jsonl lines: (model, task, sample_id, prediction)."""
    import json

    return "".join(json.dumps({"model": m, "task": t, "sample_id": i, "protocol": "loglik", "generation": p,
                               "prediction": p, "references": [p], "option_logprobs": None,
                               "ref_logprob": None}) + "\n" for m, t, i, p in rows)


def test_publish_keeps_what_an_earlier_run_published_and_replaces_what_this_one_scored(tmp_path):
    """A later choose_budget run (one new expert, the base scored again, on a machine without
    the earlier ladders) published over an earlier one: the earlier expert's rows stay, byte
    for byte; the base's rows on the tasks scored again are this run's; the new expert's
    rows are added; publishing the same run twice changes nothing."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    spec = importlib.util.spec_from_file_location("job_choose_budget",
                                                  Path(__file__).resolve().parents[1] / "jobs" / "choose_budget.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cols = ["task", "model", "steps", "own_better", "own_worse", "p_learns", "general_worse", "general_better",
            "p_forgets", "accepted", "chosen", "rule_met"]
    pub, scored = tmp_path / "pub", tmp_path / "scored"
    pub.mkdir()
    scored.mkdir()
    earlier = pd.DataFrame([["sst2", "sst2@1ep", 225, 83, 8, 3.788e-17, 30, 11, 0.002162, True, True, True]],
                           columns=cols)
    earlier.to_csv(pub / "budget.csv", index=False, float_format="%.4g")
    (pub / "scores.csv").write_text("model,task,metric,value,n,protocol,template\n"
                                    "base,sst2,accuracy,53.0000,2,loglik,sst2\n"
                                    "base,arc_easy,acc,50.0000,2,loglik,arc_easy\n"
                                    "sst2@1ep,sst2,accuracy,100.0000,2,loglik,sst2\n")
    (pub / "predictions.jsonl").write_text(_preds([("base", "sst2", "1", "positive"), ("base", "arc_easy", "1", "0"),
                                                   ("sst2@1ep", "sst2", "1", "negative")]))
    (scored / "scores.csv").write_text("model,task,metric,value,n,protocol,template\n"
                                       "base,race,accuracy,25.0000,2,loglik,race\n"
                                       "base,arc_easy,acc,51.0000,2,loglik,arc_easy\n"
                                       "race@1ep,race,accuracy,75.0000,2,loglik,race\n")
    (scored / "predictions.jsonl").write_text(_preds([("base", "race", "1", "A"), ("base", "arc_easy", "1", "1"),
                                                      ("race@1ep", "race", "1", "B")]))
    table = pd.DataFrame([["race", "race@1ep", 225, 40, 10, 1e-6, 20, 5, 0.002, True, True, True]], columns=cols)
    job.publish(pub, table, scored)
    # a later run of the same expert that holds only its newer rung keeps the earlier rung's row
    newer = pd.DataFrame([["race", "race@2ep", 450, 40, 9, 1e-6, 21, 5, 0.001, True, True, False]], columns=cols)
    job.publish(pub, newer, tmp_path / "scored")

    budget = pd.read_csv(pub / "budget.csv")
    assert list(budget["model"]) == ["sst2@1ep", "race@1ep", "race@2ep"]
    # one chosen rung per task, the later run's, and its verdict on the rule for every rung of it
    assert list(budget["chosen"]) == [True, False, True] and list(budget["rule_met"]) == [True, False, False]
    assert (pub / "budget.csv").read_text().splitlines()[1] == "sst2,sst2@1ep,225,83,8,3.788e-17,30,11,0.002162,True,True,True"
    scores = pd.read_csv(pub / "scores.csv").set_index(["model", "task"])["value"]
    assert scores.to_dict() == {("base", "sst2"): 53.0, ("sst2@1ep", "sst2"): 100.0, ("base", "race"): 25.0,
                                ("base", "arc_easy"): 51.0, ("race@1ep", "race"): 75.0}
    preds = [(r["model"], r["task"], r["prediction"]) for r in map(json.loads, (pub / "predictions.jsonl").read_text().splitlines())]
    assert preds == [("base", "sst2", "positive"), ("sst2@1ep", "sst2", "negative"), ("base", "race", "A"),
                     ("base", "arc_easy", "1"), ("race@1ep", "race", "B")]
    md = (pub / "scores.md").read_text()
    assert all(m in md for m in ("| base ", "| sst2@1ep ", "| race@1ep "))
    before = {f.name: f.read_bytes() for f in pub.iterdir()}
    job.publish(pub, newer, scored)
    assert {f.name: f.read_bytes() for f in pub.iterdir()} == before
    assert not list(pub.glob(".*"))  # no staging file left
    # a rung that went on from the 2-epoch adapter alone says so; rows published before the
    # column have none, and publishing again changes nothing
    warm = pd.DataFrame([["race", "race@3ep", 675, 41, 9, 1e-6, 30, 5, 1e-4, True, True, True, "450"]],
                        columns=cols + ["warm_start"])
    job.publish(pub, warm, scored)
    budget = pd.read_csv(pub / "budget.csv", keep_default_na=False, dtype={"warm_start": str})
    assert list(zip(budget["model"], budget["warm_start"])) == [("sst2@1ep", ""), ("race@1ep", ""), ("race@2ep", ""),
                                                                ("race@3ep", "450")]
    before = {f.name: f.read_bytes() for f in pub.iterdir()}
    job.publish(pub, warm, scored)
    assert {f.name: f.read_bytes() for f in pub.iterdir()} == before
