"""Prompt templates: turn a task's JSONL records into (prompt, target) text pairs.

The RECALL paper (arXiv 2510.20479) gives its prompts in Appendix C. That appendix could not
be retrieved offline, so the templates below are NOT verbatim: they are instruction prompts in
the same spirit (instruction + input; the answer is the label word, the option letter, the
answer span, "impossible to answer" for unanswerable SQuAD 2.0 questions, or the French
translation). Every prompt ends with "### Response:\\n" so that the target starts on a fresh
line and tokenises the same way with byte-level BPE and SentencePiece tokenisers.

Templates are data (`TEMPLATES`): a `str.format` prompt over the record's own fields (the
shipped files keep each dataset's schema, see data/*/SOURCE.md) plus a declarative target rule.
Adding a task means adding one entry, not a code branch.

The general-ability sets (ARC-Easy, PIQA, HellaSwag; `GENERAL_TASKS`) are multiple-choice
templates of another kind: their options are the record's own texts, each scored as a
continuation of the prompt (`CHOICE_DELIMITER` + option, as lm-eval-harness asks them), with
the plain prompts of data/README.md (no instruction, no "### Response:"). They measure what
the base model already knows and are never trained on (`check_trainable`).
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MISSING = object()


class TaskDataError(ValueError):
    """A task-data problem, with a message that names the file/line/field and the fix."""


@dataclass(frozen=True)
class Template:
    """One task's prompt and target rule.

    prompt: a `str.format` string over the record's fields; indexing works (`{options[0]}`).
    target_field: dotted path of the field holding the answer (`answers.text`).
    labels: maps the field's value to the target text (0 -> "negative"); None: the value itself.
    empty_target: for list-valued targets, the text used when the list is empty (unanswerable
        SQuAD 2.0); a non-empty list yields its first item (the first annotator's answer).
    id_format: how to build a stable sample id from the record; None: the `id` field if the
        record has one, else the line number.
    choices: a multiple-choice template's option texts: a dotted path to a list field
        (`endings`), or the fields holding them in order (`("sol1", "sol2")`). The target
        field then names the correct option: by its label in `choice_labels` (ARC's
        `answerKey` in `choices.label`), or by its 0-based index when that is None.
    trainable: False for the general-ability sets: fine-tuning on them is refused.
    """

    prompt: str
    target_field: str
    labels: Mapping[Any, str] | None = None
    empty_target: str | None = None
    id_format: str | None = None
    description: str = ""
    choices: str | tuple[str, ...] | None = None
    choice_labels: str | None = None
    trainable: bool = True
    prompt_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # The fields the prompt needs, read once from the format string (`options[0]` -> `options`).
        names = []
        for _, name, _, _ in string.Formatter().parse(self.prompt):
            if name:
                root = name.split("[", 1)[0].split(".", 1)[0]
                if root not in names:
                    names.append(root)
        object.__setattr__(self, "prompt_fields", tuple(names))


_RESPONSE = "\n\n### Response:\n"
_LETTERS = {0: "A", 1: "B", 2: "C", 3: "D"}

TEMPLATES: dict[str, Template] = {
    "sst2": Template(
        prompt=(
            "### Instruction:\nClassify the sentiment of the following movie review sentence. "
            'Answer with "positive" or "negative".\n\n### Input:\n{sentence}' + _RESPONSE
        ),
        target_field="label",
        labels={0: "negative", 1: "positive"},
        description="SST-2 binary sentiment (label 0/1 -> negative/positive)",
    ),
    "squad_v2": Template(
        prompt=(
            "### Instruction:\nAnswer the question using a short span copied from the context. "
            'If the context does not contain the answer, reply "impossible to answer".\n\n'
            "### Context:\n{context}\n\n### Question:\n{question}" + _RESPONSE
        ),
        target_field="answers.text",
        empty_target="impossible to answer",
        description="SQuAD 2.0 extractive QA (first annotator answer, or 'impossible to answer')",
    ),
    "medmcqa": Template(
        prompt=(
            "### Instruction:\nAnswer the following medical multiple-choice question. "
            "Reply with the letter of the correct option (A, B, C or D).\n\n"
            "### Question:\n{question}\n\n### Options:\n"
            "A. {opa}\nB. {opb}\nC. {opc}\nD. {opd}" + _RESPONSE
        ),
        target_field="cop",
        labels=_LETTERS,
        description="MedMCQA 4-option multiple choice (cop 0-3 -> A-D)",
    ),
    "race": Template(
        prompt=(
            "### Instruction:\nRead the article and answer the multiple-choice question. "
            "Reply with the letter of the correct option (A, B, C or D).\n\n"
            "### Article:\n{article}\n\n### Question:\n{question}\n\n### Options:\n"
            "A. {options[0]}\nB. {options[1]}\nC. {options[2]}\nD. {options[3]}" + _RESPONSE
        ),
        target_field="answer",
        labels={letter: letter for letter in "ABCD"},  # also validates the letter
        id_format="{example_id}#{q_index}",  # one passage holds several questions
        description="RACE reading comprehension (answer letter A-D)",
    ),
    "iwslt2017_en_fr": Template(
        prompt=(
            "### Instruction:\nTranslate the following English text into French.\n\n"
            "### English:\n{en}" + _RESPONSE
        ),
        target_field="fr",
        id_format="{talk_id}:{seg_id}",
        description="IWSLT 2017 English -> French translation (TED talks)",
    ),
    "ag_news": Template(
        prompt=(
            "### Instruction:\nClassify the topic of the following news article. Answer with one "
            'of "World", "Sports", "Business" or "Sci/Tech".\n\n### Input:\n{text}' + _RESPONSE
        ),
        target_field="label",
        labels={0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"},
        description="AG News 4-class topic classification (label 0-3)",
    ),
}


# The paper's instruction formats (its Table 6), the instruction then the output, for the
# tasks it gives one; each prompt here ends with a newline after the paper's text (its cue
# "Answer:" or the question), so that the answer starts a fresh line and tokenises as in
# training. The answers (label words, letters, spans) are the same as in TEMPLATES'
# default set: only the prompt changes. IWSLT2017 and AG News have no paper format, so the
# paper set asks them with the default templates.
TEMPLATES.update({
    "sst2_paper": dataclasses.replace(TEMPLATES["sst2"], prompt=(
        "Statement: {sentence} What's sentiment should the above sentence be? OPTIONS: - negative.- positive."
        " Answer:\n"), description="SST-2 in the paper's instruction format (Table 6)"),
    "squad_v2_paper": dataclasses.replace(TEMPLATES["squad_v2"], prompt=(
        "{context} According to the above passage, answer the following question. If it is impossible to answer"
        " according to the passage, answer 'impossible to answer': Question:{question}\n"),
        description="SQuAD 2.0 in the paper's instruction format (Table 6)"),
    "medmcqa_paper": dataclasses.replace(TEMPLATES["medmcqa"], prompt=(
        "Question: {question} Options: A: {opa} B: {opb} C: {opc} D: {opd} Choose an correct answer from"
        " A/B/C/D.Answer:\n"), description="MedMCQA in the paper's instruction format (Table 6)"),
    "race_paper": dataclasses.replace(TEMPLATES["race"], prompt=(
        "Read the article, and answer the question by replying A, B, C or D. Article: {article} Q:{question}"
        " A. {options[0]} B. {options[1]} C. {options[2]} D. {options[3]}\n"),
        description="RACE in the paper's instruction format (Table 6; its options follow the question)"),
})

# The general-ability sets (data/README.md, "General-ability group"): the base model's
# knowledge, scored by log-likelihood with lm-eval-harness's zero-shot prompts. Each option is
# the continuation CHOICE_DELIMITER + its text, and its length for the per-character
# normalisation is the text's alone (lm-eval's `acc_norm`).
CHOICE_DELIMITER = " "
TEMPLATES.update({
    "arc_easy": Template(
        prompt="Question: {question}\nAnswer:", target_field="answerKey", choices="choices.text",
        choice_labels="choices.label", trainable=False,
        description="ARC-Easy science multiple choice, 3-5 options (answerKey A-E or 1-4 in choices.label)"),
    "piqa": Template(
        prompt="Question: {goal}\nAnswer:", target_field="label", choices=("sol1", "sol2"), id_format="{idx}",
        trainable=False, description="PIQA physical commonsense, 2 options (label 0 = sol1, 1 = sol2)"),
    "hellaswag": Template(
        prompt="{activity_label}: {ctx}", target_field="label", choices="endings", id_format="{idx}",
        trainable=False, description="HellaSwag sentence completion, 4 endings (label 0-3)"),
})
GENERAL_TASKS = tuple(name for name, tpl in TEMPLATES.items() if not tpl.trainable)

# A template set names the template each task is asked with: "default" (the instruction
# templates above, which every shipped adapter was trained on) or "paper" (Table 6's).
TEMPLATE_SETS: dict[str, dict[str, str]] = {
    "default": {},
    "paper": {"sst2": "sst2_paper", "squad_v2": "squad_v2_paper", "medmcqa": "medmcqa_paper", "race": "race_paper"},
}


def template_name(task: str, template_set: str = "default") -> str:
    """The template `task` is asked with under `template_set` (the task's own by default)."""
    if template_set not in TEMPLATE_SETS:
        raise TaskDataError(f"unknown template set {template_set!r}: use {' or '.join(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[template_set].get(task, task)


def get_template(name: str) -> Template:
    """The template called `name`, or a TaskDataError listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TaskDataError(
            f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))} "
            "(or add an entry to recall_ray.core.templates.TEMPLATES)"
        ) from None


def is_general(name: str) -> bool:
    """Whether `name` is a general-ability set (a template never trained on)."""
    return name in TEMPLATES and not TEMPLATES[name].trainable


def check_trainable(name: str) -> None:
    """TaskDataError when the template (or task) `name` must never be trained on: the
    general-ability sets measure what the base model knew before any fine-tune."""
    if is_general(name):
        trainable = sorted(n for n, t in TEMPLATES.items() if t.trainable and not n.endswith("_paper"))
        raise TaskDataError(
            f"{name!r} is a general-ability set (one of {', '.join(GENERAL_TASKS)}): it is never trained on, it measures"
            f" what the base model knows; fine-tune on a task ({', '.join(trainable)}) and score {name} with"
            " jobs/evaluate.py or a scenario's evaluate.general_tasks")


def lookup(record: Mapping[str, Any], dotted: str) -> Any:
    """Value at a dotted path (`answers.text`), or MISSING when any step is absent or null."""
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return MISSING
        node = node[part]
    return node


def choice_texts(tpl: Template, record: Mapping[str, Any]) -> list[str]:
    """A multiple-choice template's option texts, as the record stores them (at least two,
    none blank)."""
    if isinstance(tpl.choices, str):
        texts = lookup(record, tpl.choices)
        if texts is MISSING or not isinstance(texts, list):
            raise TaskDataError(f"record has no list field {tpl.choices!r} (the options)")
    else:
        texts = [lookup(record, f) for f in tpl.choices]
        absent = [f for f, t in zip(tpl.choices, texts) if t is MISSING]
        if absent:
            raise TaskDataError(f"record has no field {absent[0]!r} (an option)")
    if len(texts) < 2:
        raise TaskDataError(f"record has {len(texts)} option(s): a multiple-choice question needs at least two")
    for k, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise TaskDataError(f"option {k} is {t!r}: every option must be non-empty text")
    return list(texts)


def continuations(tpl: Template, record: Mapping[str, Any]) -> list[str]:
    """The text each option is scored as: CHOICE_DELIMITER + the option (lm-eval's target
    delimiter), in the record's order."""
    return [CHOICE_DELIMITER + t for t in choice_texts(tpl, record)]


def gold_index(tpl: Template, record: Mapping[str, Any]) -> int:
    """The 0-based position of the correct option: the target field's value looked up in
    `choice_labels` (ARC: "B" in ["A", "B", "C", "D"], "3" in ["1", "2", "3", "4"]), or the
    value itself as an index (PIQA, HellaSwag)."""
    n = len(choice_texts(tpl, record))
    value = lookup(record, tpl.target_field)
    if value is MISSING:
        raise TaskDataError(f"record has no field {tpl.target_field!r} (the correct option)")
    if tpl.choice_labels is not None:
        labels = lookup(record, tpl.choice_labels)
        if labels is MISSING or not isinstance(labels, list) or len(labels) != n:
            raise TaskDataError(f"field {tpl.choice_labels!r} must list one label per option ({n})")
        if value not in labels:
            raise TaskDataError(f"field {tpl.target_field!r} is {value!r}, not one of the option labels {labels}")
        return labels.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise TaskDataError(f"field {tpl.target_field!r} is {value!r}; expected an option index 0-{n - 1}")
    return value


def target(tpl: Template, record: Mapping[str, Any]) -> str:
    if tpl.choices is not None:  # the correct option, as it is scored after the prompt
        return continuations(tpl, record)[gold_index(tpl, record)]
    value = lookup(record, tpl.target_field)
    if value is MISSING:
        raise TaskDataError(f"record has no field {tpl.target_field!r} (the target)")
    if isinstance(value, list):
        if value:
            value = value[0]
        elif tpl.empty_target is not None:
            return tpl.empty_target
        else:
            raise TaskDataError(f"field {tpl.target_field!r} is an empty list")
    if tpl.labels is not None:
        if value not in tpl.labels:
            known = ", ".join(repr(k) for k in tpl.labels)
            raise TaskDataError(f"field {tpl.target_field!r} has value {value!r}; expected one of {known}")
        value = tpl.labels[value]
    text = str(value)
    if not text.strip():
        raise TaskDataError(f"field {tpl.target_field!r} is empty: nothing to train on")
    return text


def render(template: str, record: Mapping[str, Any]) -> tuple[str, str]:
    """Render one record with the named template: returns (prompt, target).

    Raises TaskDataError naming the missing/invalid field (without a line number; the
    loader adds it).
    """
    tpl = get_template(template)
    for name in tpl.prompt_fields:
        if record.get(name) is None:
            raise TaskDataError(
                f"record has no field {name!r}, which template {template!r} needs "
                f"(it needs {', '.join(tpl.prompt_fields)} and {tpl.target_field!r})"
            )
    try:
        prompt = tpl.prompt.format(**record)
    except (IndexError, KeyError, TypeError) as err:
        # e.g. a RACE record with fewer than four options
        raise TaskDataError(f"record does not fit template {template!r}: {type(err).__name__}: {err}") from None
    return prompt, target(tpl, record)


def sample_id(tpl: Template, record: Mapping[str, Any], line_no: int) -> str:
    """Stable id: the template's id_format, else the record's `id`, else the line number."""
    if tpl.id_format is not None:
        try:
            return tpl.id_format.format(**record)
        except (KeyError, IndexError):
            pass  # fall through: a file without those fields is still usable
    if record.get("id") is not None:
        return str(record["id"])
    return str(line_no)


def load_task_records(path: str, template: str, max_samples: int | None = None) -> list[dict]:
    """Read a JSONL task file and render it: `[{"sample_id", "prompt", "target"}, ...]`.

    Records come back in file order, at most `max_samples` of them (the first ones). Blank
    lines are skipped; line numbers in messages and default sample ids are 1-based.
    Raises TaskDataError for a missing file, an unknown template, a line that is not a JSON
    object, a record that lacks a field the template needs, duplicate sample ids, or a file
    without records.
    """
    tpl = get_template(template)  # fail on a bad name before touching the file
    if max_samples is not None and max_samples <= 0:
        raise TaskDataError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise TaskDataError(f"task data file {path} {what}: pass a JSONL file (one JSON object per line)")

    out: list[dict] = []
    seen: dict[str, int] = {}
    with open(p, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if max_samples is not None and len(out) >= max_samples:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            try:
                prompt, answer = render(template, record)
            except TaskDataError as err:
                raise TaskDataError(f"{path}:{line_no}: {err}") from None
            sid = sample_id(tpl, record, line_no)
            if sid in seen:
                raise TaskDataError(
                    f"{path}:{line_no}: sample id {sid!r} already used on line {seen[sid]}; ids must be unique"
                )
            seen[sid] = line_no
            out.append({"sample_id": sid, "prompt": prompt, "target": answer})
    if not out:
        raise TaskDataError(f"{path} holds no records (empty file or only blank lines)")
    return out
