"""The representation stage's Ray shell: a Ray Data actor pool runs models over texts and
writes each sample's per-layer mean-pooled hidden states (core.pooling.mean_pool) to
Parquet in the layout of recall_ray.reps_parquet."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ..core.pooling import mean_pool
from ..models import LoadedModelSlot, ResolvedModel
from ..reps_parquet import reps_table
from ..storage import RunDir
from .events import RestartNote, report_pool_restart
from .faults import fault_point
from .pools import inference_pool, request_pool

log = logging.getLogger("recall_ray.representations")


def hidden_states_of(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The decoder's hidden_states tuple (embedding output, then every block), skipping the
    LM head: its [B, T, vocab] logits are the largest tensor of a forward and unused here.
    On transformers 5.23 the last entry is taken after the final norm (tests check it)."""
    decoder = getattr(lm, lm.base_model_prefix)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states


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


class RepresentationWriter(RepresentationExtractor, RestartNote):
    """The extractor that writes its own output: each batch's representations go straight
    from the actor to a Parquet file under `out` (per model: `out/model=<q>/`), named after
    the batch's first sample so that a retried batch rewrites the same file, written under a
    temporary name and moved. Only a row count per file comes back to the driver, which is
    its progress; no write tasks compete with the actors for the node's cores."""

    def __init__(self, out: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out.rstrip("/")
        self._remember_restart()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import uuid

        import pyarrow.parquet as pq

        from ..storage import filesystem

        table = super().__call__(batch)
        models = table.column("model").to_numpy() if self.many else np.zeros(table.num_rows, dtype=np.int32)
        written, counts, parts = [], [], []
        for q in dict.fromkeys(int(m) for m in models):
            part = table.filter(pa.array(models == q)) if self.many else table
            if self.many:
                part = part.drop_columns(["model"])
            folder = f"{self.out}/model={q}" if self.many else self.out
            fs, path = filesystem(folder)
            fs.create_dir(path, recursive=True)
            name = f"part-{int(np.min(part.column('sample_idx').to_numpy())):09d}.parquet"
            fault_point(f"reps-{q}-{name}")  # tests: a representation actor that dies mid-stage
            tmp = f"{path}/.{name}.{uuid.uuid4().hex[:8]}"
            pq.write_table(part, tmp, filesystem=fs)
            fs.move(tmp, f"{path}/{name}")
            written.append(q)
            counts.append(part.num_rows)
            parts.append(f"{folder.rsplit('/', 1)[-1]}/{name}" if self.many else name)
        note = self.restart_note()  # Ray restarted this actor: said on its first batch after it
        return {"model": np.array(written, dtype=np.int32), "rows": np.array(counts, dtype=np.int64),
                "part": np.array(parts, dtype=object),
                "restarted": np.array([note] + [""] * (len(written) - 1), dtype=object)}


def extract(models: list[ResolvedModel], items: list[dict], run_dir: RunDir, rels: list[str], *, max_length: int,
            exclude_first_token: bool, dtype: str, batch_size: int, num_actors: int | str,
            stage: str = "representations") -> list[dict]:
    """Run `items` (sample_idx, sample_id, text) through each of `models` with one Ray Data
    actor pool and write each model's per-layer representations to Parquet at its `rels[i]`
    (staged, then moved). Several models share the pool: rows sorted by model, one model
    loaded per actor at a time, each model's files under its own staging folder, each moved
    into place when the pool is done. Returns the events (cluster.events) of actors Ray
    restarted on the way."""
    import ray

    from ..progress import Progress

    many = len(models) > 1
    rows = [{"model": q, **it} for q in range(len(models)) for it in items] if many else items
    pool = inference_pool(ray.cluster_resources(), num_actors, len(rows))
    request_pool(pool)  # an autoscaling cluster grows for the whole pool at once
    tmp = run_dir.tmp_name(rels[0] if not many else "reps/_pool")
    log.info("representations of %s: %d samples each, %d actor(s) x %.2f CPU / %d GPU", [m.label for m in models],
             len(items), pool.size, pool.num_cpus, pool.num_gpus)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 64)))
    ds = ds.map_batches(
        RepresentationWriter,
        fn_constructor_args=(run_dir.uri(tmp),),
        fn_constructor_kwargs={"model": models if many else models[0], "max_length": max_length,
                               "exclude_first_token": exclude_first_token, "dtype": dtype,
                               "num_threads": pool.threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )
    progress = Progress(stage, len(rows), "samples" if not many else f"samples of {len(models)} models")
    events: list[dict] = []
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        progress.update(int(out["rows"].sum()))
        for note, part in zip(out["restarted"], out["part"]):
            if note:
                report_pool_restart(events, log, stage, str(note), "representation actor", str(part))
    progress.close()
    if not many:
        run_dir.replace_dir(tmp, rels[0])
        return events
    for q, rel in enumerate(rels):
        run_dir.replace_dir(f"{tmp}/model={q}", rel)
    run_dir.delete(tmp)
    return events
