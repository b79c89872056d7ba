"""The evaluation's Ray shell: greedy generation for several models from one Ray Data
actor pool (rows sorted by model, one model loaded per actor at a time)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.metrics import max_new_tokens
from ..models import LoadedModelSlot, ResolvedModel
from ..progress import Progress
from .pools import inference_pool


class GreedyGenerator:
    """Ray Data callable class: prompts in, greedy continuations out, for several models.

    Each row names its model (an index into `models`); rows come sorted by model, so an
    actor loads each model once and keeps one loaded at a time: one pool serves a whole
    list of models instead of a pool (and its start-up) per model. Left padding, so that
    every row's continuation starts at the same position; prompts longer than
    `max_prompt_tokens` lose their start (as in training, the end of the prompt holds the
    question and the response cue)."""

    def __init__(self, models: Sequence[ResolvedModel], dtype: str = "float32", num_threads: int | None = None,
                 max_prompt_tokens: int = 1024):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.slot = LoadedModelSlot(models, getattr(torch, dtype), self.device, padding_side="left",
                                    truncation_side="left")
        self.max_prompt_tokens = max_prompt_tokens

    def _generate(self, index: int, prompts: list[str], budgets: list[int]) -> list[str]:
        """Greedy continuations, each cut at its own budget: a batch that straddles two tasks
        generates for the larger budget, and without the cut a row's answer (and its score)
        would depend on its neighbours. Greedy tokens do not depend on later ones, so the
        cut gives exactly what generating with the row's own budget gives."""
        tok, lm = self.slot.get(index)
        enc = tok(prompts, padding=True, truncation=True, max_length=self.max_prompt_tokens,
                  return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = lm.generate(**enc, max_new_tokens=max(budgets), do_sample=False, temperature=None,
                              top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        return [tok.decode(row[:b], skip_special_tokens=True) for row, b in zip(new, budgets)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = np.empty(len(batch["row"]), dtype=object)
        for index in dict.fromkeys(int(m) for m in batch["model"]):  # usually one model per batch
            sel = np.flatnonzero(batch["model"] == index)
            texts[sel] = self._generate(index, [str(p) for p in batch["prompt"][sel]],
                                        [int(b) for b in batch["max_new_tokens"][sel]])
        return {"model": batch["model"], "row": batch["row"], "generation": texts}


def generate(work: Sequence[tuple[ResolvedModel, Sequence[Any]]], batch_size: int = 16,
             num_actors: int | str = "auto", dtype: str = "float32",
             on_complete: Callable[[int, list[str]], None] | None = None) -> list[list[str]]:
    """Greedy generations for each (model, items) pair, in the items' order, from one Ray
    Data actor pool serving every model.

    `on_complete(i, generations)` is called once per model as soon as its last prompt comes
    back (rows are sorted by model, so models finish one after another): a caller can save
    each model's result then, and a run stopped midway loses only the models in flight."""
    import ray

    models = [m for m, _ in work]
    rows = [{"model": mi, "row": j, "prompt": it.prompt, "max_new_tokens": max_new_tokens(it.task)}
            for mi, (_, items) in enumerate(work) for j, it in enumerate(items)]
    # Sorted by model, then task and prompt length: a model loads once per actor, and a batch
    # shares its generation length and pads little.
    rows.sort(key=lambda r: (r["model"], work[r["model"]][1][r["row"]].task, len(r["prompt"])))
    pool = inference_pool(ray.cluster_resources(), num_actors, max(1, len(rows) // batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 64)))
    ds = ds.map_batches(
        GreedyGenerator,
        fn_constructor_kwargs={"models": models, "dtype": dtype, "num_threads": pool.threads},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
    )
    out: list[list[str | None]] = [[None] * len(items) for _, items in work]
    left = [len(items) for _, items in work]
    progress = Progress(f"evaluate ({len(models)} models)", len(rows), "prompts")
    for r in ds.iter_rows():
        progress.update()
        mi, j = int(r["model"]), int(r["row"])
        if out[mi][j] is None:
            left[mi] -= 1
        out[mi][j] = str(r["generation"])
        if left[mi] == 0 and on_complete is not None:
            left[mi] = -1  # reported once
            on_complete(mi, out[mi])  # type: ignore[arg-type]
    missing = sum(g is None for gens in out for g in gens)
    if missing:
        raise RuntimeError(f"generation returned no text for {missing} of {len(rows)} prompts")
    return out  # type: ignore[return-value]
