"""Log-likelihood scoring (core.loglik, cluster.generation.EvalWorker, evaluate): every
number against a plain reference written here, one row at a time, with the model's full
forward (its own logits) and a float64 log-softmax."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import DATA
from recall_ray.core.loglik import choose, continuation_logprobs, option_logprobs


@pytest.fixture(scope="module")
def lm_tok(tiny_experts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_experts[1]
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def reference_logprobs(lm, context: list[int], continuation: list[int]) -> list[float]:
    """log p(t_j | context, t_<j) for each continuation token, from one unpadded forward."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    out = []
    for j, tok in enumerate(continuation):
        row = logits[len(context) - 1 + j]
        out.append(float(row[tok] - torch.logsumexp(row, dim=0)))
    return out


def test_continuation_logprobs_equal_one_row_at_a_time(lm_tok):
    lm, tok = lm_tok
    texts = [("a movie review ### Response:\n", "negative"), ("short", "positive review"),
             ("a much longer prompt with many more words than the others ### Response:\n", "World"), ("x", "y")]
    rows = [(tok(c)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]) for c, t in texts]
    got = continuation_logprobs(lm, rows, tok.pad_token_id, max_rows=3)  # two chunks, right-padded
    for (c, t), g in zip(rows, got):
        np.testing.assert_allclose(g, reference_logprobs(lm, c, t), rtol=0, atol=2e-5)
    assert any(len(t) > 1 for _, t in rows) and all(len(g) == len(t) for (_, t), g in zip(rows, got))


def test_single_token_options_take_the_prompts_own_forward(lm_tok):
    lm, tok = lm_tok
    contexts = [tok("review: great ### Response:\n")["input_ids"], tok("q ### Response:\n")["input_ids"]]
    vocab_ids = [[[5], [9], [17]], [[5], [9], [17]]]  # single-token options: the fast path
    multi = [[[5, 6], [9]], [[17], [3, 4, 5]]]  # mixed lengths: one row per option
    for opts in (vocab_ids, multi):
        got = option_logprobs(lm, contexts, opts, tok.pad_token_id)
        for c, options, per_opt in zip(contexts, opts, got):
            for o, lp in zip(options, per_opt):
                np.testing.assert_allclose(lp, reference_logprobs(lm, c, o), rtol=0, atol=2e-5)


def test_choose_sum_and_mean_and_ties():
    opts = [[-1.0], [-0.4, -0.4], [-2.0, -0.1, -0.1]]
    assert choose(opts, "sum") == 1  # sums -1.0, -0.8, -2.2
    assert choose(opts, "mean") == 1  # means -1.0, -0.4, -0.733
    assert choose([[-0.5, -0.5], [-0.6]], "sum") == 1 and choose([[-0.5, -0.5], [-0.6]], "mean") == 0
    assert choose([[-1.0], [-1.0]], "sum") == 0  # the first on a tie
    with pytest.raises(ValueError, match="normalization"):
        choose(opts, "max")


def test_eval_worker_chooses_the_most_likely_option(tiny_experts):
    """Choice rows of two models in one batch, beside a generation row: each chosen option is
    the argmax of the reference sums, and the reference row's log-probabilities match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.cluster.generation import EvalWorker
    from recall_ray.io.models import resolve_model

    dirs = [tiny_experts[0], tiny_experts[1]]
    models = [resolve_model(f"m{i}", str(d), str(d)) for i, d in enumerate(dirs)]
    options = ["World", "Sports", "Business", "Sci/Tech"]
    prompts = ["news: the match ended ### Response:\n", "news: shares fell ### Response:\n",
               "news: a new chip ### Response:\n", "translate ### Response:\n"]
    batch = {"model": np.array([0, 1, 1, 1]), "row": np.arange(4), "kind": np.array(["choice", "choice", "choice",
                                                                                       "reference"]),
             "prompt": np.array(prompts, dtype=object), "max_new_tokens": np.array([4, 4, 4, 4]),
             "options": np.array([json.dumps(options)] * 3 + [json.dumps(["le film"])], dtype=object)}
    out = EvalWorker(models)(batch)
    for r, (m, prompt) in enumerate(zip(batch["model"], prompts)):
        lm = AutoModelForCausalLM.from_pretrained(dirs[m]).eval()
        tok = AutoTokenizer.from_pretrained(dirs[m])
        ctx = tok(prompt)["input_ids"]
        if r < 3:
            sums = [sum(reference_logprobs(lm, ctx, tok(o, add_special_tokens=False)["input_ids"])) for o in options]
            assert out["text"][r] == options[int(np.argmax(sums))]
            got = json.loads(out["logprobs"][r])
            np.testing.assert_allclose([sum(lp) for lp in got], sums, rtol=0, atol=5e-5)
        else:
            ref = reference_logprobs(lm, ctx, tok("le film", add_special_tokens=False)["input_ids"])
            np.testing.assert_allclose(json.loads(out["logprobs"][r]), ref, rtol=0, atol=2e-5)


def test_protocol_decides_how_each_task_is_asked():
    from recall_ray.evaluate import EvaluationError, build_items, item_kinds

    assert item_kinds("sst2", "loglik") == ("choice",) and item_kinds("sst2", "generate") == ("generate",)
    assert item_kinds("squad_v2", "loglik") == ("generate",)
    assert item_kinds("iwslt2017_en_fr", "loglik") == ("generate", "reference")
    items = build_items(DATA, ["medmcqa", "ag_news"], "test", 3, "loglik")
    assert items[0].options == ("A", "B", "C", "D") and items[0].protocol == "loglik"
    assert items[-1].options == ("World", "Sports", "Business", "Sci/Tech")
    assert all(i.refs[0] in i.options for i in items)
    with pytest.raises(EvaluationError, match="protocol"):
        item_kinds("sst2", "perplexity")


def test_loglik_scores_and_protocol_recorded(tiny_experts, tiny_dir, ray_session):
    """The evaluation end to end on SST-2 and IWSLT: accuracy from the saved predictions'
    hits, each chosen option the reference's argmax, IWSLT's reference log-likelihood per
    token recomputed here, and the protocol in every score row and prediction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.evaluate import evaluate_models
    from recall_ray.io.models import resolve_model

    model = resolve_model("m", str(tiny_experts[1]), str(tiny_dir))
    r = evaluate_models([model], ["sst2", "iwslt2017_en_fr"], DATA, "test", 4, batch_size=4, protocol="loglik")
    scores, preds = r.scores, r.predictions
    assert set(zip(scores["task"], scores["metric"], scores["protocol"])) == {
        ("sst2", "accuracy", "loglik"), ("iwslt2017_en_fr", "exact_match", "greedy"),
        ("iwslt2017_en_fr", "bleu", "greedy"), ("iwslt2017_en_fr", "ref_logprob", "loglik")}
    lm = AutoModelForCausalLM.from_pretrained(tiny_experts[1]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_experts[1])
    from recall_ray.io.splits import load_split_with_raw

    sst = preds[preds["task"] == "sst2"]
    recs = [rec for _, rec in load_split_with_raw(DATA, "sst2", "test", max_samples=4)]
    for (_, p), rec in zip(sst.iterrows(), recs):
        ctx = tok(rec["prompt"])["input_ids"]
        sums = {o: sum(reference_logprobs(lm, ctx, tok(o, add_special_tokens=False)["input_ids"]))
                for o in ("negative", "positive")}
        assert p["generation"] == max(sums, key=sums.get) and p["protocol"] == "loglik"
    acc = scores[(scores["task"] == "sst2")]["value"].iloc[0]
    assert acc == pytest.approx(100 * np.mean([p == r[0] for p, r in zip(sst["prediction"], sst["references"])]))
    iw = preds[preds["task"] == "iwslt2017_en_fr"]
    recs = [rec for _, rec in load_split_with_raw(DATA, "iwslt2017_en_fr", "test", max_samples=4)]
    means = []
    for (_, p), rec in zip(iw.iterrows(), recs):
        lp = reference_logprobs(lm, tok(rec["prompt"])["input_ids"], tok(p["references"][0],
                                                                          add_special_tokens=False)["input_ids"])
        means.append(sum(lp) / len(lp))
        assert p["ref_logprob"] == pytest.approx(means[-1], abs=2e-5)
    got = scores[(scores["task"] == "iwslt2017_en_fr") & (scores["metric"] == "ref_logprob")]["value"].iloc[0]
    assert got == pytest.approx(float(np.mean(means)), abs=2e-5) and math.isfinite(got)


def test_paper_template_set_asks_with_table_6_formats():
    from recall_ray.core.templates import TEMPLATES, template_name
    from recall_ray.evaluate import build_items

    items = build_items(DATA, ["sst2", "medmcqa", "race", "squad_v2", "iwslt2017_en_fr"], "test", 2, "loglik", "paper")
    by_task = {i.task: i for i in items}
    assert by_task["sst2"].prompt.startswith("Statement: ") and "OPTIONS: - negative.- positive. Answer:" in \
        by_task["sst2"].prompt
    assert "Choose an correct answer from A/B/C/D.Answer:" in by_task["medmcqa"].prompt
    assert by_task["race"].prompt.startswith("Read the article, and answer the question by replying A, B, C or D.")
    assert "According to the above passage" in by_task["squad_v2"].prompt
    assert by_task["iwslt2017_en_fr"].template == "iwslt2017_en_fr"  # no paper format: the default one
    default = build_items(DATA, ["sst2"], "test", 2, "loglik", "default")
    assert [i.refs for i in default] == [i.refs for i in items if i.task == "sst2"]  # the same answers
    assert TEMPLATES[template_name("sst2", "paper")].labels == TEMPLATES["sst2"].labels
