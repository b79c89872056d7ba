"""The one-shot studies of the paper: one YAML config, one run directory, one table.

    single      for each task: its expert merged with the base (paper Table 1)
    multi       every expert merged, with and without the base (paper Table 2); the last
                task is the *new* one: RECALL's typical samples and LM-Cocktail's examples
                come from its train split only (no other task's data is used)

Each merge is computed by RECALL's own job (recall_ray.pipeline, which writes the weights,
plots and representations) and by every baseline through the same merge actors; then every
model is scored (recall_ray.evaluate) on the tasks' test split (or validation, to choose
settings). Layout of `run_dir`:

    manifest.json                 the study's stages (each resumable)
    <variant>/recall/             RECALL's run directory (weights.csv, plots/, reps/, merged/)
    <variant>/merged/<method>/    each baseline's merged model
    <variant>/eval/               scores and predictions of this variant's models
    scores.csv                    long: variant, model, task, metric, value, n
    table.csv, table.md           primary metric per task (and their mean), a row per model, each
                                  with its 95% bootstrap interval (the samples resampled, seeded)
    plots/                        weights, similarity and adjacent-layer similarity per variant
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import model_validator

from ..config import BaselineConfig, ConfigError, RayConfig, RecallSettings, RunConfig, Section, SimilarityConfig
from ..core.merge_methods import METHODS
from ..manifest import Manifest
from ..io.models import resolve_model, resolve_path
from ..io.storage import RunDir
from .common import (StudyEval, StudyResult, check_inputs, eval_hits, evaluate_stage, interval_markdown,
                     interval_table, merge_all, recall_run_config, variant_names, variant_plots)


class RecallVariant(Section):
    """A RECALL row beside the main one: the same merge with another similarity (e.g. the
    `validated` preset, or a per-layer kernel), labelled recall_<name>, with its own
    layer-constant control recall_<name>_layer_constant when the scenario's methods hold
    recall_layer_constant."""

    similarity: SimilarityConfig
    only: list[str] = []  # the scenario's variants (with_base, without_base; single: tasks) it runs in; empty: all


class ScenarioConfig(Section):
    scenario: Literal["single", "multi"]
    run_dir: str
    base: str = "builtin:smollm2-135m-instruct"
    data_dir: str = "data"
    tasks: list[str]
    experts: str  # directory holding one expert per task: <experts>/<task> (LoRA adapter or HF directory)
    include_base: list[bool] = [True, False]  # multi: merge with and without the base
    methods: list[str] = list(METHODS)
    baselines: BaselineConfig = BaselineConfig()
    recall: RecallSettings = RecallSettings()
    # named RECALL rows with other similarities, beside `recall` (which uses recall.similarity)
    recall_variants: dict[str, RecallVariant] = {}
    evaluate: StudyEval = StudyEval()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> "ScenarioConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
        for name, rv in self.recall_variants.items():
            if not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", name) or f"recall_{name}" in METHODS:
                raise ValueError(f"recall_variants name {name!r} must be lower-case words joined by _ and not make"
                                 f" a method's name (recall_{name})")
            names = variant_names(self.scenario, self.tasks, self.include_base)
            stray = sorted(set(rv.only) - set(names))
            if stray:
                raise ValueError(f"recall_variants.{name}.only names {stray}, not variants of this scenario {names}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {self.tasks}")
        if self.scenario == "multi" and len(self.tasks) < 2:
            raise ValueError("the multi scenario merges several experts: give at least two tasks")
        if not self.include_base:
            raise ValueError("include_base must list at least one of true/false")
        return self


# ------------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Variant:
    """One merge setting of a scenario: which experts, which new task, with the base or not."""

    name: str
    experts: tuple[str, ...]  # tasks whose experts are merged as old experts
    new_task: str  # whose expert is the new model and whose train data RECALL sees
    include_base: bool
    eval_tasks: tuple[str, ...]


def variants(cfg: ScenarioConfig) -> list[Variant]:
    names = variant_names(cfg.scenario, cfg.tasks, cfg.include_base)  # publish finds a run's by them
    if cfg.scenario == "single":
        return [Variant(name, (), t, True, tuple(cfg.tasks) if full_table(cfg) else (t,))
                for name, t in zip(names, cfg.tasks)]
    *old, new = cfg.tasks
    return [Variant(name, tuple(old), new, b, tuple(cfg.tasks)) for name, b in zip(names, cfg.include_base)]


def expert_path(cfg: ScenarioConfig, task: str) -> str:
    return str(Path(cfg.experts) / task)


def recall_dir(cfg: ScenarioConfig, v: Variant, row: str | None = None) -> str:
    """Where the RECALL merge of variant v (of its row `row`) runs."""
    return f"{cfg.run_dir.rstrip('/')}/{v.name}{'' if row is None else f'/recall_{row}'}/recall"


def recall_config(cfg: ScenarioConfig, v: Variant, row: str | None = None) -> RunConfig:
    """The RECALL merge of one variant: the main row's, or that of `row`, a name of
    cfg.recall_variants (its own run directory <variant>/recall_<row>/recall). It copies the
    representations the scenario's other RECALL merges computed on the same models and data
    (a row differs in its similarity only; with and without the base, in the weights only)."""
    settings = cfg.recall
    if row is not None:
        settings = cfg.recall.model_copy(update={"similarity": cfg.recall_variants[row].similarity})
    here = recall_dir(cfg, v, row)
    others = [recall_dir(cfg, w, r) for w in variants(cfg) for r in [None, *recall_rows(cfg, w)]]
    return recall_run_config(
        settings, cfg.ray, here, cfg.base,
        [{"name": t, "path": expert_path(cfg, t)} for t in v.experts],
        {"name": v.new_task, "path": expert_path(cfg, v.new_task)}, v.include_base, v.new_task, cfg.data_dir,
        [d for d in others if d != here])


def recall_rows(cfg: ScenarioConfig, v: Variant) -> list[str]:
    """The names of cfg.recall_variants that run in variant v: none when the scenario's
    methods leave RECALL out (a selection scoring a baseline alone)."""
    if "recall" not in cfg.methods:
        return []
    return [name for name, rv in cfg.recall_variants.items() if not rv.only or v.name in rv.only]


def preflight(cfg: ScenarioConfig) -> list[Variant]:
    """Every check that needs no model: experts and data exist, RECALL never reads the
    validation tail, evaluation references are present."""
    check_inputs(cfg.tasks, cfg.run_dir, cfg.base, cfg.data_dir, cfg.recall.max_samples, cfg.evaluate)
    missing = [t for t in cfg.tasks if not Path(expert_path(cfg, t)).exists()]
    if missing:
        raise ConfigError(f"no expert for tasks {missing} under {cfg.experts}: train them with "
                          "`python jobs/train_adapters.py --config configs/adapters/repro.yaml`")
    vs = variants(cfg)
    for v in vs:
        recall_config(cfg, v)  # validates the derived RECALL config
        for row in recall_rows(cfg, v):
            recall_config(cfg, v, row)
    return vs


# -------------------------------------------------------------------------------- run

def run_scenario(cfg: ScenarioConfig) -> StudyResult:
    """Run (or resume) every variant: RECALL, the baselines, the evaluation. Ray must be up."""
    vs = preflight(cfg)
    root = RunDir(cfg.run_dir)
    manifest = Manifest(root, cfg.model_dump(mode="json"))
    base_path = resolve_path(cfg.base)
    all_scores, all_hits = [], []
    for v in vs:
        methods = [m for m in cfg.methods if v.include_base or not METHODS[m].needs_base]  # e.g. DARE+Avg with base
        merged = merge_all(recall_config(cfg, v), methods, cfg.baselines, cfg.data_dir, root, v.name, manifest)
        own = [m for m in ("recall", "recall_layer_constant") if m in cfg.methods]
        for row in recall_rows(cfg, v):  # RECALL with another similarity: rows recall_<row>[_layer_constant]
            other = merge_all(recall_config(cfg, v, row), own, cfg.baselines, cfg.data_dir, root,
                              f"{v.name}/recall_{row}", manifest)
            for m in own:
                label = m.replace("recall", f"recall_{row}", 1)
                merged.outputs[label], merged.keys[label] = other.outputs[m], other.keys[m]
            variant_plots(root, f"{v.name}_recall_{row}", Path(other.recall_dir))
        # Score: the base, the experts alone (on their own task, or on every task in the
        # paper's full Table 1), every merge.
        models = merged.models
        to_score = [models[0]] + [dataclasses.replace(m, label=f"expert:{m.label}") for m in models[1:]]
        to_score += [resolve_model(name, out, base_path) for name, out in merged.outputs.items()]
        only = None if full_table(cfg) else {
            m.label: [m.label.split(":", 1)[1]] for m in to_score if m.label.startswith("expert:")}
        fps = merged.modelset.fingerprints
        model_keys = {m.label: fps[m.label.removeprefix("expert:")] for m in to_score[:len(models)]}
        model_keys.update(merged.keys)
        scores = evaluate_stage(to_score, list(v.eval_tasks), cfg.evaluate, cfg.data_dir,
                                cfg.recall.representations.num_actors, root, v.name, manifest, model_keys, only)
        all_scores.append(scores.assign(variant=v.name))
        all_hits.append(eval_hits(Path(root.path(f"{v.name}/eval/predictions.jsonl"))).assign(variant=v.name))
        if merged.recall_dir is not None:
            variant_plots(root, v.name, Path(merged.recall_dir))
    scores = pd.concat(all_scores, ignore_index=True)
    scores = scores[["variant", *[c for c in scores.columns if c != "variant"]]]
    table, index = study_table(pd.concat(all_hits, ignore_index=True), cfg)
    root.write_text("scores.csv", scores.to_csv(index=False, float_format="%.4f"))
    root.write_text("table.csv", table.to_csv(index=False, float_format="%.2f"))
    root.write_text("table.md", interval_markdown(table, index))
    return StudyResult(scores, table, manifest.timings)


def full_table(cfg: ScenarioConfig) -> bool:
    """The single study in the paper's Table 1 form: every model on every task."""
    return cfg.scenario == "single" and cfg.evaluate.all_tasks


def study_table(hits: pd.DataFrame, cfg: ScenarioConfig) -> tuple[pd.DataFrame, list[str]]:
    """The study's table (interval_table) and its index columns, from per-sample hits
    (variant, model, task, sample_id, hit):

    multi   a row per (variant, model), every task, the mean
    single  a row per model kind (base, expert, recall, each baseline), each task's column
            from that task's own variant (the merge of that task's expert), the mean
    single with evaluate.all_tasks (the paper's Table 1): a row per (fine-tuned task, model
            kind), every task, the mean over all and over the "unseen" ones (every task but the
            fine-tuned one), and the "all" rows averaging the fine-tuned tasks

    With evaluate.general_tasks, each row also has the general-ability sets' columns and
    "general", their mean; "mean" and "unseen" stay over the scenario's tasks. In the
    single table without all_tasks, a kind's general columns pool its variants' models
    (the experts', each merge's), and the base counts once.
    """
    hits = hits.copy()
    if cfg.scenario != "single":
        return interval_table(hits, ["variant", "model"]), ["variant", "model"]
    hits["model"] = hits["model"].where(~hits["model"].str.startswith("expert:"), "expert")
    if not full_table(cfg):
        # every variant scores the base on the general-ability sets: the same model on the
        # same samples, counted once
        again = (hits["model"] == "base") & hits.duplicated(["model", "task", "sample_id"])
        return interval_table(hits[~again], ["model"]), ["model"]
    hits = hits.rename(columns={"variant": "fine_tuned"})
    index = ["fine_tuned", "model"]
    table = interval_table(hits, index, groups=lambda key: {"unseen": [t for t in cfg.tasks if t != key[0]]},
                           pooled={"fine_tuned": "all"})
    return table, index
