"""Choose each long expert's training budget on validation, by the rule fixed in its config.

    python jobs/choose_budget.py --config configs/adapters/forgetting.yaml --publish docs/results/forgetting_budget

For every task of an adapters config trained as a ladder (`finetune.snapshot_every`, see
jobs/train_adapters.py), every whole-epoch snapshot in runs/ladders/<config name>/<task>/ is a
rung. The base and every rung are scored on the validation split (the last 200 records of
train.jsonl, never trained on): each rung on its own task and on the general-ability probe
(ARC-Easy by default), the base on all of them. Paired with the base, a rung is accepted when
it is better on its own task and worse on the probe, each by a one-sided exact sign test at
p < 0.05 (IWSLT: its reference log-likelihood per token, since exact match is 0 for every
model); each expert takes its smallest accepted rung, else its largest (recall_ray.core.budget).
A rung that went on from an earlier rung's adapter alone (train_adapters --warm-start: the
optimizer restarted) names that rung's step in the table's warm_start column.
The chosen adapters are copied to the config's `out/<task>/` (adapter files and
recall_ray.json); budget.csv / budget.md go to --out, the scores (scores.csv / scores.md /
predictions.jsonl) to --out/eval/, each model's cached per task under --out/eval_cache/ (a
rerun with the next expert scores only its rungs); with --publish, all are written there too,
over what is there: rows of tasks and models this run did not score stay, so a run of one new
expert on a machine without the earlier ladders completes the published tables.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's recall_ray, not whichever one pip installed
from recall_ray.cli import guarded, pin_checkout, setup_logging  # noqa: E402

pin_checkout(REPO)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "recall_ray.json")
LOGLIK_OWN = {"iwslt2017_en_fr"}  # own task judged by the reference's log-likelihood per token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="an adapters config trained as a ladder")
    p.add_argument("--general", default="arc_easy", help="the general-ability probe (a task with a train.jsonl)")
    p.add_argument("--tasks", nargs="+", help="only these tasks of the config")
    p.add_argument("--out", default=None, help="working directory (default runs/budget/<config name>)")
    p.add_argument("--publish", default=None, help="copy the tables here too (e.g. docs/results/forgetting_budget)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    def run():
        import pandas as pd

        from recall_ray.cluster.finetune import snapshot_path, snapshot_steps
        from recall_ray.cluster.runtime import ray_runtime
        from recall_ray.config import ConfigError, FinetuneConfig, RayConfig, load_tree
        from recall_ray.core.budget import Rung, choose_rung, paired_counts_of
        from recall_ray.evaluate import evaluation_stage, preflight
        from recall_ray.io.models import ModelTensors, resolve_model, resolve_path
        from recall_ray.io.storage import RunDir
        from recall_ray.manifest import Manifest
        from recall_ray.io.splits import load_split
        from recall_ray.studies.common import eval_hits, read_predictions

        stem = Path(args.config).stem
        spec = load_tree(args.config, (), "adapters config")
        tasks = args.tasks or list(spec["tasks"])
        base_path = resolve_path(spec["base"])
        models, rungs_of = [resolve_model("base", base_path, base_path)], {}
        for task in tasks:
            if task not in spec["tasks"]:
                raise ConfigError(f"task {task!r} is not in {args.config}")
            cfg = FinetuneConfig(**{**spec.get("finetune", {}), **(spec["tasks"][task] or {})})
            n = len(load_split(REPO / "data", task, spec.get("split", "train"), max_samples=cfg.max_samples))
            epoch = math.ceil(n / cfg.batch_size)
            ladder = REPO / "runs" / "ladders" / stem / task
            steps = [s for s in snapshot_steps(str(ladder)) if s % epoch == 0]
            if not steps:
                raise ConfigError(f"no whole-epoch snapshot of {task} in {ladder}: train the ladder first"
                                  f" (python jobs/train_adapters.py --config {args.config} --tasks {task})")
            rungs_of[task] = [(f"{task}@{s // epoch}ep", s, snapshot_path(str(ladder), s)) for s in steps]
            models += [resolve_model(label, path, base_path) for label, _, path in rungs_of[task]]
        every = tasks + [args.general]
        only = {label: [task, args.general] for task in tasks for label, _, _ in rungs_of[task]}
        items = preflight(models, every, REPO / "data", "validation", None)
        out = Path(args.out or REPO / "runs" / "budget" / stem)
        # a resumable stage whose scores are cached per model content and task (evaluate.
        # evaluation_stage): the base and the rungs of experts chosen before are not scored
        # again when the next expert's ladder lands
        run_dir = RunDir(str(out))
        manifest = Manifest(run_dir, {"config": args.config, "general": args.general, "tasks": tasks})
        manifest.record_inputs({"models": {m.label: m.path for m in models}})
        keys = {m.label: ModelTensors(m).fingerprint() for m in models}
        with ray_runtime(RayConfig()):
            evaluation_stage(manifest, run_dir, "", models, every, REPO / "data", "validation", None, 16, "auto",
                             keys, only, items=items)
        scored = out / "eval"

        # sorted once: a partial .loc on an unsorted MultiIndex warns (pandas' PerformanceWarning,
        # on the console) at every rung
        hits = eval_hits(scored / "predictions.jsonl").set_index(["model", "task", "sample_id"])["hit"].sort_index()
        preds = read_predictions(scored / "predictions.jsonl")
        loglik = preds.assign(sample_id=preds["sample_id"].astype(str)).set_index(
            ["model", "task", "sample_id"]).sort_index()
        rows, chosen = [], {}
        for task in tasks:
            ladder = []
            for label, steps, path in rungs_of[task]:
                own = loglik["ref_logprob"] if task in LOGLIK_OWN else hits
                ob, ow = paired_counts_of(own.loc[label, task].sort_index().to_numpy(),
                                          own.loc["base", task].sort_index().to_numpy())
                ga, gb = paired_counts_of(hits.loc[label, args.general].sort_index().to_numpy(),
                                          hits.loc["base", args.general].sort_index().to_numpy())
                ladder.append(Rung(steps, own_better=ob, own_worse=ow, general_worse=gb, general_better=ga))
            pick, met = choose_rung(ladder)
            chosen[task] = next(path for _, s, path in rungs_of[task] if s == pick.steps)
            for (label, steps, path), r in zip(rungs_of[task], ladder):
                rows.append({"task": task, "model": label, "steps": steps, "own_better": r.own_better,
                             "own_worse": r.own_worse, "p_learns": r.p_learns, "general_worse": r.general_worse,
                             "general_better": r.general_better, "p_forgets": r.p_forgets,
                             "accepted": r.accepted(), "chosen": steps == pick.steps, "rule_met": met,
                             "warm_start": warm_start_of(str(Path(path).parent), steps)})
        table = pd.DataFrame(rows)
        table.to_csv(out / "budget.csv", index=False, float_format="%.4g")
        (out / "budget.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
        dest_root = REPO / spec["out"]
        for task, src in chosen.items():
            dest = dest_root / task
            tmp = dest_root / f".{task}.tmp-budget"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copy2(Path(src) / name, tmp / name)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        if args.publish:
            publish(Path(args.publish), table, scored)
        return table, dest_root

    status, result = guarded("choose_budget", args.verbose, run)
    if status:
        return status
    table, dest_root = result
    print(table.to_string(index=False))
    print(f"\nchosen adapters copied to {dest_root}/<task>")
    return 0


def warm_start_of(ladder: str, steps: int) -> str:
    """"" for a rung of `ladder` trained without a break in its optimizer's state; for one that
    went on from an earlier rung's adapter alone (train_adapters --warm-start), that rung's step."""
    from recall_ray.cluster.finetune import ladder_warm_start

    record = ladder_warm_start(ladder, steps)
    return "" if record is None else str(record["step"])


def publish(pub: Path, table, scored: Path) -> None:
    """budget.csv / budget.md and the scores (scores.csv / scores.md / predictions.jsonl) into
    `pub`, over what an earlier run published there: its rows of other tasks and models stay
    (studies.common.replace_rows), so that experts trained and chosen on different machines,
    one run each, end in one table; this run's rows (the base's included) replace theirs. A
    budget row is one rung: a later run that holds only an expert's newer rungs (a snapshot
    carried to a new machine) keeps the earlier rungs' rows."""
    import pandas as pd

    from recall_ray.evaluate import EvalResult, result_files
    from recall_ray.studies.common import read_predictions, replace_rows

    pub.mkdir(parents=True, exist_ok=True)
    scores = pd.read_csv(scored / "scores.csv")
    preds = read_predictions(scored / "predictions.jsonl")
    if (pub / "budget.csv").exists():
        earlier = pd.read_csv(pub / "budget.csv")
        # this run chose its tasks' rungs: an earlier rung kept beside them is not chosen any more
        met = dict(zip(table["task"], table["rule_met"]))
        mine = earlier["task"].isin(list(met))
        earlier["chosen"] = earlier["chosen"] & ~mine
        earlier["rule_met"] = [met.get(t, m) for t, m in zip(earlier["task"], earlier["rule_met"])]
        table = replace_rows(earlier, table, ["task", "model"])
        if "warm_start" in table:  # rows published before the column: no warm start then
            table["warm_start"] = table["warm_start"].fillna("").astype(str).str.replace(r"\.0$", "", regex=True)
    if (pub / "scores.csv").exists() and (pub / "predictions.jsonl").exists():
        scores = replace_rows(pd.read_csv(pub / "scores.csv"), scores, ["model", "task"])
        preds = replace_rows(read_predictions(pub / "predictions.jsonl"), preds, ["model", "task"])
    files = {"budget.csv": table.to_csv(index=False, float_format="%.4g"),
             "budget.md": table.to_markdown(index=False, floatfmt=".4g") + "\n"}
    written = result_files(EvalResult(scores, preds))
    files.update({name: written[name] for name in ("scores.csv", "scores.md", "predictions.jsonl")})
    for name, text in files.items():  # each whole, then moved into place
        tmp = pub / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, pub / name)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    code = main()
    print(f"total: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    sys.exit(code)
