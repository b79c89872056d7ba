"""Fine-tune a LoRA adapter of a base model on one task, through Ray Train.

    python jobs/finetune.py --base MODEL --data FILE.jsonl --template NAME --out DIR \\
        [--run-dir DIR] [--task NAME] [--set finetune.key=value ...]

MODEL is a Hugging Face directory or a builtin name (builtin:smollm2-135m-instruct), as in
the merge job. Joins the Ray cluster in RAY_ADDRESS if set, else starts a local Ray (stopped
on exit). The adapter (adapter_config.json, adapter_model.safetensors, recall_ray.json) goes
to --out, which must not exist yet; the job's working files go to --run-dir (default
<out>.run/): job.log (everything the console does not show: Ray Train's records, its workers'
output) and ray_train/ (Ray Train's run and checkpoints). The console shows one progress line
and the result. Exit status 0 on success; otherwise one line `finetune: error: ...` on stderr
and status 2 (bad arguments, config, model or data, found before Ray starts) or 1 (the
training itself failed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's recall_ray, not whichever one pip installed
from recall_ray.cli import guarded, pin_checkout, setup_logging  # noqa: E402

pin_checkout(REPO)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model: Hugging Face model directory, its s3:// URI, or builtin:<name>")
    p.add_argument("--data", required=True, help="task data: JSONL file")
    p.add_argument("--template", required=True, help="prompt template name (recall_ray.core.templates.TEMPLATES)")
    p.add_argument("--out", required=True, help="adapter output directory or s3:// URI (must not exist)")
    p.add_argument("--run-dir", default=None,
                   help="job.log and Ray Train's run and checkpoints (ray_train/) go here (default: <out>.run; on a"
                   " multi-node cluster a shared path or a bucket's URI)")
    p.add_argument("--task", default=None, help="task name recorded in recall_ray.json (default: the template)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="finetune.KEY=VALUE",
                   help="override a FinetuneConfig field, e.g. --set finetune.steps=100 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def build_finetune_config(overrides: list[str]):
    """FinetuneConfig from `finetune.key=value` overrides; ConfigError with one line otherwise."""
    from recall_ray.config import ConfigError, FinetuneConfig, apply_override, validate

    tree: dict = {"finetune": {}}
    for assignment in overrides:
        try:
            apply_override(tree, assignment)
        except (ValueError, IndexError) as err:
            raise ConfigError(str(err)) from None
    extra = sorted(set(tree) - {"finetune"})
    if extra:
        raise ConfigError(f"only finetune.* keys can be set here, got {', '.join(extra)} (e.g. --set finetune.steps=100)")
    if not isinstance(tree["finetune"], dict):
        raise ConfigError("--set finetune=...: set individual keys, e.g. --set finetune.steps=100")
    return validate(FinetuneConfig, tree["finetune"], prefix="finetune")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    def run() -> str:
        import logging

        from recall_ray.cluster.finetune import finetune_lora, validate_inputs
        from recall_ray.config import RayConfig
        from recall_ray.core.templates import check_trainable, load_task_records
        from recall_ray.io.models import resolve_path
        from recall_ray.io.storage import RunDir

        check_trainable(args.template)  # the general-ability sets are never trained on
        cfg = build_finetune_config(args.overrides)
        base = resolve_path(args.base)  # a builtin name, as the merge job takes it
        records = load_task_records(args.data, args.template, max_samples=cfg.max_samples)
        validate_inputs(base, records, cfg, args.out)  # before Ray (or torch) is imported: --out is free
        # a local path or a bucket's URI (s3://...), for the base, --out and --run-dir alike
        run_dir = RunDir(args.run_dir or f"{args.out.rstrip('/')}.run").location()
        logging.getLogger("recall_ray.finetune").info("run directory %s", run_dir, extra={"run_dir": run_dir})
        from recall_ray.cluster.runtime import ray_runtime

        with ray_runtime(RayConfig()):
            return finetune_lora(base, records, cfg, args.out, f"{run_dir}/ray_train",
                                 task=args.task or args.template)

    status, out = guarded("finetune", args.verbose, run)
    if not status:
        print(f"adapter written to {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
