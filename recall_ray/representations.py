"""Per-layer sample representations: the pure pooling rule, the Ray Data actor that runs a
model over a batch, and the Parquet layout (one row per sample, one fixed-size float32
list column per layer: `layer_0` is the embedding output, `layer_i` block i's output).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from .models import LoadedModelSlot, ResolvedModel
from .storage import filesystem

log = logging.getLogger("recall_ray.representations")


def layer_column(i: int) -> str:
    return f"layer_{i}"


def mean_pool(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor,
              exclude_first_token: bool = False) -> np.ndarray:
    """[B, L+1, H] float32: for each layer, the mean of the hidden states over each sample's
    real tokens (mask 1). With `exclude_first_token`, each sample's first real token is left
    out (its massive activations dominate short samples) unless it is the only token."""
    mask = attention_mask.to(torch.float32).clone()
    if exclude_first_token:
        first = mask.argmax(dim=1)  # position of the first real token (left or right padding)
        drop = mask.sum(dim=1) > 1
        mask[torch.arange(mask.shape[0])[drop], first[drop]] = 0.0
    denom = mask.sum(dim=1, keepdim=True)  # [B, 1]
    pooled = [(h.to(torch.float32) * mask[:, :, None]).sum(dim=1) / denom for h in hidden_states]
    return torch.stack(pooled, dim=1).numpy()


def hidden_states_of(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The decoder's hidden_states tuple (embedding output, then every block), skipping the
    LM head: its [B, T, vocab] logits are the largest tensor of a forward and unused here.
    On transformers 5.23 the last entry is taken after the final norm (tests check it)."""
    decoder = getattr(lm, lm.base_model_prefix)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states


def reps_table(sample_idx: np.ndarray, sample_id: Sequence[str], reps: np.ndarray) -> pa.Table:
    """Arrow table with fixed-size float32 list columns, readable by any Parquet reader."""
    n, layers, hidden = reps.shape
    cols = {"sample_idx": pa.array(np.asarray(sample_idx, dtype=np.int64)), "sample_id": pa.array(list(sample_id), pa.string())}
    for i in range(layers):
        flat = pa.array(np.ascontiguousarray(reps[:, i, :]).reshape(-1), pa.float32())
        cols[layer_column(i)] = pa.FixedSizeListArray.from_arrays(flat, hidden)
    return pa.table(cols)


class RepresentationExtractor:
    """Ray Data callable class: batches of text in, a reps table out, for one model or several.

    With several models each row names its model (`model`, an index into `models`) and rows
    come sorted by model, so an actor loads each model once and keeps one loaded at a time:
    one pool serves every model of a stage instead of a pool (and its start-up) per model.
    The output then carries the `model` column (for a partitioned write)."""

    def __init__(self, model: ResolvedModel | Sequence[ResolvedModel], max_length: int, exclude_first_token: bool,
                 dtype: str, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.many = not isinstance(model, ResolvedModel)
        self.slot = LoadedModelSlot(list(model) if self.many else [model], getattr(torch, dtype), self.device,
                                    padding_side="right")
        self.max_length = max_length
        self.exclude_first_token = exclude_first_token
        if not self.many:
            self.slot.get(0)

    def _reps(self, texts: list[str], index: int = 0) -> np.ndarray:
        tok, lm = self.slot.get(index)
        enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hs = hidden_states_of(lm, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            return mean_pool([h.cpu() for h in hs], enc["attention_mask"], self.exclude_first_token)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if not self.many:
            return reps_table(batch["sample_idx"], batch["sample_id"], self._reps(list(batch["text"])))
        tables = []
        for index in dict.fromkeys(int(m) for m in batch["model"]):  # usually one model per batch
            sel = np.flatnonzero(batch["model"] == index)
            reps = self._reps([str(x) for x in batch["text"][sel]], index)
            t = reps_table(batch["sample_idx"][sel], batch["sample_id"][sel], reps)
            tables.append(t.append_column("model", pa.array(np.full(len(sel), index, dtype=np.int32))))
        return pa.concat_tables(tables)


def pool_resources(cluster: dict[str, float], requested: int | str, num_items: int) -> dict:
    """Actor pool shape from the cluster's resources: one GPU per actor when GPUs exist;
    otherwise CPU actors that leave at least one CPU free, so that Ray Data's read tasks can
    run (a pool that takes every CPU hangs on a 2-core machine)."""
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    if gpus > 0:
        size = max(1, min(gpus if requested == "auto" else min(int(requested), gpus), num_items))
        # At most one CPU per GPU actor, and never every CPU: read tasks need one too.
        return {"size": size, "num_gpus": 1, "num_cpus": min(1.0, max(0.5, cpus - 1.0) / size), "threads": None}
    if requested == "auto":
        size = max(1, int(cpus // 4)) if cpus >= 8 else 1
    else:
        size = int(requested)
    size = max(1, min(size, num_items))
    per_actor = max(0.5, cpus - 1.0) / size  # logical CPUs; one stays free for read tasks
    # torch threads: the actor's share of the cores (on 2 cores, one actor uses both).
    threads = max(1, int(math.floor(cpus / size)))
    return {"size": size, "num_gpus": 0, "num_cpus": per_actor, "threads": threads}


def read_layer(path: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample_idx [n], reps [n, H]) of one layer, sorted by sample_idx. Reads one column."""
    fs, p = filesystem(path)
    table = pads.dataset(p, format="parquet", filesystem=fs).to_table(columns=["sample_idx", layer_column(layer)])
    table = table.sort_by("sample_idx")
    col = table.column(layer_column(layer)).combine_chunks()
    hidden = col.type.list_size
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, hidden)
    return table.column("sample_idx").to_numpy(), x
