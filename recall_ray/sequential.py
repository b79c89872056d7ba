"""The sequential scenario (paper Table 7, Figure 5): tasks learned one after another.

Protocol (one YAML, one run directory; every step resumable):

    M_0 = S_0 = base
    for step t = 1..T, task t:
      chain X (for each merge method X in `chains`, e.g. recall):
        E_t^X = LoRA fine-tune of M_{t-1}^X on task t's train split
        M_t^X = merge X of (base, M_{t-1}^X, E_t^X), the base at index 0 (the reference);
                at t = 1 there is no M_0 apart from the base: merge X of (base, E_1)
                RECALL's typical samples come from task t's train split only
      SeqFT (when `seqft`):
        S_t   = S_{t-1} with the LoRA fine-tuned on task t folded in (plain sequential
                fine-tuning; E_1 is shared with the chains, which start from the same base)
      score every M_t^X and S_t on the test split of tasks 1..t

Writes scores.csv (step, trained, method, task, metric, value, n), table.csv / table.md
(primary metric per task after each step, and the mean over the tasks seen so far),
plots/forgetting.png and, per step, RECALL's weight and similarity plots.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import model_validator

from .baselines import METHODS, BaselineConfig
from .config import FinetuneConfig, RayConfig, RunConfig, _Section
from .manifest import Manifest
from .metrics import primary_metric
from .models import resolve_model, resolve_path
from .report import markdown_table
from .scenarios import (
    RecallSettings,
    ScenarioEval,
    check_inputs,
    evaluate_stage,
    merge_methods,
    recall_run_config,
    variant_plots,
)
from .splits import load_split
from .storage import RunDir

log = logging.getLogger("recall_ray.sequential")


class SequentialConfig(_Section):
    scenario: Literal["sequential"]
    run_dir: str
    base: str = "builtin:smollm2-135m-instruct"
    data_dir: str = "data"
    tasks: list[str]  # in the order they are learned
    chains: list[str] = ["recall"]  # merge methods that each carry their own chain of models
    seqft: bool = True
    finetune: FinetuneConfig = FinetuneConfig(steps=60, batch_size=8, max_length=128, seed=0)
    task_finetune: dict[str, dict] = {}  # per-task FinetuneConfig overrides, e.g. {squad_v2: {max_length: 256}}
    baselines: BaselineConfig = BaselineConfig()
    recall: RecallSettings = RecallSettings()
    evaluate: ScenarioEval = ScenarioEval()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> "SequentialConfig":
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty sequence without repeats, got {self.tasks}")
        bad = [c for c in self.chains if c not in METHODS]
        if bad:
            raise ValueError(f"unknown chains {bad}: choose merge methods from {', '.join(METHODS)}")
        if not self.chains and not self.seqft:
            raise ValueError("nothing to run: give at least one chain or set seqft: true")
        stray = sorted(set(self.task_finetune) - set(self.tasks))
        if stray:
            raise ValueError(f"task_finetune names tasks {stray} that are not in tasks {self.tasks}")
        for t in self.tasks:
            self.finetune_for(t)  # a bad override fails here, before any work
        return self

    def finetune_for(self, task: str) -> FinetuneConfig:
        return FinetuneConfig(**{**self.finetune.model_dump(), **self.task_finetune.get(task, {})})


def preflight(cfg: SequentialConfig) -> None:
    check_inputs(cfg.tasks, cfg.run_dir, cfg.base, cfg.data_dir, cfg.recall.max_samples, cfg.evaluate)


def _merge_config(cfg: SequentialConfig, step: int, task: str, chain: str, previous: str | None, adapter: str,
                  start: str) -> RunConfig:
    """Step `step`'s merge of chain `chain`: base, the previous merge (none at step 1) and
    the adapter fine-tuned from it."""
    return recall_run_config(
        cfg.recall, cfg.ray, f"{cfg.run_dir.rstrip('/')}/step{step}/{chain}/recall", cfg.base,
        [{"name": "previous", "path": previous}] if previous else [],
        {"name": task, "path": adapter, "adapter_base": start}, True, task, cfg.data_dir)


def run_sequential(cfg: SequentialConfig):
    """Run (or resume) the whole sequence. Ray must be up."""
    from .finetune import finetune_lora
    from .merge import run_merge
    from .merge_methods import MergeMethod
    from .scenarios import ScenarioResult
    from .validate import check_models

    preflight(cfg)
    root = RunDir(cfg.run_dir)
    manifest = Manifest(root, cfg.model_dump(mode="json"))
    base_path = resolve_path(cfg.base)
    current = {c: base_path for c in cfg.chains}  # M_{t-1} per chain
    current_key = {c: "base" for c in cfg.chains}  # what decided its contents
    if cfg.seqft:
        current["seqft"] = base_path
        current_key["seqft"] = "base"
    all_scores = []
    for step, task in enumerate(cfg.tasks, start=1):
        ft = cfg.finetune_for(task)
        records = load_split(cfg.data_dir, task, "train", max_samples=ft.max_samples)
        data_key = hashlib.sha256(repr([(r["prompt"], r["target"]) for r in records]).encode()).hexdigest()
        # One fine-tune per distinct starting model (at step 1 every chain starts from the base).
        adapters: dict[str, str] = {}
        adapter_key: dict[str, str] = {}  # start -> the fine-tune stage's key
        for label, start in current.items():
            if start in adapters:
                continue
            out = str(Path(cfg.run_dir, f"step{step}", "finetune", label, "adapter").resolve())

            def finetune(start=start, out=out, label=label) -> dict:
                import shutil

                shutil.rmtree(out, ignore_errors=True)  # a stale adapter of other settings
                finetune_lora(start, records, ft, out,
                              str(Path(cfg.run_dir, f"step{step}", "finetune", label, "ray_train").resolve()), task=task)
                return {"adapter": out}

            manifest.run(f"step{step}/finetune_{label}", [current_key[label], data_key, ft.model_dump()],
                         [out], finetune)
            adapters[start] = out
            adapter_key[start] = manifest.data["stages"][f"step{step}/finetune_{label}"]["key"]
        nxt, nxt_key = {}, {}
        for chain in cfg.chains:
            start = current[chain]
            rc = _merge_config(cfg, step, task, chain, None if step == 1 else start, adapters[start], start)
            merged = merge_methods(rc, [chain], cfg.baselines, cfg.data_dir, root, f"step{step}/{chain}", manifest)
            nxt[chain], nxt_key[chain] = merged.outputs[chain], merged.keys[chain]
            if merged.recall_dir is not None:
                variant_plots(root, f"step{step}_{chain}", Path(merged.recall_dir))
        if cfg.seqft:
            start = current["seqft"]
            out = root.uri(f"step{step}/seqft/model")
            models = [resolve_model("previous", start, start), resolve_model(task, adapters[start], start)]
            ms = check_models(models)
            fold = MergeMethod("seqft", "linear", [[0.0, 1.0]] * ms.grouping.num_groups)  # exactly the adapted model

            def fold_stage(models=models, ms=ms, out=out, fold=fold) -> dict:
                rep = run_merge(models, ms.grouping, ms.infos, fold, out, True, cfg.recall.merge.num_actors,
                                cfg.recall.merge.placement, cfg.recall.merge.max_shard_bytes, side_dir=start)
                return {"output": out, "seconds": rep.seconds}

            manifest.run(f"step{step}/seqft_fold", [current_key["seqft"], adapter_key[start]], [out], fold_stage)
            nxt["seqft"], nxt_key["seqft"] = out, manifest.data["stages"][f"step{step}/seqft_fold"]["key"]
        current, current_key = nxt, nxt_key
        to_score = [resolve_model(label, path, base_path) for label, path in current.items()]
        scores = evaluate_stage(to_score, cfg.tasks[:step], cfg.evaluate, cfg.data_dir,
                                cfg.recall.representations.num_actors, root, f"step{step}", manifest, current_key)
        all_scores.append(scores.assign(step=step, trained=task))
    scores = pd.concat(all_scores, ignore_index=True).rename(columns={"model": "method"})
    scores = scores[["step", "trained", "method", "task", "metric", "value", "n"]]
    table = sequence_table(scores)
    root.write_text("scores.csv", scores.to_csv(index=False, float_format="%.4f"))
    root.write_text("table.csv", table.to_csv(index=False, float_format="%.2f"))
    root.write_text("table.md", markdown_table(table))
    from .analysis import figure_png, plot_forgetting

    root.write_bytes("plots/forgetting.png",
                     figure_png(plot_forgetting(scores, {t: primary_metric(t) for t in cfg.tasks})))
    return ScenarioResult(scores, table, manifest.timings)


def sequence_table(scores: pd.DataFrame) -> pd.DataFrame:
    """A row per (step, method): the primary metric of every task seen so far, and their mean."""
    prim = scores[[primary_metric(t) == m for t, m in zip(scores["task"], scores["metric"])]]
    wide = prim.pivot_table(index=["step", "method"], columns="task", values="value", aggfunc="mean", sort=False)
    wide = wide[list(dict.fromkeys(prim["task"]))]
    wide["mean_seen"] = wide.mean(axis=1, skipna=True)
    return wide.reset_index()
