"""LoRA supervised fine-tuning of the base model on the new task, through Ray Train (V2).

    finetune_lora(base_dir, records, cfg, out_dir, storage_dir) -> out_dir

The driver validates the inputs, runs `train_loop_per_worker` on `cfg.num_workers` Ray Train
workers (DDP over gloo on CPU, NCCL on GPU, or DeepSpeed when `cfg.deepspeed` names a JSON
config), and gets the trained PEFT adapter back as a Ray Train checkpoint under
`<storage_dir>/<run name>/checkpoint_*`. It then copies the adapter into `out_dir` atomically
(temporary sibling directory, renamed into place when complete) with a `recall_ray.json` that
records the base model's fingerprint, the task, the steps, the final loss and the seed.

With `ewc_fisher` (a diagonal Fisher saved by `recall_ray.io.safetensors_io.save_fisher`, keyed by the
LoRA-targeted weights) and `ewc_lambda`, every step's loss gets EWC's penalty
`ewc_lambda / 2 * sum(F * delta^2)` on the LoRA deltas (recall_ray/core/ewc.py); `fisher_of`
computes such a Fisher in a Ray task.

The tokenisation/label masking, padding and data order are the pure functions of
recall_ray.core.sft, tested without Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

from ..config import FinetuneConfig
from ..core.lora import META_FILE
from ..core.sft import batch_schedule, collate, shard, tokenize_records
from ..io.storage import (file_sha256, is_uri, local_copy, model_path, output_exists, put_tree, replace_json, staged,
                          staging_location)
from .faults import fault_point

logger = logging.getLogger("recall_ray.finetune")


class FinetuneError(RuntimeError):
    """Training itself failed (in a worker or in Ray Train); the message names the cause."""


# ----------------------------------------------------------------------------- Ray worker


def _worker_logging() -> None:
    # The root logger's level (WARNING) would drop our INFO progress lines in the worker.
    # Ray workers already give the root logger a handler (forwarded to the driver); add our
    # own only where none exists, or every line would print twice.
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def _load_lora_model(base_dir: str, cfg: FinetuneConfig) -> torch.nn.Module:
    import torch

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.config.use_cache = False  # no KV cache in training
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
    )
    # Same seed on every rank -> the same LoRA A init everywhere (B starts at zero).
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora)


def _deepspeed_engine(model: torch.nn.Module, cfg: FinetuneConfig, optimizer: torch.optim.Optimizer):
    import deepspeed  # lazy: an optional GPU-only dependency

    with open(cfg.deepspeed) as fh:
        ds_config = json.load(fh)
    # Our batch size and precision win unless the file sets its own.
    ds_config.setdefault("train_micro_batch_size_per_gpu", cfg.batch_size)
    ds_config.setdefault("gradient_accumulation_steps", 1)
    if cfg.bf16:
        ds_config.setdefault("bf16", {"enabled": True})
    kwargs: dict = {}
    if "optimizer" not in ds_config:
        kwargs["optimizer"] = optimizer  # ours (torch AdamW, cfg.learning_rate)
        ds_config.setdefault("zero_allow_untested_optimizer", True)  # ZeRO refuses it otherwise
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config, **kwargs,
    )
    return engine


def _save_adapter(model: torch.nn.Module, out: str, use_deepspeed: bool, rank: int) -> None:
    """Rank 0 writes adapter_config.json + adapter_model.safetensors. Under DeepSpeed ZeRO-3
    the LoRA weights are partitioned, so every rank joins the gather first."""
    import torch

    # Unwrap explicitly: PeftModel forwards unknown attributes to the wrapped model, so a
    # `hasattr(model, "module")` test would be fragile.
    wrapped = use_deepspeed or isinstance(model, torch.nn.parallel.DistributedDataParallel)
    peft_model = model.module if wrapped else model
    if use_deepspeed:
        import deepspeed

        lora_params = [p for p in peft_model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
            if rank == 0:
                peft_model.save_pretrained(out, safe_serialization=True)
    elif rank == 0:
        peft_model.save_pretrained(out, safe_serialization=True)


RESUME_FILE = "resume_state.pt"
RESUME_DIR = "resume-step-"  # + the step, zero-padded: the newest sorts last


def _training_state(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    loss: float) -> dict:
    """Everything a resumed run needs to go on as if it had never stopped: the trainable
    (LoRA) weights, the optimizer's state, the random generators' state (dropout), the step."""
    import torch

    return {"step": step, "loss": loss, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "params": {n: p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict()}


def _restore(state: dict, peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Put a `_training_state` back; returns (the first step to run, the last loss)."""
    import torch

    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        if state.get("adapter_weights") is not None:  # a warm start (`seed_snapshot`): an adapter's tensors
            from peft import set_peft_model_state_dict

            loaded = set_peft_model_state_dict(peft_model, state["adapter_weights"])
            trainable = sum(p.requires_grad for p in params.values())
            if loaded.unexpected_keys or len(state["adapter_weights"]) != trainable:
                raise ValueError(f"the warm start's adapter has {len(state['adapter_weights'])} tensors for this"
                                 f" model's {trainable} LoRA weights (unexpected: {loaded.unexpected_keys[:3]})")
        else:
            for n, t in state["params"].items():
                params[n].copy_(t.to(params[n].device))
    if state["optimizer"] is not None:  # None after a warm start: the optimizer's moments start at zero
        optimizer.load_state_dict(state["optimizer"])
    if state["rng"] is not None:  # None after a warm start: the generator keeps the run's seed
        torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]) + 1, float(state["loss"])


def _checkpoint(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, loss: float,
                rank: int) -> None:
    """Report a checkpoint to resume from (`_training_state`), in a folder named after the
    step. Every rank reports (a barrier); rank 0 carries the files (DDP keeps the ranks'
    weights equal). The files are in the run's storage when `report` returns."""
    import torch

    import ray.train

    state = _training_state(peft_model, optimizer, step, loss)
    with tempfile.TemporaryDirectory(prefix="rr_resume_") as tmp:
        if rank == 0:
            torch.save(state, os.path.join(tmp, RESUME_FILE))
        ray.train.report({"step": step, "loss": loss}, checkpoint_dir_name=f"{RESUME_DIR}{step:07d}",
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


SNAPSHOT_DIR = "step-"  # + the step, zero-padded (7 digits): the newest sorts last
SNAPSHOT_META = "snapshot.json"


def snapshot_steps(snapshot_dir: str) -> list[int]:
    """The steps of the complete snapshots in `snapshot_dir`, ascending (a snapshot is renamed
    into place only when written whole, so every `step-*` folder is complete)."""
    if not os.path.isdir(snapshot_dir):
        return []
    return sorted(int(e[len(SNAPSHOT_DIR):]) for e in os.listdir(snapshot_dir)
                  if e.startswith(SNAPSHOT_DIR) and e[len(SNAPSHOT_DIR):].isdigit())


def snapshot_path(snapshot_dir: str, step: int) -> str:
    return os.path.join(snapshot_dir, f"{SNAPSHOT_DIR}{step:07d}")


def _snapshot(model: torch.nn.Module, peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              step: int, loss: float, snapshot_dir: str) -> None:
    """Rank 0 writes the adapter at this step and the training state into
    `snapshot_dir/step-NNNNNNN/`, built under a temporary name and renamed in when whole."""
    import torch

    os.makedirs(snapshot_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{SNAPSHOT_DIR}{step:07d}.tmp-", dir=snapshot_dir)
    try:
        _save_adapter(model, tmp, use_deepspeed=False, rank=0)
        torch.save(_training_state(peft_model, optimizer, step, loss), os.path.join(tmp, RESUME_FILE))
        with open(os.path.join(tmp, SNAPSHOT_META), "w") as fh:
            json.dump({"step": step, "loss": loss}, fh)
        os.replace(tmp, snapshot_path(snapshot_dir, step))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WARM_START = "warm_start"  # snapshot.json / recall_ray.json: the ladder went on from an adapter alone
WARM_START_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)  # a finished adapter's


def warm_start_record(adapter_dir: str, cfg: FinetuneConfig, fingerprint: str, task: str,
                      ewc_lambda: float = 0.0) -> dict:
    """Check that `adapter_dir` (a finished adapter with its recall_ray.json) is an earlier rung
    of the training `cfg` describes, and return what a warm start from it records: its step,
    last loss and the sha256 of its weights (and, under "after", the warm start the adapter
    itself came from, if any). Raises ValueError naming what differs."""
    for name in WARM_START_FILES:
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            raise ValueError(f"warm start {adapter_dir} lacks {name}: pass an adapter written by finetune_lora")
    with open(os.path.join(adapter_dir, META_FILE)) as fh:
        meta = json.load(fh)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as fh:
        acfg = json.load(fh)
    found = {"base": meta.get("base_fingerprint"), "task": meta.get("task"), "seed": meta.get("seed"),
             "ewc_lambda": float(meta.get("ewc", {}).get("lambda", 0.0)), "r": acfg.get("r"),
             "alpha": float(acfg.get("lora_alpha", 0)), "target_modules": sorted(acfg.get("target_modules") or [])}
    wanted = {"base": fingerprint, "task": task, "seed": cfg.seed, "ewc_lambda": float(ewc_lambda), "r": cfg.r,
              "alpha": float(cfg.alpha), "target_modules": sorted(cfg.target_modules)}
    differ = [f"{k} {found[k]!r} (this training: {wanted[k]!r})" for k in wanted if found[k] != wanted[k]]
    if differ:
        raise ValueError(f"warm start {adapter_dir} is not a rung of this training: its " + "; ".join(differ))
    step = int(meta["steps"])
    if not 0 < step < cfg.steps:
        raise ValueError(f"warm start {adapter_dir} was trained {step} steps: a warm start goes on from fewer"
                         f" than finetune.steps ({cfg.steps})")
    digest = file_sha256(os.path.join(adapter_dir, "adapter_model.safetensors"))
    record = {"step": step, "loss": float(meta["final_loss"]), "adapter_sha256": digest,
              "optimizer": "moments restarted at zero", "dropout_generator": "reseeded"}
    if meta.get(WARM_START) is not None:  # a warm start of a warm start: the earlier one is kept
        record["after"] = meta[WARM_START]
    return record


def seed_snapshot(snapshot_dir: str, adapter_dir: str, record: dict) -> bool:
    """Make `adapter_dir` (checked by `warm_start_record`, which gave `record`) the ladder's
    snapshot of its step, unless the ladder already holds a snapshot at or past that step.
    The snapshot's state holds the adapter's weights but no optimizer or generator state
    (they were not kept with the adapter): a run going on from it restarts Adam's moments,
    so it is not the uninterrupted run, and every adapter after it records `warm_start`.
    Returns whether it was seeded."""
    import torch
    from safetensors.torch import load_file

    step = record["step"]
    if any(s >= step for s in snapshot_steps(snapshot_dir)):
        return False
    tmp = tempfile.mkdtemp(prefix=f".{SNAPSHOT_DIR}{step:07d}.tmp-", dir=snapshot_dir)
    try:
        for name in WARM_START_FILES:
            shutil.copy2(os.path.join(adapter_dir, name), os.path.join(tmp, name))
        weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        torch.save({"step": step, "loss": record["loss"], "rng": None, "cuda_rng": None, "params": None,
                    "adapter_weights": weights, "optimizer": None}, os.path.join(tmp, RESUME_FILE))
        with open(os.path.join(tmp, SNAPSHOT_META), "w") as fh:
            json.dump({"step": step, "loss": record["loss"], WARM_START: record}, fh)
        os.replace(tmp, snapshot_path(snapshot_dir, step))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


SNAPSHOT_LABEL = "adapter_label.json"  # in a snapshot directory: what every snapshot's recall_ray.json shares


def _snapshot_meta(snapshot_dir: str, step: int, shared: dict) -> dict:
    """The recall_ray.json of the snapshot at `step`: `shared` with the step, that step's loss
    and, when the ladder went on from a warm start below it, that warm start's record."""
    with open(os.path.join(snapshot_path(snapshot_dir, step), SNAPSHOT_META)) as fh:
        loss = json.load(fh)["loss"]
    warm = ladder_warm_start(snapshot_dir, step)
    return {**shared, "steps": step, "final_loss": loss, **({WARM_START: warm} if warm else {})}


def snapshot_as_adapter(snapshot_dir: str, dest: str) -> dict:
    """Write the newest snapshot of a training, finished or not, to `dest` (created; it must
    not exist) as an adapter with its recall_ray.json, as finetune_lora labels its snapshots
    when it finishes: the way to carry a training that a stopped machine left half done to
    another one, where it is a `warm_start`. A snapshot seeded from a warm start keeps the
    recall_ray.json it was seeded with. Returns that recall_ray.json. Raises
    FileNotFoundError when the directory has no snapshot, or no label (written by
    finetune_lora before its first step since snapshots can be carried)."""
    steps = snapshot_steps(snapshot_dir)
    if not steps:
        raise FileNotFoundError(f"{snapshot_dir} holds no snapshot")
    src = snapshot_path(snapshot_dir, steps[-1])
    if os.path.isfile(os.path.join(src, META_FILE)):  # labelled at the run's end, or a seeded warm start
        with open(os.path.join(src, META_FILE)) as fh:
            meta = json.load(fh)
    else:
        label = os.path.join(snapshot_dir, SNAPSHOT_LABEL)
        if not os.path.isfile(label):
            raise FileNotFoundError(f"{snapshot_dir} has no {SNAPSHOT_LABEL} (a training started before snapshots"
                                    " were labelled): its snapshots cannot be carried as adapters")
        with open(label) as fh:
            meta = _snapshot_meta(snapshot_dir, steps[-1], json.load(fh))
    tmp = staging_location(dest)
    try:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        os.rename(tmp, dest)  # fails if dest appeared meanwhile: never overwrite an adapter
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def ladder_warm_start(snapshot_dir: str, upto: int) -> dict | None:
    """The warm start (`seed_snapshot`) that the ladder's adapter of `upto` steps descends
    from: the newest seeded snapshot below `upto` (the seeded one itself is the adapter it
    was made from, exactly), or None."""
    for step in reversed([s for s in snapshot_steps(snapshot_dir) if s < upto]):
        with open(os.path.join(snapshot_path(snapshot_dir, step), SNAPSHOT_META)) as fh:
            record = json.load(fh).get(WARM_START)
        if record is not None:
            return record
    return None


def _resume_states() -> list:
    """The run's resume checkpoints, newest first: the one Ray Train registered, and those in
    the run's storage (a checkpoint reported just before its worker died is stored but may
    not have been registered yet)."""
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    found = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        found.append(ckpt)
    storage = ray.train.get_context().get_storage()
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    for info in fs.get_file_info(FileSelector(root, allow_not_found=True)):
        if info.type == FileType.Directory and info.base_name.startswith(RESUME_DIR):
            found.append(ray.train.Checkpoint(info.path, filesystem=fs))
    return sorted(found, key=lambda c: c.path.rstrip("/").rsplit("/", 1)[-1], reverse=True)


def _resume(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
            snapshot_dir: str | None, steps: int) -> tuple[int, float]:
    """(the first step to run, the last loss) after restoring the latest state of this
    training: a checkpoint of this run when the worker was restarted, or the newest snapshot
    of at most `steps` in `snapshot_dir` (an earlier, shorter run of the same ladder),
    whichever is further on; (1, nan) for a fresh start."""
    import torch

    for ckpt in _resume_states():
        try:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, RESUME_FILE), map_location="cpu", weights_only=False)  # ours
        except (OSError, RuntimeError, EOFError) as e:  # cut short by the failure: the one before
            logger.warning("checkpoint %s unreadable (%s); trying an older one", ckpt.path, e)
            continue
        break
    else:
        state = None
    done = [s for s in snapshot_steps(snapshot_dir) if s <= steps] if snapshot_dir else []
    if done and (state is None or done[-1] > state["step"]):
        state = torch.load(os.path.join(snapshot_path(snapshot_dir, done[-1]), RESUME_FILE),
                           map_location="cpu", weights_only=False)  # ours
    if state is None:
        return 1, float("nan")
    if rank == 0:
        logger.info("resumed from the state of step %d", state["step"])
    return _restore(state, peft_model, optimizer)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: LoRA SFT on this rank's shard, then rank 0 reports the adapter."""
    import torch

    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    _worker_logging()
    cfg = FinetuneConfig.model_validate(config["cfg"])
    torch.set_num_threads(config["threads"])  # Ray's OMP_NUM_THREADS may have set fewer at import
    base_dir: str = local_copy(config["base_dir"])  # a bucket's base: one copy per node, in its cache
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_ds = cfg.deepspeed is not None

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = tokenize_records(tokenizer, shard(config["records"], rank, world), cfg.max_length)
    schedule = batch_schedule(len(examples), cfg.batch_size, cfg.steps, cfg.seed)

    model = _load_lora_model(base_dir, cfg)
    peft_model = model  # DDP wraps this very module; lora_deltas needs it unwrapped
    fisher, lam = None, float(config.get("ewc_lambda", 0.0))
    if config.get("ewc_fisher") is not None:
        from ..core.ewc import ewc_penalty, lora_deltas
        from ..io.safetensors_io import load_fisher

        fisher = load_fisher(config["ewc_fisher"], device)
        with torch.no_grad():  # keys and shapes, before the first step
            ewc_penalty(fisher, lora_deltas(peft_model), lam)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    if use_ds:
        model = _deepspeed_engine(model.to(device), cfg, optimizer)
    else:
        model = ray.train.torch.prepare_model(model)  # DDP when world > 1, moves to device
    model.train()
    # Dropout masks differ per rank but are reproducible for a given seed.
    torch.manual_seed(cfg.seed + rank)
    snapshot_dir = config.get("snapshot_dir")
    # A restarted worker goes on from its checkpoint; a longer run of a ladder, from its snapshot.
    first_step, loss_value = _resume(peft_model, optimizer, rank, snapshot_dir, cfg.steps)

    log_every = max(1, min(10, cfg.steps // 5))
    penalty_value = float("nan")
    for step, idx in enumerate(schedule, start=1):
        if step < first_step:
            continue
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        task_loss = loss = model(**batch).loss
        if fisher is not None:  # the deviation from the start model is exactly the LoRA delta
            penalty = ewc_penalty(fisher, lora_deltas(peft_model), lam)
            loss = task_loss + penalty
            penalty_value = penalty.item()
        if use_ds:
            model.backward(loss)
            model.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss_value, total = task_loss.item(), loss.item()
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {step}: lower finetune.learning_rate")
        if rank == 0 and (step % log_every == 0 or step == 1 or step == cfg.steps):
            if fisher is None:
                logger.info("step %d/%d loss %.4f", step, cfg.steps, loss_value)
            else:
                logger.info("step %d/%d loss %.4f ewc penalty %.4g", step, cfg.steps, loss_value, penalty_value)
        fault_point(f"finetune-step-{step}")  # tests: a worker that dies after a step, before its checkpoint
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _checkpoint(peft_model, optimizer, step, loss_value, rank)
        if snapshot_dir and rank == 0 and (step == cfg.steps or cfg.snapshot_every and step % cfg.snapshot_every == 0):
            _snapshot(model, peft_model, optimizer, step, loss_value, snapshot_dir)

    final = torch.tensor([loss_value], dtype=torch.float64, device=device)
    if world > 1:  # report the mean last-step loss over ranks
        torch.distributed.all_reduce(final)
        final /= world
    metrics = {"final_loss": float(final.item()), "steps": cfg.steps, "torch_threads": torch.get_num_threads()}
    if fisher is not None:
        metrics["final_ewc_penalty"] = penalty_value  # identical on every rank (DDP keeps the adapters equal)

    with tempfile.TemporaryDirectory(prefix="rr_adapter_") as tmp:
        _save_adapter(model, tmp, use_ds, rank)
        # Every rank must call report (it is a barrier); only rank 0 carries the checkpoint.
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- driver


def worker_cpus(cfg: FinetuneConfig, cluster_cpus: float) -> int:
    """CPUs requested per Ray Train worker, and its torch threads: `cfg.cpus_per_worker`, or
    for "auto" 1 per GPU worker and otherwise the cluster's CPUs shared among the workers."""
    if cfg.cpus_per_worker != "auto":
        return int(cfg.cpus_per_worker)  # positive: checked by FinetuneConfig
    if cfg.use_gpu:
        return 1
    return max(1, int(cluster_cpus // cfg.num_workers))


def _validate_ewc(base_dir: str, cfg: FinetuneConfig, ewc_fisher: str | None, ewc_lambda: float) -> None:
    """The EWC inputs: a Fisher file whose keys and shapes are exactly the weights the LoRA
    targets in `base_dir` (read from the safetensors headers), and a lambda >= 0."""
    from ..core.ewc import check_keys, target_weight_names
    from ..io.safetensors_io import list_weight_files, read_header, tensor_infos

    if not isinstance(ewc_lambda, (int, float)) or not math.isfinite(ewc_lambda) or ewc_lambda < 0:
        raise ValueError(f"ewc_lambda must be a finite number >= 0, got {ewc_lambda!r}")
    if ewc_fisher is None:
        if ewc_lambda != 0:
            raise ValueError(f"ewc_lambda={ewc_lambda} needs an ewc_fisher file (recall_ray.io.safetensors_io.save_fisher)")
        return
    if cfg.deepspeed is not None:
        raise ValueError("EWC (ewc_fisher) is not supported with DeepSpeed: unset finetune.deepspeed"
                         " (DDP over num_workers works)")
    if not Path(ewc_fisher).is_file():
        raise ValueError(f"EWC Fisher {ewc_fisher} does not exist")
    header, _ = read_header(ewc_fisher)
    shapes = {n: tuple(v["shape"]) for n, v in header.items() if n != "__metadata__"}
    infos = tensor_infos(list_weight_files(base_dir))
    expected = target_weight_names(infos, cfg.target_modules)
    check_keys(shapes, expected, f"EWC Fisher {ewc_fisher} (target_modules {list(cfg.target_modules)})")
    for n in expected:
        if shapes[n] != tuple(infos[n].shape):
            raise ValueError(f"EWC Fisher {ewc_fisher}: {n} has shape {shapes[n]} but {base_dir} has"
                             f" {tuple(infos[n].shape)}: it was computed for another model")


def validate_inputs(base_dir: str, records: Sequence[dict], cfg: FinetuneConfig, out_dir: str,
              ewc_fisher: str | None = None, ewc_lambda: float = 0.0, snapshot_dir: str | None = None) -> None:
    """Cheap checks before any Ray work, each naming the fix."""
    if cfg.snapshot_every and snapshot_dir is None:
        raise ValueError("finetune.snapshot_every needs a snapshot directory (finetune_lora(snapshot_dir=...),"
                         " jobs/train_adapters.py sets one)")
    if snapshot_dir is not None and is_uri(snapshot_dir):
        raise ValueError(f"snapshot directory {snapshot_dir} must be a local path (a shared volume on a cluster)")
    if snapshot_dir is not None and cfg.deepspeed is not None:
        raise ValueError("snapshots are not supported with DeepSpeed (its ZeRO-3 state is sharded): unset one of them")
    if not (model_path(base_dir) / "config.json").is_file():
        raise ValueError(f"base model {base_dir} has no config.json: pass a Hugging Face model directory")
    if not records:
        raise ValueError("no training records: check the task data file and template")
    for i, r in enumerate(records[:cfg.max_samples]):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("target"), str):
            raise ValueError(f"record {i} must be a dict with string 'prompt' and 'target' (see recall_ray.core.templates)")
    n = min(len(records), cfg.max_samples)
    if n < cfg.num_workers:
        raise ValueError(f"{n} records cannot be sharded over {cfg.num_workers} workers: lower finetune.num_workers")
    if cfg.checkpoint_every and cfg.deepspeed is not None:
        raise ValueError("finetune.checkpoint_every is not supported with DeepSpeed (its ZeRO-3 state is sharded):"
                         " unset one of them")
    if cfg.deepspeed is not None:
        if not cfg.use_gpu:
            raise ValueError("finetune.deepspeed needs GPUs: set finetune.use_gpu=true or unset finetune.deepspeed")
        if not Path(cfg.deepspeed).is_file():
            raise ValueError(f"DeepSpeed config {cfg.deepspeed} does not exist")
    _validate_ewc(base_dir, cfg, ewc_fisher, ewc_lambda)
    if output_exists(out_dir):
        raise FileExistsError(f"adapter output {out_dir} already exists: remove it or choose another --out")


def training_error_summary(err: BaseException) -> str:
    """One line naming the root cause of a Ray Train failure (the first failing rank's own
    exception) instead of Ray's generic "Training failed due to worker errors"."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause, where = failures[rank], f"rank {rank}: "
    else:
        cause, where = getattr(err, "controller_failure", None) or err, ""
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{where}{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def ladder_key(fingerprint: str, records: Sequence[dict], cfg: FinetuneConfig, ewc_fisher: str | None,
               ewc_lambda: float) -> str:
    """What the snapshots of one training ladder share: everything that decides the adapter
    but the number of steps. A snapshot directory made under another key is refused."""
    from ..manifest import stable_hash

    return stable_hash({"base": fingerprint, "records": [[r["prompt"], r["target"]] for r in records],
                        "finetune": {k: v for k, v in cfg.key().items() if k != "steps"},
                        "ewc": [ewc_fisher, float(ewc_lambda)]})


LADDER_FILE = "ladder.json"


def _claim_snapshot_dir(snapshot_dir: str, key: str) -> None:
    """Record the ladder's key in a new snapshot directory, or check an existing one's."""
    path = os.path.join(snapshot_dir, LADDER_FILE)
    if os.path.isfile(path):
        with open(path) as fh:
            found = json.load(fh).get("key")
        if found != key:
            raise ValueError(f"snapshot directory {snapshot_dir} belongs to another training (other base, data or"
                             " settings than these): remove it or choose another")
        return
    os.makedirs(snapshot_dir, exist_ok=True)
    replace_json(path, {"key": key})


def finetune_lora(base_dir: str, records: list[dict], cfg: FinetuneConfig, out_dir: str, storage_dir: str,
                  *, task: str = "task", run_name: str | None = None, ewc_fisher: str | None = None,
                  ewc_lambda: float = 0.0, snapshot_dir: str | None = None,
                  warm_start: str | None = None) -> str:
    """Fine-tune a LoRA adapter of `base_dir` on `records` ({"prompt", "target"} dicts, e.g.
    from `load_task_records`; the first `cfg.max_samples` are used) and write it to `out_dir`.

    `cfg.batch_size` is per worker; each worker trains on records[rank::num_workers] and runs
    `cfg.steps` optimizer steps (DDP keeps the ranks' adapters identical). Ray Train keeps its
    run and checkpoint under `storage_dir/<run_name>/checkpoint_*/`: a local path on one
    machine; on a multi-node cluster a shared filesystem path or a pyarrow URI (s3://...),
    since workers on other nodes upload there. `base_dir` and `out_dir` may be URIs too (each
    worker copies a bucket's base to its node's cache; the adapter is uploaded whole when complete).
    Returns `out_dir`, which holds adapter_config.json, adapter_model.safetensors and
    recall_ray.json. Raises FileExistsError when out_dir already exists, ValueError for bad
    inputs (before any Ray work), FinetuneError when training fails.

    EWC: with `ewc_fisher`, a safetensors Fisher (recall_ray.core.ewc) whose keys are exactly the
    `.weight` names of the modules `cfg.target_modules` wraps in `base_dir` (checked here,
    before any Ray work, and again in the workers), every step minimises the task loss plus
    `ewc_lambda / 2 * sum(F * (scaling * B @ A)^2)`: since the fine-tune starts at `base_dir`,
    the LoRA delta is the deviation from it. The Fisher is read by each worker from that path
    (on a cluster: a path every node sees). `final_loss` stays the task loss; recall_ray.json
    records the lambda, the Fisher and the last step's penalty. `ewc_lambda` 0 adds an exact
    zero (the same adapter as no Fisher). Not supported with DeepSpeed.

    Snapshots: with `snapshot_dir` (a path every worker can read), rank 0 writes the adapter
    and the training state there every `cfg.snapshot_every` steps and at the last step
    (`step-NNNNNNN/`), and the run starts from the newest snapshot of at most `cfg.steps`
    steps found there: a run to 450 steps after one to 225 trains only steps 226-450, and
    ends with the same adapter as one run of 450 steps. The directory records the training's
    key (`ladder_key`): a directory of another training is refused.

    Warm start: with `warm_start` (an adapter this training wrote at fewer steps, e.g. the
    committed rung of a ladder whose snapshots are on a machine that is gone) and a
    `snapshot_dir` holding no snapshot at or past its step, the run goes on from its weights
    (`seed_snapshot`) with the optimizer's moments at zero and the dropout generator
    reseeded; the batch order is the uninterrupted run's. The adapter is therefore not the
    uninterrupted run's, and its recall_ray.json says so (`warm_start`: the step, loss and
    weights' sha256 it went on from).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..io.safetensors_io import content_fingerprint

    local = lambda path: path if is_uri(path) else os.path.abspath(path)  # workers may not share our cwd
    base_dir, out_dir = local(base_dir), local(out_dir)
    ewc_fisher = os.path.abspath(ewc_fisher) if ewc_fisher is not None else None
    snapshot_dir = local(snapshot_dir) if snapshot_dir is not None else None
    validate_inputs(base_dir, records, cfg, out_dir, ewc_fisher, ewc_lambda, snapshot_dir)
    records = [{"prompt": r["prompt"], "target": r["target"]} for r in records[:cfg.max_samples]]
    fingerprint = content_fingerprint(base_dir)  # fails early on a directory without weights
    if warm_start is not None and snapshot_dir is None:
        raise ValueError("a warm start needs a snapshot directory (finetune.snapshot_every and"
                         " finetune_lora(snapshot_dir=...))")
    record = warm_start_record(warm_start, cfg, fingerprint, task, ewc_lambda) if warm_start is not None else None
    shared = {"base_fingerprint": fingerprint, "task": task, "seed": cfg.seed}  # every adapter of this ladder's
    if ewc_fisher is not None:
        # by content, not path: the run folder's absolute path means nothing once the adapter
        # is exported or copied to another machine
        shared["ewc"] = {"fisher_sha256": file_sha256(ewc_fisher), "lambda": float(ewc_lambda)}
    if snapshot_dir is not None:
        _claim_snapshot_dir(snapshot_dir, ladder_key(fingerprint, records, cfg, ewc_fisher, ewc_lambda))
        # what labels every snapshot as an adapter, written before the first step so that a
        # training that never finishes can still be carried elsewhere (`snapshot_as_adapter`)
        replace_json(os.path.join(snapshot_dir, SNAPSHOT_LABEL), shared, indent=2)
    if record is not None and seed_snapshot(snapshot_dir, warm_start, record):
        logger.warning("going on from %s (step %d) with the optimizer's moments restarted: the adapter will not"
                       " be the uninterrupted run's (recall_ray.json records warm_start)", warm_start, record["step"])

    threads = worker_cpus(cfg, ray.cluster_resources().get("CPU", 1.0))
    run_name = run_name or f"finetune-{task}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage = local(storage_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "base_dir": base_dir, "records": records,
                           "ewc_fisher": ewc_fisher, "ewc_lambda": float(ewc_lambda), "threads": threads,
                           "snapshot_dir": snapshot_dir},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": threads}
        ),
        run_config=ray.train.RunConfig(storage_path=storage, name=run_name,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    logger.info("fine-tuning %s on %d records (%d steps, batch %d x %d workers of %d CPUs); run %s/%s",
                base_dir, len(records), cfg.steps, cfg.batch_size, cfg.num_workers, threads, storage, run_name)
    from ..progress import Progress

    progress = Progress(f"finetune {task}", cfg.steps, "steps")  # one line, when the run ends
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise FinetuneError(f"Ray Train run {run_name} failed: {training_error_summary(err)}") from err
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint (see the worker logs)")
    progress.update(cfg.steps)
    final_loss = float(result.metrics["final_loss"])
    logger.info("fine-tuning done: final loss %.4f, checkpoint %s", final_loss, result.checkpoint.path)

    meta = {**shared, "steps": cfg.steps, "final_loss": final_loss,
            "torch_threads": int(result.metrics["torch_threads"])}
    if ewc_fisher is not None:
        meta["ewc"] = {**shared["ewc"], "final_penalty": float(result.metrics["final_ewc_penalty"])}
    if snapshot_dir is not None:  # each snapshot is an adapter too: label it as one
        labelled = {k: v for k, v in meta.items() if k not in ("steps", "final_loss")}  # each has its own
        for step in snapshot_steps(snapshot_dir):
            label = os.path.join(snapshot_path(snapshot_dir, step), META_FILE)
            if not os.path.isfile(label):
                replace_json(label, _snapshot_meta(snapshot_dir, step, labelled), indent=2)
        warm = ladder_warm_start(snapshot_dir, cfg.steps)
        if warm is not None:
            meta[WARM_START] = warm
    # Build the output in a staging folder beside its final place (same filesystem) and move
    # it in only when complete, so a crash never leaves a half-written adapter that looks
    # finished. On an object store the adapter is built here and uploaded to the staging.
    tmp = tempfile.mkdtemp(prefix="recall-ray-adapter-") if is_uri(out_dir) else staging_location(out_dir)
    try:
        with result.checkpoint.as_directory() as ckpt_dir:
            for entry in sorted(os.listdir(ckpt_dir)):
                if entry.startswith("."):
                    continue  # Ray-internal metadata, if any
                src = os.path.join(ckpt_dir, entry)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
        for required in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.isfile(os.path.join(tmp, required)):
                raise RuntimeError(f"checkpoint {result.checkpoint.path} lacks {required}")
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        if output_exists(out_dir):  # created by someone else while we trained
            raise FileExistsError(f"adapter output {out_dir} appeared during training: not overwriting it")
        if is_uri(out_dir):
            with staged(out_dir, overwrite=False) as staging:
                for entry in sorted(os.listdir(tmp)):
                    put_tree(os.path.join(tmp, entry), staging, entry)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("adapter written to %s", out_dir)
    return out_dir


# ----------------------------------------------------------------------------- EWC Fisher


def _fisher_task(model_dir: str, records: list[dict], max_length: int, target_modules: list[str],
                 use_gpu: bool) -> dict[str, torch.Tensor]:
    """In a Ray task: `ewc.diagonal_fisher` of `model_dir`'s LoRA-targeted weights on `records`."""
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.ewc import diagonal_fisher, target_weight_names

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = tokenize_records(tokenizer, records, max_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    names = target_weight_names([n for n, _ in model.named_parameters()], target_modules)
    if not names:
        raise ValueError(f"{model_dir} has no weights of the target modules {target_modules}")
    fisher = diagonal_fisher(model, examples, names, pad_id)
    return {n: t.cpu() for n, t in fisher.items()}


def fisher_of(model_dir: str, records: Sequence[dict], max_length: int, target_modules: Sequence[str],
              max_samples: int, *, use_gpu: bool = False) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher (recall_ray.core.ewc.diagonal_fisher: per-example squared
    gradients of the summed target NLL, averaged) of the weights a LoRA on `target_modules`
    would wrap in the plain model `model_dir`, over the first `max_samples` of `records`
    ({"prompt", "target"} dicts, tokenised like the fine-tune with `max_length`). Runs in one
    Ray task (num_cpus=1, and one GPU with `use_gpu`); returns float32 CPU tensors keyed by
    the weights' names, ready for `core.ewc.accumulate` / `safetensors_io.save_fisher`. Ray must be up."""
    import ray

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"model {model_dir} has no config.json: pass a Hugging Face model directory")
    if max_samples <= 0:
        raise ValueError(f"max_samples must be > 0, got {max_samples}")
    records = [{"prompt": r["prompt"], "target": r["target"]} for r in records[:max_samples]]
    if not records:
        raise ValueError("no records to compute the Fisher on: check the task data")
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=0)(_fisher_task)
    return ray.get(task.remote(os.path.abspath(model_dir), records, max_length, list(target_modules), use_gpu))
