"""What the studies (single, multi, sequential, selection) share: the evaluation section,
the checks every study makes before Ray starts, the RECALL merge of a set of models beside
every baseline (each a resumable stage), scoring, and the published files of a finished
study (tables, scores, paired comparisons, per-layer weights, plots, stage times).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from ..config import BaselineConfig, ConfigError, RayConfig, RecallSettings, RunConfig, Section
from ..core.merge_methods import METHODS, build_method
from ..core.templates import GENERAL_TASKS, is_general
from ..manifest import Manifest
from ..io.models import resolve_path
from ..io.splits import VALIDATION_SIZE, load_split, split_file
from ..io.storage import RunDir

log = logging.getLogger("recall_ray.studies")


class StudyEval(Section):
    split: Literal["test", "validation"] = "test"
    max_samples: int = Field(50, gt=0)  # first N of each task's split
    batch_size: int = Field(16, gt=0)
    # every model on every task: single in the paper's Table 1 form, sequential as its Table 7
    all_tasks: bool = False
    protocol: Literal["loglik", "generate"] = "loglik"  # closed-label tasks (recall_ray.evaluate.PROTOCOLS)
    normalization: Literal["sum", "mean"] = "sum"
    templates: Literal["default", "paper"] = "default"  # core.templates.TEMPLATE_SETS: the prompts asked
    # The general-ability sets (core.templates.GENERAL_TASKS: what the base knew before any
    # fine-tune) every scored model is also scored on, at `general_max_samples` records each
    # (None: the whole split, 500 test records); the tables give their mean as "general".
    general_tasks: list[str] = []
    general_max_samples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_general(self) -> "StudyEval":
        wrong = [t for t in self.general_tasks if not is_general(t)]
        if wrong:
            raise ValueError(f"evaluate.general_tasks {wrong} are not general-ability sets: use some of"
                             f" {', '.join(GENERAL_TASKS)} (the scenario's own tasks go in `tasks`)")
        if len(set(self.general_tasks)) != len(self.general_tasks):
            raise ValueError(f"evaluate.general_tasks lists a set twice: {self.general_tasks}")
        return self


@dataclasses.dataclass
class StudyResult:
    scores: pd.DataFrame  # long scores of every model scored
    table: pd.DataFrame  # the study's table (primary metric per task and their mean)
    timings: dict[str, dict]


def check_inputs(tasks: list[str], run_dir: str, base: str, data_dir: str, recall_max_samples: int,
                 ev: StudyEval) -> None:
    """The checks every scenario makes before any work: known tasks, a local run directory,
    a base that resolves, enough train records for RECALL (the validation tail excluded),
    references in the evaluation split."""
    from ..evaluate import build_items, check_tasks

    check_tasks(tasks)
    general = [t for t in tasks if is_general(t)]
    if general:
        raise ConfigError(f"tasks {general} are general-ability sets, never fine-tuned on: list them under"
                          " evaluate.general_tasks, and only the experts' tasks under tasks")
    if "://" in run_dir:
        raise ConfigError("a scenario loads (and fine-tunes) its models here to score them: use a local run_dir")
    resolve_path(base)
    for t in tasks:
        n_train = len(load_split(data_dir, t, "train"))
        if recall_max_samples > n_train:
            raise ConfigError(f"recall.max_samples={recall_max_samples} exceeds the {n_train} train records of"
                              f" {t} (train.jsonl less its {VALIDATION_SIZE}-record validation tail)")
    build_items(data_dir, tasks + list(ev.general_tasks), ev.split, ev.max_samples, ev.protocol, ev.templates,
                general_samples(ev))


def recall_run_config(r: RecallSettings, ray: RayConfig, run_dir: str, base: str, experts: list[dict],
                      new_model: dict, include_base: bool, task: str, data_dir: str,
                      reuse_from: list[str] = ()) -> RunConfig:
    """The jobs/merge.py config of one RECALL merge inside a study: the new task's train
    split only (never its validation tail), RECALL's sections taken from `r` as they are (they
    were validated once, with the study's config). `reuse_from`: the study's other RECALL
    run directories, whose representations it copies where they are the same."""
    return RunConfig.model_validate({
        "reuse_from": list(reuse_from),
        "run_dir": run_dir,
        "overwrite": True,  # the study owns its run directory
        "base": {"name": "base", "path": base},
        "experts": experts,
        "new_model": new_model,
        "include_base": include_base,
        "task": {"name": task, "data": str(split_file(data_dir, task, "train")), "template": task,
                 "max_samples": r.max_samples, "max_length": r.max_length_for(task)},
        "typical": r.typical, "similarity": r.similarity, "representations": r.representations, "merge": r.merge,
        "ray": ray,
    })


@dataclasses.dataclass
class Merged:
    """The merges of one set of models: output directory per method, and what they came from."""

    outputs: dict[str, str]  # method -> merged model directory
    models: list  # ResolvedModel, merge order (base first)
    modelset: object  # validate.ModelSet
    keys: dict[str, str]  # method -> the key of the stage that produced it (for downstream keys)
    recall_dir: str | None  # RECALL's run directory, when it ran


def merge_all(rc: RunConfig, methods: list[str], baselines: BaselineConfig, data_dir: str, root: RunDir,
              prefix: str, manifest: Manifest) -> Merged:
    """Merge rc's models (base, experts, new model) by every method in `methods`: RECALL by
    its own job (run directory rc.run_dir), the baselines by the same merge actors into
    <root>/<prefix>/merged/<method>, each a resumable stage of `manifest`."""
    from .. import pipeline
    from ..cluster.tasks import model_losses

    plan = pipeline.preflight(rc)
    models = [plan.base, *plan.experts, plan.new]
    ms = plan.modelset
    G, K = ms.grouping.num_groups, len(models)
    recall_w, outputs, keys = None, {}, {}
    needs = {need for name in methods for need in METHODS[name].needs}
    if "recall_weights" in needs:
        res = pipeline.run_pipeline(rc, plan)  # resumes by itself: its own manifest in rc.run_dir
        manifest.timings.update({f"{prefix}/recall/{k}": t for k, t in res.timings.items()})
        recall_w = pipeline.weights_matrix(res.table, [m.label for m in models], G)
        if "recall" in methods:  # the job's own merge is RECALL's
            outputs["recall"] = rc.output_dir
            keys["recall"] = res.merge_key
    losses = None
    # what computed weights come from, for the merges' keys (pipeline.merge_method_key): their
    # inputs' keys, never their values, which differ in the last bits from one CPU to another
    computed_from = {"recall_weights": res.merge_key if recall_w is not None else None}
    if "losses" in needs:
        examples = load_split(data_dir, plan.cfg.task.template, "train", max_samples=baselines.cocktail_examples)
        key = [ms.fingerprints.all(), [(r["prompt"], r["target"]) for r in examples], rc.task.max_length]
        run = manifest.run(f"{prefix}/cocktail_losses", key, [],
                           lambda: model_losses(models, examples, rc.task.max_length))
        losses, computed_from["losses"] = run.result, run.key
    for name in methods:
        if name == "recall":
            continue
        method = build_method(name, G, K, rc.include_base, baselines, recall_w, losses)
        outputs[name] = root.uri(f"{prefix}/merged/{name}")
        weights_from = None
        if METHODS[name].needs:
            weights_from = {"name": name, "include_base": rc.include_base, "settings": baselines.model_dump(mode="json"),
                            **{need: computed_from[need] for need in sorted(METHODS[name].needs)}}
        keys[name] = pipeline.merge_stage(manifest, f"{prefix}/merge_{name}", models, ms, method, outputs[name],
                                          rc.merge, weights_from)
    return Merged(outputs, models, ms, keys, rc.run_dir if recall_w is not None else None)


def general_samples(ev: StudyEval) -> dict[str, int | None]:
    """How many records of each general-ability set are scored (build_items' max_samples_of)."""
    return {t: ev.general_max_samples for t in ev.general_tasks}


def evaluate_stage(to_score: list, tasks: list[str], ev: StudyEval, data_dir: str, num_actors, root: RunDir,
                   prefix: str, manifest: Manifest, model_keys: dict[str, object], only: dict | None = None
                   ) -> pd.DataFrame:
    """Score `to_score` on `tasks` and the general-ability sets of `ev` (every model on
    those, even one that `only` limits to its own task)."""
    from ..evaluate import evaluation_stage

    general = list(ev.general_tasks)
    if only is not None:
        only = {label: list(mine) + general for label, mine in only.items()}
    return evaluation_stage(manifest, root, prefix, to_score, list(tasks) + general, data_dir, ev.split,
                            ev.max_samples, ev.batch_size, num_actors, model_keys, only, protocol=ev.protocol,
                            normalization=ev.normalization, template_set=ev.templates,
                            max_samples_of=general_samples(ev) or None)


def stage_times(run_dir: str | Path, parts: set[str] | None = None) -> pd.DataFrame:
    """Seconds of every finished stage of a local run directory (its manifest and the nested
    RECALL runs' manifests), as recorded by the run that computed it: what the scenario
    costs from scratch, however many resumes it took. `parts` (run_parts): only the stages
    of these variants or steps, and those of no variant."""
    rows = []
    root = Path(run_dir)
    for mf in sorted(root.rglob("manifest.json")):
        where = mf.parent.relative_to(root).as_posix()
        for name, st in json.loads(mf.read_text()).get("stages", {}).items():
            stage = f"{where}/{name}" if where != "." else name
            if st.get("status") == "done" and ("/" not in stage or in_parts(stage, parts)):
                rows.append({"stage": stage, "seconds": st.get("seconds", 0.0)})
    return pd.DataFrame(rows, columns=["stage", "seconds"])


def run_parts(run_dir: str | Path) -> set[str] | None:
    """The variants (one-shot scenarios) or steps (sequential: step<n>) of the run whose
    config the directory's manifest records, i.e. the run that wrote its table. A run
    directory shared by several runs (a selection's candidates, a study with fewer variants)
    keeps the others' subdirectories as a cache; what is published must be this run's alone.
    None when the manifest records no scenario."""
    mf = Path(run_dir) / "manifest.json"
    config = json.loads(mf.read_text()).get("config", {}) if mf.is_file() else {}
    if config.get("scenario") == "sequential":
        return {f"step{i}" for i in range(1, len(config["tasks"]) + 1)}
    if config.get("scenario") in ("single", "multi"):
        return set(variant_names(config["scenario"], config["tasks"], config.get("include_base", [])))
    return None


def variant_names(scenario: str, tasks: list[str], include_base: list[bool]) -> list[str]:
    """A one-shot scenario's variants: single, one per task (its expert with the base);
    multi, one per include_base value."""
    if scenario == "single":
        return list(tasks)
    return ["with_base" if b else "without_base" for b in include_base]


def in_parts(name: str, parts: set[str] | None) -> bool:
    """Whether a path ("with_base/eval", "step2/recall") or a flat name ("with_base_weights",
    "step2_recall") belongs to one of the run's parts."""
    if parts is None:
        return True
    head = name.split("/", 1)[0]
    return any(head == p or head.startswith(p + "_") for p in parts)


PUBLISHED = ("table.md", "table.csv", "scores.csv", "stage_times.csv", "kept_delta.csv", "kept_delta_summary.csv",
             "ewc_penalty.csv")


def publish(run_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy a finished scenario's small result files (tables, scores, stage times, plots,
    each RECALL merge's per-layer weights and their summary, RECALL paired against every
    other model on the same samples (paired.csv), and the base paired against every other
    model (paired_base.csv: what each expert and merge gained or forgot against it)) into
    `dest` (e.g. docs/results/multi), replacing what was there; returns the names."""
    import shutil

    from ..io.storage import staged

    from ..analysis import weight_summary

    src = Path(run_dir)
    if not (src / "table.csv").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished scenario (no table.csv): run it first")
    parts = run_parts(src)  # this run's variants or steps: a shared directory holds others' too
    stage_times(src, parts).to_csv(src / "stage_times.csv", index=False, float_format="%.1f")
    names = [n for n in PUBLISHED if (src / n).is_file()]
    plots = sorted((src / "plots").glob("*.png")) if (src / "plots").is_dir() else []
    plots = [f for f in plots if not f.stem.endswith(VARIANT_PLOTS) or in_parts(f.stem.rsplit("_", 1)[0], parts)]
    weights = {name: f for name, f in recall_weights(src).items() if in_parts(name, parts)}
    tables = paired_against_each(src, ("recall", "base"), parts, controls=True)
    paired = {name: tables[model] for name, model in (("paired.csv", "recall"), ("paired_base.csv", "base"),
                                                       ("paired_layer_constant.csv", CONTROLS))
              if tables[model] is not None}
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
        for name, table in paired.items():
            # p-values with 3 significant digits: a fixed 4 decimals writes p = 4e-6 as 0.0000
            table.assign(p_value=table["p_value"].map("{:.3g}".format)).to_csv(
                Path(tmp) / name, index=False, float_format="%.4f")
    extra = [f"weights/{n}.csv" for n in weights] + (["weights_summary.csv"] if weights else [])
    return names + [f"plots/{f.name}" for f in plots] + extra + list(paired)


CONTROLS = "layer_constant"  # paired_against_each's key for each RECALL row against its control
LAYER_CONSTANT = "_layer_constant"


def paired_against_each(run_dir: Path, models: tuple[str, ...], parts: set[str] | None = None,
                        controls: bool = False) -> dict[str, pd.DataFrame | None]:
    """For each of `models`, `analysis.paired_comparison` of it against every other model
    scored beside it, in every evaluation of the run (<where>/eval/predictions.jsonl; column
    `eval` names where; `parts`: only these variants' or steps'), with the pooled rows; None
    for a model no evaluation scored. Each evaluation's predictions are read once for all
    `models` (the files of runs with the general sets are large).

    `controls`: also, under key CONTROLS, every RECALL row (recall, recall_<name>) against
    its layer-constant control (<row>_layer_constant: the same merge with each model's weight
    averaged over the layers) where both were scored: what the per-layer part of each
    similarity setting did, which paired.csv shows for the main row only."""
    from ..analysis import paired_comparison

    found: dict[str, list[pd.DataFrame]] = {m: [] for m in (*models, *([CONTROLS] if controls else []))}
    for f in sorted(run_dir.rglob("eval/predictions.jsonl")):
        where = f.parent.parent.relative_to(run_dir).as_posix()
        if not in_parts(where, parts):
            continue
        preds = read_predictions(f)
        scored = list(dict.fromkeys(preds["model"]))
        for model in models:
            if model in scored:
                found[model] += [paired_comparison(preds, model, other).assign(eval=where)
                                 for other in scored if other != model]
        if controls:
            found[CONTROLS] += [paired_comparison(preds, row, row + LAYER_CONSTANT).assign(eval=where)
                                for row in scored if (row == "recall" or row.startswith("recall_"))
                                and not row.endswith(LAYER_CONSTANT) and row + LAYER_CONSTANT in scored]
    return {m: _with_pooled_rows(tables) if tables else None for m, tables in found.items()}


def _with_pooled_rows(tables: list[pd.DataFrame]) -> pd.DataFrame:
    out = pd.concat(tables, ignore_index=True)
    out = out[["eval", *[c for c in out.columns if c != "eval"]]]
    return pd.concat([out, general_per_eval(out), pooled_over_evals(out)], ignore_index=True)


def general_per_eval(paired: pd.DataFrame) -> pd.DataFrame:
    """Per evaluation, one row task "general" per pair (a, b): the general-ability sets'
    paired counts summed, with the sign test (what one expert or merge kept of the base's
    knowledge, all sets together). Empty when the run scored no general-ability set."""
    rows = paired[(paired["eval"] != "all") & paired["task"].map(is_general).astype(bool)]
    out = [_pooled(g, {"general": g}, paired.columns).assign(eval=ev) for ev, g in rows.groupby("eval", sort=False)]
    return pd.concat(out, ignore_index=True) if out else paired.iloc[0:0]


def pooled_over_evals(paired: pd.DataFrame) -> pd.DataFrame:
    """Rows `eval` = "all" that pool the per-task rows of the single scenario's evaluations
    (one per fine-tuned task, named after it), each `expert:<task>` counted as "expert":

    - evaluations on disjoint tasks (each merge scored on its own task): one row, task "all";
    - the paper's Table 1 (every evaluation scores the same tasks, and each is named after
      one of them): rows task "all" (every cell of the grid), "unseen" (the cells off the
      fine-tuned task) and "own" (the fine-tuned task's cells). A test sample then counts
      once per fine-tuned task, each time for a different merge.

    The general-ability sets (evaluate.general_tasks) stay out of those scopes and, in
    either case, get their own row, task "general".

    Empty otherwise (multi: two variants scored on the same samples, not to be pooled)."""
    rows = paired[paired["task"] != "all"]
    rows = rows.assign(b=rows["b"].where(~rows["b"].str.startswith("expert:"), "expert"))
    general = rows["task"].map(is_general).astype(bool)
    rows, general_rows = rows[~general], rows[general]
    tasks_of = rows.groupby("eval")["task"].apply(set)
    if len(tasks_of) < 2:
        return paired.iloc[0:0]
    if sum(map(len, tasks_of)) == len(set().union(*tasks_of)):
        scopes = {"all": rows}
    else:
        shared = set.intersection(*tasks_of)
        if not (all(ts == shared for ts in tasks_of) and set(tasks_of.index) <= shared):
            return paired.iloc[0:0]
        own = rows["task"] == rows["eval"]
        scopes = {"all": rows, "unseen": rows[~own], "own": rows[own]}
    if not general_rows.empty:
        scopes["general"] = general_rows  # every evaluation's general-ability sets, each merge on the same samples
    return _pooled(rows, scopes, paired.columns)


def _pooled(rows: pd.DataFrame, scopes: dict[str, pd.DataFrame], columns) -> pd.DataFrame:
    """One row per (scope, a, b): the scope's paired counts summed, with the sign test."""
    from ..analysis import paired_counts

    out = []
    for task, scope in scopes.items():
        for (a, b), g in scope.groupby(["a", "b"], sort=False):
            counts = [int(g[c].sum()) for c in ("both", "only_a", "only_b", "neither")]
            out.append({"eval": "all", "a": a, "b": b, "task": task, **paired_counts(*counts)})
    return pd.DataFrame(out, columns=columns)


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


VARIANT_PLOTS = ("_weights", "_similarity", "_adjacent")  # variant_plots' names: <variant>_<kind>.png


def variant_plots(root: RunDir, name: str, recall_dir: Path) -> None:
    """plots/<name>_{weights,similarity,adjacent}.png from a RECALL run directory."""
    from ..analysis import adjacent_table, figure_png, plot_lines

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


# ---------------------------------------------------------------- tables with intervals

def read_predictions(path: Path) -> pd.DataFrame:
    """An evaluation's predictions.jsonl as written (model, task, sample_id, prediction,
    references, ...), each field as JSON has it: no dtype guessing on ids or answers."""
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def replace_rows(old: pd.DataFrame, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`old` without the rows whose `keys` values occur in `new`, then `new`: a later run's
    table published over an earlier one's, that keeps what only the earlier run measured (a
    fresh machine holds none of the earlier experts' ladders; it scores the new expert and the
    base again, and the base's new rows replace its old ones)."""
    missing = [k for k in keys if k not in old.columns or k not in new.columns]
    if missing:
        raise ValueError(f"replace_rows: key columns {missing} are not in both tables")
    taken = set(new[keys].astype(str).itertuples(index=False, name=None))
    kept = [tuple(r) not in taken for r in old[keys].astype(str).itertuples(index=False, name=None)]
    return pd.concat([old[kept], new], ignore_index=True)


def eval_hits(predictions: Path) -> pd.DataFrame:
    """Per sample, whether the model scored on the task's primary metric (core.metrics
    .sample_hits), from an evaluation's predictions.jsonl: model, task, sample_id, hit."""
    from ..core.metrics import sample_hits

    preds = read_predictions(predictions)
    parts = []
    for (model, task), sub in preds.groupby(["model", "task"], sort=False):
        guesses = [p if isinstance(p, str) else None for p in sub["prediction"]]  # NaN: pandas' None
        parts.append(pd.DataFrame({"model": model, "task": task, "sample_id": sub["sample_id"].astype(str),
                                   "hit": sample_hits(task, guesses, list(sub["references"]))}))
    return pd.concat(parts, ignore_index=True)


def _replicates(hits: pd.DataFrame, groups: dict[str, list[str]], seed: int) -> tuple[dict, dict]:
    """Each task's estimate and bootstrap replicates, "mean" over the row's tasks (those of
    the scenario: the general-ability sets apart, when there are others), "general" over
    the general-ability sets, and each of `groups`."""
    from ..core.analysis import bootstrap_means

    per_task = {t: sub["hit"].to_numpy() for t, sub in hits.groupby("task", sort=False)}
    est, reps = bootstrap_means(per_task, seed=seed)
    general = [t for t in per_task if is_general(t)]
    own = [t for t in per_task if t not in general]
    if general and own:
        est["mean"] = float(np.mean([est[t] for t in own]))
        reps["mean"] = np.mean([reps[t] for t in own], axis=0)
    groups = {**groups, "general": general}
    for name, tasks in groups.items():
        if tasks:
            est[name] = float(np.mean([est[t] for t in tasks]))
            reps[name] = np.mean([reps[t] for t in tasks], axis=0)
    return est, reps


def interval_table(hits: pd.DataFrame, index: list[str], seed: int = 0,
                   groups: Callable[[tuple], dict[str, list[str]]] | None = None,
                   pooled: dict[str, str] | None = None) -> pd.DataFrame:
    """A row per `index` key of `hits` (index..., task, hit): each task's score with its 95%
    percentile-bootstrap interval (`<col>`, `<col>_lo`, `<col>_hi`), then "mean" over the
    row's tasks (the general-ability sets excepted, unless they are all there is), each of
    `groups(key)` (name -> a subset of the tasks) and "general", the mean over the row's
    general-ability sets (when it has some). With `pooled`
    ({index column: label}), rows averaging every key that shares the other index values
    are added, labelled `label` in that column (the paper's "all" rows of Table 1); their
    intervals come from the averaged replicates (the keys resampled independently)."""
    from ..core.analysis import percentile_interval

    rows, reps_of = [], {}
    tasks = list(dict.fromkeys(hits["task"]))
    for key, sub in hits.groupby(index, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        est, reps = _replicates(sub, groups(key) if groups else {}, seed)
        reps_of[key] = (est, reps)
    if pooled:
        (col, label), = pooled.items()
        at = index.index(col)
        others = dict.fromkeys(k[:at] + k[at + 1:] for k in reps_of)
        for rest in others:
            keys = [k for k in reps_of if k[:at] + k[at + 1:] == rest]
            names = set.intersection(*(set(reps_of[k][0]) for k in keys))
            est = {n: float(np.mean([reps_of[k][0][n] for k in keys])) for n in names}
            reps = {n: np.mean([reps_of[k][1][n] for k in keys], axis=0) for n in names}
            reps_of[rest[:at] + (label,) + rest[at:]] = (est, reps)
    for key, (est, reps) in reps_of.items():
        row = dict(zip(index, key))
        for name in est:
            lo, hi = percentile_interval(reps[name])
            row.update({name: est[name], f"{name}_lo": lo, f"{name}_hi": hi})
        rows.append(row)
    names = tasks + ["mean"] + [n for n in dict.fromkeys(c for r in rows for c in r)
                                if n not in tasks and n != "mean" and n not in index and not n.endswith(("_lo", "_hi"))]
    cols = index + [c for n in names for c in (n, f"{n}_lo", f"{n}_hi")]
    return pd.DataFrame(rows).reindex(columns=cols)


def interval_markdown(table: pd.DataFrame, index: list[str], digits: int = 1) -> str:
    """A table of `interval_table` as Markdown: each score cell "value [low, high]"."""
    from ..report import markdown_table

    names = [c for c in table.columns if c not in index and not c.endswith(("_lo", "_hi"))]
    shown = table[index].copy()
    for n in names:
        shown[n] = [("" if v != v else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
                    for v, lo, hi in zip(table[n], table[f"{n}_lo"], table[f"{n}_hi"])]
    return markdown_table(shown)
