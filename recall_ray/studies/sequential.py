"""The sequential scenario (paper Table 7, Figure 5): tasks learned one after another.

Protocol (one YAML, one run directory; every step resumable):

    M_0 = S_0 = base
    for step t = 1..T, task t:
      chain X (for each merge method X in `chains`, e.g. recall, and each protocol of
      `merge_with`):
        E_t^X = LoRA fine-tune of M_{t-1}^X on task t's train split
        M_t^X = merge X of (M_{t-1}^X, E_t^X)            merge_with: previous (the paper's
                Section 4.3: "the current model is merged with the previously accumulated
                one"); the base is only the numerical reference, with no weight (label X)
              = merge X of (base, M_{t-1}^X, E_t^X)      merge_with: previous_and_base, the
                base one of the weighted models (label X_with_base)
                at t = 1 there is no M_0 apart from the base: merge X of (base, E_1), the
                same merge for both protocols (computed once, as is E_2, which both chains
                then fine-tune from the same M_1)
                RECALL's typical samples come from task t's train split only
      SeqFT (when `seqft`):
        S_t   = S_{t-1} with the LoRA fine-tuned on task t folded in (plain sequential
                fine-tuning; E_1 is shared with the chains, which start from the same base)
      EWC (when `ewc.enabled`; a training-side baseline, recall_ray/ewc.py):
        E_t^ewc = LoRA fine-tune of S^ewc_{t-1} on task t, its loss plus
                  ewc.lam / 2 * sum(F_{<t} * delta^2), delta the LoRA delta (= the move away
                  from S^ewc_{t-1}) and F_{<t} the accumulated Fisher of tasks 1..t-1; at t = 1
                  there is none: E_1^ewc is the shared E_1 and S^ewc_1 = S_1
        S^ewc_t = S^ewc_{t-1} with E_t^ewc folded in (as SeqFT)
        F_{<t+1} = F_{<t} + the diagonal Fisher of S^ewc_t on the first ewc.fisher_samples
                  records of task t's train split (step{t}/ewc/fisher.safetensors)
      score every M_t^X, S_t and S^ewc_t on the test split of tasks 1..t (of every task with
      evaluate.all_tasks, as the paper's Table 7 does)

Writes scores.csv (step, trained, method, task, metric, value, n, protocol), table.csv /
table.md (primary metric per task after each step, the mean over the tasks seen so far and,
with evaluate.all_tasks, over all tasks; each with its 95% bootstrap interval),
kept_delta.csv / kept_delta_summary.csv (the share of each task's delta each RECALL chain
keeps after every later step, from its weights: kept_delta), ewc_penalty.csv (the EWC
penalty's share of the loss at each penalised fine-tune), plots/forgetting.png and, per
step, RECALL's weight and similarity plots. Every fine-tune,
fold, Fisher and evaluation is a manifest stage keyed by what decides its output: a rerun
recomputes nothing that is done. `export_adapters` copies a run's step adapters out (small:
LoRA only); a later run given them as `adapters:` copies each one whose stage key and
starting model match instead of training it, so the tables regenerate without retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from ..config import BaselineConfig, ConfigError, FinetuneConfig, RayConfig, RecallSettings, RunConfig, Section
from ..core.merge_methods import METHODS
from ..core.metrics import primary_metric
from ..core.templates import is_general
from ..manifest import Manifest, stable_hash
from ..io.models import made_by, resolve_model, resolve_path, write_made_by
from ..io.splits import load_split
from ..io.storage import RunDir, replace_json
from .common import (StudyEval, StudyResult, check_inputs, eval_hits, evaluate_stage, interval_markdown,
                     interval_table, merge_all, recall_run_config, variant_plots)

log = logging.getLogger("recall_ray.sequential")


class EwcSettings(Section):
    """The EWC line (recall_ray/ewc.py). `lam` weighs the penalty against the task loss (the
    mean NLL per target token); the Fisher is of each example's summed target NLL, so with
    lam = 1 the penalty is the quadratic estimate of the old tasks' mean loss increase *per
    example*, weighed like the new task's loss per token. A default, not a tuned value."""

    enabled: bool = False
    lam: float = Field(1.0, ge=0)  # 0: no penalty, the line is SeqFT (and shares its fine-tunes)
    fisher_samples: int = Field(64, gt=0)  # the first records of each task's train split


class SequentialConfig(Section):
    scenario: Literal["sequential"]
    run_dir: str
    base: str = "builtin:smollm2-135m-instruct"
    data_dir: str = "data"
    tasks: list[str]  # in the order they are learned
    chains: list[str] = ["recall"]  # merge methods that each carry their own chain of models
    # what each chain's step t >= 2 merges: "previous" (M_{t-1}, E_t), the paper's protocol, or
    # "previous_and_base" (base, M_{t-1}, E_t), the base weighted too; both: two chains side by side
    merge_with: list[Literal["previous", "previous_and_base"]] = ["previous"]
    seqft: bool = True
    ewc: EwcSettings = EwcSettings()
    finetune: FinetuneConfig = FinetuneConfig(steps=60, batch_size=8, max_length=128, seed=0)
    task_finetune: dict[str, dict] = {}  # per-task FinetuneConfig overrides, e.g. {squad_v2: {max_length: 256}}
    # Step adapters exported by an earlier run (export_adapters; jobs/scenario.py --export-adapters):
    # a fine-tune whose stage key and starting model match an exported one copies it instead of
    # training, so the tables regenerate without retraining; any other step is trained.
    adapters: str | None = None
    baselines: BaselineConfig = BaselineConfig()
    recall: RecallSettings = RecallSettings()
    evaluate: StudyEval = StudyEval()
    ray: RayConfig = RayConfig()

    @field_validator("merge_with", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "SequentialConfig":
        if not self.merge_with or len(set(self.merge_with)) != len(self.merge_with):
            raise ValueError(f"merge_with must list previous and/or previous_and_base once each, got {self.merge_with}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty sequence without repeats, got {self.tasks}")
        bad = [c for c in self.chains if c not in METHODS]
        if bad:
            raise ValueError(f"unknown chains {bad}: choose merge methods from {', '.join(METHODS)}")
        with_base = [c for c in self.chains if METHODS[c].needs_base]
        if with_base and "previous" in self.merge_with:
            raise ValueError(f"chains {with_base} average the base in: use them with merge_with: previous_and_base")
        if not self.chains and not self.seqft and not self.ewc.enabled:
            raise ValueError("nothing to run: give at least one chain, or set seqft: true or ewc.enabled: true")
        stray = sorted(set(self.task_finetune) - set(self.tasks))
        if stray:
            raise ValueError(f"task_finetune names tasks {stray} that are not in tasks {self.tasks}")
        for t in self.tasks:
            self.finetune_for(t)  # a bad override fails here, before any work
        if self.ewc.enabled:
            targets = {t: self.finetune_for(t).target_modules for t in self.tasks}
            if len({tuple(v) for v in targets.values()}) > 1:
                raise ValueError(f"ewc needs the same finetune.target_modules for every task (the Fisher is kept for"
                                 f" the LoRA-targeted weights), got {targets}")
            if any(self.finetune_for(t).deepspeed for t in self.tasks):
                raise ValueError("ewc is not supported with finetune.deepspeed: unset one of them")
        return self

    def finetune_for(self, task: str) -> FinetuneConfig:
        return FinetuneConfig(**{**self.finetune.model_dump(), **self.task_finetune.get(task, {})})

    def chain_lines(self) -> list[tuple[str, str, bool]]:
        """(label, merge method, whether steps >= 2 weigh the base) of every chain: `recall`
        merges (M_{t-1}, E_t), `recall_with_base` (base, M_{t-1}, E_t)."""
        return [(c if m == "previous" else f"{c}_with_base", c, m == "previous_and_base")
                for c in self.chains for m in self.merge_with]


def preflight(cfg: SequentialConfig) -> None:
    check_inputs(cfg.tasks, cfg.run_dir, cfg.base, cfg.data_dir, cfg.recall.max_samples, cfg.evaluate)
    if cfg.adapters is not None and not Path(cfg.adapters).is_dir():
        raise ConfigError(f"adapters: {cfg.adapters} is not a directory of exported step adapters: export them with"
                          " `python jobs/scenario.py --config <sequential.yaml> --export-adapters DIR`, or remove"
                          " the key to train every step")


def _merge_config(cfg: SequentialConfig, step: int, task: str, label: str, previous: str | None, adapter: str,
                  start: str, with_base: bool) -> RunConfig:
    """Step `step`'s merge of chain `label`: the previous merge and the adapter fine-tuned
    from it, the base weighted beside them when `with_base`; at step 1 (no previous merge)
    the base and the adapter."""
    def recall_dir(line: str) -> str:
        return f"{cfg.run_dir.rstrip('/')}/step{step}/{line}/recall"

    # the step's other chains: where they merge the same previous model and adapter (the two
    # protocols share step 1 and E_2), their representations are the same
    others = [recall_dir(line) for line, *_ in cfg.chain_lines() if line != label]
    return recall_run_config(
        cfg.recall, cfg.ray, recall_dir(label), cfg.base,
        [{"name": "previous", "path": previous}] if previous else [],
        {"name": task, "path": adapter, "adapter_base": start}, previous is None or with_base, task, cfg.data_dir,
        others)


def kept_delta(steps: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """The share of each task's delta a merge chain keeps after every later step, per layer
    group, from the chain's RECALL weights (`steps`: (task, weights table) in order; each
    table has rows layer, model, weight, with models "base", "previous" and the step's task,
    as weights.csv).

    E_t is fine-tuned from M_{t-1}, so E_t = M_{t-1} + d_t, and a merge with (normalised)
    weights w_base + w_prev + w_new = 1 is M_t = base + (w_prev + w_new)(M_{t-1} - base)
    + w_new d_t. Task s's delta is kept at w_new(s) at its own step and multiplied by
    w_prev(u) + w_new(u) = 1 - w_base(u) at every later step u: a chain that does not weigh
    the base (merge_with: previous) keeps it whole after its own step. Rows: task,
    learned_at, after_step, layer, kept."""
    rows = []
    share, learned = {}, {}  # task -> [G] share of its delta in the current model; task -> its step
    for step, (task, w) in enumerate(steps, start=1):
        table = w.pivot_table(index="layer", columns="model", values="weight", aggfunc="first").fillna(0.0)
        total = table.sum(axis=1).to_numpy(dtype=np.float64)
        if task not in table.columns:
            raise ValueError(f"step {step}'s weights have no row for its task {task!r}: models {list(table.columns)}")
        # at step 1 the base is the model fine-tuned from (the "previous" one), not a weight on its own
        base = table["base"].to_numpy(dtype=np.float64) if step > 1 and "base" in table.columns else 0.0
        keep = 1.0 - base / total
        for t in share:
            share[t] = share[t] * keep
        share[task], learned[task] = table[task].to_numpy(dtype=np.float64) / total, step
        for t, kept in share.items():
            rows += [{"task": t, "learned_at": learned[t], "after_step": step, "layer": int(g), "kept": float(v)}
                     for g, v in zip(table.index, kept)]
    return pd.DataFrame(rows, columns=["task", "learned_at", "after_step", "layer", "kept"])


def ewc_penalty_table(metas: list[tuple[int, str, dict]]) -> pd.DataFrame:
    """How much the EWC penalty weighs in each penalised fine-tune: from (step, task, the
    adapter's recall_ray.json), the last step's task loss, its penalty (lambda included) and
    the penalty's share of their sum, penalty / (loss + penalty). A share near 0 is a
    fine-tune the penalty barely moved (it is SeqFT's)."""
    rows = []
    for step, task, meta in metas:
        loss, pen = float(meta["final_loss"]), float(meta["ewc"]["final_penalty"])
        rows.append({"step": step, "task": task, "lambda": float(meta["ewc"]["lambda"]), "final_loss": loss,
                     "final_penalty": pen, "penalty_share": pen / (loss + pen)})
    return pd.DataFrame(rows, columns=["step", "task", "lambda", "final_loss", "final_penalty", "penalty_share"])


def kept_delta_summary(kept: pd.DataFrame) -> pd.DataFrame:
    """kept_delta over the transformer blocks (every layer group but the embeddings, group
    0, which a q/v LoRA leaves unchanged): mean, min and max per (chain, task, after_step)."""
    keys = [c for c in ("chain", "task", "learned_at", "after_step") if c in kept.columns]
    blocks = kept[kept["layer"] > 0]
    out = blocks.groupby(keys, sort=False)["kept"].agg(["mean", "min", "max"]).reset_index()
    return out.rename(columns={"mean": "blocks_mean", "min": "blocks_min", "max": "blocks_max"})


def start_keys(base_path: str, labels: list[str]) -> dict[str, str]:
    """The key of every line's M_0: the base's weights (file fingerprint), so that a run
    directory resumed with another base retrains from step 1 instead of reusing adapters
    trained on the old one."""
    from ..io.safetensors_io import model_fingerprint

    fp = f"base:{model_fingerprint(base_path)}"
    return {label: fp for label in labels}


def _records_key(records: list[dict]) -> str:
    return hashlib.sha256(repr([(r["prompt"], r["target"]) for r in records]).encode()).hexdigest()


STAGE_FILE = "stage.json"  # beside an exported adapter: the fine-tune stage and key it came from
_FINETUNE_STAGE = re.compile(r"^step\d+/finetune_\w+$")


def _exports(adapters_dir: str, base_key: str, partial: bool) -> list[Path]:
    """The folders under `adapters_dir` that export_adapters wrote for a fine-tune of this
    base key (its inputs and settings, without any warm start): finished adapters, or
    (`partial`) the newest snapshots of unfinished ones."""
    found = []
    for f in sorted(Path(adapters_dir).rglob(STAGE_FILE)):
        st = json.loads(f.read_text())
        if st.get("base_key", st.get("key")) == base_key and bool(st.get("partial")) == partial:
            found.append(f.parent)
    return found


def find_prebuilt(adapters_dir: str | None, key: str, start: str) -> Path | None:
    """The adapter exported (export_adapters) under `adapters_dir` for a fine-tune stage of
    this (base) key, when it was trained on this starting model: the base fingerprint it
    recorded equals the content fingerprint of `start` (a merge recomputed on another CPU may
    differ in its last bits, and the adapter would then not fit it exactly). Found by key, not
    by stage name, so a run with other lines (whose shared step-1 stage is named after another
    line) still finds it. None otherwise: the step is trained."""
    from ..io.safetensors_io import content_fingerprint

    if adapters_dir is None:
        return None
    found = _exports(adapters_dir, key, partial=False)
    if not found:
        log.info("no adapter exported in %s for this fine-tune's inputs and settings", adapters_dir)
        return None
    want = content_fingerprint(start)
    for d in found:  # several exports may hold this key (e.g. copies of one directory): any that fits
        meta = d / "recall_ray.json"
        if not meta.is_file():
            raise ConfigError(f"{d} holds an exported adapter without the recall_ray.json that names the model it"
                              f" was trained on: export it again (jobs/scenario.py --export-adapters) or remove it")
        if json.loads(meta.read_text()).get("base_fingerprint") == want:
            return d
    if made_by(start) is not None:
        # the start is a merge or fold of this run, identified by the key of the stage that made
        # it (part of this fine-tune's key): the same model as the one the export was trained
        # on, recomputed here with other last bits. The copy is relabelled (relabel_start).
        log.info("%s: the adapter exported in %s was trained on this starting model as computed on another"
                 " machine (the same stage key, other last bits): reusing it", start, found[0])
        return found[0]
    log.warning("the adapters exported in %s for this fine-tune were trained on a starting model that differs"
                " from %s: training", ", ".join(map(str, found)), start)
    return None


def relabel_start(adapter_dir: str | Path, start: str) -> None:
    """Point a copied adapter's recall_ray.json at `start` when it was trained on the same
    model as computed elsewhere (find_prebuilt): base_fingerprint becomes start's, and
    trained_on_base_fingerprint keeps the one it was trained on."""
    from ..io.safetensors_io import content_fingerprint

    f = Path(adapter_dir, "recall_ray.json")
    meta = json.loads(f.read_text())
    want = content_fingerprint(start)
    if meta.get("base_fingerprint") != want:
        replace_json(f, {**meta, "base_fingerprint": want, "trained_on_base_fingerprint": meta.get("base_fingerprint")},
                     indent=2)


def find_partial(adapters_dir: str | None, base_key: str, start: str, ft: FinetuneConfig, task: str,
                 ewc_lambda: float) -> tuple[Path, dict] | None:
    """The furthest half-finished fine-tune of this base key exported under `adapters_dir`
    (export_adapters: the newest snapshot of a stage a stopped run left running) that is an
    earlier rung of this very training on this starting model, with its warm-start record
    (`warm_start_record`); None when there is none. A start this run labelled with the key of
    the stage that made it (`made_by`, part of `base_key`) is the model the export was trained
    on even when recomputed here with other last bits, as for find_prebuilt: the fine-tune
    warm-starts from a relabelled copy (relabel_start). One that does not fit (an unlabelled
    start of other bytes) is skipped with a warning: the step then trains from its first step."""
    from ..cluster.finetune import warm_start_record
    from ..io.safetensors_io import content_fingerprint

    if adapters_dir is None:
        return None
    found = _exports(adapters_dir, base_key, partial=True)
    fingerprint = content_fingerprint(start) if found else None
    labelled = bool(found) and made_by(start) is not None
    best = None
    for d in found:
        fp, meta = fingerprint, d / "recall_ray.json"
        if labelled and meta.is_file():  # the same model by its key: its recorded bits are not checked
            fp = json.loads(meta.read_text()).get("base_fingerprint", fingerprint)
        try:
            record = warm_start_record(str(d), ft, fp, task, ewc_lambda)
        except ValueError as err:
            log.warning("not going on from the half-finished fine-tune exported in %s: %s", d, err)
            continue
        if best is None or record["step"] > best[1]["step"]:
            best = (d, record)
    return best


SNAPSHOTS_STAGE = "stage.json"  # in a fine-tune's snapshot folder: the stage and keys it trains for


def carried_start(adapters_dir: str | None, base_key: str, start: str, snapshots: str | None, ft: FinetuneConfig,
                  task: str, ewc_lambda: float) -> tuple[Path | None, Path | None, dict | None]:
    """What a fine-tune stage goes on from, decided before its key: (a finished adapter
    exported for it, a half-finished one to warm-start from, the warm start its adapter
    records or will record). The stage key names the warm start, since an adapter that went
    on from one (the optimizer's moments restarted) is not the uninterrupted run's.

    In order: a finished export (its warm start, if any, is in its recall_ray.json); a
    half-finished export further on than this machine's own snapshots (a stopped run carried
    to a fresh machine); else this machine's snapshots, exact, or none."""
    from ..cluster.finetune import WARM_START, ladder_warm_start, snapshot_steps

    done = find_prebuilt(adapters_dir, base_key, start)
    if done is not None:
        return done, None, json.loads((done / "recall_ray.json").read_text()).get(WARM_START)
    local = snapshot_steps(snapshots) if snapshots else []
    partial = find_partial(adapters_dir, base_key, start, ft, task, ewc_lambda)
    if partial is not None and partial[1]["step"] > max(local, default=0):
        return None, partial[0], partial[1]
    return None, None, ladder_warm_start(snapshots, ft.steps) if local else None


def export_adapters(run_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy every finished fine-tune of a sequential run (its adapter files, without Ray
    Train's checkpoints) into dest/<stage>/ with a stage.json of the stage's keys, and the
    newest snapshot of every fine-tune the run left unfinished (finetune.snapshot_every) into
    dest/<stage>.partial/: the `adapters:` input of a later run, which copies the finished ones
    and warm-starts the unfinished ones (carried_start). Returns the stages exported, an
    unfinished one as "<stage>.partial".

    An export adds to `dest` and never loses an adapter: each stage folder is written whole,
    then moved into place (_place_export); a folder of that name holding another fine-tune
    (two configs sharing a run directory name their steps alike, and a rerun may train a step
    again under a new key) is kept beside it, and nothing else under `dest` (an adapters
    folder shared with other runs) is touched."""
    import shutil

    from ..cluster.finetune import snapshot_as_adapter, snapshot_steps
    from ..io.storage import discard, staging_location

    mf = Path(run_dir, Manifest.FILE)
    if not mf.is_file():
        raise FileNotFoundError(f"{run_dir} holds no run (no {Manifest.FILE}): run the sequential scenario first")
    stages = json.loads(mf.read_text())["stages"]
    done = {n: st for n, st in stages.items() if _FINETUNE_STAGE.match(n) and st.get("status") == "done"}
    unfinished = {}  # stage -> (its snapshot folder, its keys): the stage the manifest has running with this key
    for marker in sorted(Path(run_dir).glob(f"step*/finetune/*/snapshots/*/{SNAPSHOTS_STAGE}")):
        m = json.loads(marker.read_text())
        st = stages.get(m["stage"], {})
        if st.get("status") != "done" and st.get("key") == m["key"] and snapshot_steps(str(marker.parent)):
            unfinished[m["stage"]] = (marker.parent, m)
    if not done and not unfinished:
        raise FileNotFoundError(f"{run_dir} has no fine-tune stage to export (none finished, none snapshotted)")
    Path(dest).mkdir(parents=True, exist_ok=True)
    # beside dest, not in it (a run reading dest must not find a half-built export), and on its
    # file system, so that each folder moves into place whole
    tmp = staging_location(str(dest))
    try:
        for name, st in sorted(done.items()):
            src, out = Path(st["result"]["adapter"]), Path(tmp, name)
            out.mkdir(parents=True)
            for f in sorted(src.iterdir()):
                if f.is_file() and f.suffix in (".json", ".safetensors"):
                    shutil.copy2(f, out / f.name)
            trained = (st.get("result") or {}).get("trained_seconds") or st.get("seconds")  # a reused one's first cost
            base_key = (st.get("result") or {}).get("base_key", st["key"])  # runs before warm starts: the same
            (out / STAGE_FILE).write_text(json.dumps({"stage": name, "key": st["key"], "base_key": base_key,
                                                      "trained_seconds": trained}, indent=1) + "\n")
        for name, (snaps, m) in sorted(unfinished.items()):
            out = Path(tmp, f"{name}.partial")
            out.parent.mkdir(parents=True, exist_ok=True)
            meta = snapshot_as_adapter(str(snaps), str(out))
            (out / STAGE_FILE).write_text(json.dumps({"stage": name, "key": m["key"], "base_key": m["base_key"],
                                                      "partial": True, "step": meta["steps"]}, indent=1) + "\n")
        exported = sorted([*done, *(f"{n}.partial" for n in unfinished)])
        for name in exported:
            _place_export(Path(tmp, name), Path(dest, name))
        for name in done:  # the snapshot export of a fine-tune now exported finished is spent
            spent = Path(dest, f"{name}.partial")
            if spent.is_dir() and _export_key(spent) == _export_key(Path(dest, name)):
                shutil.rmtree(spent)
    finally:
        discard(tmp)
    return exported


def _export_key(folder: Path) -> str | None:
    """The base key of the fine-tune an export folder holds (its stage.json); None if none."""
    f = folder / STAGE_FILE
    if not f.is_file():
        return None
    st = json.loads(f.read_text())
    return st.get("base_key", st.get("key"))


def _place_export(built: Path, target: Path) -> None:
    """Move a finished export folder to `target`. A folder there holding the same fine-tune
    (its base key) is replaced; anything else there is kept, renamed <target>.<its key's first
    8 characters> (or .unkeyed): find_prebuilt matches by key, not by name."""
    import shutil

    if target.exists():
        old = _export_key(target)
        if old != _export_key(built):
            aside = target.with_name(f"{target.name}.{old[:8] if old else 'unkeyed'}")
            if aside.exists():  # the same fine-tune, set aside before
                shutil.rmtree(aside)
            target.rename(aside)
        else:
            shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    built.rename(target)


def run_sequential(cfg: SequentialConfig):
    """Run (or resume) the whole sequence. Ray must be up."""
    from ..cluster.finetune import finetune_lora, fisher_of
    from ..cluster.merge import run_merge
    from ..core.ewc import accumulate
    from ..core.merge_methods import MergeMethod
    from ..io.safetensors_io import load_fisher, save_fisher
    from ..validate import check_models

    preflight(cfg)
    root = RunDir(cfg.run_dir)
    manifest = Manifest(root, cfg.model_dump(mode="json"))
    base_path = resolve_path(cfg.base)
    folded = (["seqft"] if cfg.seqft else []) + (["ewc"] if cfg.ewc.enabled else [])  # lines that fold their adapter
    lines = cfg.chain_lines()
    current = {label: base_path for label in [*(c[0] for c in lines), *folded]}  # M_{t-1} per chain, S_{t-1}, S^ewc_{t-1}
    chain_weights: dict[str, list[tuple[str, pd.DataFrame]]] = {label: [] for label, *_ in lines}
    ewc_meta: list[tuple[int, str, dict]] = []  # (step, task, recall_ray.json) of every penalised fine-tune
    current_key = start_keys(base_path, list(current))  # what decided its contents
    fisher_path: str | None = None  # the EWC line's accumulated Fisher of tasks 1..t-1
    fisher_key: str | None = None  # the key of the stage that wrote it
    all_scores, all_hits = [], []
    for step, task in enumerate(cfg.tasks, start=1):
        ft = cfg.finetune_for(task)
        records = load_split(cfg.data_dir, task, "train", max_samples=ft.max_samples)
        data_key = _records_key(records)
        # One fine-tune per distinct (starting model, penalty): at step 1 every line starts from
        # the base without a penalty, so the chains, SeqFT and EWC share E_1.
        penalty = {label: fisher_path if label == "ewc" else None for label in current}
        done: dict[tuple, tuple[str, str]] = {}  # (start, penalty) -> (adapter, stage key)
        adapter_of: dict[str, str] = {}
        adapter_key: dict[str, str] = {}  # label -> the key of its fine-tune stage
        for label, start in current.items():
            job = (start, penalty[label])
            if job not in done:
                where = Path(cfg.run_dir, f"step{step}", "finetune", label).resolve()  # this fine-tune's folder
                out = str(where / "adapter")
                key_parts = [current_key[label], data_key, ft.key()]
                ewc_args = {}
                if penalty[label] is not None:
                    key_parts.append({"ewc_fisher": fisher_key, "ewc_lambda": cfg.ewc.lam})
                    ewc_args = {"ewc_fisher": penalty[label], "ewc_lambda": cfg.ewc.lam}

                stage = f"step{step}/finetune_{label}"
                base_key = stable_hash(key_parts)
                # With finetune.snapshot_every, a stopped run's fine-tune goes on from its newest
                # snapshot (a fine-tune of the long experts' budgets takes hours); the folder is
                # named by the base key, so another training never meets this one's snapshots.
                snapshots = str(where / "snapshots" / base_key[:16]) if ft.snapshot_every else None
                prebuilt, partial, warm = carried_start(cfg.adapters, base_key, start, snapshots, ft, task,
                                                        cfg.ewc.lam if penalty[label] is not None else 0.0)
                if warm is not None:  # not the uninterrupted run's adapter: neither is anything after it
                    key_parts = [*key_parts, {"warm_start": warm}]

                def finetune(start=start, out=out, where=where, ewc_args=ewc_args, stage=stage, base_key=base_key,
                             snapshots=snapshots, prebuilt=prebuilt, partial=partial,
                             key=stable_hash(key_parts)) -> dict:
                    import shutil

                    shutil.rmtree(out, ignore_errors=True)  # a stale adapter of other settings
                    if prebuilt is not None:  # the same inputs and settings: the same adapter, trained before
                        shutil.copytree(prebuilt, out, ignore=shutil.ignore_patterns(STAGE_FILE))
                        relabel_start(out, start)
                        log.info("%s: reusing the adapter exported in %s", stage, prebuilt)
                        trained = json.loads((prebuilt / STAGE_FILE).read_text()).get("trained_seconds")
                        return {"adapter": out, "prebuilt": str(prebuilt), "trained_seconds": trained,
                                "base_key": base_key}
                    if snapshots is not None:  # which stage these snapshots are, for export_adapters
                        Path(snapshots).mkdir(parents=True, exist_ok=True)
                        Path(snapshots, SNAPSHOTS_STAGE).write_text(
                            json.dumps({"stage": stage, "key": key, "base_key": base_key}, indent=1) + "\n")
                    carried = None
                    if partial is not None:  # copied into the run, labelled with this start (find_partial)
                        log.info("%s: going on from the half-finished fine-tune exported in %s", stage, partial)
                        carried = where / "carried_start"
                        shutil.rmtree(carried, ignore_errors=True)
                        shutil.copytree(partial, carried, ignore=shutil.ignore_patterns(STAGE_FILE))
                        relabel_start(carried, start)
                    finetune_lora(start, records, ft, out, str(where / "ray_train"), task=task,
                                  snapshot_dir=snapshots, warm_start=str(carried) if carried else None, **ewc_args)
                    return {"adapter": out, "base_key": base_key, **({"warm_start": str(partial)} if partial else {})}

                done[job] = (out, manifest.run(stage, key_parts, [out], finetune).key)
            adapter_of[label], adapter_key[label] = done[job]
        if penalty.get("ewc") is not None:
            ewc_meta.append((step, task, json.loads(Path(adapter_of["ewc"], "recall_ray.json").read_text())))
        nxt, nxt_key = {}, {}
        merges: dict[tuple, tuple[str, str, str | None]] = {}  # one merge per distinct input: step 1's is shared
        for label, method, with_base in lines:
            start = current[label]
            previous = None if step == 1 else start
            job = (method, start, adapter_of[label], previous is None or with_base)
            if job not in merges:
                rc = _merge_config(cfg, step, task, label, previous, adapter_of[label], start, with_base)
                merged = merge_all(rc, [method], cfg.baselines, cfg.data_dir, root, f"step{step}/{label}", manifest)
                merges[job] = (merged.outputs[method], merged.keys[method], merged.recall_dir)
                write_made_by(merged.outputs[method], merged.keys[method])  # its identity downstream
                if merged.recall_dir is not None:
                    variant_plots(root, f"step{step}_{label}", Path(merged.recall_dir))
            nxt[label], nxt_key[label], recall_dir = merges[job]
            if recall_dir is not None:
                chain_weights[label].append((task, pd.read_csv(Path(recall_dir, "weights.csv"))))
        folds: dict[tuple[str, str], tuple[str, str]] = {}  # (start, adapter) -> (model, stage key)
        for label in folded:  # SeqFT and EWC: S_t = S_{t-1} with the adapter folded in
            start, adapter = current[label], adapter_of[label]
            if (start, adapter) not in folds:  # EWC's step 1 is SeqFT's
                out = root.uri(f"step{step}/{label}/model")
                models = [resolve_model("previous", start, start), resolve_model(task, adapter, start)]
                ms = check_models(models)
                fold = MergeMethod(label, "linear", [[0.0, 1.0]] * ms.grouping.num_groups)  # exactly the adapted model

                def fold_stage(models=models, ms=ms, out=out, fold=fold, start=start) -> dict:
                    rep = run_merge(models, ms.grouping, ms.infos, fold, out, True, cfg.recall.merge.num_actors,
                                    cfg.recall.merge.placement, cfg.recall.merge.max_shard_bytes, side_dir=start)
                    return {"output": out, "seconds": rep.seconds}

                fold_key = manifest.run(f"step{step}/{label}_fold", [current_key[label], adapter_key[label]], [out],
                                        fold_stage).key
                write_made_by(out, fold_key)
                folds[(start, adapter)] = (out, fold_key)
            nxt[label], nxt_key[label] = folds[(start, adapter)]
        # F_{<t+1} = F_{<t} + Fisher of S^ewc_t on task t. At lambda 0 there is no penalty to
        # weigh it by: no Fisher, so the EWC line's fine-tunes are SeqFT's (the same stage, not
        # a second training of the same thing), as the lambda-0 candidate of the EWC selection is.
        if cfg.ewc.enabled and cfg.ewc.lam > 0:
            fisher_records = load_split(cfg.data_dir, task, "train", max_samples=cfg.ewc.fisher_samples)
            out = str(Path(cfg.run_dir, f"step{step}", "ewc", "fisher.safetensors").resolve())

            def fisher_stage(model=nxt["ewc"], previous=fisher_path, out=out, fisher_records=fisher_records) -> dict:
                fisher = fisher_of(model, fisher_records, ft.max_length, ft.target_modules, cfg.ewc.fisher_samples,
                                   use_gpu=ft.use_gpu)
                if previous is not None:
                    fisher = accumulate(load_fisher(previous), fisher)
                save_fisher(fisher, out, {"tasks": ",".join(cfg.tasks[:step])})
                return {"fisher": out, "tasks": cfg.tasks[:step], "samples": len(fisher_records)}

            fisher_key = manifest.run(f"step{step}/ewc_fisher",
                                      [nxt_key["ewc"], _records_key(fisher_records), ft.max_length,
                                       list(ft.target_modules), fisher_key], [out], fisher_stage).key
            fisher_path = out
        current, current_key = nxt, nxt_key
        to_score = [resolve_model(label, path, base_path) for label, path in current.items()]
        scored = cfg.tasks if cfg.evaluate.all_tasks else cfg.tasks[:step]  # Table 7 scores every task
        scores = evaluate_stage(to_score, scored, cfg.evaluate, cfg.data_dir,
                                cfg.recall.representations.num_actors, root, f"step{step}", manifest, dict(current_key))
        all_scores.append(scores.assign(step=step, trained=task))
        all_hits.append(eval_hits(Path(root.path(f"step{step}/eval/predictions.jsonl"))).assign(step=step))
    scores = pd.concat(all_scores, ignore_index=True).rename(columns={"model": "method"})
    scores = scores[["step", "trained", "method", *[c for c in scores.columns if c not in ("step", "trained", "method")]]]
    table = sequence_table(pd.concat(all_hits, ignore_index=True).rename(columns={"model": "method"}), cfg.tasks)
    root.write_text("scores.csv", scores.to_csv(index=False, float_format="%.4f"))
    root.write_text("table.csv", table.to_csv(index=False, float_format="%.2f"))
    root.write_text("table.md", interval_markdown(table, ["step", "method"]))
    if ewc_meta:
        root.write_text("ewc_penalty.csv", ewc_penalty_table(ewc_meta).to_csv(index=False, float_format="%.6g"))
    else:  # not one left by an earlier run of the directory
        Path(cfg.run_dir, "ewc_penalty.csv").unlink(missing_ok=True)
    kept = [kept_delta(w).assign(chain=label) for label, w in chain_weights.items() if w]
    if kept:
        kept = pd.concat(kept, ignore_index=True)[["chain", "task", "learned_at", "after_step", "layer", "kept"]]
        root.write_text("kept_delta.csv", kept.to_csv(index=False, float_format="%.6f"))
        root.write_text("kept_delta_summary.csv", kept_delta_summary(kept).to_csv(index=False, float_format="%.4f"))
    from ..analysis import figure_png, plot_forgetting

    root.write_bytes("plots/forgetting.png",
                     figure_png(plot_forgetting(scores, {t: primary_metric(t) for t in cfg.tasks})))
    return StudyResult(scores, table, manifest.timings)


def sequence_table(hits: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """A row per (step, method) from per-sample hits (step, method, task, sample_id, hit):
    each task scored at that step, "mean_seen" over the tasks learned so far (tasks[:step]),
    and, when every task was scored (evaluate.all_tasks, the paper's Table 7), "mean_all"
    over all of them; with evaluate.general_tasks, "general" over those; each with its 95%
    bootstrap interval."""
    table = interval_table(hits, ["step", "method"], groups=lambda key: {"mean_seen": tasks[:int(key[0])]})
    own = hits[~hits["task"].map(is_general).astype(bool)]  # the general-ability sets have their own column
    every = set(own["task"]) == set(tasks) and all(set(g["task"]) == set(tasks) for _, g in own.groupby("step"))
    mean = {c: c.replace("mean", "mean_all", 1) for c in ("mean", "mean_lo", "mean_hi")}
    return table.rename(columns=mean) if every and len(tasks) > 1 else table.drop(columns=list(mean))
