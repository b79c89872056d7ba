"""lm-evaluation-harness beside recall-ray's evaluation: the same models, the same prompts,
scored by lm-eval (0.4.x, the `harness` extra) so that a user can check one evaluator
against the other.

    recall-ray tasks (data/, a template set) -> lm-eval task configs (YAML + the JSONL records)
      -> one Ray task per model (cluster.harness: lm-eval's HFLM, `peft=` for an adapter)
      -> per-sample choices and lm-eval's results -> scores.csv (model, task, metric, value, n)

A closed-label task (SST-2, AG News, MedMCQA, RACE) becomes a `multiple_choice` config that
reads exactly the records our evaluation asks (the split, its first `max_samples`) from a
local JSONL (`dataset_path: json`), with our template turned into Jinja (`doc_to_text`), our
options (`doc_to_choice`) and no delimiter between prompt and option. lm-eval's `acc` is then
our log-likelihood accuracy with `normalization: sum`. One difference in how lm-eval scores,
which does not change a choice: it moves a context's trailing whitespace into the
continuation, so each option's log-likelihood includes the response cue's newline token,
the same term for every option. Any other lm-eval task can be named too: its YAML (in a
folder given as an include path) or a built-in task, as long as its data is local (no hub
access at run time: HF_DATASETS_OFFLINE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .cluster.harness import OFFLINE_ENV, WHERE
from .core.templates import TEMPLATES
from .evaluate import EvalItem, EvaluationError, closed_options

TASK_PREFIX = "recall_ray_"  # our configs' lm-eval names: lm-eval has its own `sst2`, `race`
INSTALL_HINT = "pip install -e '.[harness]' (lm-eval 0.4.x)"


class HarnessError(EvaluationError):
    """Bad input for the lm-eval evaluation, or lm-eval disagreeing with our prompts."""


def require_lm_eval() -> str:
    """lm-eval's version, or a HarnessError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise HarnessError(f"--harness lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")\
            from None
    version = getattr(lm_eval, "__version__", "0")
    if not version.startswith("0.4."):
        raise HarnessError(f"lm-eval {version} is installed; recall-ray's configs are written for 0.4.x: {INSTALL_HINT}")
    return version


# ----------------------------------------------------------------------------- configs (pure)

def jinja_prompt(fmt: str) -> str:
    """A `str.format` template as the Jinja template lm-eval renders (`{{ field }}`): the
    literal text kept verbatim (inside `{% raw %}` when it holds Jinja syntax), each field
    (`sentence`, `options[0]`, `answers.text`) as an expression. Format specs and
    conversions have no Jinja equivalent here and are refused."""
    out, text = [], ""

    def flush() -> None:  # `str.format` yields "{{" as separate "{" pieces: judge the joined text
        if any(s in text for s in ("{{", "}}", "{%", "%}", "{#", "#}")):
            if "endraw" in text:
                raise HarnessError(f"template text {text!r} holds Jinja's 'endraw': it cannot be quoted for lm-eval")
            out.append("{% raw %}" + text + "{% endraw %}")
        else:
            out.append(text)

    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        text += literal
        if name is not None:
            if spec or conversion or not name:
                raise HarnessError(f"template field {{{name}{'!' + conversion if conversion else ''}"
                                   f"{':' + spec if spec else ''}}} has no Jinja equivalent: use plain {{field}}s")
            flush()
            text = ""
            out.append("{{ " + jinja_field(name) + " }}")
    flush()
    return "".join(out)


def jinja_field(name: str) -> str:
    """A `str.format` field name as a Jinja expression: `options[0]` stays, `z[w]` (an index
    that is not a number: the string "w") becomes `z['w']`, an attribute stays `.attr`."""
    import _string

    first, rest = _string.formatter_field_name_split(name)
    expr = str(first)
    for is_attr, key in rest:
        expr += f".{key}" if is_attr else f"[{key!r}]"
    return expr


def harness_task_name(task: str) -> str:
    return TASK_PREFIX + task


def task_config(task: str, template: str, data_file: str) -> dict:
    """The lm-eval config of a closed-label task of ours: `multiple_choice` over the JSONL
    records at `data_file` (its `test` split), our template's prompt, our options in our
    order, the gold option's index from the record's label field, `acc` (sum of the
    option's token log-probabilities), zero-shot."""
    options = closed_options(task)
    if not options:
        raise HarnessError(f"task {task!r} is not a closed-label task: --harness lm-eval scores SST-2, AG News,"
                           f" MedMCQA and RACE by log-likelihood; score {task} with recall-ray's evaluation")
    tpl = TEMPLATES[template]
    gold = "{" + ", ".join(f"{k!r}: {options.index(str(v))}" for k, v in tpl.labels.items()) + "}"
    return {
        "task": harness_task_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": jinja_prompt(tpl.prompt),
        "doc_to_choice": options,
        "doc_to_target": "{{ " + gold + "[" + tpl.target_field + "] }}",
        "target_delimiter": "",  # our prompt ends with the response cue's newline
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "recall_ray_task": task, "recall_ray_template": template},
    }


def config_files(raw_by_task: dict[str, list[dict]], templates: dict[str, str], where: str) -> dict[str, str]:
    """{file name: text} of the configs of our tasks: `<task>.yaml` and the records it reads,
    `<task>.jsonl` (the raw records our evaluation asks, in its order), with data paths
    under the directory `where` the files will be written to."""
    import yaml

    files = {}
    for task, raw in raw_by_task.items():
        cfg = task_config(task, templates[task], str(Path(where) / f"{task}.jsonl"))
        files[f"{task}.yaml"] = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=10**6)
        files[f"{task}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw)
    return files


def check_prompts(raw_by_task: dict[str, list[dict]], items: Sequence[EvalItem], templates: dict[str, str]) -> None:
    """Before any work: lm-eval's rendering of each config's Jinja prompt equals our prompt
    for every record (a template whose translation differs is an error, not a silent change
    of what the models are asked)."""
    from lm_eval.utils import apply_template

    for task, raw in raw_by_task.items():
        ours = [i for i in items if i.task == task]
        jinja = jinja_prompt(TEMPLATES[templates[task]].prompt)
        for record, item in zip(raw, ours):
            if apply_template(jinja, record) != item.prompt:
                raise HarnessError(f"task {task}, sample {item.sample_id}: lm-eval renders the prompt differently from"
                                   f" recall-ray (template {templates[task]!r}); fix recall_ray.harness.jinja_prompt")


# ----------------------------------------------------------------------------- results (pure)

@dataclass
class SampleChoice:
    """lm-eval's answer to one sample of a closed-label task of ours."""

    task: str
    sample_id: str
    prompt: str  # the context lm-eval scored (our prompt)
    choice: str  # the option of highest summed log-likelihood (the first on a tie)
    gold: str
    option_loglik: dict[str, float]


def sample_choices(task: str, samples: Sequence[dict], items: Sequence[EvalItem]) -> list[SampleChoice]:
    """Per-sample choices from lm-eval's logged samples (`log_samples`) of our task `task`;
    `items` are our evaluation's items of that task (lm-eval's doc_id is their index). A
    sample whose context is not our prompt is a RuntimeError (a failure, not bad input)."""
    options = closed_options(task)
    out = []
    for s in sorted(samples, key=lambda s: int(s["doc_id"])):
        item = items[int(s["doc_id"])]
        context = s["arguments"][0][0]
        # lm-eval moves trailing whitespace from the context into the continuation
        if context.rstrip() != item.prompt.rstrip():
            raise RuntimeError(f"task {task}, sample {item.sample_id}: lm-eval scored a context that is not"
                               " recall-ray's prompt")
        ll = [float(r[0]) for r in s["filtered_resps"]]
        best = int(np.argmax(ll))  # numpy's argmax takes the first of equal values, as core.loglik.choose
        out.append(SampleChoice(task, item.sample_id, context, options[best], options[int(s["target"])],
                                dict(zip(options, ll))))
    return out


def score_rows(label: str, results: dict, ours: dict[str, str], templates: dict[str, str]) -> list[dict]:
    """scores.csv rows (model, task, metric, value, n, protocol, template) from lm-eval's
    `results`: our tasks (`ours`: lm-eval name -> our name) as `accuracy` in percent, lm-eval's
    `acc` x 100, like our evaluation's rows; any other task with each of lm-eval's metrics as
    lm-eval reports it (its own scale), stderr left out."""
    rows = []
    for name, metrics in results["results"].items():
        n = int(results.get("n-samples", {}).get(name, {}).get("effective", metrics.get("sample_len", 0)) or 0)
        if name in ours:
            task = ours[name]
            rows.append({"model": label, "task": task, "metric": "accuracy", "value": 100.0 * float(metrics["acc,none"]),
                         "n": n, "protocol": "lm-eval", "template": templates[task]})
            continue
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            rows.append({"model": label, "task": name, "metric": metric if filt == "none" else f"{metric}/{filt}",
                         "value": float(value), "n": n, "protocol": "lm-eval", "template": ""})
    return rows


# ----------------------------------------------------------------------------- the stage

@dataclass
class HarnessPlan:
    """What every model is asked: our tasks' config files, and the user's lm-eval tasks."""

    items: list[EvalItem]
    templates: dict[str, str]  # our task -> the template it is asked with
    raw: dict[str, list[dict]]  # our task -> its raw records, in the items' order
    user_tasks: list[str]  # lm-eval task names the user gave
    include: dict[str, bytes]  # the user's include folders' files: "<i>/<relative path>" -> bytes
    defaults: bool  # whether lm-eval's own task index is needed (a user task not in an include folder)
    limit: int | None = None  # --max-samples: the user's tasks' first N docs too (ours are cut already)

    @property
    def task_names(self) -> list[str]:
        return [harness_task_name(t) for t in self.raw] + list(self.user_tasks)


INCLUDE_LIMIT = 64 * 1024**2  # an include folder travels with each Ray task: configs, not data sets


def read_include(dirs: Sequence[str]) -> dict[str, bytes]:
    """The files of the user's lm-eval include folders, to rebuild them on any node."""
    files: dict[str, bytes] = {}
    for i, d in enumerate(dirs):
        root = Path(d)
        if not root.is_dir():
            raise HarnessError(f"--lm-eval-include {d}: not a directory (give the folder holding the tasks' YAML files)")
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            files[f"{i}/{f.relative_to(root)}"] = f.read_bytes()
    size = sum(len(b) for b in files.values())
    if size > INCLUDE_LIMIT:
        raise HarnessError(f"--lm-eval-include folders hold {size / 1024**2:.0f} MiB; they travel with every Ray task:"
                           f" keep data sets outside them (a task's data_files may name any path its nodes can read)")
    return files


def plan(tasks: Sequence[str], data_dir: str | Path, split: str, max_samples: int | None, template_set: str,
         user_tasks: Sequence[str] = (), include_dirs: Sequence[str] = (), models: Sequence = ()) -> HarnessPlan:
    """Every check before any work: lm-eval installed, our tasks closed-label with their
    items built (evaluate.preflight, with each of `models`' tokenizers checked, or
    evaluate.build_items: the same records, prompts and references as our evaluation) and
    their prompts rendered identically by lm-eval, the user's tasks known to lm-eval with
    their data loadable offline."""
    import os

    from .core.templates import template_name
    from .evaluate import build_items, check_tasks, preflight
    from .io.splits import load_split_with_raw

    require_lm_eval()
    if not tasks and not user_tasks:
        raise HarnessError("no tasks to evaluate: name recall-ray tasks (--tasks sst2 ...) or lm-eval tasks"
                           " (--lm-eval-tasks ...)")
    tasks = check_tasks(tasks) if tasks else []
    for t in tasks:
        task_config(t, template_name(t, template_set), "")  # refuses an open task first
    if tasks and models:
        items = preflight(models, tasks, data_dir, split, max_samples, "loglik", template_set)
    else:
        items = build_items(data_dir, tasks, split, max_samples, "loglik", template_set) if tasks else []
    templates = {t: template_name(t, template_set) for t in tasks}
    raw = {t: [r for r, _ in load_split_with_raw(data_dir, t, split, templates[t], max_samples)] for t in tasks}
    check_prompts(raw, items, templates)
    include = read_include(include_dirs)
    defaults = False
    if user_tasks:
        for k, v in OFFLINE_ENV.items():  # the user's data must be local: refuse the hub now, not on a node
            os.environ.setdefault(k, v)
        from lm_eval.tasks import TaskManager, get_task_dict

        local = TaskManager(include_path=list(include_dirs), include_defaults=False) if include_dirs else None
        defaults = local is None or any(t not in local.all_tasks for t in user_tasks)
        tm = TaskManager(include_path=list(include_dirs) or None) if defaults else local
        unknown = [t for t in user_tasks if t not in tm.all_tasks]
        if unknown:
            raise HarnessError(f"unknown lm-eval task(s) {unknown}: name a task lm-eval knows, or give the folder of"
                               " its YAML with --lm-eval-include")
        for t in user_tasks:
            try:
                get_task_dict([t], tm)
            except Exception as e:  # lm-eval and datasets raise many kinds; the first line says which
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise HarnessError(f"lm-eval task {t}: its data cannot be loaded offline ({first}); name a task whose"
                                   " data is local (a YAML with dataset_path: json and data_files)") from None
    return HarnessPlan(items, templates, raw, list(user_tasks), include, defaults, max_samples)


@dataclass
class HarnessResult:
    scores: pd.DataFrame  # model, task, metric, value, n, protocol, template
    choices: pd.DataFrame  # our tasks' per-sample choices: model, task, sample_id, choice, gold, option_loglik
    results: dict[str, dict]  # model label -> lm-eval's results (without the samples)
    seconds: dict[str, float]


def collect(label: str, out: dict, plan_: HarnessPlan) -> tuple[list[dict], list[dict]]:
    """One model's score rows and per-sample choices from a Ray task's output."""
    ours = {harness_task_name(t): t for t in plan_.raw}
    choices = []
    for name, task in ours.items():
        mine = [i for i in plan_.items if i.task == task]
        choices += [{"model": label, **vars(c)} for c in sample_choices(task, out["samples"][name], mine)]
    return score_rows(label, out, ours, plan_.templates), choices


def result_files(result: HarnessResult, meta: dict) -> dict[str, str]:
    """scores.csv (the shape of our evaluation's), scores.md (wide), lm_eval_results.json
    (lm-eval's own results per model) and lm_eval_samples.jsonl (our tasks' per-sample
    choices, with each option's log-likelihood)."""
    from .evaluate import wide_table
    from .report import markdown_table

    files = {"scores.csv": result.scores.to_csv(index=False, float_format="%.4f"),
             "lm_eval_results.json": json.dumps({"meta": meta, "seconds": result.seconds, "models": result.results},
                                                indent=2, default=str) + "\n",
             "lm_eval_samples.jsonl": result.choices.drop(columns=["prompt"], errors="ignore")
             .to_json(orient="records", lines=True, force_ascii=False)}
    if len(result.scores):
        files["scores.md"] = markdown_table(wide_table(result.scores).reset_index())
    return files


def write_result(result: HarnessResult, out_dir: str | Path, plan_: HarnessPlan, meta: dict) -> None:
    """`result_files` and the task configs (lm_eval_tasks/: the YAML and JSONL records, with
    data paths into that folder, to rerun with `lm_eval --include_path`), moved into place
    only when complete."""
    from .io.storage import staged

    final = Path(out_dir).resolve() / "lm_eval_tasks"
    with staged(str(out_dir), overwrite=True) as tmp:
        for name, text in result_files(result, meta).items():
            (Path(tmp) / name).write_text(text)
        (Path(tmp) / "lm_eval_tasks").mkdir()
        for name, text in config_files(plan_.raw, plan_.templates, str(final)).items():
            (Path(tmp) / "lm_eval_tasks" / name).write_text(text)


def evaluate(models, plan_: HarnessPlan, batch_size: int = 16, dtype: str = "float32",
             num_tasks: int | str = "auto") -> HarnessResult:
    """Score every model with lm-eval (Ray must be initialised): one Ray task per model."""
    import time

    from .cluster.harness import run_models

    t0 = time.perf_counter()
    outs = run_models(models, plan_.task_names, config_files(plan_.raw, plan_.templates, WHERE), plan_.include,
                      plan_.defaults, batch_size, dtype, num_tasks, plan_.limit)
    rows, choices, results = [], [], {}
    for m, out in zip(models, outs):
        r, c = collect(m.label, out, plan_)
        rows += r
        choices += c
        results[m.label] = {k: v for k, v in out.items() if k != "samples"}
    cols = ["model", "task", "metric", "value", "n", "protocol", "template"]
    return HarnessResult(pd.DataFrame(rows, columns=cols), pd.DataFrame(choices), results,
                         {"lm_eval": time.perf_counter() - t0})

