"""The evaluation's Ray shell: greedy generation and log-likelihood scoring (core.loglik) for
several models from one Ray Data actor pool (rows sorted by model, one model loaded per
actor at a time)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.metrics import max_new_tokens
from ..io.models import LoadedModelSlot, ResolvedModel
from ..progress import Progress
from .events import RestartNote, report_pool_restart
from .pools import inference_pool, request_pool

MAX_PROMPT_TOKENS = 1024  # a longer prompt loses its start (lm-eval's runs get the same max_length)

log = logging.getLogger("recall_ray.evaluate")


class EvalWorker(RestartNote):
    """Ray Data callable class: evaluation rows in, answers out, for several models.

    Each row names its model (an index into `models`) and its kind:
      generate   greedy continuation of `prompt`, cut at `max_new_tokens`
      choice     the option (of the JSON list `options`) whose continuation of `prompt` the
                 model finds most likely (core.loglik), with every option's token
                 log-probabilities
      reference  the token log-probabilities of `options[0]` (a reference answer) after `prompt`
    Rows come sorted by model, so an actor loads each model once and keeps one loaded at a
    time: one pool serves a whole list of models instead of a pool (and its start-up) per
    model. Prompts longer than `max_prompt_tokens` lose their start (as in training, the end
    of the prompt holds the question and the response cue)."""

    def __init__(self, models: Sequence[ResolvedModel], dtype: str = "float32", num_threads: int | None = None,
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS, normalization: str = "sum"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.slot = LoadedModelSlot(models, getattr(torch, dtype), self.device, padding_side="left",
                                    truncation_side="left")
        self.max_prompt_tokens = max_prompt_tokens
        self.normalization = normalization
        self._remember_restart()

    def _generate(self, index: int, prompts: list[str], budgets: list[int]) -> list[str]:
        """Greedy continuations, each cut at its own budget: a batch that straddles two tasks
        generates for the larger budget, and without the cut a row's answer (and its score)
        would depend on its neighbours. Greedy tokens do not depend on later ones, so the
        cut gives exactly what generating with the row's own budget gives. Left padding, so
        that every row's continuation starts at the same position."""
        tok, lm = self.slot.get(index)
        enc = tok(prompts, padding=True, truncation=True, max_length=self.max_prompt_tokens,
                  return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = lm.generate(**enc, max_new_tokens=max(budgets), do_sample=False, temperature=None,
                              top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        return [tok.decode(row[:b], skip_special_tokens=True) for row, b in zip(new, budgets)]

    def _contexts(self, tok, prompts: list[str], options: list[list[list[int]]]) -> list[list[int]]:
        """Prompt ids (with special tokens, as in training), cut from the left so that the
        prompt and its longest option fit `max_prompt_tokens`."""
        ids = tok(prompts, add_special_tokens=True)["input_ids"]
        return [list(c)[-max(1, self.max_prompt_tokens - max(len(o) for o in opts)):] for c, opts in zip(ids, options)]

    def _choose(self, index: int, prompts: list[str], options: list[list[str]]) -> list[tuple[str, list]]:
        from ..core.loglik import choose, option_logprobs

        tok, lm = self.slot.get(index)
        opt_ids = [[tok(o, add_special_tokens=False)["input_ids"] for o in opts] for opts in options]
        lps = option_logprobs(lm, self._contexts(tok, prompts, opt_ids), opt_ids, _pad_id(tok), self.device)
        return [(opts[choose(lp, self.normalization)], lp) for opts, lp in zip(options, lps)]

    def _reference(self, index: int, prompts: list[str], refs: list[str]) -> list[list[float]]:
        from ..core.loglik import continuation_logprobs

        tok, lm = self.slot.get(index)
        ref_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]
        ctx = self._contexts(tok, prompts, [[r] for r in ref_ids])
        return continuation_logprobs(lm, list(zip(ctx, ref_ids)), _pad_id(tok), self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["row"])
        texts, logprobs = np.full(n, "", dtype=object), np.full(n, "null", dtype=object)
        for index in dict.fromkeys(int(m) for m in batch["model"]):  # usually one model per batch
            for kind in ("generate", "choice", "reference"):
                sel = np.flatnonzero((batch["model"] == index) & (batch["kind"] == kind))
                if not len(sel):
                    continue
                prompts = [str(p) for p in batch["prompt"][sel]]
                if kind == "generate":
                    texts[sel] = self._generate(index, prompts, [int(b) for b in batch["max_new_tokens"][sel]])
                    continue
                options = [json.loads(str(o)) for o in batch["options"][sel]]
                if kind == "choice":
                    for i, (text, lp) in zip(sel, self._choose(index, prompts, options)):
                        texts[i], logprobs[i] = text, json.dumps(lp)
                else:
                    for i, lp in zip(sel, self._reference(index, prompts, [o[0] for o in options])):
                        logprobs[i] = json.dumps(lp)
        restarted = np.full(n, "", dtype=object)
        restarted[0] = self.restart_note()  # Ray restarted this actor: said on its first batch after it
        return {"model": batch["model"], "row": batch["row"], "kind": batch["kind"], "text": texts,
                "logprobs": logprobs, "restarted": restarted}


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@dataclass
class Answer:
    """What the evaluation got for one (model, item): the text the model answered (greedy
    generation, or the option chosen by log-likelihood), each option's token
    log-probabilities (choice), and the reference's (reference)."""

    text: str | None = None
    option_logprobs: list | None = None
    ref_logprobs: list[float] | None = None


def evaluate_rows(work: Sequence[tuple[ResolvedModel, Sequence[Any]]], batch_size: int = 16,
                  num_actors: int | str = "auto", dtype: str = "float32", normalization: str = "sum",
                  on_complete: Callable[[int, list[Answer]], None] | None = None) -> list[list[Answer]]:
    """The Answer of each (model, items) pair's every item, in the items' order, from one Ray
    Data actor pool serving every model. Each item (evaluate.EvalItem) asks for its `kinds`
    (generate, choice, reference): one row each.

    `on_complete(i, answers)` is called once per model as soon as its last row comes back
    (rows are sorted by model, so models finish one after another): a caller can save each
    model's result then, and a run stopped midway loses only the models in flight."""
    import ray

    models = [m for m, _ in work]
    rows = []
    for mi, (_, items) in enumerate(work):
        for j, it in enumerate(items):
            for kind in it.kinds:
                opts = it.options if kind == "choice" else [it.refs[0]] if kind == "reference" else []
                rows.append({"model": mi, "row": j, "kind": kind, "prompt": it.prompt,
                             "max_new_tokens": max_new_tokens(it.task), "options": json.dumps(list(opts))})
    # Sorted by model, then task, kind and prompt length: a model loads once per actor, and a
    # batch shares its kind and generation length and pads little.
    rows.sort(key=lambda r: (r["model"], work[r["model"]][1][r["row"]].task, r["kind"], len(r["prompt"])))
    pool = inference_pool(ray.cluster_resources(), num_actors, max(1, len(rows) // batch_size))
    request_pool(pool)  # an autoscaling cluster grows for the whole pool at once
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 64)))
    ds = ds.map_batches(
        EvalWorker,
        fn_constructor_kwargs={"models": models, "dtype": dtype, "num_threads": pool.threads,
                               "normalization": normalization},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
    )
    out = [[Answer() for _ in items] for _, items in work]
    left = [sum(len(it.kinds) for it in items) for _, items in work]
    seen: set[tuple[int, int, str]] = set()
    progress = Progress(f"evaluate ({len(models)} models)", len(rows), "rows")
    for r in ds.iter_rows():
        progress.update()
        mi, j, kind = int(r["model"]), int(r["row"]), str(r["kind"])
        if r.get("restarted"):
            report_pool_restart([], log, "evaluate", str(r["restarted"]), "evaluation actor",
                                f"{models[mi].label}'s row {j} ({kind})")
        if (mi, j, kind) not in seen:
            seen.add((mi, j, kind))
            left[mi] -= 1
        answer = out[mi][j]
        if kind == "generate":
            answer.text = str(r["text"])
        elif kind == "choice":
            answer.text, answer.option_logprobs = str(r["text"]), json.loads(str(r["logprobs"]))
        else:
            answer.ref_logprobs = json.loads(str(r["logprobs"]))
        if left[mi] == 0 and on_complete is not None:
            left[mi] = -1  # reported once
            on_complete(mi, out[mi])
    missing = len(rows) - len(seen)
    if missing:
        raise RuntimeError(f"evaluation returned nothing for {missing} of {len(rows)} rows")
    return out
