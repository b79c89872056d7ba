"""Score models on tasks with the paper's metrics: greedy generation through a Ray Data
actor pool, prompts from the fine-tuning templates.

    python jobs/evaluate.py --model merged=runs/default/merged --model ag_news=adapters/ag_news \\
        --tasks sst2 medmcqa ag_news --max-samples 50 --out runs/eval

A model is a Hugging Face directory or a LoRA adapter directory on --base (default: the
builtin SmolLM2-135M-Instruct). Writes <out>/scores.json, scores.csv (model, task, metric,
value, n), scores.md, predictions.jsonl and job.log (everything the console does not show:
Ray Data's records, its workers' output), and prints one progress line and the table. Joins
RAY_ADDRESS if set, else starts local Ray. Exit status 0 on success; otherwise one line on
stderr (2: bad input, found before any generation; 1: a failure).

With --harness lm-eval (the `harness` extra), lm-evaluation-harness scores the same models
instead, one Ray task per model, on configs written for the closed-label tasks (the same
records, prompts and options; `acc` = our loglik accuracy) and on any lm-eval task named
with --lm-eval-tasks whose data is local (its YAML's folder given with --lm-eval-include):

    python jobs/evaluate.py --harness lm-eval --model merged=runs/default/merged \
        --tasks sst2 ag_news medmcqa race --max-samples 50 --out runs/eval_lm_eval

It writes scores.csv (same columns), scores.md, lm_eval_results.json (lm-eval's results per
model), lm_eval_samples.jsonl (per-sample choices) and lm_eval_tasks/ (the configs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's recall_ray, not whichever one pip installed
from recall_ray.cli import guarded, pin_checkout, setup_logging  # noqa: E402

pin_checkout(REPO)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a model to score (repeatable): Hugging Face directory or LoRA adapter on --base")
    p.add_argument("--base", default="builtin:smollm2-135m-instruct", help="base model of adapter models")
    p.add_argument("--tasks", nargs="*", default=[], help="task names (data/<task>/, template of the same name)")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="test.jsonl, or the validation tail held out from train.jsonl")
    p.add_argument("--max-samples", type=int, default=None, help="first N samples of each task's split")
    p.add_argument("--data-dir", default=str(REPO / "data"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-actors", default="auto")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray this job starts (default: every core); each actor runs torch on"
                   " its share, so 1 gives one thread, far faster than two on a machine whose cores are oversubscribed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--protocol", default="loglik", choices=["loglik", "generate"],
                   help="closed-label tasks (SST-2, AG News, MedMCQA, RACE): the option the model finds most likely"
                   " (loglik), or greedy generation; SQuAD 2.0 and IWSLT always generate")
    p.add_argument("--templates", default="default", choices=["default", "paper"],
                   help="the prompts: the templates the adapters were trained on, or the paper's (Table 6)")
    p.add_argument("--normalization", default="sum", choices=["sum", "mean"],
                   help="rank a closed task's options by the sum of their tokens' log-probabilities, or the mean")
    p.add_argument("--harness", default="recall-ray", choices=["recall-ray", "lm-eval"],
                   help="the evaluator: recall-ray's own, or lm-evaluation-harness (pip install -e '.[harness]')")
    p.add_argument("--lm-eval-tasks", nargs="+", default=[], metavar="TASK",
                   help="with --harness lm-eval: lm-eval tasks to run besides --tasks (their data must be local)")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="with --harness lm-eval: a folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def resolve_models(specs: list[str], base: str) -> list:
    from recall_ray.io.models import resolve_model, resolve_path

    base_path = resolve_path(base)
    models = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--model {spec!r}: expected NAME=PATH, e.g. --model merged=runs/default/merged")
        name, path = spec.split("=", 1)
        models.append(resolve_model(name, path, base_path))
    return models


def check_harness_args(args: argparse.Namespace) -> None:
    """The options --harness lm-eval cannot honour, refused before any work."""
    if args.harness != "lm-eval":
        if args.lm_eval_tasks or args.lm_eval_include:
            raise ValueError("--lm-eval-tasks and --lm-eval-include need --harness lm-eval")
        return
    if args.protocol != "loglik":
        raise ValueError("--harness lm-eval scores the closed-label tasks by log-likelihood: drop --protocol generate")
    if args.normalization != "sum":
        raise ValueError("--harness lm-eval reports acc, the option of largest summed log-likelihood: use"
                         " --normalization sum (lm-eval's acc_norm divides by bytes, not tokens)")


def run_harness(args: argparse.Namespace, models: list):
    """--harness lm-eval: every check, then one Ray task per model (recall_ray.harness)."""
    from recall_ray import harness
    from recall_ray.cluster.runtime import ray_runtime
    from recall_ray.config import RayConfig

    plan = harness.plan(args.tasks, args.data_dir, args.split, args.max_samples, args.templates,
                        args.lm_eval_tasks, args.lm_eval_include, models)  # every check before Ray starts
    num_tasks = args.num_actors if args.num_actors == "auto" else int(args.num_actors)
    with ray_runtime(RayConfig(num_cpus=args.num_cpus)):
        result = harness.evaluate(models, plan, args.batch_size, args.dtype, num_tasks)
    harness.write_result(result, args.out, plan, {
        "harness": "lm-eval", "lm_eval_version": harness.require_lm_eval(), "split": args.split,
        "max_samples": args.max_samples, "templates": args.templates, "dtype": args.dtype,
        "models": {m.label: m.path for m in models}})
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    t0 = time.perf_counter()
    if args.harness == "lm-eval":  # no hub access at run time: before anything imports datasets
        for k, v in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
            os.environ.setdefault(k, v)

    def run():
        import logging

        if args.max_samples is not None and args.max_samples <= 0:
            raise ValueError(f"--max-samples must be positive, got {args.max_samples}")
        if args.num_cpus is not None and args.num_cpus <= 0:
            raise ValueError(f"--num-cpus must be positive, got {args.num_cpus}")
        check_harness_args(args)
        models = resolve_models(args.models, args.base)
        if args.harness == "lm-eval":
            return run_harness(args, models)
        from recall_ray.cluster.runtime import ray_runtime
        from recall_ray.config import RayConfig
        from recall_ray.evaluate import evaluate_models, preflight, write_result

        items = preflight(models, args.tasks, args.data_dir, args.split, args.max_samples, args.protocol,
                          args.templates)  # every check before Ray starts
        num_actors = args.num_actors if args.num_actors == "auto" else int(args.num_actors)
        with ray_runtime(RayConfig(num_cpus=args.num_cpus)):
            result = evaluate_models(models, args.tasks, args.data_dir, args.split, args.max_samples,
                                     args.batch_size, num_actors, args.dtype, items=items,
                                     normalization=args.normalization)
        write_result(result, args.out, {"split": args.split, "max_samples": args.max_samples,
                                        "protocol": args.protocol, "normalization": args.normalization,
                                        "templates": args.templates,
                                        "models": {m.label: m.path for m in models}})
        # the job's records, held until now, go to <out>/job.log (cli.RunLogHandler)
        logging.getLogger("recall_ray.evaluate").info("scores written to %s", args.out, extra={"run_dir": args.out})
        return result

    status, result = guarded("evaluate", args.verbose, run)
    if status:
        return status
    if args.harness == "lm-eval":
        from recall_ray.evaluate import wide_table

        print(f"\n=== lm-eval scores ({args.split} split) ===")
        print(wide_table(result.scores).to_string(float_format=lambda v: f"{v:.3f}") if len(result.scores) else "(none)")
        print(f"\nwritten to {args.out} (scores.csv, scores.md, lm_eval_results.json, lm_eval_samples.jsonl,"
              f" lm_eval_tasks/); {time.perf_counter() - t0:.1f}s")
        return 0
    print(f"\n=== scores ({args.split} split) ===")
    print(result.wide.to_string(float_format=lambda v: f"{v:.1f}"))
    print(f"\nwritten to {args.out} (scores.json, scores.csv, scores.md, predictions.jsonl, job.log);"
          f" {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
