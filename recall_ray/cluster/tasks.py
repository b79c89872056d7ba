"""Small Ray tasks around pure functions: KMeans on each layer's column and LM-Cocktail's
per-model losses."""

from __future__ import annotations

import logging
from typing import Sequence

from ..core.typical import typical_indices
from ..io.models import ResolvedModel
from ..io.reps_parquet import read_layer

log = logging.getLogger("recall_ray.tasks")


def kmeans_all_layers(reps_uri: str, num_layers: int, k: int, seed: int, n_init: int) -> list[list[int]]:
    """One Ray task per layer, each reading only its column; returns sample_idx per layer
    (core.typical.typical_indices: the distinct sample nearest each of k KMeans centres)."""
    import ray

    @ray.remote(num_cpus=0.5)
    def kmeans_layer(layer: int) -> list[int]:
        idx, x = read_layer(reps_uri, layer)
        return [int(idx[i]) for i in typical_indices(x, k, seed, n_init)]

    from ..progress import Progress

    refs = [kmeans_layer.remote(i) for i in range(num_layers)]
    progress = Progress("typical (KMeans per layer)", num_layers, "layers")
    out = []
    for r in refs:
        out.append(ray.get(r))
        progress.update()
    return out


def model_losses(models: Sequence[ResolvedModel], records: Sequence[dict], max_length: int) -> list[float]:
    """`core.sft.target_loss` of every model on `records`, one Ray task each (LM-Cocktail)."""
    import ray

    @ray.remote(num_cpus=1)
    def one(model) -> float:
        import torch

        from ..core.sft import target_loss
        from ..io.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        return target_loss(load_causal_lm(model), load_tokenizer(model), records, max_length)

    return ray.get([one.remote(m) for m in models])
