"""The merges a scenario compares, by name: RECALL and the baselines of the paper (plus the
layer-constant ablation), each turned into a `MergeMethod` for the same merge actors.

    recall                 per-layer RECALL weights (the job's weights.csv)
    recall_layer_constant  each model's RECALL weight averaged over layers, in every layer
    average                uniform average of the merged models (model soup)
    task_arithmetic        base + lam * sum of task vectors
    ties                   TIES: trim to `ties_density`, elect signs, disjoint mean, * lam
    dare_average           DARE (drop `dare_drop`, rescale) on the average of task vectors
    dare_task_arithmetic   DARE on task arithmetic (* lam)
    lm_cocktail            LM-Cocktail: global weights softmax(-loss / T) from each model's loss
                           on a few examples of the new task

Also the loss that LM-Cocktail needs (`target_loss`, `model_losses`): mean token loss on
the answers of a few (prompt, target) examples, as in fine-tuning.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .merge_methods import MergeMethod, cocktail_weights, layer_constant, task_vector_weights, uniform_weights

METHODS: tuple[str, ...] = ("recall", "recall_layer_constant", "average", "task_arithmetic", "ties", "dare_average",
                            "dare_task_arithmetic", "lm_cocktail")


class BaselineConfig(BaseModel):
    """Settings of the baselines (choose them on the validation split, never on test)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lam: float = Field(1.0, gt=0)  # task-vector scale: task arithmetic, TIES, DARE + task arithmetic
    ties_density: float = Field(0.2, gt=0, le=1)  # fraction of each task vector TIES keeps
    dare_drop: float = Field(0.9, ge=0, lt=1)  # fraction of each task vector DARE drops
    seed: int = 0  # DARE's masks
    cocktail_temperature: float = Field(1.0, gt=0)
    cocktail_examples: int = Field(8, gt=0)  # new-task examples LM-Cocktail's losses are measured on


def build_method(name: str, num_groups: int, num_models: int, include_base: bool, cfg: BaselineConfig,
                 recall_weights: np.ndarray | None = None, losses: Sequence[float] | None = None) -> MergeMethod:
    """The MergeMethod called `name` for K models (model 0 the base) in G layer groups.

    include_base: whether the base takes part in the weighted (linear) merges; the
    task-vector methods always start from the base, which is their reference.
    recall_weights: [G, K] RECALL weights (recall, recall_layer_constant).
    losses: [K] each model's loss on the new task's examples (lm_cocktail); the base's is
    ignored when include_base is False.
    """
    G, K = num_groups, num_models
    if name in ("recall", "recall_layer_constant"):
        if recall_weights is None or np.shape(recall_weights) != (G, K):
            raise ValueError(f"{name} needs the [{G}, {K}] RECALL weights, got {np.shape(recall_weights)}")
        w = recall_weights if name == "recall" else layer_constant(recall_weights)
        return MergeMethod(name, "linear", w)
    if name == "average":
        return MergeMethod(name, "linear", uniform_weights(G, K, include_base))
    if name == "lm_cocktail":
        if losses is None or len(losses) != K:
            raise ValueError(f"lm_cocktail needs one loss per model ({K}), got {losses}")
        row = np.zeros(K)
        first = 0 if include_base else 1
        row[first:] = cocktail_weights(list(losses)[first:], cfg.cocktail_temperature)
        return MergeMethod(name, "linear", np.tile(row, (G, 1)))
    tv = task_vector_weights(G, K)
    if name == "task_arithmetic":
        return MergeMethod(name, "task_arithmetic", tv, lam=cfg.lam)
    if name == "ties":
        return MergeMethod(name, "ties", tv, density=cfg.ties_density, lam=cfg.lam, normalize=True)
    if name == "dare_average":
        return MergeMethod(name, "dare_linear", tv, density=1 - cfg.dare_drop, normalize=True, seed=cfg.seed)
    if name == "dare_task_arithmetic":
        return MergeMethod(name, "dare_linear", tv, density=1 - cfg.dare_drop, lam=cfg.lam, seed=cfg.seed)
    raise ValueError(f"unknown merge method {name!r}: choose from {', '.join(METHODS)}")


# ------------------------------------------------------------------------ LM-Cocktail's loss

def target_loss(lm: torch.nn.Module, tokenizer, records: Sequence[dict], max_length: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token (target + EOS) of `records` ({prompt, target}),
    the prompt masked out, exactly the fine-tuning loss."""
    from .finetune import IGNORE_INDEX, collate, tokenize_records

    examples = tokenize_records(tokenizer, records, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad)
            logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no answer tokens to measure a loss on")
    return total / count


def model_losses(models: Sequence, records: Sequence[dict], max_length: int) -> list[float]:
    """`target_loss` of every model (ResolvedModel), one Ray task each."""
    import ray

    from .models import load_causal_lm, load_tokenizer

    @ray.remote(num_cpus=1)
    def one(model) -> float:
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        return target_loss(load_causal_lm(model), load_tokenizer(model), records, max_length)

    return ray.get([one.remote(m) for m in models])
