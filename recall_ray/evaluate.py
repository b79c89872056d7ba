"""Evaluation: greedy generation on a task split through a Ray Data actor pool
(recall_ray.cluster.generation), scored with the paper's metrics (core.metrics).

    items (prompt, references) per task -> one actor pool for every model (EvalWorker)
      -> generations -> per-task scores -> scores.json / scores.csv / predictions.jsonl

Every check that needs no forward pass (known task, references present, tokenizer able to
represent the template's text) runs before any actor starts. Prompts come from the same
templates as fine-tuning, so a model is asked exactly what it was trained to answer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .core.metrics import (TASK_METRICS, MetricError, extract_answer, max_new_tokens, option_picks, option_scores,
                           primary_metric, references, score_task)
from .core.templates import TEMPLATES, continuations, get_template, template_name
from .io.models import ResolvedModel, load_tokenizer
from .report import markdown_table
from .io.splits import load_split_with_raw
from .io.storage import staged

log = logging.getLogger("recall_ray.evaluate")


class EvaluationError(ValueError):
    """Bad evaluation input, found before any generation."""


# ----------------------------------------------------------------------------- pure parts

def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks, deduplicated in order; EvaluationError for an empty list or an unknown name."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise EvaluationError("no tasks to evaluate: name at least one (e.g. --tasks sst2 ag_news)")
    unknown = [t for t in tasks if t not in TASK_METRICS or t not in TEMPLATES]
    if unknown:
        known = sorted(set(TASK_METRICS) & set(TEMPLATES))
        raise EvaluationError(f"unknown task(s) {unknown}: known tasks are {', '.join(known)}")
    return tasks


def template_texts(task: str) -> list[str]:
    """The fixed text a model must be able to read and write for `task`: the prompt's
    literal parts (instruction, section headers) and the label words it answers with."""
    import string

    tpl = TEMPLATES[task]
    texts = [lit.strip() for lit, _, _, _ in string.Formatter().parse(tpl.prompt) if lit.strip()]
    if tpl.labels is not None:
        texts += [str(v) for v in tpl.labels.values()]
    if tpl.empty_target:
        texts.append(tpl.empty_target)
    return texts


def unrepresentable(tokenizer, texts: Sequence[str]) -> list[str]:
    """The texts this tokenizer cannot encode faithfully: they map to the unknown token or
    do not decode back to themselves (whitespace aside)."""
    bad = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False)
        if not ids or (unk is not None and unk in ids) or " ".join(back.split()) != " ".join(text.split()):
            bad.append(text)
    return bad


# How a task is asked. "loglik" (the default): a closed-label task (its template maps a
# label to an answer word or letter: SST-2, AG News, MedMCQA, RACE) is answered by the option
# the model finds most likely (core.loglik), and translation gets the reference's per-token
# log-likelihood beside its generation; "generate": every task by greedy generation, the
# answer extracted from the text. Open tasks (SQuAD 2.0, IWSLT) always generate, and the
# general-ability sets (ARC-Easy, PIQA, HellaSwag) are always scored by log-likelihood: each
# record's own options, ranked two ways (core.metrics.option_scores: acc and acc_norm).
PROTOCOLS = ("loglik", "generate")
REFERENCE_TASKS = ("iwslt2017_en_fr",)  # reference log-likelihood: a signal where exact match is 0


def closed_options(task: str) -> list[str]:
    """The answers a closed-label task allows (its template's label words, in order), or []."""
    labels = TEMPLATES[task].labels
    return list(dict.fromkeys(str(v) for v in labels.values())) if labels else []


def item_kinds(task: str, protocol: str) -> tuple[str, ...]:
    """The rows an item of `task` is asked as (cluster.generation.EvalWorker's kinds)."""
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown evaluation protocol {protocol!r}: use {' or '.join(PROTOCOLS)}")
    if TASK_METRICS[task].by_options:
        return ("choice",)
    if protocol == "loglik" and closed_options(task):
        return ("choice",)
    if protocol == "loglik" and task in REFERENCE_TASKS:
        return ("generate", "reference")
    return ("generate",)


@dataclass
class EvalItem:
    task: str
    sample_id: str
    prompt: str
    refs: list[str]
    kinds: tuple[str, ...] = ("generate",)
    options: tuple[str, ...] = ()  # the answers a "choice" row chooses among
    template: str = ""  # the template the prompt was rendered with (core.templates)

    @property
    def protocol(self) -> str:
        """How this item's primary metric is measured: "loglik" or "greedy"."""
        return "loglik" if "choice" in self.kinds else "greedy"


def build_items(data_dir: str | Path, tasks: Sequence[str], split: str, max_samples: int | None,
                protocol: str = "loglik", template_set: str = "default",
                max_samples_of: dict[str, int | None] | None = None) -> list[EvalItem]:
    """Every (task, sample) to ask, with the prompt of the task's template in `template_set`
    (core.templates.TEMPLATE_SETS), references checked: a split without references (e.g.
    an unlabelled test set) is an error here, not a score of 0 later. `max_samples_of`
    overrides `max_samples` for some tasks (the general-ability sets, scored whole). A
    general-ability item's options are its record's own continuations and its reference
    the correct one's index."""
    items = []
    for task in tasks:
        kinds, options = item_kinds(task, protocol), tuple(closed_options(task))
        template = template_name(task, template_set)
        by_options = TASK_METRICS[task].by_options
        cap = (max_samples_of or {}).get(task, max_samples)
        for raw, rec in load_split_with_raw(data_dir, task, split, template, max_samples=cap):
            try:
                refs = references(task, raw, sample=rec["sample_id"])
            except MetricError as err:
                raise EvaluationError(f"{task} {split} split, sample {rec['sample_id']}: {err}") from None
            if by_options:
                options = tuple(continuations(get_template(template), raw))
            elif "choice" in kinds and not set(refs) <= set(options):
                raise EvaluationError(f"{task} {split} split, sample {rec['sample_id']}: reference {refs} is not one"
                                      f" of the options {list(options)}")
            items.append(EvalItem(task, rec["sample_id"], rec["prompt"], refs, kinds,
                                  options if "choice" in kinds else (), template))
    return items


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    """A reference's log-likelihood per token (nats; 0 is certainty)."""
    return float(sum(token_logprobs) / len(token_logprobs)) if token_logprobs else float("nan")


def score_table(model: str, items: Sequence[EvalItem], answers: Sequence) -> pd.DataFrame:
    """Long table (model, task, metric, value, n, protocol) of one model's scores; `answers`
    are cluster.generation.Answer (or plain strings: generated texts)."""
    texts = [a if isinstance(a, str) else a.text for a in answers]
    rows = []
    for task in dict.fromkeys(i.task for i in items):
        idx = [j for j, it in enumerate(items) if it.task == task]
        if TASK_METRICS[task].by_options:
            scores = option_scores(task, [answers[j].option_logprobs for j in idx], [items[j].options for j in idx],
                                   [items[j].refs for j in idx])
        else:
            scores = score_task(task, [texts[j] for j in idx], [items[j].refs for j in idx])
        n = int(scores.pop("n"))
        protocol = items[idx[0]].protocol
        template = items[idx[0]].template or task
        rows += [{"model": model, "task": task, "metric": m, "value": float(v), "n": n, "protocol": protocol,
                  "template": template} for m, v in scores.items()]
        if "reference" in items[idx[0]].kinds:
            lp = [mean_logprob(answers[j].ref_logprobs) for j in idx]
            rows.append({"model": model, "task": task, "metric": "ref_logprob", "value": float(np.mean(lp)), "n": n,
                         "protocol": "loglik", "template": template})
    return pd.DataFrame(rows)


def wide_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Models as rows, `task/metric` as columns (in task order), for printing and Markdown."""
    s = scores.assign(column=scores["task"] + "/" + scores["metric"])
    wide = s.pivot(index="model", columns="column", values="value")
    return wide.loc[list(dict.fromkeys(s["model"])), list(dict.fromkeys(s["column"]))]


# ------------------------------------------------------------------------ scoring runs

# Bumped whenever what a prompt's generation is changes, so that cached scores of the old
# protocol are not reused: 2 = each row cut at its own task's budget (1 let a batch that
# straddled two tasks give every row the larger one).
GENERATION_PROTOCOL = 2
LOGLIK_PROTOCOL = 1  # likewise for log-likelihood scoring (core.loglik)


@dataclass
class EvalResult:
    scores: pd.DataFrame  # long: model, task, metric, value, n
    predictions: pd.DataFrame  # model, task, sample_id, generation, prediction, references
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def wide(self) -> pd.DataFrame:
        return wide_table(self.scores)


def preflight(models: Sequence[ResolvedModel], tasks: Sequence[str], data_dir: str | Path, split: str,
              max_samples: int | None, protocol: str = "loglik", template_set: str = "default",
              max_samples_of: dict[str, int | None] | None = None) -> list[EvalItem]:
    """Every check that needs no forward pass; returns the items to ask (`build_items`)."""
    if not models:
        raise EvaluationError("no models to evaluate")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"model names must be distinct, got {labels}")
    tasks = check_tasks(tasks)
    items = build_items(data_dir, tasks, split, max_samples, protocol, template_set, max_samples_of)
    for m in models:
        tok = load_tokenizer(m)
        for task in tasks:
            bad = unrepresentable(tok, template_texts(template_name(task, template_set)))
            if bad:
                raise EvaluationError(
                    f"the tokenizer of model {m.label!r} ({m.tokenizer_dir}) cannot represent {bad!r} of task {task}'s"
                    " template (unknown token or lossy round trip): evaluate with the tokenizer the model was trained"
                    " with, or add the template's text to its vocabulary")
    return items


def evaluate_models(models: Sequence[ResolvedModel], tasks: Sequence[str], data_dir: str | Path, split: str = "test",
                    max_samples: int | None = None, batch_size: int = 16, num_actors: int | str = "auto",
                    dtype: str = "float32", items: list[EvalItem] | None = None,
                    only: dict[str, Sequence[str]] | None = None,
                    on_model: Callable[[str, pd.DataFrame, pd.DataFrame], None] | None = None,
                    protocol: str = "loglik", normalization: str = "sum") -> EvalResult:
    """Score every model on every task (Ray must be initialised); `only` limits a model
    (by label) to some of the tasks, e.g. an expert to its own. `on_model(label, scores,
    predictions)` receives each model's part of the result as soon as it is complete.
    `protocol` (PROTOCOLS) decides how items are asked when `items` are not given;
    `normalization` ranks a choice's options (core.loglik.choose)."""
    items = items if items is not None else preflight(models, tasks, data_dir, split, max_samples, protocol)
    work = [(m, [i for i in items if only is None or m.label not in only or i.task in only[m.label]]) for m in models]
    work = [(m, mine) for m, mine in work if mine]
    parts: dict[int, tuple[pd.DataFrame, pd.DataFrame]] = {}

    def complete(mi: int, answers: list) -> None:
        m, mine = work[mi]
        parts[mi] = model_result(m.label, mine, answers)
        if on_model is not None:
            on_model(m.label, *parts[mi])

    from .cluster.generation import evaluate_rows

    t0 = time.perf_counter()
    evaluate_rows(work, batch_size, num_actors, dtype, normalization, on_complete=complete)
    seconds = {"generation": time.perf_counter() - t0}
    log.info("evaluated %d models on %d prompts in %.1fs", len(work), sum(len(w) for _, w in work), seconds["generation"])
    ordered = [parts[mi] for mi in range(len(work))]
    return EvalResult(pd.concat([s for s, _ in ordered], ignore_index=True),
                      pd.concat([p for _, p in ordered], ignore_index=True), seconds)


def model_result(label: str, items: Sequence[EvalItem], answers: Sequence) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One model's long scores and its predictions table: every answer (the generation, or
    the option chosen by log-likelihood, with each option's log-probability), its cleaned
    prediction, the references and, for translation, the reference's log-likelihood. A
    general-ability item's prediction is the index of the option its task's primary metric
    chooses (core.metrics.option_picks), its generation that option's text, and its option
    log-probabilities a list in the record's order."""
    texts, predictions = [], []
    for i, a in zip(items, answers):
        if TASK_METRICS[i.task].by_options:
            pick = option_picks(a.option_logprobs, i.options)[primary_metric(i.task)]
            texts.append(i.options[pick])
            predictions.append(str(pick))
        else:
            texts.append(a if isinstance(a, str) else a.text)
            predictions.append(extract_answer(i.task, texts[-1]))
    preds = pd.DataFrame({
        "model": label, "task": [i.task for i in items], "sample_id": [i.sample_id for i in items],
        "protocol": [i.protocol for i in items],
        "generation": texts, "prediction": predictions,
        "references": [i.refs for i in items],
        "option_logprobs": [None if isinstance(a, str) or a.option_logprobs is None
                            else [sum(lp) for lp in a.option_logprobs] if TASK_METRICS[i.task].by_options
                            else {o: sum(lp) for o, lp in zip(i.options, a.option_logprobs)}
                            for i, a in zip(items, answers)],
        "ref_logprob": [None if isinstance(a, str) or a.ref_logprobs is None else mean_logprob(a.ref_logprobs)
                        for a in answers],
    })
    return score_table(label, items, answers), preds


def result_files(result: EvalResult, meta: dict | None = None) -> dict[str, str]:
    """The evaluation's files as text: scores.csv (long), scores.json, scores.md (wide),
    predictions.jsonl (every generation, its cleaned answer and the references)."""
    payload = {"scores": result.scores.to_dict(orient="records"), "seconds": result.seconds, **(meta or {})}
    return {
        "scores.csv": result.scores.to_csv(index=False, float_format="%.4f"),
        "scores.json": json.dumps(payload, indent=2) + "\n",
        "scores.md": markdown_table(result.wide.reset_index()),
        "predictions.jsonl": result.predictions.to_json(orient="records", lines=True, force_ascii=False),
    }


def write_result(result: EvalResult, out_dir: str | Path, meta: dict | None = None) -> None:
    """`result_files` written to a local `out_dir`: built in a staging directory beside it
    and moved into place only when complete (an existing `out_dir` is replaced)."""
    with staged(str(out_dir), overwrite=True) as tmp:
        for name, text in result_files(result, meta).items():
            (Path(tmp) / name).write_text(text)


def evaluation_stage(manifest, run_dir, prefix: str, models: Sequence[ResolvedModel], tasks: Sequence[str],
                     data_dir: str | Path, split: str, max_samples: int | None, batch_size: int,
                     num_actors: int | str, model_keys: dict[str, object], only: dict[str, Sequence[str]] | None = None,
                     items: list[EvalItem] | None = None, dtype: str = "float32", protocol: str = "loglik",
                     normalization: str = "sum", template_set: str = "default",
                     max_samples_of: dict[str, int | None] | None = None) -> pd.DataFrame:
    """Score `models` on `tasks` as a resumable stage of `manifest`, writing
    <run_dir>/<prefix>/eval/; returns the long scores. `max_samples_of` overrides
    `max_samples` for some tasks (build_items).

    `model_keys[label]` is whatever decides that model's contents (a fingerprint, the key
    of the merge stage that wrote it). Each model's scores on each task are cached under
    <run_dir>/eval_cache/ by that key and the prompts of that task, whatever its label: a
    model scored once on a task (the base in both variants of a scenario, an unchanged merge
    when a sibling method's setting changes, the same model in a longer task list) is never
    generated for again on that task in this run directory, and two labels of one model in
    the same call are scored once."""
    import io

    from .manifest import stable_hash

    items = items if items is not None else preflight(models[:1], tasks, data_dir, split, max_samples, protocol,
                                                      template_set, max_samples_of)
    missing = [m.label for m in models if m.label not in model_keys]
    if missing:
        raise ValueError(f"evaluation_stage: no model key for {missing}")
    rel = f"{prefix}/eval" if prefix else "eval"

    def mine(m: ResolvedModel) -> list[EvalItem]:
        return [i for i in items if i.task in tasks and (only is None or m.label not in only or i.task in only[m.label])]

    def entry(m: ResolvedModel, task: str) -> str:
        """The cache entry of one model on one task: its content key and exactly what it is asked."""
        return "eval_cache/" + stable_hash([
            model_keys[m.label], split, dtype,
            [(i.task, i.sample_id, i.prompt, i.refs, max_new_tokens(i.task), i.kinds, i.options)
             for i in mine(m) if i.task == task],
            {"generation": GENERATION_PROTOCOL, "loglik": LOGLIK_PROTOCOL, "normalization": normalization},
        ])[:32]

    # each model's tasks in the order they are asked, and the entry of each
    asked = {m.label: list(dict.fromkeys(i.task for i in mine(m))) for m in models}
    cache = {m.label: {t: entry(m, t) for t in asked[m.label]} for m in models}
    key = [split, max_samples, [(m.label, [cache[m.label][t] for t in asked[m.label]]) for m in models]]

    def run() -> dict:
        # an entry asked of two labels (the same model under two names: SeqFT's and EWC's first
        # step, the base in a list twice) is scored once, under the first; the others read it
        claimed: set[str] = set()
        todo = {}
        for m in models:
            for t, entry_of_t in cache[m.label].items():
                if entry_of_t not in claimed and not run_dir.exists(f"{entry_of_t}.scores.csv"):
                    todo.setdefault(m.label, []).append(t)
                claimed.add(entry_of_t)
        seconds = {}
        if todo:
            log.info("evaluate: generating for %s (the other models and tasks cached)", todo)
            for label, missing in todo.items():  # -v: where each would have been found
                log.debug("evaluate: not cached: %s on %s (%s)", label, ", ".join(missing),
                          ", ".join(cache[label][t] for t in missing))

            def save(label: str, scores: pd.DataFrame, preds: pd.DataFrame) -> None:
                # as soon as the model is done, so that a stage stopped midway resumes from the
                # models it had finished; predictions first: an entry is complete once its scores exist
                for t in todo[label]:
                    run_dir.write_text(f"{cache[label][t]}.predictions.jsonl",
                                       preds[preds["task"] == t].to_json(orient="records", lines=True,
                                                                         force_ascii=False))
                    run_dir.write_text(f"{cache[label][t]}.scores.csv",
                                       scores[scores["task"] == t].to_csv(index=False))

            r = evaluate_models([m for m in models if m.label in todo], tasks, data_dir, split, max_samples,
                                batch_size, num_actors, dtype, items, todo, on_model=save,
                                normalization=normalization)
            seconds = r.seconds

        def read(label: str, suffix: str) -> list[bytes]:
            return [run_dir.read_bytes(f"{cache[label][t]}.{suffix}") for t in asked[label]]

        scores = pd.concat([pd.read_csv(io.BytesIO(b)).assign(model=m.label)
                            for m in models for b in read(m.label, "scores.csv")], ignore_index=True)
        preds = pd.concat([pd.read_json(io.BytesIO(b), lines=True, dtype=False).assign(model=m.label)
                           for m in models for b in read(m.label, "predictions.jsonl") if b.strip()],
                          ignore_index=True)
        result = EvalResult(scores, preds, seconds)
        meta = {"split": split, "max_samples": max_samples, "protocol": protocol, "normalization": normalization,
                "templates": template_set, **({"max_samples_of": max_samples_of} if max_samples_of else {})}
        for fname, text in result_files(result, meta).items():
            run_dir.write_text(f"{rel}/{fname}", text)
        return {"seconds": seconds, "generated": list(todo), "generated_tasks": todo}

    manifest.run(f"{prefix}/evaluate" if prefix else "evaluate", key, [run_dir.uri(f"{rel}/scores.csv")], run)
    return pd.read_csv(io.BytesIO(run_dir.read_bytes(f"{rel}/scores.csv")))
