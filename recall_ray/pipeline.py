"""The RECALL job, stage by stage, on Ray. Each stage's core is a pure function in its own
module; this file decides what runs where, checks inputs before any work, and records
every stage in the manifest so that a rerun resumes.

    preflight -> [finetune] -> reps (new model, all task data) -> typical (KMeans per layer)
              -> reps (every other model, typical samples) -> weights -> merge
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import RayConfig, RunConfig
from .manifest import Manifest, stable_hash
from .merge_methods import MergeMethod
from .models import ModelTensors, ResolvedModel, resolve_model, resolve_path
from .safetensors_io import CheckpointError
from .similarity import layer_similarity, saturated_layers, softmax_weights
from .storage import RunDir, refuse_existing_output
from .templates import load_task_records
from .typical import TooFewSamplesError, union_in_order
from .validate import ModelMismatchError, ModelSet, check_models, raise_if_nonfinite

log = logging.getLogger("recall_ray.pipeline")


class PipelineError(ValueError):
    """Bad input found before any work."""


@dataclass
class PipelineResult:
    output: str
    run_dir: str
    table: pd.DataFrame
    timings: dict[str, dict]
    typical_count: int
    saturated: list[int]
    merge_peak_rss_mb: float | None = None
    merge_peak_anon_mb: float | None = None
    scores: pd.DataFrame | None = None  # evaluation (model, task, metric, value, n), when asked for


# ---------------------------------------------------------------------------- preflight

@dataclass
class Plan:
    cfg: RunConfig
    base: ResolvedModel
    experts: list[ResolvedModel]
    new: ResolvedModel | None  # None: fine-tuned by the job
    records: list[dict]
    data_hash: str
    modelset: ModelSet | None  # checked in preflight when every model already exists
    eval_items: list | None = None  # evaluation prompts and references, checked in preflight


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preflight(cfg: RunConfig) -> Plan:
    """Every check that needs no model forward pass. Raises before anything is written."""
    base_path = resolve_path(cfg.base.path)
    base = resolve_model(cfg.base.name or "base", cfg.base.path, base_path, cfg.allow_pickle)
    if base.kind != "hf":
        raise PipelineError(f"base {cfg.base.path} is an adapter; `base` must be a full Hugging Face model directory")
    def own_base(spec) -> str:
        return resolve_path(spec.adapter_base) if spec.adapter_base else base_path

    experts = [resolve_model(e.label, e.path, own_base(e), cfg.allow_pickle) for e in cfg.experts]
    new = None
    if cfg.new_model is not None and not cfg.finetune.enabled:
        new = resolve_model(cfg.new_model.name or "new", cfg.new_model.path, own_base(cfg.new_model), cfg.allow_pickle)
    labels = [base.label] + [e.label for e in experts] + [new.label if new else "new"]
    if len(set(labels)) != len(labels):
        raise PipelineError(f"model names must be distinct, got {labels}: set `name` on the models")
    if new is None and not cfg.experts and not cfg.include_base:
        raise PipelineError("nothing to merge the new model with: add `experts` or set include_base: true")

    records = load_task_records(cfg.task.data, cfg.task.template, cfg.task.max_samples)
    if len(records) < cfg.typical.k:
        raise TooFewSamplesError(
            f"task data {cfg.task.data} has {len(records)} usable samples (task.max_samples={cfg.task.max_samples})"
            f" but typical.k={cfg.typical.k}: KMeans needs at least k samples; add data or lower typical.k"
        )
    if not _is_own_output(cfg):
        refuse_existing_output(cfg.output_dir, cfg.overwrite)
    models = [base, *experts] + ([new] if new else [])
    modelset = check_models(models, cfg.architecture, cfg.merge.head_group) if len(models) >= 2 else None
    eval_items = None
    if cfg.evaluate.tasks:
        from .evaluate import preflight as eval_preflight

        if "://" in cfg.output_dir or "://" in cfg.run_dir:
            raise PipelineError("evaluate.tasks loads the merged models on this machine: use a local run_dir and"
                                " output, or leave evaluate.tasks empty")
        ev = cfg.evaluate
        eval_items = eval_preflight([base], ev.tasks, ev.data_dir, ev.split, ev.max_samples)
    return Plan(cfg, base, experts, new, records, _file_hash(cfg.task.data), modelset if new else None, eval_items)


def _is_own_output(cfg: RunConfig) -> bool:
    """An output this run directory's manifest says it produced (a rerun may reuse it)."""
    import json

    from pyarrow.fs import FileType

    from .storage import filesystem

    fs, root = filesystem(cfg.run_dir)
    path = f"{root.rstrip('/')}/{Manifest.FILE}"
    if fs.get_file_info(path).type != FileType.File:
        return False
    with fs.open_input_stream(path) as f:
        stage = json.loads(f.read()).get("stages", {}).get("merge", {})
    return stage.get("status") == "done" and (stage.get("result") or {}).get("output") == cfg.output_dir


# ------------------------------------------------------------------------- Ray helpers

def _finite_scan(models: list[ResolvedModel]) -> None:
    """NaN/Inf check, one Ray task per distinct weight set (the base is read once)."""
    import ray

    from .validate import nonfinite_tensors

    scan = ray.remote(num_cpus=0.5)(nonfinite_tensors)
    seen: dict[tuple, ResolvedModel] = {}
    for m in models:
        key = (m.weights_dir, m.path if m.kind == "adapter" else None)
        seen.setdefault(key, m)
    refs = {m.label: scan.remote(m) for m in seen.values()}
    raise_if_nonfinite({label: ray.get(r) for label, r in refs.items()})


def _extract(models: list[ResolvedModel], items: list[dict], cfg: RunConfig, run_dir: RunDir, rels: list[str]) -> None:
    """Run `items` (sample_idx, sample_id, text) through each of `models` with one Ray Data
    actor pool and write each model's per-layer representations to Parquet at its `rels[i]`
    (staged, then moved). Several models share the pool: rows sorted by model, one model
    loaded per actor at a time, a write partitioned by model whose partitions are moved into
    place."""
    import ray

    from .representations import RepresentationExtractor, pool_resources

    many = len(models) > 1
    rows = [{"model": q, **it} for q in range(len(models)) for it in items] if many else items
    pool = pool_resources(ray.cluster_resources(), cfg.representations.num_actors, len(rows))
    tmp = run_dir.tmp_name(rels[0] if not many else "reps/_pool")
    log.info("representations of %s: %d samples each, %d actor(s) x %.2f CPU / %d GPU", [m.label for m in models],
             len(items), pool["size"], pool["num_cpus"], pool["num_gpus"])
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // cfg.representations.batch_size, 64)))
    ds = ds.map_batches(
        RepresentationExtractor,
        fn_constructor_kwargs={
            "model": models if many else models[0], "max_length": cfg.task.max_length,
            "exclude_first_token": cfg.representations.exclude_first_token,
            "dtype": cfg.representations.dtype, "num_threads": pool["threads"],
        },
        batch_size=cfg.representations.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool["size"]),
        num_cpus=pool["num_cpus"],
        num_gpus=pool["num_gpus"],
    )
    if not many:
        ds.write_parquet(run_dir.uri(tmp))
        run_dir.replace_dir(tmp, rels[0])
        return
    ds.write_parquet(run_dir.uri(tmp), partition_cols=["model"])
    for q, rel in enumerate(rels):
        run_dir.replace_dir(f"{tmp}/model={q}", rel)
    run_dir.delete(tmp)


def _kmeans_all_layers(reps_uri: str, num_layers: int, cfg: RunConfig) -> list[list[int]]:
    """One Ray task per layer, each reading only its column; returns sample_idx per layer."""
    import ray

    from .representations import read_layer
    from .typical import typical_indices

    @ray.remote(num_cpus=0.5)
    def kmeans_layer(layer: int) -> list[int]:
        idx, x = read_layer(reps_uri, layer)
        chosen = typical_indices(x, cfg.typical.k, cfg.typical.seed, cfg.typical.n_init)
        return [int(idx[i]) for i in chosen]

    refs = [kmeans_layer.remote(i) for i in range(num_layers)]
    out = []
    for i, r in enumerate(refs):
        out.append(ray.get(r))
        log.info("typical: layer %d/%d clustered", i + 1, num_layers)
    return out


# ------------------------------------------------------------------------------ stages

def run_pipeline(cfg: RunConfig, plan: Plan | None = None) -> PipelineResult:
    """Run (or resume) the whole job. Ray must already be initialised (see `connect_ray`).
    `plan`: this config's `preflight`, when the caller already made it."""
    plan = plan if plan is not None else preflight(cfg)
    run_dir = RunDir(cfg.run_dir)
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"))
    base, experts = plan.base, plan.experts

    # Fine-tune the new model when the config has none (or asks for it).
    new = plan.new
    if new is None:
        new = _finetune_stage(plan, run_dir, manifest)

    models = [base, *experts, new]  # merge order; the base is the reference (index 0)
    modelset: ModelSet = plan.modelset or check_models(models, cfg.architecture, cfg.merge.head_group)
    manifest.record_inputs({
        "models": {m.label: {"kind": m.kind, "path": m.path, "fingerprint": modelset.fingerprints[m.label]} for m in models},
        "task_data": {"path": str(Path(cfg.task.data).resolve()), "sha256": plan.data_hash},
    })
    if cfg.merge.check_finite:
        manifest.run("finite_check", [modelset.fingerprints], [], lambda: _finite_scan(models))

    num_layers = modelset.arch.num_layers(modelset.hf_config)
    items = [{"sample_idx": i, "sample_id": r["sample_id"], "text": r["prompt"] + r["target"]}
             for i, r in enumerate(plan.records)]
    reps_opts = [cfg.task.max_length, cfg.representations.exclude_first_token, cfg.representations.dtype]

    # Representations of the new model on all of the new task's data.
    new_rel = f"reps/{new.label}"
    new_key = [modelset.fingerprints[new.label], plan.data_hash, cfg.task.model_dump(), reps_opts]
    manifest.run("reps_new", new_key, [run_dir.uri(new_rel)],
                 lambda: _extract([new], items, cfg, run_dir, [new_rel]))

    # Typical samples: KMeans per layer on the new model's representations.
    typical_key = [new_key, cfg.typical.model_dump()]

    def typical_stage() -> dict:
        per_layer = _kmeans_all_layers(run_dir.uri(new_rel), num_layers + 1, cfg)
        order, chosen_by = union_in_order(per_layer)
        table = pa.table({
            "sample_idx": pa.array(order, pa.int64()),
            "sample_id": [items[i]["sample_id"] for i in order],
            "text": [items[i]["text"] for i in order],
            "chosen_by_layers": pa.array([chosen_by[i] for i in order], pa.list_(pa.int32())),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf)
        run_dir.write_bytes("typical.parquet", buf.getvalue())
        return {"count": len(order), "sample_idx": order}

    typical = manifest.run("typical", typical_key, [run_dir.uri("typical.parquet")], typical_stage)
    typical_idx = typical["sample_idx"]
    log.info("typical samples: %d distinct over %d layers (k=%d)", len(typical_idx), num_layers + 1, cfg.typical.k)

    # Representations of every other model on the typical samples: one actor pool for all
    # the models whose stage is not done (each model's stage keeps its own key, so adding an
    # expert computes that expert alone).
    typical_items = [items[i] for i in typical_idx]
    rel_of = {new.label: new_rel}
    others = [m for m in models if m is not new]
    keys = {m.label: [modelset.fingerprints[m.label], typical_key, reps_opts] for m in others}
    for m in others:
        rel_of[m.label] = f"reps/{m.label}"
    todo = [m for m in others if not manifest.done(f"reps_{m.label}", stable_hash(keys[m.label]))]

    def pool_stage() -> dict:  # the first pending model's stage runs the pool for all of them
        _extract(todo, typical_items, cfg, run_dir, [rel_of[m.label] for m in todo])
        return {"pool_models": [m.label for m in todo]}

    for i, m in enumerate(todo):
        manifest.run(f"reps_{m.label}", keys[m.label], [run_dir.uri(rel_of[m.label])],
                     pool_stage if i == 0 else (lambda: {"pool_of": todo[0].label}))
    for m in others:  # the reused ones: recorded as skipped
        if m not in todo:
            manifest.run(f"reps_{m.label}", keys[m.label], [run_dir.uri(rel_of[m.label])], dict)

    # Similarities and weights (small: on the driver, one layer at a time).
    weigh_labels = ([base.label] if cfg.include_base else []) + [e.label for e in experts] + [new.label]
    weights_key = [typical_key, {lbl: modelset.fingerprints[lbl] for lbl in weigh_labels}, reps_opts,
                   cfg.similarity.model_dump(), cfg.include_base]
    manifest.run("weights", weights_key, [run_dir.uri("weights.parquet"), run_dir.uri("weights.csv")],
                 lambda: _weights_stage(run_dir, rel_of, weigh_labels, new.label, typical_idx, num_layers, cfg))
    table = pd.read_parquet(io.BytesIO(run_dir.read_bytes("weights.parquet")))
    sat = sorted(set(table.loc[table["saturated"], "layer"].astype(int)))
    if sat:
        log.warning("similarity saturated in %d of %d layers %s: the kernel does not tell models apart there and"
                    " the weights are a constant (see DESIGN.md; try normalize: l2, sigma: median or a temperature)",
                    len(sat), num_layers + 1, _ranges(sat))

    # Merge (base column 0 when the base does not take part; it stays the reference).
    w = weights_matrix(table, [m.label for m in models], num_layers + 1)
    merge_key = [weights_key, stable_hash(w.round(12).tolist()), cfg.merge.model_dump(exclude={"num_actors"}),
                 cfg.output_dir, [modelset.fingerprints[m.label] for m in models]]
    merge_result = manifest.run("merge", merge_key, [cfg.output_dir],
                                lambda: _merge_stage(models, modelset, w, table, typical_idx, cfg, run_dir))
    scores = None
    if plan.eval_items is not None:
        scores = _evaluate_stage(plan, models, modelset, merge_key, run_dir, manifest)
    return PipelineResult(cfg.output_dir, cfg.run_dir, table, manifest.timings, len(typical_idx), sat,
                          (merge_result or {}).get("peak_rss_mb"), (merge_result or {}).get("peak_anon_mb"), scores)


def merge_stage(manifest: Manifest, name: str, models: list[ResolvedModel], modelset: ModelSet, method: MergeMethod,
                out: str, merge_cfg) -> str:
    """Merge `models` by `method` into `out` (with its mergekit.yaml) as a resumable stage."""
    from .merge import run_merge
    from .mergekit_export import mergekit_file

    key = [[modelset.fingerprints[m.label] for m in models], dataclasses.asdict(method),
           merge_cfg.model_dump(exclude={"num_actors"})]

    def run() -> dict:
        report = run_merge(models, modelset.grouping, modelset.infos, method, out, True, merge_cfg.num_actors,
                           merge_cfg.placement, merge_cfg.max_shard_bytes, side_dir=models[0].weights_dir,
                           extra_files=mergekit_file(method, models, modelset))
        return {"output": out, "seconds": report.seconds}

    manifest.run(name, key, [out], run)
    return manifest.data["stages"][name]["key"]


def _evaluate_stage(plan: Plan, models: list[ResolvedModel], modelset: ModelSet, merge_key: list, run_dir: RunDir,
                    manifest: Manifest) -> pd.DataFrame:
    """Baseline merges beside the RECALL merge, then the new model alone, each baseline and
    the RECALL merge scored side by side on the evaluation tasks."""
    from .evaluate import evaluation_stage
    from .merge_methods import uniform_weights

    cfg, ev = plan.cfg, plan.cfg.evaluate
    new = models[-1]
    to_score, keys = [new], {new.label: modelset.fingerprints[new.label]}
    for name in ev.baselines:
        out = run_dir.uri(f"baselines/{name}")
        method = MergeMethod(name, "linear", uniform_weights(modelset.grouping.num_groups, len(models),
                                                             include_base=cfg.include_base))
        keys[name] = merge_stage(manifest, f"baseline_{name}", models, modelset, method, out, cfg.merge)
        to_score.append(resolve_model(name, out, models[0].path))
    to_score.append(resolve_model("recall", cfg.output_dir, models[0].path))
    keys["recall"] = stable_hash(merge_key)
    return evaluation_stage(manifest, run_dir, "", to_score, ev.tasks, ev.data_dir, ev.split, ev.max_samples,
                            ev.batch_size, cfg.representations.num_actors, keys, items=plan.eval_items)


def weights_matrix(table: pd.DataFrame, labels: list[str], num_groups: int) -> np.ndarray:
    """[G, K] merge weights in merge order from the weights table (a model that does not
    take part, e.g. the base with include_base false, keeps weight 0)."""
    w = np.zeros((num_groups, len(labels)))
    col = {label: q for q, label in enumerate(labels)}
    for row in table.itertuples():
        w[int(row.layer), col[row.model]] = row.weight
    return w


def _finetune_stage(plan: Plan, run_dir: RunDir, manifest: Manifest) -> ResolvedModel:
    from .finetune import finetune_lora

    cfg = plan.cfg
    if "://" in cfg.run_dir:
        raise PipelineError("fine-tuning writes its adapter locally: use a local run_dir, or give `new_model`")
    out = str(Path(cfg.run_dir, "finetune", "adapter").resolve())
    ft_records = load_task_records(cfg.task.data, cfg.task.template, cfg.finetune.max_samples)
    key = [ModelTensors(plan.base).fingerprint(), plan.data_hash, cfg.task.template, cfg.finetune.model_dump()]

    def run() -> dict:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # a stale adapter from other settings
        finetune_lora(plan.base.path, ft_records, cfg.finetune, out, str(Path(cfg.run_dir, "finetune", "ray_train").resolve()))
        return {"adapter": out}

    manifest.run("finetune", key, [out], run)
    name = cfg.new_model.name if cfg.new_model and cfg.new_model.name else "new"
    return resolve_model(name, out, plan.base.path, cfg.allow_pickle)


def _weights_stage(run_dir: RunDir, rel_of: dict[str, str], labels: list[str], new_label: str, typical_idx: list[int],
                   num_layers: int, cfg: RunConfig) -> dict:
    from .report import plot_png
    from .representations import read_layer

    sc = cfg.similarity
    new_q = labels.index(new_label)
    keep = np.asarray(typical_idx)
    rows = []
    for layer in range(num_layers + 1):
        reps = []
        for lbl in labels:
            idx, x = read_layer(run_dir.uri(rel_of[lbl]), layer)
            pos = {int(s): j for j, s in enumerate(idx)}
            reps.append(x[[pos[int(s)] for s in keep]])  # same samples, same order for every model
        ls = layer_similarity(reps, new_q, sc.kernel, sc.sigma, sc.normalize, sc.pairing)
        wts = softmax_weights(ls.similarity[None, :], sc.temperature)[0]
        norm = float(np.linalg.norm(reps[new_q], axis=1).mean())
        for q, lbl in enumerate(labels):
            rows.append({"layer": layer, "model": lbl, "sq_distance": float(ls.sq_dist[q]),
                         "similarity": float(ls.similarity[q]), "weight": float(wts[q]), "sigma": ls.sigma,
                         "new_rep_norm": norm})
    table = pd.DataFrame(rows)
    sim = table.pivot(index="layer", columns="model", values="similarity")[labels].to_numpy()
    sat = set(saturated_layers(sim, new_q))
    table["saturated"] = table["layer"].isin(sat)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    run_dir.write_bytes("weights.parquet", buf.getvalue())
    run_dir.write_text("weights.csv", table.to_csv(index=False, float_format="%.10g"))
    run_dir.write_bytes("plots/similarity.png", plot_png(table, "similarity", "similarity to the new model"))
    run_dir.write_bytes("plots/weights.png", plot_png(table, "weight", "merge weight"))
    run_dir.write_bytes("plots/sq_distance.png", plot_png(table, "sq_distance", "mean squared distance", log_scale=True))
    for layer in range(num_layers + 1):
        sub = table[table["layer"] == layer]
        log.info("layer %2d: sq_dist %s | sim %s | w %s%s", layer,
                 " ".join(f"{v:.3g}" for v in sub["sq_distance"]), " ".join(f"{v:.3g}" for v in sub["similarity"]),
                 " ".join(f"{v:.3f}" for v in sub["weight"]), "  SATURATED" if layer in sat else "")
    return {"layers": num_layers + 1, "saturated": sorted(sat)}


def _merge_stage(models: list[ResolvedModel], modelset: ModelSet, w: np.ndarray, table: pd.DataFrame,
                 typical_idx: list[int], cfg: RunConfig, run_dir: RunDir) -> dict:
    from .merge import run_merge
    from .mergekit_export import mergekit_file
    from .report import model_card

    card = model_card(
        [{"label": m.label, "kind": m.kind, "path": m.path} for m in models], table,
        "\n".join(f"{k}: {v}" for k, v in {
            "similarity": cfg.similarity.model_dump(), "typical": cfg.typical.model_dump(),
            "include_base": cfg.include_base, "head_group": cfg.merge.head_group}.items()),
        len(typical_idx),
    )
    method = MergeMethod("recall", "linear", w)
    report = run_merge(models, modelset.grouping, modelset.infos, method, cfg.output_dir, cfg.overwrite,
                       cfg.merge.num_actors, cfg.merge.placement, cfg.merge.max_shard_bytes,
                       side_dir=models[0].weights_dir, card=card,
                       extra_files={"recall_weights.csv": table.to_csv(index=False, float_format="%.10g"),
                                    **mergekit_file(method, models, modelset)})
    return {"output": cfg.output_dir, "seconds": report.seconds, "peak_rss_mb": report.peak_rss_mb,
            "peak_anon_mb": report.peak_anon_mb,
            "shards": [{k: s[k] for k in ("file", "bytes", "seconds", "peak_rss_mb", "peak_anon_mb", "node_id")}
                       for s in report.shards]}


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


def connect_ray(ray_cfg: RayConfig) -> bool:
    """Join a cluster (config address or RAY_ADDRESS, as under `ray job submit`) or start a
    local runtime. Returns True when this process started Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a laptop run needs no token auth
    ray.init(address="local", num_cpus=ray_cfg.num_cpus, object_store_memory=ray_cfg.object_store_memory,
             configure_logging=False, **own_dashboard())
    return True


def own_dashboard() -> dict:
    """ray.init arguments for a local runtime whose processes ask their own dashboard.

    Ray Train's placement-group cleaner asks the state API, from inside the cluster, every
    second whether the run's controller is alive, and removes the workers' placement group
    when told it is not. Left to find "the" local cluster itself, it fails without a
    dashboard and, with another Ray instance on the machine (a test suite, a second job),
    can ask that one, hear "no such actor" and kill a healthy fine-tune (seen after 15 min
    of training here). So the runtime gets a dashboard on a free port of 127.0.0.1, and
    RAY_API_SERVER_ADDRESS names it in this process's environment, which the raylet and
    every worker inherit. Call it just before `ray.init`, and `release_dashboard` after
    `ray.shutdown`."""
    port = _free_port()
    _replaced_api_server.append(os.environ.get(_API_SERVER_ENV))
    os.environ[_API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_replaced_api_server: list[str | None] = []  # what each own_dashboard() call replaced


def release_dashboard() -> None:
    """After `ray.shutdown` of a runtime started with `own_dashboard`: put back the
    RAY_API_SERVER_ADDRESS it replaced, so that Ray clients of this process (the state API,
    a later cluster join) do not ask a dashboard that no longer exists."""
    if _replaced_api_server:
        previous = _replaced_api_server.pop()
        if previous is None:
            os.environ.pop(_API_SERVER_ENV, None)
        else:
            os.environ[_API_SERVER_ENV] = previous


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


__all__ = ["run_pipeline", "connect_ray", "own_dashboard", "release_dashboard", "preflight", "PipelineError", "CheckpointError", "ModelMismatchError"]
