"""Scenarios of the paper as jobs: one YAML config, one run directory, one table.

    single      for each task: its expert merged with the base (paper Table 1)
    multi       every expert merged, with and without the base (paper Table 2); the last
                task is the *new* one: RECALL's typical samples and LM-Cocktail's examples
                come from its train split only (no other task's data is used)

Each merge is computed by RECALL's own job (recall_ray.pipeline, which writes the weights,
plots and representations) and by every baseline through the same merge actors; then every
model is scored (recall_ray.evaluate) on the tasks' test split (or validation, to choose
settings). Layout of `run_dir`:

    manifest.json                 the scenario's stages (each resumable)
    <variant>/recall/             RECALL's run directory (weights.csv, plots/, reps/, merged/)
    <variant>/merged/<method>/    each baseline's merged model
    <variant>/eval/               scores and predictions of this variant's models
    scores.csv                    long: variant, model, task, metric, value, n
    table.csv, table.md           primary metric per task (and their mean), a row per model
    plots/                        weights, similarity and adjacent-layer similarity per variant
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import Field, ValidationError, model_validator

from .baselines import METHODS, BaselineConfig, build_method, model_losses
from .config import (
    ConfigError,
    MergeConfig,
    RayConfig,
    RepresentationConfig,
    RunConfig,
    SimilarityConfig,
    TypicalConfig,
    _format_errors,
    _Section,
    apply_override,
)
from .manifest import Manifest
from .metrics import primary_metric
from .models import resolve_model, resolve_path
from .report import markdown_table
from .splits import VALIDATION_SIZE, load_split, split_file
from .storage import RunDir

log = logging.getLogger("recall_ray.scenarios")


class RecallSettings(_Section):
    """RECALL's own settings in a scenario (the sections of jobs/merge.py's config)."""

    max_samples: int = Field(200, gt=0)  # new-task train samples represented and clustered
    max_length: int = Field(128, gt=8)
    typical: TypicalConfig = TypicalConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    representations: RepresentationConfig = RepresentationConfig()
    merge: MergeConfig = MergeConfig()


class ScenarioEval(_Section):
    split: Literal["test", "validation"] = "test"
    max_samples: int = Field(50, gt=0)  # first N of each task's split
    batch_size: int = Field(16, gt=0)
    all_tasks: bool = False  # single: also score every merge on the other tasks (kept knowledge)


class ScenarioConfig(_Section):
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
    evaluate: ScenarioEval = ScenarioEval()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> "ScenarioConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
        if "recall_layer_constant" in self.methods and "recall" not in self.methods:
            raise ValueError("recall_layer_constant needs RECALL's weights: keep 'recall' in methods")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {self.tasks}")
        if self.scenario == "multi" and len(self.tasks) < 2:
            raise ValueError("the multi scenario merges several experts: give at least two tasks")
        if not self.include_base:
            raise ValueError("include_base must list at least one of true/false")
        return self


def load_scenario(path: str, overrides: list[str] = ()):
    """A ScenarioConfig (single, multi) or a SequentialConfig (sequential), by `scenario`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"scenario config {path} does not exist")
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"scenario config {path} must hold a YAML mapping")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        if tree.get("scenario") == "sequential":
            from .sequential import SequentialConfig

            return SequentialConfig.model_validate(tree)
        return ScenarioConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


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
    if cfg.scenario == "single":
        return [Variant(t, (), t, True, tuple(cfg.tasks) if cfg.evaluate.all_tasks else (t,)) for t in cfg.tasks]
    *old, new = cfg.tasks
    return [Variant("with_base" if b else "without_base", tuple(old), new, b, tuple(cfg.tasks))
            for b in cfg.include_base]


def expert_path(cfg: ScenarioConfig, task: str) -> str:
    return str(Path(cfg.experts) / task)


def recall_run_config(r: RecallSettings, ray: RayConfig, run_dir: str, base: str, experts: list[dict],
                      new_model: dict, include_base: bool, task: str, data_dir: str) -> RunConfig:
    """The jobs/merge.py config of one RECALL merge inside a scenario: the new task's train
    split only (never its validation tail), RECALL's settings from `r`."""
    return RunConfig.model_validate({
        "run_dir": run_dir,
        "overwrite": True,  # the scenario owns its run directory
        "base": {"name": "base", "path": base},
        "experts": experts,
        "new_model": new_model,
        "include_base": include_base,
        "task": {"name": task, "data": str(split_file(data_dir, task, "train")), "template": task,
                 "max_samples": r.max_samples, "max_length": r.max_length},
        "typical": r.typical.model_dump(), "similarity": r.similarity.model_dump(),
        "representations": r.representations.model_dump(), "merge": r.merge.model_dump(),
        "ray": ray.model_dump(),
    })


def recall_config(cfg: ScenarioConfig, v: Variant) -> RunConfig:
    """The RECALL merge of one variant."""
    return recall_run_config(
        cfg.recall, cfg.ray, f"{cfg.run_dir.rstrip('/')}/{v.name}/recall", cfg.base,
        [{"name": t, "path": expert_path(cfg, t)} for t in v.experts],
        {"name": v.new_task, "path": expert_path(cfg, v.new_task)}, v.include_base, v.new_task, cfg.data_dir)


def check_inputs(tasks: list[str], run_dir: str, base: str, data_dir: str, recall_max_samples: int,
                 ev: ScenarioEval) -> None:
    """The checks every scenario makes before any work: known tasks, a local run directory,
    a base that resolves, enough train records for RECALL (the validation tail excluded),
    references in the evaluation split."""
    from .evaluate import build_items, check_tasks

    check_tasks(tasks)
    if "://" in run_dir:
        raise ConfigError("a scenario loads (and fine-tunes) its models here to score them: use a local run_dir")
    resolve_path(base)
    for t in tasks:
        n_train = len(load_split(data_dir, t, "train"))
        if recall_max_samples > n_train:
            raise ConfigError(f"recall.max_samples={recall_max_samples} exceeds the {n_train} train records of"
                              f" {t} (train.jsonl less its {VALIDATION_SIZE}-record validation tail)")
    build_items(data_dir, tasks, ev.split, ev.max_samples)


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
    return vs


# -------------------------------------------------------------------------------- run

@dataclasses.dataclass
class ScenarioResult:
    scores: pd.DataFrame  # variant, model, task, metric, value, n
    table: pd.DataFrame  # primary metric per task and their mean, a row per (variant, model)
    timings: dict[str, dict]


@dataclasses.dataclass
class Merged:
    """The merges of one set of models: output directory per method, and what they came from."""

    outputs: dict[str, str]  # method -> merged model directory
    models: list  # ResolvedModel, merge order (base first)
    modelset: object  # validate.ModelSet
    keys: dict[str, str]  # method -> the key of the stage that produced it (for downstream keys)
    recall_dir: str | None  # RECALL's run directory, when it ran


def merge_methods(rc: RunConfig, methods: list[str], baselines: BaselineConfig, data_dir: str, root: RunDir,
                  prefix: str, manifest: Manifest) -> Merged:
    """Merge rc's models (base, experts, new model) by every method in `methods`: RECALL by
    its own job (run directory rc.run_dir), the baselines by the same merge actors into
    <root>/<prefix>/merged/<method>, each a resumable stage of `manifest`."""
    from . import pipeline

    plan = pipeline.preflight(rc)
    models = [plan.base, *plan.experts, plan.new]
    ms = plan.modelset
    G, K = ms.grouping.num_groups, len(models)
    recall_w, outputs, keys = None, {}, {}
    if "recall" in methods or "recall_layer_constant" in methods:
        res = pipeline.run_pipeline(rc, plan)  # resumes by itself: its own manifest in rc.run_dir
        manifest.timings.update({f"{prefix}/recall/{k}": t for k, t in res.timings.items()})
        recall_w = pipeline.weights_matrix(res.table, [m.label for m in models], G)
        if "recall" in methods:
            outputs["recall"] = rc.output_dir
            keys["recall"] = json.loads(RunDir(rc.run_dir).read_text("manifest.json"))["stages"]["merge"]["key"]
    losses = None
    if "lm_cocktail" in methods:
        examples = load_split(data_dir, plan.cfg.task.template, "train", max_samples=baselines.cocktail_examples)
        key = [ms.fingerprints, [(r["prompt"], r["target"]) for r in examples], rc.task.max_length]
        losses = manifest.run(f"{prefix}/cocktail_losses", key, [],
                              lambda: model_losses(models, examples, rc.task.max_length))
    for name in methods:
        if name == "recall":
            continue
        method = build_method(name, G, K, rc.include_base, baselines, recall_w, losses)
        outputs[name] = root.uri(f"{prefix}/merged/{name}")
        keys[name] = pipeline.merge_stage(manifest, f"{prefix}/merge_{name}", models, ms, method, outputs[name],
                                          rc.merge)
    return Merged(outputs, models, ms, keys, rc.run_dir if recall_w is not None else None)


def evaluate_stage(to_score: list, tasks: list[str], ev: ScenarioEval, data_dir: str, num_actors, root: RunDir,
                   prefix: str, manifest: Manifest, model_keys: dict[str, object], only: dict | None = None
                   ) -> pd.DataFrame:
    from .evaluate import evaluation_stage

    return evaluation_stage(manifest, root, prefix, to_score, tasks, data_dir, ev.split, ev.max_samples,
                            ev.batch_size, num_actors, model_keys, only)


def run_scenario(cfg: ScenarioConfig) -> ScenarioResult:
    """Run (or resume) every variant: RECALL, the baselines, the evaluation. Ray must be up."""
    vs = preflight(cfg)
    root = RunDir(cfg.run_dir)
    manifest = Manifest(root, cfg.model_dump(mode="json"))
    base_path = resolve_path(cfg.base)
    all_scores = []
    for v in vs:
        merged = merge_methods(recall_config(cfg, v), cfg.methods, cfg.baselines, cfg.data_dir, root, v.name, manifest)
        # Score: the base, the experts alone (on their own task), every merge.
        models = merged.models
        to_score = [models[0]] + [dataclasses.replace(m, label=f"expert:{m.label}") for m in models[1:]]
        to_score += [resolve_model(name, out, base_path) for name, out in merged.outputs.items()]
        only = {m.label: [m.label.split(":", 1)[1]] for m in to_score if m.label.startswith("expert:")}
        fps = merged.modelset.fingerprints
        model_keys = {m.label: fps[m.label.removeprefix("expert:")] for m in to_score[:len(models)]}
        model_keys.update(merged.keys)
        scores = evaluate_stage(to_score, list(v.eval_tasks), cfg.evaluate, cfg.data_dir,
                                cfg.recall.representations.num_actors, root, v.name, manifest, model_keys, only)
        all_scores.append(scores.assign(variant=v.name))
        if merged.recall_dir is not None:
            variant_plots(root, v.name, Path(merged.recall_dir))
    scores = pd.concat(all_scores, ignore_index=True)[["variant", "model", "task", "metric", "value", "n"]]
    table = summary_table(scores, cfg.scenario)
    root.write_text("scores.csv", scores.to_csv(index=False, float_format="%.4f"))
    root.write_text("table.csv", table.to_csv(index=False, float_format="%.2f"))
    root.write_text("table.md", markdown_table(table))
    return ScenarioResult(scores, table, manifest.timings)


def summary_table(scores: pd.DataFrame, scenario: str) -> pd.DataFrame:
    """Primary metric per task as columns and their mean over the tasks each row was scored
    on. single: one row per model kind (base, expert, recall, baselines), the task columns
    gathered from each task's own variant; multi: one row per (variant, model)."""
    prim = scores[[primary_metric(t) == m for t, m in zip(scores["task"], scores["metric"])]].copy()
    if scenario == "single":
        prim["model"] = prim["model"].where(~prim["model"].str.startswith("expert:"), "expert")
        index = ["model"]
    else:
        index = ["variant", "model"]
    wide = prim.pivot_table(index=index, columns="task", values="value", aggfunc="mean", sort=False)
    tasks = list(dict.fromkeys(prim["task"]))
    wide = wide[tasks]
    wide["mean"] = wide.mean(axis=1, skipna=True)
    return wide.reset_index()


def stage_times(run_dir: str | Path) -> pd.DataFrame:
    """Seconds of every finished stage of a local run directory (its manifest and the nested
    RECALL runs' manifests), as recorded by the run that computed it: what the scenario
    costs from scratch, however many resumes it took."""
    rows = []
    root = Path(run_dir)
    for mf in sorted(root.rglob("manifest.json")):
        where = mf.parent.relative_to(root).as_posix()
        for name, st in json.loads(mf.read_text()).get("stages", {}).items():
            if st.get("status") == "done":
                rows.append({"stage": f"{where}/{name}" if where != "." else name, "seconds": st.get("seconds", 0.0)})
    return pd.DataFrame(rows, columns=["stage", "seconds"])


PUBLISHED = ("table.md", "table.csv", "scores.csv", "stage_times.csv")


def publish(run_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy a finished scenario's small result files (tables, scores, stage times, plots,
    each RECALL merge's per-layer weights and their summary, RECALL paired against every
    other model on the same samples) into `dest` (e.g. docs/results/multi), replacing what was there; returns the names."""
    import shutil

    from .storage import staged

    from .analysis import weight_summary

    src = Path(run_dir)
    if not (src / "table.csv").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished scenario (no table.csv): run it first")
    stage_times(src).to_csv(src / "stage_times.csv", index=False, float_format="%.1f")
    names = [n for n in PUBLISHED if (src / n).is_file()]
    plots = sorted((src / "plots").glob("*.png")) if (src / "plots").is_dir() else []
    weights = recall_weights(src)
    paired = paired_against(src)
    with staged(str(dest), overwrite=True) as tmp:
        for n in names:
            shutil.copy2(src / n, Path(tmp) / n)
        if plots:
            (Path(tmp) / "plots").mkdir()
            for f in plots:
                shutil.copy2(f, Path(tmp) / "plots" / f.name)
        if weights:
            (Path(tmp) / "weights").mkdir()
            for name, f in weights.items():
                shutil.copy2(f, Path(tmp) / "weights" / f"{name}.csv")
            summary = pd.concat([weight_summary(pd.read_csv(f)).assign(merge=name) for name, f in weights.items()],
                                ignore_index=True)
            summary = summary[["merge", *[c for c in summary.columns if c != "merge"]]]
            summary.to_csv(Path(tmp) / "weights_summary.csv", index=False, float_format="%.4f")
        if paired is not None:
            # p-values with 3 significant digits: a fixed 4 decimals writes p = 4e-6 as 0.0000
            paired.assign(p_value=paired["p_value"].map("{:.3g}".format)).to_csv(
                Path(tmp) / "paired.csv", index=False, float_format="%.4f")
    extra = [f"weights/{n}.csv" for n in weights] + (["weights_summary.csv"] if weights else [])
    return names + [f"plots/{f.name}" for f in plots] + extra + (["paired.csv"] if paired is not None else [])


def paired_against(run_dir: Path, model: str = "recall") -> pd.DataFrame | None:
    """`analysis.paired_comparison` of `model` against every other model scored beside it,
    in every evaluation of the run (<where>/eval/predictions.jsonl; column `eval` names
    where), or None when no evaluation scored `model`."""
    from .analysis import paired_comparison

    parts = []
    for f in sorted(run_dir.rglob("eval/predictions.jsonl")):
        preds = pd.DataFrame([json.loads(line) for line in f.read_text().splitlines() if line.strip()])
        if model not in set(preds["model"]):
            continue
        where = f.parent.parent.relative_to(run_dir).as_posix()
        for other in dict.fromkeys(preds["model"]):
            if other != model:
                parts.append(paired_comparison(preds, model, other).assign(eval=where))
    if not parts:
        return None
    out = pd.concat(parts, ignore_index=True)
    out = out[["eval", *[c for c in out.columns if c != "eval"]]]
    return pd.concat([out, pooled_over_evals(out)], ignore_index=True)


def pooled_over_evals(paired: pd.DataFrame) -> pd.DataFrame:
    """Rows `eval` = "all" that pool the per-task rows of several evaluations on disjoint
    tasks (the single scenario: one variant per task), each `expert:<task>` counted as
    "expert"; empty when the evaluations share tasks (multi: the same samples twice)."""
    from .analysis import sign_test

    rows = paired[paired["task"] != "all"]
    tasks_of = rows.groupby("eval")["task"].apply(set)
    if len(tasks_of) < 2 or sum(map(len, tasks_of)) != len(set().union(*tasks_of)):
        return paired.iloc[0:0]
    rows = rows.assign(b=rows["b"].where(~rows["b"].str.startswith("expert:"), "expert"))
    out = []
    for (a, b), g in rows.groupby(["a", "b"], sort=False):
        n, both, oa, ob = (int(g[c].sum()) for c in ("n", "both", "only_a", "only_b"))
        out.append({"eval": "all", "a": a, "b": b, "task": "all", "n": n, "both": both, "only_a": oa, "only_b": ob,
                    "neither": n - both - oa - ob, "score_a": 100.0 * (both + oa) / n,
                    "score_b": 100.0 * (both + ob) / n, "p_value": sign_test(oa, ob)})
    return pd.DataFrame(out, columns=paired.columns)


def recall_weights(run_dir: Path) -> dict[str, Path]:
    """The per-layer weights.csv of every RECALL merge inside a scenario's run directory,
    named as its plots are: the RECALL run's parent directory, '/' -> '_' (with_base,
    step2_recall, sst2)."""
    found = {}
    for f in sorted(run_dir.rglob("weights.csv")):
        if (f.parent / "manifest.json").is_file() and f.parent != run_dir:
            where = f.parent.parent.relative_to(run_dir).as_posix()
            found["recall" if where == "." else where.replace("/", "_")] = f
    return found


def variant_plots(root: RunDir, name: str, recall_dir: Path) -> None:
    """plots/<name>_{weights,similarity,adjacent}.png from a RECALL run directory."""
    from .analysis import adjacent_table, figure_png, plot_lines

    weights = pd.read_csv(recall_dir / "weights.csv")
    title = f"{name}: "
    root.write_bytes(f"plots/{name}_weights.png", figure_png(plot_lines(
        weights, "layer", "weight", "model", title + "RECALL merge weights", "weight", "layer (0 = embeddings)")))
    root.write_bytes(f"plots/{name}_similarity.png", figure_png(plot_lines(
        weights, "layer", "similarity", "model", title + "similarity to the new model", "similarity",
        "layer (0 = embeddings)")))
    adj = adjacent_table(recall_dir)
    root.write_bytes(f"plots/{name}_adjacent.png", figure_png(plot_lines(
        adj, "layer", "similarity", "model", title + "adjacent-layer similarity", "mean cosine(layer i-1, layer i)",
        "layer i")))


__all__ = ["ScenarioConfig", "load_scenario", "run_scenario", "summary_table", "variants", "preflight",
           "stage_times", "publish"]
