"""lm-evaluation-harness beside our evaluation (recall_ray.harness): on identical prompts
lm-eval's per-sample choice equals ours for the log-likelihood tasks; the job's
`--harness lm-eval` path on the simulated cluster; its refusals before any work."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import DATA, REPO, make_lora

pytest.importorskip("lm_eval", reason="lm-eval is the `harness` extra (pip install -e '.[test]' installs it)")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLOSED = ["sst2", "ag_news", "medmcqa", "race"]


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("harness_lora")
    make_lora(tiny_dir, out, seed=7)
    return out


def our_answers(model, items, max_prompt_tokens: int):
    """Our evaluation's EvalWorker (the Ray Data callable, here in-process) on `items`:
    (chosen option, [sum of each option's token log-probabilities]) per item."""
    from recall_ray.cluster.generation import EvalWorker

    worker = EvalWorker([model], max_prompt_tokens=max_prompt_tokens)
    batch = {"model": np.zeros(len(items), dtype=int), "row": np.arange(len(items)),
             "kind": np.array(["choice"] * len(items), dtype=object),
             "prompt": np.array([i.prompt for i in items], dtype=object),
             "max_new_tokens": np.zeros(len(items), dtype=int),
             "options": np.array([json.dumps(list(i.options)) for i in items], dtype=object)}
    out = worker(batch)
    return [(str(t), [sum(o) for o in json.loads(lp)]) for t, lp in zip(out["text"], out["logprobs"])]


@pytest.mark.parametrize("kind", ["hf", "adapter"])
def test_lm_eval_choice_equals_ours_per_sample(kind, tiny_dir, lora_dir):
    """SST-2, AG News, MedMCQA, RACE (4 test samples each) on the tiny Llama and on a LoRA
    adapter of it (lm-eval through PEFT, ours folded): lm-eval scores exactly our prompt and
    options, picks the same option on every sample, each option's log-likelihood differs
    from ours by one term common to all options (the response cue's newline, which lm-eval
    moves into the continuation), and its `acc` is the share of samples whose choice is gold."""
    from recall_ray import harness
    from recall_ray.cluster.harness import WHERE, lm_eval_model, run_lm_eval
    from recall_ray.io.models import resolve_model

    model = resolve_model("m", str(tiny_dir if kind == "hf" else lora_dir), str(tiny_dir))
    plan = harness.plan(CLOSED, DATA, "test", 4, "default")
    # no truncation on either side: the tiny tokenizer makes RACE prompts of ~2000 tokens
    ours = our_answers(model, plan.items, max_prompt_tokens=4096)
    lm = lm_eval_model(model, "float32", batch_size=8, device="cpu", max_length=4096)
    out = run_lm_eval(lm, plan.task_names, harness.config_files(plan.raw, plan.templates, WHERE),
                      {}, False)
    _, choices = harness.collect("m", out, plan)

    assert [(c["task"], c["sample_id"]) for c in choices] == [(i.task, i.sample_id) for i in plan.items]
    for c, item, (our_choice, our_ll) in zip(choices, plan.items, ours):
        assert c["prompt"] == item.prompt  # lm-eval's context: our prompt
        assert c["gold"] == item.refs[0]
        assert c["choice"] == our_choice, (item.task, item.sample_id, c["option_loglik"], our_ll)
        shift = np.array(list(c["option_loglik"].values())) - np.array(our_ll)
        assert shift.max() - shift.min() < 1e-3, (item.task, shift)  # one common term
        assert shift.max() < 0  # the newline's log-probability
    for task in CLOSED:
        mine = [c for c in choices if c["task"] == task]
        acc = np.mean([c["choice"] == c["gold"] for c in mine])
        assert out["results"][harness.harness_task_name(task)]["acc,none"] == pytest.approx(acc, abs=1e-12)
        assert out["n-samples"][harness.harness_task_name(task)]["effective"] == 4


def test_task_config_renders_our_prompts():
    """Every template of a closed task (default and paper sets) becomes a Jinja prompt that
    lm-eval renders to our prompt on each of the first 20 test records, and a target that
    picks the index of our reference among the options."""
    from lm_eval.utils import apply_template

    from recall_ray import harness
    from recall_ray.evaluate import closed_options

    for template_set in ("default", "paper"):
        plan = harness.plan(CLOSED, DATA, "test", 20, template_set)  # plan runs check_prompts
        for task in CLOSED:
            cfg = harness.task_config(task, plan.templates[task], "x.jsonl")
            items = [i for i in plan.items if i.task == task]
            for record, item in zip(plan.raw[task], items):
                assert apply_template(cfg["doc_to_text"], record) == item.prompt
                gold = int(apply_template(cfg["doc_to_target"], record))
                assert closed_options(task)[gold] == item.refs[0]


def test_jinja_prompt_quotes_literal_braces():
    """A template's literal text that looks like Jinja ("{{" from an escaped brace, "{%")
    stays literal: lm-eval renders each the way `str.format` does."""
    from lm_eval.utils import apply_template

    from recall_ray import harness

    record = {"x": "X", "y": ["a", "b"], "z": {"w": "W"}}
    for fmt in ["a {{x}} {y[0]} {z[w]}", "{{{{ {y[1]} }}}}", "%}} {{# {x} #}} {{%", "plain {x}\n"]:
        assert apply_template(harness.jinja_prompt(fmt), record) == fmt.format(**record), fmt
    with pytest.raises(harness.HarnessError, match="no Jinja equivalent"):
        harness.jinja_prompt("{x:>5}")


def write_user_task(folder):
    """A user's own lm-eval task (YAML + local JSONL): two-way multiple choice on 3 docs."""
    folder.mkdir()
    docs = [{"q": "the film is great", "a": 0}, {"q": "the film is dull", "a": 1}, {"q": "a fine cast", "a": 0}]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "user_mc.yaml").write_text(
        "task: user_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Review: {{q}}\\nSentiment:\"\n"
        "doc_to_choice: [\"good\", \"bad\"]\ndoc_to_target: \"{{a}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1\n")


def test_job_harness_lm_eval(ray_session, tiny_dir, lora_dir, tmp_path):
    """jobs/evaluate.py --harness lm-eval on a full model and an adapter (one Ray task each):
    scores.csv in our evaluation's shape, each closed task's accuracy the share of its logged
    samples whose choice is gold, the user's own task scored too, lm-eval's results JSON and
    configs that lm-eval can rerun."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    write_user_task(tmp_path / "user")
    out = tmp_path / "out"
    rc = job.main(["--harness", "lm-eval", "--model", f"base={tiny_dir}", "--model", f"lora={lora_dir}",
                   "--base", str(tiny_dir), "--tasks", "sst2", "medmcqa", "--max-samples", "3",
                   "--lm-eval-tasks", "user_mc", "--lm-eval-include", str(tmp_path / "user"),
                   "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns[:5]) == ["model", "task", "metric", "value", "n"]
    samples = pd.read_json(out / "lm_eval_samples.jsonl", lines=True)
    for model in ("base", "lora"):
        for task in ("sst2", "medmcqa"):
            s = samples[(samples.model == model) & (samples.task == task)]
            row = scores[(scores.model == model) & (scores.task == task)]
            assert len(s) == 3 and row.metric.tolist() == ["accuracy"] and row.n.tolist() == [3]
            assert row.value.iloc[0] == pytest.approx(100 * np.mean(s.choice == s.gold), abs=1e-3)
        user = scores[(scores.model == model) & (scores.task == "user_mc")]
        assert user.metric.tolist() == ["acc"] and user.n.tolist() == [3] and 0 <= user.value.iloc[0] <= 1
    results = json.loads((out / "lm_eval_results.json").read_text())
    assert set(results["models"]) == {"base", "lora"}
    assert set(results["models"]["lora"]["results"]) == {"recall_ray_sst2", "recall_ray_medmcqa", "user_mc"}
    cfg = (out / "lm_eval_tasks" / "sst2.yaml").read_text()
    assert str(out.resolve() / "lm_eval_tasks" / "sst2.jsonl") in cfg
    assert len((out / "lm_eval_tasks" / "sst2.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "squad_v2"], "not a closed-label task"),
    (["--tasks", "sst2", "--normalization", "mean"], "--normalization sum"),
    (["--tasks", "sst2", "--protocol", "generate"], "drop --protocol generate"),
    (["--lm-eval-include", "{missing}", "--lm-eval-tasks", "user_mc"], "not a directory"),
])
def test_job_harness_bad_input(extra, message, tiny_dir, tmp_path, capsys):
    """Refused with one line (exit status 2) before Ray starts."""
    import importlib.util

    import ray

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    write_user_task(tmp_path / "user")
    extra = [e.format(user=tmp_path / "user", missing=tmp_path / "nope") for e in extra]
    started = ray.is_initialized()
    rc = job.main(["--harness", "lm-eval", "--model", f"m={tiny_dir}", *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert ray.is_initialized() == started and not (tmp_path / "out").exists()


def test_unknown_lm_eval_task_is_refused(monkeypatch, tiny_dir, tmp_path, capsys):
    """A task in neither the include folder nor lm-eval's own index: one line, exit 2. The
    own index (about 15,000 tasks, minutes to build on 2 busy cores) is left out here: the
    TaskManager sees the include folder only."""
    import importlib.util

    from lm_eval import tasks

    real = tasks.TaskManager.__init__
    monkeypatch.setattr(tasks.TaskManager, "__init__",
                        lambda self, *a, **kw: real(self, *a, **{**kw, "include_defaults": False}))
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    write_user_task(tmp_path / "user")
    rc = job.main(["--harness", "lm-eval", "--model", f"m={tiny_dir}", "--lm-eval-tasks", "user_mc", "no_such_task",
                   "--lm-eval-include", str(tmp_path / "user"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown lm-eval task(s) ['no_such_task']" in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_lm_eval_is_one_line(monkeypatch):
    import sys

    from recall_ray import harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(harness.HarnessError, match=r"pip install -e '\.\[harness\]'"):
        harness.require_lm_eval()
