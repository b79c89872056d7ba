"""The evaluation job: bad input refused before any generation, batched left-padded greedy
generation equal to one-prompt-at-a-time generation, the pipeline's evaluation stage, and
the CLI's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DATA, REPO, float64_state
from recall_ray.cluster.generation import EvalWorker
from recall_ray.evaluate import (
    EvaluationError,
    build_items,
    check_tasks,
    preflight,
    template_texts,
    unrepresentable,
)
from recall_ray.io.models import load_tokenizer, resolve_model


def test_unknown_and_empty_task_lists_are_refused():
    with pytest.raises(EvaluationError, match="unknown task.*'nope'.*known tasks are .*sst2"):
        check_tasks(["sst2", "nope"])
    with pytest.raises(EvaluationError, match="no tasks to evaluate"):
        check_tasks([])
    assert check_tasks(["sst2", "ag_news", "sst2"]) == ["sst2", "ag_news"]


def test_split_without_references_is_refused(tmp_path):
    (tmp_path / "sst2").mkdir()
    lines = [json.dumps({"idx": i, "sentence": f"text {i}", "label": 1}) for i in range(3)]
    lines.append(json.dumps({"idx": 9, "sentence": "unlabelled", "label": None}))  # e.g. GLUE's test set
    (tmp_path / "sst2" / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match="label"):
        build_items(tmp_path, ["sst2"], "test", None)


def test_items_carry_every_squad_reference():
    items = build_items(DATA, ["squad_v2"], "test", 40)
    raw = [json.loads(l) for l in (DATA / "squad_v2" / "test.jsonl").read_text().splitlines()[:40]]
    for item, rec in zip(items, raw):
        texts = list(dict.fromkeys(rec["answers"]["text"])) or ["impossible to answer"]
        assert item.refs == texts
        assert item.prompt.endswith("### Response:\n") and rec["question"] in item.prompt


def test_tokenizer_without_the_templates_tokens_is_refused(tmp_path, tiny_dir):
    """A word-level tokenizer that never saw '###' maps the template's headers to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a movie review sentence positive negative"] * 3,
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    assert unrepresentable(fast, ["### Response:"]) == ["### Response:"]
    assert unrepresentable(load_tokenizer(resolve_model("b", str(tiny_dir), str(tiny_dir))), template_texts("sst2")) == []

    bad = tmp_path / "bad_tok_model"
    bad.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix in (".safetensors",) or f.name in ("config.json", "generation_config.json"):
            (bad / f.name).write_bytes(f.read_bytes())
    fast.save_pretrained(bad)
    model = resolve_model("badtok", str(bad), str(bad))
    with pytest.raises(EvaluationError, match="tokenizer of model 'badtok'.*cannot represent.*sst2"):
        preflight([model], ["sst2"], DATA, "test", 4)


def test_template_texts_hold_headers_and_labels():
    texts = template_texts("sst2")
    assert "positive" in texts and "negative" in texts
    assert any("### Response:" in t for t in texts)
    assert "impossible to answer" in template_texts("squad_v2")


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_experts):
    """Batched, left-padded, two models and two generation budgets in one batch (a batch
    that straddles two tasks): each row equals its own model's argmax decoding of its prompt
    alone with its own budget, written out by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = [tiny_experts[1], tiny_experts[0]]
    models = [resolve_model(f"m{i}", str(d), str(d)) for i, d in enumerate(dirs)]
    prompts = ["### Instruction:\nsay\n### Response:\n", "a longer prompt with several more words in it ### Response:\n",
               "short", "### Instruction:\nsay\n### Response:\n"]
    which = np.array([1, 1, 1, 0])
    out = EvalWorker(models)({"model": which, "row": np.arange(4), "prompt": np.array(prompts, dtype=object),
                              "kind": np.array(["generate"] * 4), "max_new_tokens": np.array([6, 2, 6, 3]),
                              "options": np.array(["[]"] * 4, dtype=object)})
    budgets = [6, 2, 6, 3]

    def reference(model_dir: Path, prompt: str, budget: int) -> str:
        lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(budget):
                nxt = int(lm(ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return tok.decode(new, skip_special_tokens=True)

    expect = [reference(dirs[m], p, b) for m, p, b in zip(which, prompts, budgets)]
    assert list(out["text"]) == expect
    assert reference(dirs[1], prompts[1], 6) != expect[1]  # the batch's largest budget would give another text
    assert list(out["model"]) == list(which) and list(out["row"]) == [0, 1, 2, 3]


def test_pipeline_scores_new_model_average_and_merge(tiny_run, tiny_dir, tiny_experts):
    cfg, result = tiny_run
    run_dir = Path(cfg.run_dir)
    scores = pd.read_csv(run_dir / "eval" / "scores.csv")
    assert list(dict.fromkeys(scores["model"])) == ["new", "average", "recall"]
    assert set(scores["task"]) == {"sst2", "ag_news"}
    assert (scores["n"] == 5).all()
    preds = pd.read_json(run_dir / "eval" / "predictions.jsonl", lines=True)
    assert len(preds) == 3 * 2 * 5
    # accuracy recomputed from the saved predictions (the extracted answer; None when the
    # generation holds no label, which counts as wrong)
    for (model, task), sub in preds.groupby(["model", "task"]):
        hits = sum(isinstance(p, str) and p == r[0] for p, r in zip(sub["prediction"], sub["references"]))
        got = scores[(scores["model"] == model) & (scores["task"] == task) & (scores["metric"] == "accuracy")]["value"]
        assert float(got.iloc[0]) == pytest.approx(100.0 * hits / len(sub))
    # the uniform-average baseline: every tensor the plain mean of the three models
    avg = float64_state(run_dir / "baselines" / "average")
    srcs = [float64_state(tiny_dir), float64_state(tiny_experts[0]), float64_state(tiny_experts[1])]
    for name, t in avg.items():
        assert np.allclose(t, (srcs[0][name] + srcs[1][name] + srcs[2][name]) / 3, atol=1e-6), name


def test_evaluation_cache_is_keyed_by_model_content_not_label(tiny_run, tiny_dir, tiny_experts):
    """A model scored once in a run directory is not generated for again, whatever its label
    (the base in both variants of a scenario); a model with another key is."""
    from recall_ray.evaluate import evaluation_stage
    from recall_ray.manifest import Manifest
    from recall_ray.io.storage import RunDir

    cfg, _ = tiny_run
    root = RunDir(cfg.run_dir)
    manifest = Manifest(root, {"test": "cache"})
    first = pd.read_csv(Path(cfg.run_dir) / "eval" / "scores.csv")
    # the same content key as the pipeline gave the new model, under another label and prefix
    from recall_ray.validate import check_models

    new = resolve_model("renamed", str(tiny_experts[1]), str(tiny_dir))
    fp = check_models([resolve_model("base", str(tiny_dir), str(tiny_dir)), new]).fingerprints["renamed"]
    ev = cfg.evaluate
    scores = evaluation_stage(manifest, root, "again", [new], ev.tasks, ev.data_dir, ev.split, ev.max_samples,
                              ev.batch_size, 1, {"renamed": fp})
    assert manifest.data["stages"]["again/evaluate"]["result"]["generated"] == []
    want = first[first["model"] == "new"].drop(columns="model").reset_index(drop=True)
    assert scores.drop(columns="model").reset_index(drop=True).equals(want)
    assert set(scores["model"]) == {"renamed"}
    # another key: generated afresh
    evaluation_stage(manifest, root, "other", [new], ["sst2"], ev.data_dir, ev.split, 2, ev.batch_size, 1,
                     {"renamed": "another-key"})
    assert manifest.data["stages"]["other/evaluate"]["result"]["generated"] == ["renamed"]
    # a longer task list: only the task not scored before is generated, and the result is what
    # scoring both afresh (under a third key) gives
    longer = evaluation_stage(manifest, root, "longer", [new], ["sst2", "medmcqa"], ev.data_dir, ev.split, 2,
                              ev.batch_size, 1, {"renamed": "another-key"})
    assert manifest.data["stages"]["longer/evaluate"]["result"]["generated_tasks"] == {"renamed": ["medmcqa"]}
    fresh = evaluation_stage(manifest, root, "fresh", [new], ["sst2", "medmcqa"], ev.data_dir, ev.split, 2,
                             ev.batch_size, 1, {"renamed": "third-key"})
    assert manifest.data["stages"]["fresh/evaluate"]["result"]["generated_tasks"] == {"renamed": ["sst2", "medmcqa"]}
    assert longer.equals(fresh) and list(dict.fromkeys(longer["task"])) == ["sst2", "medmcqa"]
    # one model under two labels in one call (SeqFT's and EWC's first step): scored once, under
    # the first label, and the second reads the same scores
    twin = resolve_model("twin", str(tiny_experts[1]), str(tiny_dir))
    both = evaluation_stage(manifest, root, "twins", [new, twin], ["sst2"], ev.data_dir, ev.split, 2,
                            ev.batch_size, 1, {"renamed": "fourth-key", "twin": "fourth-key"})
    assert manifest.data["stages"]["twins/evaluate"]["result"]["generated_tasks"] == {"renamed": ["sst2"]}
    by = {label: g.drop(columns="model").reset_index(drop=True) for label, g in both.groupby("model")}
    assert set(by) == {"renamed", "twin"} and by["renamed"].equals(by["twin"])
    assert by["renamed"].equals(fresh[fresh["task"] == "sst2"].drop(columns="model").reset_index(drop=True))
    for where in ("longer", "fresh"):
        preds = pd.read_json(Path(cfg.run_dir) / where / "eval" / "predictions.jsonl", lines=True)
        assert preds.groupby("task").size().to_dict() == {"sst2": 2, "medmcqa": 2}


def test_cli_scores_a_model_and_writes_its_files(tmp_path, tiny_dir, ray_session, capsys):
    """jobs/evaluate.py's main() in this process: it joins the session's Ray runtime."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "eval"
    status = job.main(["--model", f"tiny={tiny_dir}", "--base", str(tiny_dir), "--tasks", "sst2", "medmcqa",
                       "--max-samples", "3", "--batch-size", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    # job.log: the job's records (cli.RunLogHandler), written into --out once the scores are
    assert {p.name for p in out.iterdir()} == {"scores.json", "scores.csv", "scores.md", "predictions.jsonl", "job.log"}
    assert "scores written to" in (out / "job.log").read_text()
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["task"]) == {"sst2", "medmcqa"} and (scores["n"] == 3).all()
    assert "sst2/accuracy" in captured.out


def test_cli_refuses_unknown_task_before_starting_ray(tmp_path, tiny_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", f"tiny={tiny_dir}", "--tasks", "nope",
         "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # bad input, found before any work
    assert "unknown task(s) ['nope']" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_cli_refuses_a_bad_cpu_count_before_starting_ray(tmp_path, tiny_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", f"tiny={tiny_dir}", "--tasks", "piqa",
         "--num-cpus", "0", "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--num-cpus must be positive, got 0" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_each_model_is_reported_once_as_soon_as_complete(tiny_dir, tiny_experts, ray_session):
    """evaluate_models hands each model's scores and predictions to `on_model` once, equal to
    its part of the final result: the evaluation stage saves a model's cache entry then, so
    a stopped stage resumes from the models it had finished."""
    from recall_ray.evaluate import evaluate_models

    models = [resolve_model("a", str(tiny_experts[0]), str(tiny_dir)), resolve_model("b", str(tiny_dir), str(tiny_dir))]
    seen: list[tuple[str, pd.DataFrame, pd.DataFrame]] = []
    result = evaluate_models(models, ["sst2", "medmcqa"], DATA, "test", max_samples=3, batch_size=2, num_actors=1,
                             only={"b": ["sst2"]}, on_model=lambda *part: seen.append(part))
    assert sorted(label for label, _, _ in seen) == ["a", "b"]
    for label, scores, preds in seen:
        assert scores.equals(result.scores[result.scores["model"] == label].reset_index(drop=True))
        assert preds.equals(result.predictions[result.predictions["model"] == label].reset_index(drop=True))
    assert set(result.predictions[result.predictions["model"] == "b"]["task"]) == {"sst2"}
    assert len(result.predictions) == 3 * 2 + 3
