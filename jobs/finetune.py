"""Fine-tune a LoRA adapter of a base model on one task, through Ray Train.

    python jobs/finetune.py --base DIR --data FILE.jsonl --template NAME --out DIR \\
        [--run-dir DIR] [--task NAME] [--set finetune.key=value ...]

Joins the Ray cluster in RAY_ADDRESS if set, else starts a local Ray (stopped on exit). Ray
Train's run and checkpoints go under <run-dir>/finetune/; the adapter (adapter_config.json,
adapter_model.safetensors, recall_ray.json) goes to --out, which must not exist yet.
Exit status 0 on success; otherwise one line `error: ...` on stderr and status 2 (bad
arguments, config or data) or 1 (the training itself failed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import recall_ray.config  # noqa: F401  (installed package)
except ImportError:  # run from a checkout: make the package importable here and in Ray workers
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from pydantic import ValidationError  # noqa: E402

from recall_ray.config import ConfigError, FinetuneConfig, apply_override  # noqa: E402


class UsageError(Exception):
    """Bad arguments, config or data: exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model: Hugging Face model directory")
    p.add_argument("--data", required=True, help="task data: JSONL file")
    p.add_argument("--template", required=True, help="prompt template name (recall_ray.templates.TEMPLATES)")
    p.add_argument("--out", required=True, help="adapter output directory (must not exist)")
    p.add_argument("--run-dir", default="runs/default",
                   help="Ray Train run and checkpoints go to <run-dir>/finetune/ (a shared path or URI on a multi-node cluster)")
    p.add_argument("--task", default=None, help="task name recorded in recall_ray.json (default: the template)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="finetune.KEY=VALUE",
                   help="override a FinetuneConfig field, e.g. --set finetune.steps=100 (repeatable)")
    return p.parse_args(argv)


def build_finetune_config(overrides: list[str]) -> FinetuneConfig:
    """FinetuneConfig from `finetune.key=value` overrides; UsageError with one line otherwise."""
    tree: dict = {"finetune": {}}
    try:
        for assignment in overrides:
            apply_override(tree, assignment)
    except (ConfigError, ValueError, IndexError) as err:
        raise UsageError(str(err)) from None
    extra = sorted(set(tree) - {"finetune"})
    if extra:
        raise UsageError(f"only finetune.* keys can be set here, got {', '.join(extra)} (e.g. --set finetune.steps=100)")
    if not isinstance(tree["finetune"], dict):
        raise UsageError("--set finetune=...: set individual keys, e.g. --set finetune.steps=100")
    try:
        return FinetuneConfig.model_validate(tree["finetune"])
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = "finetune." + ".".join(str(x) for x in e["loc"])
            if e["type"] == "extra_forbidden":
                parts.append(f"unknown config key '{key}' (known: {', '.join(FinetuneConfig.model_fields)})")
            else:
                parts.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
        raise UsageError("; ".join(parts)) from None


def ensure_ray() -> bool:
    """Join RAY_ADDRESS's cluster, or start a private local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # connects to RAY_ADDRESS
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": a new instance, never someone else's `ray start` cluster on this host.
    ray.init(address="local", num_cpus=None, include_dashboard=False)
    return True


def run(args: argparse.Namespace) -> str:
    from recall_ray.finetune import finetune_lora
    from recall_ray.templates import TaskDataError, load_task_records

    cfg = build_finetune_config(args.overrides)
    if os.path.lexists(args.out):
        raise UsageError(f"adapter output {args.out} already exists: remove it or choose another --out")
    try:
        records = load_task_records(args.data, args.template, max_samples=cfg.max_samples)
    except TaskDataError as err:
        raise UsageError(str(err)) from None
    started = ensure_ray()
    try:
        return finetune_lora(args.base, records, cfg, args.out, os.path.join(args.run_dir, "finetune"),
                             task=args.task or args.template)
    finally:
        if started:
            import ray

            ray.shutdown()  # our own local instance only; never `ray stop`


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        out = run(args)
    except (UsageError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # finetune_lora's input validation
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # training failed (FinetuneError names the cause); details in the log above
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"error: fine-tuning failed: {type(err).__name__}: {first}", file=sys.stderr)
        return 1
    print(f"adapter written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
