"""The general-ability sets (ARC-Easy, PIQA, HellaSwag): templates on the shipped records,
their label conventions, the refusal to train on them, and their log-likelihood scores (acc:
summed log-prob; acc_norm: per character, as lm-eval) against a plain float64 reference
computed here, one option at a time, with the model's own full forward."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DATA, REPO
from recall_ray.core.templates import (GENERAL_TASKS, TEMPLATES, TaskDataError, continuations, gold_index,
                                       load_task_records, render)

GENERAL = ["arc_easy", "piqa", "hellaswag"]


def records(task: str, split: str = "test") -> list[dict]:
    return [json.loads(line) for line in (DATA / task / f"{split}.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ templates

def test_the_general_sets_are_the_never_trained_templates():
    assert set(GENERAL_TASKS) == set(GENERAL)
    assert all(not TEMPLATES[t].trainable for t in GENERAL)
    assert all(TEMPLATES[t].trainable for t in TEMPLATES if t not in GENERAL)


@pytest.mark.parametrize("task", GENERAL)
def test_every_shipped_record_renders_with_the_data_readmes_prompt(task):
    recs = records(task)
    rendered = load_task_records(str(DATA / task / "test.jsonl"), task)
    assert len(rendered) == len(recs) == 500 and len({r["sample_id"] for r in rendered}) == 500
    for raw, r in zip(recs, rendered):
        if task == "arc_easy":
            prompt, texts, gold = f"Question: {raw['question']}\nAnswer:", raw["choices"]["text"], \
                raw["choices"]["label"].index(raw["answerKey"])
            assert r["sample_id"] == raw["id"]
        elif task == "piqa":
            prompt, texts, gold = f"Question: {raw['goal']}\nAnswer:", [raw["sol1"], raw["sol2"]], raw["label"]
            assert r["sample_id"] == str(raw["idx"])
        else:
            prompt, texts, gold = f"{raw['activity_label']}: {raw['ctx']}", raw["endings"], raw["label"]
            assert r["sample_id"] == str(raw["idx"])
        assert r["prompt"] == prompt
        assert continuations(TEMPLATES[task], raw) == [" " + t for t in texts]  # texts kept as stored
        assert r["target"] == " " + texts[gold]


def test_arc_label_conventions_and_option_counts():
    tpl = TEMPLATES["arc_easy"]
    recs = records("arc_easy") + records("arc_easy", "train")
    numeric = [r for r in recs if r["answerKey"] in "1234"]
    counts = {len(r["choices"]["text"]) for r in recs}
    assert numeric and counts == {3, 4, 5}  # the shipped files hold every convention
    for r in numeric[:5]:
        assert gold_index(tpl, r) == int(r["answerKey"]) - 1 and r["choices"]["label"][0] == "1"
    five = next(r for r in recs if len(r["choices"]["text"]) == 5)
    assert len(continuations(tpl, five)) == 5
    assert gold_index(tpl, five) == "ABCDE".index(five["answerKey"])
    q = {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert render("arc_easy", q) == ("Question: q\nAnswer:", " z") and gold_index(tpl, q) == 2


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "C"}, "not one of the option"),
    ({"question": "q", "choices": {"text": ["x", "y"], "label": ["A"]}, "answerKey": "A"}, "one label per option"),
    ({"question": "q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "A"}, "at least two"),
    ({"question": "q", "choices": {"text": ["x", " "], "label": ["A", "B"]}, "answerKey": "A"}, "non-empty"),
    ({"question": "q", "answerKey": "A"}, "no list field 'choices.text'"),
])
def test_bad_arc_records_are_refused_by_name(record, message):
    with pytest.raises(TaskDataError, match=message):
        render("arc_easy", record)


def test_index_labels_must_be_in_range_and_integers():
    with pytest.raises(TaskDataError, match="option index 0-1"):
        render("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2})
    with pytest.raises(TaskDataError, match="option index 0-3"):
        render("hellaswag", {"activity_label": "a", "ctx": "c", "endings": ["1", "2", "3", "4"], "label": "3"})
    with pytest.raises(TaskDataError, match="no field 'sol2'"):
        render("piqa", {"goal": "g", "sol1": "a", "label": 0})


# ------------------------------------------------------------------- never trained on

@pytest.mark.parametrize("task", GENERAL)
@pytest.mark.parametrize("split", ["train", "all_train"])
def test_training_splits_of_the_general_sets_are_refused(task, split):
    from recall_ray.io.splits import load_split

    with pytest.raises(TaskDataError, match=f"'{task}' is a general-ability set.*never trained on"):
        load_split(DATA, task, split)


def test_a_general_template_on_a_task_file_is_refused_for_training():
    from recall_ray.io.splits import load_split

    with pytest.raises(TaskDataError, match="never trained on"):
        load_split(DATA, "sst2", "train", template="piqa")


def test_arc_easy_validation_is_the_last_200_train_records():
    from recall_ray.io.splits import VALIDATION_SIZE, load_split

    val = load_split(DATA, "arc_easy", "validation")
    tail = records("arc_easy", "train")[-VALIDATION_SIZE:]
    assert [r["sample_id"] for r in val] == [r["id"] for r in tail] and len(val) == 200
    test_ids = {r["id"] for r in records("arc_easy")}
    assert not test_ids & {r["sample_id"] for r in val}


@pytest.mark.parametrize("task", ["piqa", "hellaswag"])
def test_sets_without_train_have_no_validation_split(task):
    from recall_ray.io.splits import load_split

    with pytest.raises(TaskDataError, match=f"{task}.*no validation split.*arc_easy"):
        load_split(DATA, task, "validation")


def test_finetune_job_refuses_a_general_set_before_any_work(tmp_path, tiny_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_job", REPO / "jobs" / "finetune.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "adapter"
    status = job.main(["--base", str(tiny_dir), "--data", str(DATA / "arc_easy" / "train.jsonl"),
                       "--template", "arc_easy", "--out", str(out)])
    assert status == 2 and not out.exists()
    assert "'arc_easy' is a general-ability set" in capsys.readouterr().err


def test_adapter_configs_never_name_a_general_set():
    import yaml

    for f in (REPO / "configs" / "adapters").glob("*.yaml"):
        assert not set(yaml.safe_load(f.read_text())["tasks"]) & set(GENERAL), f


# ------------------------------------------------------------------------------ scoring

def reference_logprob_sum(lm, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), float64, from one unpadded forward of their concatenation."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    return float(sum(logits[len(context) - 1 + j, t] - torch.logsumexp(logits[len(context) - 1 + j], 0)
                     for j, t in enumerate(continuation)))


def numpy_scores(lm, tok, prompts: list[str], options: list[list[str]], golds: list[int]) -> dict[str, float]:
    """acc and acc_norm written plainly: argmax of the sums, and of the sums over each option's
    length in characters without its leading space."""
    acc, norm = [], []
    for prompt, opts, gold in zip(prompts, options, golds):
        ctx = tok(prompt)["input_ids"]
        sums = np.array([reference_logprob_sum(lm, ctx, tok(" " + o, add_special_tokens=False)["input_ids"])
                         for o in opts])
        chars = np.array([len(o) for o in opts], dtype=np.float64)
        acc.append(int(np.argmax(sums)) == gold)
        norm.append(int(np.argmax(sums / chars)) == gold)
    return {"acc": 100.0 * np.mean(acc), "acc_norm": 100.0 * np.mean(norm)}


def test_option_scores_by_hand():
    from recall_ray.core.metrics import MetricError, option_picks, option_scores

    # option 0: sum -2.0 over 4 chars (-0.5/char); option 1: -1.5 over 2 chars (-0.75/char)
    lp = [[-1.0, -1.0], [-1.5]]
    assert option_picks(lp, [" abcd", " ab"]) == {"acc": 1, "acc_norm": 0}
    three = [[-3.0], [-2.0], [-2.0]]  # a tie: the first
    assert option_picks(three, [" a", " bb", " cc"]) == {"acc": 1, "acc_norm": 1}
    got = option_scores("hellaswag", [lp, three], [[" abcd", " ab"], [" a", " bb", " cc"]], [["0"], ["1"]])
    assert got == {"acc_norm": 100.0, "acc": 50.0, "n": 2} and list(got)[0] == "acc_norm"  # primary first
    with pytest.raises(MetricError, match="generations"):
        option_scores("sst2", [lp], [[" a", " b"]], [["0"]])
    with pytest.raises(MetricError, match="option_scores"):
        from recall_ray.core.metrics import score_task

        score_task("piqa", ["x"], [["0"]])


def test_option_logprobs_of_variable_options_equal_one_row_at_a_time(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.core.loglik import option_logprobs

    lm, tok = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["Question: why?\nAnswer:", "a much longer context with several more words in it", "x"]
    opts = [[" because", " no idea at all", " y"], [" one"], [" a b c d e", " fg", " hij klm", " n", " opq"]]
    ctx = [tok(p)["input_ids"] for p in prompts]
    ids = [[tok(o, add_special_tokens=False)["input_ids"] for o in os_] for os_ in opts]
    got = option_logprobs(lm, ctx, ids, tok.pad_token_id, max_rows=2)
    for c, os_, per in zip(ctx, ids, got):
        for o, lp in zip(os_, per):
            assert len(lp) == len(o)
            assert sum(lp) == pytest.approx(reference_logprob_sum(lm, c, o), abs=5e-5)


def test_general_sets_scored_end_to_end_against_numpy(tiny_dir, ray_session):
    """evaluate_models on ARC-Easy (two numeric answer keys, a 3-option question), PIQA and
    HellaSwag: acc and acc_norm equal the plain reference, the prediction is the primary
    metric's choice, and the saved hits reproduce the primary score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.core.metrics import primary_metric, sample_hits
    from recall_ray.evaluate import evaluate_models, preflight
    from recall_ray.io.models import resolve_model

    arc = records("arc_easy")
    pick = [i for i, r in enumerate(arc) if r["answerKey"] in "1234"][:2]
    pick += [next(i for i, r in enumerate(arc) if len(r["choices"]["text"]) == 3)] + [0, 1, 2]
    model = resolve_model("m", str(tiny_dir), str(tiny_dir))
    items = preflight([model], ["arc_easy"], DATA, "test", None)
    items = [items[i] for i in pick] + preflight([model], ["piqa", "hellaswag"], DATA, "test", 4)
    r = evaluate_models([model], GENERAL, DATA, "test", items=items, batch_size=3)
    lm, tok = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    for task in GENERAL:
        if task == "arc_easy":
            raws = [arc[i] for i in pick]
            prompts = [f"Question: {x['question']}\nAnswer:" for x in raws]
            options = [x["choices"]["text"] for x in raws]
            golds = [x["choices"]["label"].index(x["answerKey"]) for x in raws]
        elif task == "piqa":
            raws = records(task)[:4]
            prompts = [f"Question: {x['goal']}\nAnswer:" for x in raws]
            options, golds = [[x["sol1"], x["sol2"]] for x in raws], [x["label"] for x in raws]
        else:
            raws = records(task)[:4]
            prompts = [f"{x['activity_label']}: {x['ctx']}" for x in raws]
            options, golds = [x["endings"] for x in raws], [x["label"] for x in raws]
        want = numpy_scores(lm, tok, prompts, options, golds)
        got = r.scores[r.scores["task"] == task].set_index("metric")["value"]
        assert got["acc"] == pytest.approx(want["acc"]) and got["acc_norm"] == pytest.approx(want["acc_norm"])
        assert list(r.scores[r.scores["task"] == task]["metric"])[0] == primary_metric(task)
        preds = r.predictions[r.predictions["task"] == task]
        assert [x[0] for x in preds["references"]] == [str(g) for g in golds]
        assert all(len(lps) == len(o) for lps, o in zip(preds["option_logprobs"], options))
        hits = sample_hits(task, list(preds["prediction"]), list(preds["references"]))
        assert 100.0 * np.mean(hits) == pytest.approx(want[primary_metric(task)])
        assert set(preds["protocol"]) == {"loglik"}


def test_option_intervals_recompute_both_metrics_from_saved_sums():
    """From a predictions table (option log-prob sums, references) and the data: each
    metric's hit by the plain rule, and its interval from a plainly written bootstrap."""
    from recall_ray.analysis import option_hits, option_intervals

    arc, hs = records("arc_easy")[:3], records("hellaswag")[:2]
    rng = np.random.default_rng(1)
    rows, want = [], []
    for task, recs in (("arc_easy", arc), ("hellaswag", hs)):
        for r in recs:
            texts = r["choices"]["text"] if task == "arc_easy" else r["endings"]
            gold = r["choices"]["label"].index(r["answerKey"]) if task == "arc_easy" else r["label"]
            sums = list(-rng.uniform(1, 30, size=len(texts)))
            sid = r["id"] if task == "arc_easy" else str(r["idx"])
            rows.append({"model": "m", "task": task, "sample_id": sid, "option_logprobs": sums,
                         "references": [str(gold)]})
            chars = np.array([len(t) for t in texts], dtype=float)
            want.append((task, sid, int(np.argmax(sums) == gold), int(np.argmax(np.array(sums) / chars) == gold)))
    hits = option_hits(pd.DataFrame(rows), DATA)
    got = {(t, s, m): h for t, s, m, h in zip(hits["task"], hits["sample_id"], hits["metric"], hits["hit"])}
    for task, sid, acc, norm in want:
        assert got[(task, sid, "acc")] == acc and got[(task, sid, "acc_norm")] == norm
    table = option_intervals(hits).set_index(["task", "metric"])
    for task in ("arc_easy", "hellaswag"):
        x = 100.0 * np.array([w[3] for w in want if w[0] == task], dtype=float)
        r = np.random.default_rng(0)
        reps = [x[r.integers(0, len(x), size=len(x))].mean() for _ in range(2000)]
        lo, hi = np.quantile(reps, [0.025, 0.975])
        row = table.loc[(task, "acc_norm")]
        assert (row["value"], row["lo"], row["hi"], row["n"]) == pytest.approx((x.mean(), lo, hi, len(x)))
