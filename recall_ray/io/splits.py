"""Data splits of a task folder (`data/<task>/train.jsonl`, `test.jsonl`).

The shipped files have train and test only. Settings (sigma, normalisation, temperature,
TIES/DARE parameters, LM-Cocktail's examples) must be chosen on data the test never sees
and the adapters never trained on, so a *validation* split is held out from train: the
last `VALIDATION_SIZE` records of train.jsonl. The files are ordered by a hash of each
record's key (see data/README.md), so the tail is a fixed pseudo-random sample, and
"train" below means train.jsonl without that tail.

The general-ability sets (core.templates.GENERAL_TASKS) are never trained on: their `train`
and `all_train` splits are refused. ARC-Easy's train.jsonl gives them a validation split
(its last `VALIDATION_SIZE` records); PIQA and HellaSwag ship a test file only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.templates import TaskDataError, check_trainable, is_general, load_task_records

VALIDATION_SIZE = 200
SPLITS = ("train", "validation", "test", "all_train")


def split_file(data_dir: str | Path, task: str, split: str) -> Path:
    """The JSONL file behind `split` of `task` under `data_dir`."""
    if split not in SPLITS:
        raise TaskDataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split in ("train", "all_train"):
        check_trainable(task)
    name = "test.jsonl" if split == "test" else "train.jsonl"
    path = Path(data_dir) / task / name
    if not path.is_file() and is_general(task) and split == "validation":
        raise TaskDataError(f"general-ability set {task!r} has no validation split (it ships test.jsonl only,"
                            " data/README.md): choose settings on arc_easy's validation split, score it on test")
    if not path.is_file():
        raise TaskDataError(f"task {task!r} has no {name} under {data_dir} (expected {path})")
    return path


def _cut(items: list, task: str, split: str, max_samples: int | None) -> list:
    if split in ("train", "validation"):
        if len(items) <= VALIDATION_SIZE:
            raise TaskDataError(
                f"task {task!r} has {len(items)} train records: holding out {VALIDATION_SIZE} for validation"
                " leaves none to train on; add data")
        items = items[:-VALIDATION_SIZE] if split == "train" else items[-VALIDATION_SIZE:]
    return items[:max_samples] if max_samples is not None else items


def load_split(data_dir: str | Path, task: str, split: str, template: str | None = None,
               max_samples: int | None = None) -> list[dict]:
    """Rendered records ({sample_id, prompt, target}) of one split, at most `max_samples`
    (the first ones in file order). `all_train` is train.jsonl whole (the default run's
    adapters were trained on it). A template never trained on (core.templates.check_trainable)
    has no train split, whatever the task."""
    if split in ("train", "all_train") and template:
        check_trainable(template)
    return _cut(load_task_records(str(split_file(data_dir, task, split)), template or task), task, split, max_samples)


def load_split_with_raw(data_dir: str | Path, task: str, split: str, template: str | None = None,
                        max_samples: int | None = None) -> list[tuple[dict, dict]]:
    """(raw JSON record, rendered record) pairs of one split: evaluation needs the raw
    record too (SQuAD 2.0 accepts every annotator's answer, the template targets the first)."""
    path = split_file(data_dir, task, split)
    rendered = load_task_records(str(path), template or task)  # validates every line first
    with open(path, encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh if line.strip()]
    return _cut(list(zip(raw, rendered)), task, split, max_samples)
