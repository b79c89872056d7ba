"""Prompt templates: every template renders the shipped data; every error names its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recall_ray.core.templates import TEMPLATES, TaskDataError, load_task_records, render

DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = ["sst2", "squad_v2", "medmcqa", "race", "iwslt2017_en_fr", "ag_news"]


def first_record(task: str, split: str = "train") -> dict:
    with open(DATA / task / f"{split}.jsonl") as fh:
        return json.loads(fh.readline())


def test_every_shipped_task_has_a_template():
    assert set(TASKS) <= set(TEMPLATES)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_template_renders_shipped_data(task, split):
    records = load_task_records(str(DATA / task / f"{split}.jsonl"), task, max_samples=50)
    assert len(records) == 50
    assert len({r["sample_id"] for r in records}) == 50
    for r in records:
        assert set(r) == {"sample_id", "prompt", "target"}
        assert r["prompt"].endswith("### Response:\n") and r["target"].strip()


@pytest.mark.parametrize("task", TASKS)
def test_template_other_templates_reject_foreign_records(task):
    # A record of one task lacks a field every other template needs: nothing renders silently.
    record = first_record(task)
    for other in TASKS:
        if other != task:
            with pytest.raises(TaskDataError):
                render(other, record)


def test_targets_follow_label_conventions():
    assert render("sst2", {"sentence": "great", "label": 1})[1] == "positive"
    assert render("sst2", {"sentence": "bad", "label": 0})[1] == "negative"
    assert render("ag_news", {"text": "x", "label": 3})[1] == "Sci/Tech"
    med = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}
    prompt, target = render("medmcqa", med)
    assert target == "C" and "C. c\n" in prompt
    race = {"article": "art", "question": "q", "options": ["w", "x", "y", "z"], "answer": "D"}
    prompt, target = render("race", race)
    assert target == "D" and "D. z\n" in prompt and "art" in prompt
    squad = {"context": "c", "question": "q", "answers": {"text": ["France", "France"], "answer_start": [0, 0]}}
    assert render("squad_v2", squad)[1] == "France"
    squad["answers"] = {"text": [], "answer_start": []}
    assert render("squad_v2", squad)[1] == "impossible to answer"
    assert render("iwslt2017_en_fr", {"en": "Hello.", "fr": "Bonjour."}) == (
        TEMPLATES["iwslt2017_en_fr"].prompt.format(en="Hello."), "Bonjour.")


def test_braces_in_data_are_not_format_fields():
    prompt, _ = render("sst2", {"sentence": "a {label} b {0}", "label": 1})
    assert "a {label} b {0}" in prompt


def test_sample_ids():
    assert load_task_records(str(DATA / "sst2/train.jsonl"), "sst2", 2)[1]["sample_id"] == "2"  # line number
    assert load_task_records(str(DATA / "race/train.jsonl"), "race", 1)[0]["sample_id"] == "high21106.txt#0"
    assert load_task_records(str(DATA / "iwslt2017_en_fr/train.jsonl"), "iwslt2017_en_fr", 1)[0]["sample_id"] == "2340:9"
    med = first_record("medmcqa")
    assert load_task_records(str(DATA / "medmcqa/train.jsonl"), "medmcqa", 1)[0]["sample_id"] == med["id"]


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    return str(p)


def test_error_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        load_task_records(str(tmp_path / "nope.jsonl"), "sst2")
    with pytest.raises(TaskDataError, match="is a directory"):
        load_task_records(str(tmp_path), "sst2")


def test_error_unknown_template_lists_known(tmp_path):
    with pytest.raises(TaskDataError, match="unknown template 'sst3'.*ag_news.*sst2"):
        load_task_records(write(tmp_path, '{"sentence": "a", "label": 1}\n'), "sst3")
    with pytest.raises(TaskDataError, match="known templates"):
        render("nope", {})


def test_error_empty_file(tmp_path):
    with pytest.raises(TaskDataError, match="no records"):
        load_task_records(write(tmp_path, ""), "sst2")
    with pytest.raises(TaskDataError, match="no records"):
        load_task_records(write(tmp_path, "\n  \n"), "sst2")


def test_error_missing_field_names_line_and_field(tmp_path):
    text = '{"sentence": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    with pytest.raises(TaskDataError, match=r"d\.jsonl:2: record has no field 'sentence'"):
        load_task_records(write(tmp_path, text), "sst2")
    with pytest.raises(TaskDataError, match=r":1: record has no field 'label'"):
        load_task_records(write(tmp_path, '{"sentence": "a"}\n'), "sst2")
    with pytest.raises(TaskDataError, match=r":1: field 'label' has value 7"):
        load_task_records(write(tmp_path, '{"sentence": "a", "label": 7}\n'), "sst2")
    race = {"article": "a", "question": "q", "options": ["x", "y"], "answer": "A"}
    with pytest.raises(TaskDataError, match=r":1: record does not fit template 'race'"):
        load_task_records(write(tmp_path, json.dumps(race) + "\n"), "race")


def test_error_line_not_json(tmp_path):
    with pytest.raises(TaskDataError, match=r"d\.jsonl:2: not valid JSON"):
        load_task_records(write(tmp_path, '{"sentence": "a", "label": 1}\n{oops\n'), "sst2")
    with pytest.raises(TaskDataError, match=r":1: expected a JSON object, got list"):
        load_task_records(write(tmp_path, "[1, 2]\n"), "sst2")


def test_error_duplicate_ids_and_bad_max_samples(tmp_path):
    rec = json.dumps({"id": "x", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0})
    with pytest.raises(TaskDataError, match="sample id 'x' already used on line 1"):
        load_task_records(write(tmp_path, rec + "\n" + rec + "\n"), "medmcqa")
    with pytest.raises(TaskDataError, match="max_samples"):
        load_task_records(write(tmp_path, rec + "\n"), "medmcqa", max_samples=0)


def test_max_samples_keeps_file_order():
    every = load_task_records(str(DATA / "sst2/test.jsonl"), "sst2")
    assert len(every) == 500
    assert load_task_records(str(DATA / "sst2/test.jsonl"), "sst2", max_samples=5) == every[:5]
