"""The RECALL job: its checks, then its stages, declared as data in the order they run.

    preflight (no Ray, nothing written)
      -> finetune?  -> reps_new -> typical -> reps_<model>... -> weights -> merge
      -> baseline_<name>... -> evaluate                       (the last two when asked for)

Each stage's core is a pure function (recall_ray.core) run by a thin Ray shell
(recall_ray.cluster); this module decides what runs where and records every stage in the
run's manifest with a key (a hash of what decides its output), so that a rerun resumes and a
changed setting recomputes only the stages downstream of it. Nothing is written to the run
directory until every input has passed the checks that read no weights (preflight). The one
check that reads every weight, for NaN/Inf, is done by the representation stages' loads, which
read every input anyway (FiniteCheck; docs/design.md, "Bad input").
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .config import BaselineConfig, MergeConfig, RunConfig
from .core.errors import CheckpointError
from .core.templates import check_trainable, load_task_records
from .core.typical import TooFewSamplesError, union_in_order
from .manifest import Manifest, StageRun, recorded_stages, stable_hash, stage_complete
from .io.models import ModelTensors, ResolvedModel, resolve_model, resolve_path
from .io.storage import RunDir, check_writable, file_sha256, filesystem, output_exists, refuse_existing_output
from .validate import ModelMismatchError, ModelSet, check_models

if TYPE_CHECKING:  # the checks (preflight) import none of these: a bad input is answered in a second
    import pandas as pd

    from .core.merge_methods import MergeMethod

log = logging.getLogger("recall_ray.pipeline")


class PipelineError(ValueError):
    """Bad input found before any work."""


@dataclass
class PipelineResult:
    output: str
    run_dir: str
    table: pd.DataFrame  # the weights table (layer, model, sq_distance, similarity, weight, ...)
    timings: dict[str, dict]
    typical_count: int
    saturated: list[int]
    merge_key: str  # what decided the merged model's contents (not its place): the same in any run directory
    merge_peak_rss_mb: float | None = None
    merge_peak_anon_mb: float | None = None
    scores: pd.DataFrame | None = None  # evaluation (model, task, metric, value, n), when asked for


# ---------------------------------------------------------------------------- checks

@dataclass
class Plan:
    """A config whose inputs passed every check that needs no forward pass."""

    cfg: RunConfig
    base: ResolvedModel
    experts: list[ResolvedModel]
    new: ResolvedModel | None  # None: fine-tuned by the job
    records: list[dict]
    data_hash: str
    modelset: ModelSet | None  # the merge's models, checked (None until the new model is fine-tuned)
    eval_items: list | None = None  # evaluation prompts and references


def preflight(cfg: RunConfig) -> Plan:
    """Every check that needs no model forward pass and no Ray: models, their shapes,
    tokenizers and adapters' bases, the task data, the output, the evaluation's prompts.
    Raises before anything is written."""
    base_path = resolve_path(cfg.base.path)
    base = resolve_model(cfg.base.name or "base", cfg.base.path, base_path, cfg.allow_pickle)
    if base.kind != "hf":
        raise PipelineError(f"base {cfg.base.path} is an adapter; `base` must be a full Hugging Face model directory")

    def resolve(spec, default_name: str) -> ResolvedModel:
        own_base = resolve_path(spec.adapter_base) if spec.adapter_base else base_path
        return resolve_model(spec.name or default_name if default_name else spec.label, spec.path, own_base,
                             cfg.allow_pickle, spec.base_name_check)

    experts = [resolve(e, "") for e in cfg.experts]
    new = resolve(cfg.new_model, "new") if cfg.new_model is not None and not cfg.finetune.enabled else None
    labels = [base.label] + [e.label for e in experts] + [new.label if new else "new"]
    if len(set(labels)) != len(labels):
        raise PipelineError(f"model names must be distinct, got {labels}: set `name` on the models")
    if new is None and not cfg.experts and not cfg.include_base:
        raise PipelineError("nothing to merge the new model with: add `experts` or set include_base: true")

    if cfg.finetune.enabled:
        check_trainable(cfg.task.template)  # a general-ability set is never fine-tuned on
    records = load_task_records(cfg.task.data, cfg.task.template, cfg.task.max_samples)
    if len(records) < cfg.typical.k:
        raise TooFewSamplesError(
            f"task data {cfg.task.data} has {len(records)} usable samples (task.max_samples={cfg.task.max_samples})"
            f" but typical.k={cfg.typical.k}: KMeans needs at least k samples; add data or lower typical.k"
        )
    if not _is_own_output(cfg):  # this run's own output is reused by a rerun
        refuse_existing_output(cfg.output_dir, cfg.overwrite)
    for dest in (cfg.output_dir, cfg.run_dir):
        check_writable(dest)
    models = [base, *experts] + ([new] if new else [])
    modelset = check_models(models, cfg.architecture, cfg.merge.head_group) if len(models) >= 2 else None
    eval_items = None
    if cfg.evaluate.tasks:
        from .evaluate import preflight as eval_preflight

        # an output or run_dir on an object store is fine: the evaluation's actors read the
        # merged models from there (io.models.load_causal_lm copies one to its node's cache)
        ev = cfg.evaluate
        eval_items = eval_preflight([base], ev.tasks, ev.data_dir, ev.split, ev.max_samples, ev.protocol, ev.templates)
    return Plan(cfg, base, experts, new, records, file_sha256(cfg.task.data), modelset if new else None, eval_items)


def _is_own_output(cfg: RunConfig) -> bool:
    """An output this run directory's manifest says it produced: a merge recorded done, or
    one whose output was moved into place by a run that stopped before recording it."""
    stage = recorded_stages(cfg.run_dir).get("merge", {})
    return bool(stage) and stage_complete(stage) and (stage.get("result") or {}).get("output") == cfg.output_dir


class FiniteCheck:
    """The NaN/Inf check of every input's weights, folded into the representation stages:
    their actors test each tensor as they read it for the model's forwards
    (models.load_causal_lm_read), so the inputs are not read once more for it. This counts
    the weight sets tested (a full model's weights, an adapter's own tensors) for the job's
    progress line and the manifest's `finite_check` record. A model whose representations an
    earlier run computed (its stage skipped, same key) was tested then: the stage keys say
    whether it was (Run.reps_opts)."""

    def __init__(self, models: list[ResolvedModel]):
        from .progress import Progress

        self.owner = {m.weights_dir: m.label for m in models if m.kind == "hf"}
        self.sets_of = {m.label: self._sets(m) for m in models}
        self.total = set().union(*self.sets_of.values())
        self.tested: set[str] = set()
        self.before: set[str] = set()
        self.seconds = 0.0  # of the tests themselves, summed over the actors
        self.progress = Progress("finite check (NaN/Inf)", len(self.total), "weight sets")

    def _sets(self, m: ResolvedModel) -> set[str]:
        """A full model's weights; an adapter's own tensors, and its base's when no full model
        of the job holds them (as a scan of each distinct weight set would count them)."""
        if m.kind == "hf":
            return {m.weights_dir}
        return {m.path} | ({m.weights_dir} if m.weights_dir not in self.owner else set())

    def checked(self, weight_set: str) -> None:
        if weight_set in self.total and weight_set not in self.tested | self.before:
            self.tested.add(weight_set)
            self.progress.update()

    def tested_before(self) -> None:
        """Every weight set not tested now: its representations were reused from an earlier run
        (no progress line when none was tested now)."""
        rest = sorted(self.total - self.tested - self.before)
        self.before.update(rest)
        if not self.tested:
            log.info("finite check: the same weights were tested by an earlier run's representation stages")
        elif rest:
            self.progress.update(len(rest))


# -------------------------------------------------------------------------- the stages

# What the representations are of, in the stages' keys: prompt + target tokenised apart and cut
# by the fine-tune's rule (core.sft.represented_ids). Representations cut the old way (the
# joined text cut from the right, which kept a long record's passage and lost its question)
# are recomputed, not reused.
REPRESENTED = "prompt+target, keep_end"


@dataclass
class Run:
    """What the stages of one job share: the plan, where they write, what they produced."""

    plan: Plan
    run_dir: RunDir
    manifest: Manifest
    models: list[ResolvedModel] = field(default_factory=list)  # merge order; the base first
    modelset: ModelSet | None = None
    parts: dict[str, Any] = field(default_factory=dict)  # stage -> key parts (downstream keys embed them)
    runs: dict[str, StageRun] = field(default_factory=dict)  # manifest stage -> what it did
    items: list[dict] = field(default_factory=list)  # the new task's samples
    typical_idx: list[int] = field(default_factory=list)
    table: pd.DataFrame | None = None  # the weights table
    pending_reps: list[ResolvedModel] | None = None  # models whose reps one shared pool computes
    finite: FiniteCheck | None = None  # the NaN/Inf check (merge.check_finite), done by the reps stages
    # nothing here or in cfg.reuse_from can be reused (a new run directory): the representation
    # stages run before their keys are made, so that the models' fingerprints come from their
    # loads (every tensor read anyway) instead of a read of their own
    keys_after_reads: bool = False

    @property
    def cfg(self) -> RunConfig:
        return self.plan.cfg

    @property
    def new(self) -> ResolvedModel:
        return self.models[-1]

    @property
    def num_groups(self) -> int:
        return self.modelset.arch.num_layers(self.modelset.hf_config) + 1

    def fp(self, label: str) -> str:
        return self.modelset.fingerprints[label]

    def learn_fingerprints(self, models: list[ResolvedModel], found: dict[int, str]) -> None:
        """The fingerprints a representation pool's loads made (ExtractReport.fingerprints)."""
        for q, fp in found.items():
            self.modelset.fingerprints.learn(models[q].label, fp)

    def reps_rel(self, label: str) -> str:
        return f"reps/{label}"

    def reps_opts(self) -> list:
        r = self.cfg.representations
        # representations computed without the NaN/Inf check are not reused by a run that asks
        # for it (the check is done by their loads)
        return [self.cfg.task.max_length, r.exclude_first_token, r.dtype, REPRESENTED] + (
            [] if self.cfg.merge.check_finite else ["weights not checked for NaN/Inf"])


@dataclass(frozen=True)
class Stage:
    """One stage of the job. `name` is its manifest entry; a stage with `items` has one
    entry per item (`name` formatted with `item`). key/outputs/compute take the Run and the
    item (None for a single stage); compute returns the record kept in the manifest."""

    name: str
    inputs: tuple[str, ...]  # the stages whose outputs (and keys) it uses
    key: Callable[[Run, str | None], Any]
    outputs: Callable[[Run, str | None], list[str]]
    compute: Callable[[Run, str | None], Any]
    items: Callable[[Run], list[str]] | None = None
    when: Callable[[Run], bool] = lambda run: True


def _finetune(run: Run, _: str | None) -> dict:
    from .cluster.finetune import finetune_lora

    cfg = run.cfg
    out = _finetune_dir(run)
    if run.run_dir.exists("finetune/adapter"):  # a stale adapter from other settings
        run.run_dir.delete("finetune/adapter")
    records = load_task_records(cfg.task.data, cfg.task.template, cfg.finetune.max_samples)
    # Ray Train's run and checkpoints go to the run directory too: on a bucket, where every
    # node of a cluster without a shared disk reaches them
    finetune_lora(run.plan.base.path, records, cfg.finetune, out, run.run_dir.location("finetune/ray_train"))
    return {"adapter": out}


def _finetune_dir(run: Run) -> str:
    return run.run_dir.location("finetune/adapter")


def _reps_new(run: Run, _: str | None) -> dict:
    report = _extract([run.new], run.items, run, [run.reps_rel(run.new.label)], "reps_new")
    run.learn_fingerprints([run.new], report.fingerprints)
    return {"bytes_read": report.bytes_read[0], **({"events": report.events} if report.events else {})}


def _typical(run: Run, _: str | None) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .cluster.tasks import kmeans_all_layers

    t = run.cfg.typical
    per_layer = kmeans_all_layers(run.run_dir.uri(run.reps_rel(run.new.label)), run.num_groups, t.k, t.seed, t.n_init)
    order, chosen_by = union_in_order(per_layer)
    table = pa.table({
        "sample_idx": pa.array(order, pa.int64()),
        "sample_id": [run.items[i]["sample_id"] for i in order],
        "text": [run.items[i]["text"] for i in order],
        "chosen_by_layers": pa.array([chosen_by[i] for i in order], pa.list_(pa.int32())),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    run.run_dir.write_bytes("typical.parquet", buf.getvalue())
    return {"count": len(order), "sample_idx": order}


def _others(run: Run) -> list[str]:
    return [m.label for m in run.models if m is not run.new]


def _reps_other(run: Run, label: str | None) -> dict:
    """One representation pool for every model whose stage is pending (each keeps its own
    key, so adding an expert computes that expert alone): the first pending model's stage
    runs the pool for all of them."""
    if run.pending_reps is None:
        def computed(m: ResolvedModel) -> bool:  # here, or in a run this one copies from
            name, key = f"reps_{m.label}", stable_hash(_reps_other_key(run, m.label))
            outputs = [run.run_dir.uri(run.reps_rel(m.label))]
            return run.manifest.done(name, key) or _done_elsewhere(run, name, key, outputs) is not None

        pending = [m for m in run.models if m.label in _others(run) and (run.keys_after_reads or not computed(m))]
        typical_items = [run.items[i] for i in run.typical_idx]
        report = _extract(pending, typical_items, run, [run.reps_rel(m.label) for m in pending],
                          f"reps of {_names(m.label for m in pending)}")
        run.learn_fingerprints(pending, report.fingerprints)
        run.pending_reps = pending
        # tensor bytes each model's loads read (all of the pool's actors)
        return {"pool_models": [m.label for m in pending],
                "bytes_read": {m.label: n for m, n in zip(pending, report.bytes_read)},
                **({"events": report.events} if report.events else {})}
    return {"pool_of": run.pending_reps[0].label}


def _names(labels: Iterable[str], shown: int = 4) -> str:
    """A list of names for a progress line: all of a few, or the count and its ends."""
    labels = list(labels)
    if len(labels) <= shown:
        return ", ".join(labels)
    return f"{len(labels)} models ({', '.join(labels[:shown - 1])}, ..., {labels[-1]})"


def _reps_other_key(run: Run, label: str) -> list:
    return [run.fp(label), run.parts["typical"], run.reps_opts()]


def _weigh_labels(run: Run) -> list[str]:
    return ([run.plan.base.label] if run.cfg.include_base else []) + [e.label for e in run.plan.experts] + [run.new.label]


def _weights(run: Run, _: str | None) -> dict:
    """Similarities and weights (core.similarity.layer_weights), on the driver, one layer of
    every model's Parquet column in memory at a time; then the table and its plots."""
    import pandas as pd

    from .core.similarity import layer_weights
    from .report import plot_png, weight_log_lines
    from .io.reps_parquet import iter_layers

    sc = run.cfg.similarity
    labels = _weigh_labels(run)
    # every weighed model's layer and the base's (the shift kernel measures moves away from it)
    layers = iter_layers([run.run_dir.uri(run.reps_rel(lbl)) for lbl in [*labels, run.plan.base.label]],
                         run.typical_idx, run.num_groups)
    models_of, base_of = itertools.tee(layers)
    lw = layer_weights((row[:-1] for row in models_of), labels.index(run.new.label), sc.kernel, sc.sigma,
                       sc.normalize, sc.pairing, sc.temperature, base_per_layer=(row[-1] for row in base_of))
    table = pd.DataFrame(lw.rows(labels))
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    run.run_dir.write_bytes("weights.parquet", buf.getvalue())
    run.run_dir.write_text("weights.csv", table.to_csv(index=False, float_format="%.10g"))
    run.run_dir.write_bytes("plots/similarity.png", plot_png(table, "similarity", "similarity to the new model"))
    run.run_dir.write_bytes("plots/weights.png", plot_png(table, "weight", "merge weight"))
    run.run_dir.write_bytes("plots/sq_distance.png", plot_png(table, "sq_distance", "mean squared distance",
                                                              log_scale=True))
    for line in weight_log_lines(table):
        log.debug(line)
    return {"layers": run.num_groups, "saturated": list(lw.saturated)}


def weights_matrix(table: pd.DataFrame, labels: list[str], num_groups: int) -> np.ndarray:
    """[G, K] merge weights in merge order from the weights table (a model that does not
    take part, e.g. the base with include_base false, keeps weight 0)."""
    w = np.zeros((num_groups, len(labels)))
    col = {label: q for q, label in enumerate(labels)}
    for row in table.itertuples():
        w[int(row.layer), col[row.model]] = row.weight
    return w


def _recall_weights(run: Run) -> np.ndarray:
    return weights_matrix(run.table, [m.label for m in run.models], run.num_groups)


def _merge(run: Run, _: str | None) -> dict:
    from .cluster.merge import run_merge
    from .core.merge_methods import MergeMethod
    from .mergekit_export import mergekit_file
    from .report import model_card

    cfg, models = run.cfg, run.models
    card = model_card(
        [{"label": m.label, "kind": m.kind, "path": m.path} for m in models], run.table,
        "\n".join(f"{k}: {v}" for k, v in {
            "similarity": cfg.similarity.model_dump(), "typical": cfg.typical.model_dump(),
            "include_base": cfg.include_base, "head_group": cfg.merge.head_group}.items()),
        len(run.typical_idx),
    )
    method = MergeMethod("recall", "linear", _recall_weights(run))
    report = run_merge(models, run.modelset.grouping, run.modelset.infos, method, cfg.output_dir, cfg.overwrite,
                       cfg.merge.num_actors, cfg.merge.placement, cfg.merge.max_shard_bytes,
                       side_dir=models[0].weights_dir, card=card,
                       extra_files={"recall_weights.csv": run.table.to_csv(index=False, float_format="%.10g"),
                                    **mergekit_file(method, models, run.modelset)},
                       resume_key=stable_hash(run.parts["merge"]),
                       before_publish=lambda staging, rep: run.manifest.publishing("merge", _merge_record(rep), staging))
    return _merge_record(report)


def _merge_record(report) -> dict:
    """The merge stage's result in the manifest, from its cluster.merge.MergeReport."""
    return {"output": report.output, "seconds": report.seconds, "peak_rss_mb": report.peak_rss_mb,
            "peak_anon_mb": report.peak_anon_mb, "resumed_shards": report.resumed, "events": report.events,
            "shards": [{k: s.get(k) for k in ("file", "bytes", "bytes_read", "seconds", "peak_rss_mb", "peak_anon_mb",
                                              "node_id")} for s in report.shards]}


def _baseline_method(run: Run, name: str) -> MergeMethod:
    from .core.merge_methods import build_method

    return build_method(name, run.num_groups, len(run.models), run.cfg.include_base, BaselineConfig())


def _baseline(run: Run, name: str | None) -> dict:
    return merge_method_compute(run.models, run.modelset, _baseline_method(run, name),
                                run.run_dir.uri(f"baselines/{name}"), run.cfg.merge,
                                resume_key=stable_hash(run.parts[f"baseline_{name}"]))


def _evaluate(run: Run, _: str | None) -> pd.DataFrame:
    """The new model alone, each baseline merge and the RECALL merge, scored side by side."""
    from .evaluate import evaluation_stage

    cfg, ev = run.cfg, run.cfg.evaluate
    new = run.new
    to_score, keys = [new], {new.label: run.fp(new.label)}
    for name in ev.baselines:
        to_score.append(resolve_model(name, run.run_dir.uri(f"baselines/{name}"), run.models[0].path))
        keys[name] = run.runs[f"baseline_{name}"].key
    to_score.append(resolve_model("recall", cfg.output_dir, run.models[0].path))
    keys["recall"] = run.runs["merge"].key
    return evaluation_stage(run.manifest, run.run_dir, "", to_score, ev.tasks, ev.data_dir, ev.split, ev.max_samples,
                            ev.batch_size, cfg.representations.num_actors, keys, items=run.plan.eval_items,
                            protocol=ev.protocol, normalization=ev.normalization, template_set=ev.templates)


def _reps_new_key(run: Run, _: str | None) -> list:
    return [run.fp(run.new.label), run.plan.data_hash, run.cfg.task.model_dump(), run.reps_opts()]


def _weights_key(run: Run, _: str | None) -> list:
    return [run.parts["typical"], {lbl: run.fp(lbl) for lbl in _weigh_labels(run)}, run.reps_opts(),
            run.cfg.similarity.key(), run.cfg.include_base]


def _merged_content(run: Run) -> list:
    """What decides the merged model's contents, not where it is written: the key its scores
    are cached by (PipelineResult.merge_key), the same in any run directory and on any
    machine. The weights enter by what computed them (the weights stage's key), not by their
    values: representations recomputed on another CPU (or in other batches) differ in their
    last bits, and so do the weights, while the merge is the same one."""
    return [run.parts["weights"], run.cfg.merge.key(), [run.fp(m.label) for m in run.models]]


def _merge_key(run: Run, _: str | None) -> list:
    # the stage's key adds the weights' values, so that this directory's merged tensors are
    # always those of its own weights.csv, and the output's place: a merge recorded done at
    # another place (Manifest.done checks the outputs it recorded) is not this run's output
    return [*_merged_content(run), stable_hash(_recall_weights(run).round(12).tolist()), run.cfg.output_dir]


def _evaluating(run: Run) -> bool:
    return run.plan.eval_items is not None


STAGES: tuple[Stage, ...] = (
    Stage("reps_new", ("new model", "task data"), _reps_new_key,
          lambda run, _: [run.run_dir.uri(run.reps_rel(run.new.label))], _reps_new),
    Stage("typical", ("reps_new",), lambda run, _: [run.parts["reps_new"], run.cfg.typical.model_dump()],
          lambda run, _: [run.run_dir.uri("typical.parquet")], _typical),
    Stage("reps_{item}", ("typical",), _reps_other_key, lambda run, label: [run.run_dir.uri(run.reps_rel(label))],
          _reps_other, items=_others),
    Stage("weights", ("reps_new", "reps_{item}"), _weights_key,
          lambda run, _: [run.run_dir.uri("weights.parquet"), run.run_dir.uri("weights.csv")], _weights),
    Stage("merge", ("weights",), _merge_key, lambda run, _: [run.cfg.output_dir], _merge),
    Stage("baseline_{item}", (), lambda run, name: merge_method_key(run.models, run.modelset,
                                                                   _baseline_method(run, name), run.cfg.merge),
          lambda run, name: [run.run_dir.uri(f"baselines/{name}")], _baseline,
          items=lambda run: list(run.cfg.evaluate.baselines), when=_evaluating),
)


# The stages that only the models, the task data and the representation and typical settings
# decide (their keys say so): another run with the same key made the same files.
REUSABLE = ("reps_new", "typical", "reps_{item}")
# The stages whose loads read every tensor of their models (and so give their fingerprints)
KEYS_AFTER_READS = ("reps_new", "reps_{item}")
# What a copied stage's record leaves out: what the other run's own work read and survived.
NOT_COPIED = ("bytes_read", "events", "pool_models", "pool_of")


def _done_elsewhere(run: Run, name: str, key: str, outputs: list[str]) -> tuple[str, dict] | None:
    """(run directory, its record of the stage) for the first directory of cfg.reuse_from
    whose manifest records stage `name` done with `key` and that holds every one of this
    stage's outputs (at the same place inside it); None when there is none."""
    here = run.run_dir.root
    for other in run.cfg.reuse_from:
        other = other.rstrip("/")
        if other == here:
            continue
        stage = recorded_stages(other).get(name)
        if stage and stage.get("status") == "done" and stage.get("key") == key:
            src = RunDir(other)  # there: its manifest is
            if all(src.exists(_rel(run, o)) for o in outputs):
                return other, stage
    return None


def _rel(run: Run, location: str) -> str:
    """An output's path inside this run's directory (the same inside every run's)."""
    root = run.run_dir.uri() + "/"
    if not location.startswith(root):
        raise ValueError(f"{location} is not inside the run directory {root}")
    return location[len(root):]


def _copy_stage(run: Run, name: str, found: tuple[str, dict], outputs: list[str]) -> dict:
    """Copy stage `name`'s outputs from the run directory `_done_elsewhere` found into this
    run's; its record (without what that run's own work read) says where they came from."""
    from pyarrow.fs import FileType, copy_files

    other, stage = found
    src = RunDir(other)
    for location in outputs:
        rel = _rel(run, location)
        if run.run_dir.exists(rel):  # a stale output of other settings
            run.run_dir.delete(rel)
        if src.fs.get_file_info(src.path(rel)).type == FileType.Directory:
            run.run_dir.fs.create_dir(run.run_dir.path(rel), recursive=True)
        copy_files(src.path(rel), run.run_dir.path(rel), source_filesystem=src.fs,
                   destination_filesystem=run.run_dir.fs)
    result = stage.get("result") or {}
    log.info("stage %s: the same key is done in %s; its outputs copied", name, other)
    return {**{k: v for k, v in result.items() if k not in NOT_COPIED}, "copied_from": other}


def run_stage(run: Run, stage: Stage, item: str | None = None) -> StageRun:
    """Run one stage (one item of it) through the manifest, keeping its key parts. A reusable
    stage that another run of cfg.reuse_from finished with the same key is copied from it."""
    name = stage.name.format(item=item)
    outputs = stage.outputs(run, item)
    if run.keys_after_reads and stage.name in KEYS_AFTER_READS:
        # nothing to reuse: its key is made once its loads have given the fingerprints
        done = run.manifest.run(name, lambda: stage.key(run, item), outputs, lambda: stage.compute(run, item))
        run.parts[name] = stage.key(run, item)
        run.runs[name] = done
        return done
    parts = stage.key(run, item)
    run.parts[name] = parts

    def compute():
        found = _done_elsewhere(run, name, stable_hash(parts), outputs) if stage.name in REUSABLE else None
        return _copy_stage(run, name, found, outputs) if found else stage.compute(run, item)

    done = run.manifest.run(name, parts, outputs, compute)
    run.runs[name] = done
    return done


def _after(run: Run, stage: Stage) -> None:
    """What a stage's result means for the next ones."""
    import pandas as pd

    if stage.name == "reps_{item}" and run.finite is not None:  # every model's weights were read: checked
        fc = run.finite
        fc.tested_before()
        run.manifest.record("finite_check", [run.modelset.fingerprints.all()], fc.seconds, not fc.tested,
                            {"done_by": "the representation stages' loads", "weight_sets": len(fc.total),
                             "tested_now": len(fc.tested), "tested_before": len(fc.before)})
    elif stage.name == "typical":
        run.typical_idx = run.runs["typical"].result["sample_idx"]
        log.info("typical samples: %d distinct over %d layers (k=%d)", len(run.typical_idx), run.num_groups,
                 run.cfg.typical.k)
    elif stage.name == "weights":
        run.table = pd.read_parquet(io.BytesIO(run.run_dir.read_bytes("weights.parquet")))
        sat = sorted(set(run.table.loc[run.table["saturated"], "layer"].astype(int)))
        if sat:
            log.warning("similarity saturated in %d of %d layers %s: the kernel does not tell models apart there"
                        " and the weights are a constant (see docs/design.md 'Saturation'; try normalize: l2,"
                        " sigma: median or a temperature)", len(sat), run.num_groups, _ranges(sat))


def run_pipeline(cfg: RunConfig, plan: Plan | None = None) -> PipelineResult:
    """Run (or resume) the whole job. Ray must already be up (cluster.runtime.ray_runtime).
    `plan`: this config's `preflight`, when the caller already made it (before Ray)."""
    plan = plan if plan is not None else preflight(cfg)
    created = not output_exists(cfg.run_dir)
    try:
        return _run(cfg, plan)
    except CheckpointError:
        # an input refused by the stages' reads (NaN/Inf in a weight, a tensor cut short)
        # leaves no run directory behind, as preflight's refusals do, unless the directory
        # was there before or holds a fine-tuned adapter (which a rerun reuses)
        if created and not recorded_stages(cfg.run_dir).get("finetune"):
            fs, path = filesystem(cfg.run_dir)
            fs.delete_dir(path)
        raise


def _run(cfg: RunConfig, plan: Plan) -> PipelineResult:
    run_dir = RunDir(cfg.run_dir)
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"))
    run = Run(plan, run_dir, manifest)

    new = plan.new
    if new is None:  # fine-tune the new model when the config has none (or asks for it)
        key = [ModelTensors(plan.base).fingerprint(), plan.data_hash, cfg.task.template, cfg.finetune.key()]
        manifest.run("finetune", key, [_finetune_dir(run)], lambda: _finetune(run, None))
        name = cfg.new_model.name if cfg.new_model and cfg.new_model.name else "new"
        new = resolve_model(name, _finetune_dir(run), plan.base.path, cfg.allow_pickle)
    run.models = [plan.base, *plan.experts, new]
    run.modelset = plan.modelset or check_models(run.models, cfg.architecture, cfg.merge.head_group)
    if cfg.merge.check_finite:  # done by the representation stages' loads
        run.finite = FiniteCheck(run.models)
    run.keys_after_reads = not (set(manifest.data["stages"]) - {"finetune"}) and not cfg.reuse_from

    def record_inputs() -> None:
        models = {m.label: {"kind": m.kind, "path": m.path, "fingerprint": run.fp(m.label),
                            **({"base_check": run.modelset.base_checks[m.label]}
                               if m.label in run.modelset.base_checks else {})}
                  for m in run.models}
        manifest.record_inputs({
            "models": models,
            "task_data": {"path": str(Path(cfg.task.data).resolve()), "sha256": plan.data_hash},
            # what the fingerprints read of the tensors for themselves (none when the
            # representation loads gave them all)
            "fingerprint_bytes_read": run.modelset.fingerprints.bytes_read,
        })

    if not run.keys_after_reads:
        record_inputs()
    # prompt and target apart: the representation stage cuts them as the fine-tune does (core.sft.keep_end)
    run.items = [{"sample_idx": i, "sample_id": r["sample_id"], "text": r["prompt"] + r["target"],
                  "prompt": r["prompt"], "target": r["target"]} for i, r in enumerate(plan.records)]

    for stage in STAGES:
        if not stage.when(run):
            continue
        for item in (stage.items(run) if stage.items else [None]):
            run_stage(run, stage, item)
        _after(run, stage)
        if run.keys_after_reads and stage.name == "reps_{item}":  # every fingerprint is known now
            record_inputs()

    scores = _evaluate(run, None) if _evaluating(run) else None
    merge = run.runs["merge"].result or {}
    sat = sorted(set(run.table.loc[run.table["saturated"], "layer"].astype(int)))
    return PipelineResult(cfg.output_dir, cfg.run_dir, run.table, manifest.timings, len(run.typical_idx), sat,
                          stable_hash(_merged_content(run)), merge.get("peak_rss_mb"), merge.get("peak_anon_mb"),
                          scores)


def _extract(models: list[ResolvedModel], items: list[dict], run: Run, rels: list[str], stage: str):
    from .cluster.representations import extract

    r, fc = run.cfg.representations, run.finite
    report = extract(models, items, run.run_dir, rels, max_length=run.cfg.task.max_length,
                     exclude_first_token=r.exclude_first_token, dtype=r.dtype, batch_size=r.batch_size,
                     num_actors=r.num_actors, stage=stage, check_finite=fc is not None,
                     on_checked=fc.checked if fc else None, weights_owner=fc.owner if fc else None,
                     tested=fc.tested | fc.before if fc else ())
    if fc is not None:
        fc.seconds += report.check_seconds
    return report


# --------------------------------------------------------------- any method as a stage

def merge_method_key(models: list[ResolvedModel], modelset: ModelSet, method: MergeMethod,
                     merge_cfg: MergeConfig, weights_from: Any = None) -> list:
    """What decides a merge's contents. With `weights_from` (the key of what the method's
    weights were computed from: RECALL's similarities, the models' losses) that key stands
    for the weights: computed again on another machine they differ in their last bits, and
    the key is to name the same merge wherever it is computed (the scenarios cache scores by
    it). Without it the weights are part of the key (they are settings, or fixed)."""
    desc = dataclasses.asdict(method)
    if weights_from is not None:
        desc = {**{k: v for k, v in desc.items() if k != "weights"}, "weights_from": weights_from}
    return [[modelset.fingerprints[m.label] for m in models], desc, merge_cfg.key()]


def merge_method_compute(models: list[ResolvedModel], modelset: ModelSet, method: MergeMethod, out: str,
                         merge_cfg: MergeConfig, resume_key: str | None = None) -> dict:
    """Merge `models` by `method` into `out`, with its mergekit.yaml; `resume_key` (the
    stage's key) lets a rerun keep the shards an interrupted run finished."""
    from .cluster.merge import run_merge
    from .mergekit_export import mergekit_file

    report = run_merge(models, modelset.grouping, modelset.infos, method, out, True, merge_cfg.num_actors,
                       merge_cfg.placement, merge_cfg.max_shard_bytes, side_dir=models[0].weights_dir,
                       extra_files=mergekit_file(method, models, modelset), resume_key=resume_key)
    return {"output": out, "seconds": report.seconds, "resumed_shards": report.resumed, "events": report.events}


def merge_stage(manifest: Manifest, name: str, models: list[ResolvedModel], modelset: ModelSet, method: MergeMethod,
                out: str, merge_cfg: MergeConfig, weights_from: Any = None) -> str:
    """Merge `models` by `method` into `out` as a resumable stage; returns the merge's key
    (merge_method_key, with `weights_from` when its weights were computed). The stage's own
    key always holds the weights' values: this directory's output is of its own weights."""
    parts = merge_method_key(models, modelset, method, merge_cfg)
    key = manifest.run(name, parts, [out], lambda: merge_method_compute(models, modelset, method, out, merge_cfg,
                                                                        resume_key=stable_hash(parts))).key
    return key if weights_from is None else stable_hash(merge_method_key(models, modelset, method, merge_cfg,
                                                                         weights_from))


def _ranges(xs: list[int]) -> str:
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return "[" + ", ".join(out) + "]"


__all__ = ["run_pipeline", "preflight", "FiniteCheck", "PipelineError", "PipelineResult", "Plan", "STAGES",
           "CheckpointError", "ModelMismatchError", "merge_stage", "weights_matrix"]
