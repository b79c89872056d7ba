"""The lm-eval evaluation's Ray shell: one Ray task per model, spread over the cluster (a GPU
each where the cluster has GPUs), each running lm-eval's Hugging Face model class on the task
configs it is sent (recall_ray.harness)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..io.models import ResolvedModel
from .generation import MAX_PROMPT_TOKENS

log = logging.getLogger("recall_ray.harness")
WHERE = "@RECALL_RAY_TASKS@"  # stands for the folder a node writes the configs to
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # no hub access at run time


def lm_eval_model(model: ResolvedModel, dtype: str = "float32", batch_size: int = 16, device: str | None = None,
                  max_length: int = MAX_PROMPT_TOKENS):
    """lm-eval's HFLM for a model: a Hugging Face directory, or a LoRA adapter on its base
    through PEFT (`peft=`), with the tokenizer our evaluation uses and a context of
    `max_length` tokens (our evaluation's prompt cap: a longer prompt loses its start on
    both sides)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HFLM(pretrained=model.weights_dir, peft=model.path if model.kind == "adapter" else None,
                tokenizer=model.tokenizer_dir, dtype=dtype, device=device, batch_size=batch_size,
                max_length=max_length)


def run_lm_eval(lm, task_names: Sequence[str], files: dict[str, str], include: dict[str, bytes],
                defaults: bool, limit: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` of `lm` (an HFLM) on `task_names`, with our configs (`files`:
    `recall_ray.harness.config_files` with `where` = WHERE, written to a temporary folder whose
    path replaces WHERE) and the user's include folders rebuilt beside them, each task's first
    `limit` docs (None: all);
    returns lm-eval's results, JSON-safe, with the logged samples (`samples`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="rr_lm_eval_") as tmp:
        paths = []
        if files:
            ours = Path(tmp) / "ours"
            ours.mkdir()
            for name, text in files.items():  # the configs' data paths name this folder
                (ours / name).write_text(text.replace(WHERE, str(ours)) if name.endswith(".yaml") else text)
            paths.append(str(ours))
        for rel, data in include.items():  # "<i>/<path in the i-th include folder>"
            f = Path(tmp, "include", rel)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            folder = str(Path(tmp, "include", rel.split("/", 1)[0]))
            if folder not in paths:
                paths.append(folder)
        tm = TaskManager(include_path=paths or None, include_defaults=defaults)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(task_names), task_manager=tm, log_samples=True,
                                      bootstrap_iters=0, limit=limit)
    keep = ("results", "n-samples", "configs", "versions", "samples")
    return json_safe({k: res[k] for k in keep if k in res})


def json_safe(obj: Any) -> Any:
    """lm-eval's results made JSON-safe (numpy scalars as numbers, other objects as text)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run_models(models: Sequence[ResolvedModel], task_names: Sequence[str], files: dict[str, str],
               include: dict[str, bytes], defaults: bool, batch_size: int = 16, dtype: str = "float32",
               num_tasks: int | str = "auto", limit: int | None = None) -> list[dict]:
    """Every model's lm-eval output (`run_lm_eval` on `task_names`, with `files`, `include`,
    `defaults` and `limit` as there), one Ray task per model, in the models' order. Each
    task asks for one GPU where the cluster has any, else its share of the CPUs
    (cluster.pools.inference_pool: never every CPU); tasks are spread over the nodes, and run
    with no hub access (the data must be local)."""
    import ray

    from ..progress import Progress
    from .pools import inference_pool, request_pool

    shape = inference_pool(ray.cluster_resources(), num_tasks, len(models))
    request_pool(shape)

    @ray.remote(num_cpus=shape.num_cpus, num_gpus=shape.num_gpus, scheduling_strategy="SPREAD", max_retries=1,
                runtime_env={"env_vars": {**OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "false"}})
    def one(model: ResolvedModel) -> dict:
        import torch

        # torch threads: the CPUs this task holds (tasks of several models may share a node)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        for k, v in OFFLINE_ENV.items():
            os.environ.setdefault(k, v)
        lm = lm_eval_model(model, dtype, batch_size)
        return run_lm_eval(lm, task_names, files, include, defaults, limit)

    log.info("lm-eval: %d models, %d tasks each (%s)", len(models), len(task_names), shape)
    refs = [one.remote(m) for m in models]
    progress = Progress(f"lm-eval ({len(models)} models)", len(models), "models")
    out = []
    for r in refs:
        out.append(ray.get(r))
        progress.update()
    return out
