"""The representation stage's Ray shell: a Ray Data actor pool runs models over texts and
writes each sample's per-layer mean-pooled hidden states (core.pooling.mean_pool) to
Parquet in the layout of recall_ray.io.reps_parquet."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..core.pooling import mean_pool
from ..core.sft import represented_batch
from ..io.models import LoadedModelSlot, ResolvedModel
from ..io.reps_parquet import reps_table
from ..io.storage import RunDir
from ..validate import nonfinite_by_label, raise_if_nonfinite
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
    """Ray Data callable class: batches of records in, a reps table out, for one model or several.

    A batch with `prompt` and `target` columns (a task's records, the pipeline's case) is
    tokenised as the fine-tune tokenises it and cut by its rule (core.sft.represented_batch:
    the passage's start goes, the question, options and target stay); a batch with only
    `text` is tokenised whole and cut at `max_length` from the right.

    With several models each row names its model (`model`, an index into `models`) and rows
    come sorted by model, so an actor loads each model once and keeps one loaded at a time:
    one pool serves every model of a stage instead of a pool (and its start-up) per model.
    The output then carries the `model` column (for a partitioned write)."""

    def __init__(self, model: ResolvedModel | Sequence[ResolvedModel], max_length: int, exclude_first_token: bool,
                 dtype: str, num_threads: int | None = None, read_weights: bool = False, check_finite: bool = False,
                 tested: Sequence[str] = ()):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.many = not isinstance(model, ResolvedModel)
        self.slot = LoadedModelSlot(list(model) if self.many else [model], getattr(torch, dtype), self.device,
                                    padding_side="right", read_weights=read_weights, check_finite=check_finite,
                                    tested=tested)
        self.max_length = max_length
        self.exclude_first_token = exclude_first_token
        if not self.many:
            self.slot.get(0)

    def _reps(self, batch: dict[str, np.ndarray], sel: np.ndarray, index: int = 0) -> np.ndarray:
        tok, lm = self.slot.get(index)
        if "prompt" in batch and "target" in batch:
            enc = represented_batch(tok, [str(x) for x in batch["prompt"][sel]], [str(x) for x in batch["target"][sel]],
                                    self.max_length)
        else:
            enc = tok([str(x) for x in batch["text"][sel]], padding=True, truncation=True, max_length=self.max_length,
                      return_tensors="pt")
        with torch.inference_mode():
            hs = hidden_states_of(lm, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            return mean_pool([h.cpu() for h in hs], enc["attention_mask"], self.exclude_first_token)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if not self.many:
            return reps_table(batch["sample_idx"], batch["sample_id"],
                              self._reps(batch, np.arange(len(batch["sample_idx"]))))
        tables = []
        for index in dict.fromkeys(int(m) for m in batch["model"]):  # usually one model per batch
            sel = np.flatnonzero(batch["model"] == index)
            reps = self._reps(batch, sel, index)
            t = reps_table(batch["sample_idx"][sel], batch["sample_id"][sel], reps)
            tables.append(t.append_column("model", pa.array(np.full(len(sel), index, dtype=np.int32))))
        return pa.concat_tables(tables)


class RepresentationWriter(RepresentationExtractor, RestartNote):
    """The extractor that writes its own output: each batch's representations go straight
    from the actor to a Parquet file under `out` (per model: `out/model=<q>/`), named after
    the batch's first sample so that a retried batch rewrites the same file, written under a
    temporary name and moved. Only counts come back to the driver: rows per file (its
    progress) and, the first time an actor loads a model, what the load read
    (models.WeightsRead: bytes, and the tensors with NaN/Inf when `check_finite`). A model
    whose weights are not finite gets no forward pass and no file. No write tasks compete
    with the actors for the node's cores."""

    def __init__(self, out: str, *args, **kwargs):
        kwargs.setdefault("read_weights", True)
        super().__init__(*args, **kwargs)
        self.out = out.rstrip("/")
        self._remember_restart()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        models = batch["model"].astype(np.int64) if self.many else np.zeros(len(batch["sample_idx"]), dtype=np.int64)
        out: dict[str, list] = {"model": [], "rows": [], "loaded": [], "bytes_read": [], "check_seconds": [],
                                "weights_read": [], "nonfinite": [], "part": [], "fingerprint": []}
        for q in dict.fromkeys(int(m) for m in models):  # usually one model per batch
            sel = np.flatnonzero(models == q)
            self.slot.get(q)  # loads (or swaps in) model q: its weights read, and checked, here
            read = self.slot.take_read(q)
            bad = "" if read is None or read.finite else json.dumps(
                {"weights": read.weights_nonfinite, "adapter": read.adapter_nonfinite})
            out["part"].append("" if bad else self._write(q, batch, sel))
            out["model"].append(q)
            out["rows"].append(len(sel))
            out["loaded"].append(read is not None)
            out["bytes_read"].append(read.bytes_read if read else 0)
            out["check_seconds"].append(read.check_seconds if read else 0.0)
            out["weights_read"].append(bool(read and read.weights_read))
            out["nonfinite"].append(bad)
            out["fingerprint"].append((read.fingerprint or "") if read else "")
        return {"model": np.array(out["model"], dtype=np.int32), "rows": np.array(out["rows"], dtype=np.int64),
                "loaded": np.array(out["loaded"], dtype=bool),
                "bytes_read": np.array(out["bytes_read"], dtype=np.int64),
                "check_seconds": np.array(out["check_seconds"], dtype=np.float64),
                "weights_read": np.array(out["weights_read"], dtype=bool),
                "nonfinite": np.array(out["nonfinite"], dtype=object),
                "part": np.array(out["part"], dtype=object),
                "fingerprint": np.array(out["fingerprint"], dtype=object),
                # Ray restarted this actor: said on its first batch after it
                "restarted": np.array([self.restart_note()] + [""] * (len(out["model"]) - 1), dtype=object)}

    def _write(self, q: int, batch: dict[str, np.ndarray], sel: np.ndarray) -> str:
        import uuid

        import pyarrow.parquet as pq

        from ..io.storage import filesystem

        part = reps_table(batch["sample_idx"][sel], batch["sample_id"][sel],
                          self._reps(batch, sel, q))
        folder = f"{self.out}/model={q}" if self.many else self.out
        fs, path = filesystem(folder)
        fs.create_dir(path, recursive=True)
        name = f"part-{int(np.min(part.column('sample_idx').to_numpy())):09d}.parquet"
        fault_point(f"reps-{q}-{name}")  # tests: a representation actor that dies mid-stage
        tmp = f"{path}/.{name}.{uuid.uuid4().hex[:8]}"
        pq.write_table(part, tmp, filesystem=fs)
        fs.move(tmp, f"{path}/{name}")
        return f"{folder.rsplit('/', 1)[-1]}/{name}" if self.many else name


@dataclass
class ExtractReport:
    """What a representation pool read: tensor bytes per model (every load and swap of it,
    by every actor), the seconds its NaN/Inf tests took, and the models whose weights the
    actors tested (`checked`, with what they found)."""

    bytes_read: list[int]
    check_seconds: float = 0.0
    checked: dict[int, dict] = field(default_factory=dict)  # model index -> {"weights": [...], "adapter": [...]}
    tested: set[str] = field(default_factory=set)  # weight sets tested: weights dirs and adapter dirs
    events: list[dict] = field(default_factory=list)  # actors Ray restarted on the way (cluster.events)
    # model index -> its fingerprint (ModelTensors.fingerprint), from a load that read every
    # tensor: the job's stage keys without a read of their own
    fingerprints: dict[int, str] = field(default_factory=dict)


def extract(models: list[ResolvedModel], items: list[dict], run_dir: RunDir, rels: list[str], *, max_length: int,
            exclude_first_token: bool, dtype: str, batch_size: int, num_actors: int | str,
            stage: str = "representations", check_finite: bool = False,
            on_checked: Callable[[str], None] | None = None,
            weights_owner: dict[str, str] | None = None, tested: Collection[str] = ()) -> ExtractReport:
    """Run `items` (sample_idx, sample_id, and prompt + target or text) through each of `models` with one Ray Data
    actor pool and write each model's per-layer representations to Parquet at its `rels[i]`
    (staged, then moved). Several models share the pool: rows sorted by model, one model
    loaded per actor at a time, each model's files under its own staging folder, each moved
    into place when the pool is done.

    With `check_finite` the actors test every tensor they load for NaN/Inf (the job's
    NaN/Inf check, folded into this read): `on_checked(weight_set)` is called the first time
    a weight set (a full model's weights directory, or an adapter's directory) is tested; the
    full weights of the directories in `tested` (an earlier stage tested them) are not. If
    any model's weights are not finite, nothing is moved into place, the staging is removed
    once the pool has stopped, and a CheckpointError (validate.raise_if_nonfinite) names the model (a tensor
    of the full weights under `weights_owner[weights_dir]`, the full model that holds them,
    when given). The report lists the events (cluster.events) of actors Ray restarted on the way."""
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
                               "num_threads": pool.threads, "check_finite": check_finite,
                               "tested": sorted(tested)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )
    progress = Progress(stage, len(rows), "samples" if not many else f"samples of {len(models)} models")
    report = ExtractReport([0] * len(models))
    # the pool runs to its end even when a model is refused: stopping it early could leave an
    # actor writing into the staging after it was removed
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        progress.update(int(out["rows"].sum()))
        for note, part in zip(out["restarted"], out["part"]):
            if note:
                report_pool_restart(report.events, log, stage, str(note), "representation actor", str(part))
        for q, loaded, nbytes, secs, read, found_json, fp in zip(out["model"], out["loaded"], out["bytes_read"],
                                                                 out["check_seconds"], out["weights_read"],
                                                                 out["nonfinite"], out["fingerprint"]):
            q, m = int(q), models[int(q)]
            report.bytes_read[q] += int(nbytes)
            report.check_seconds += float(secs)
            if fp:
                report.fingerprints.setdefault(q, str(fp))
            if not (check_finite and loaded):
                continue
            found = json.loads(found_json) if found_json else {}
            entry = report.checked.setdefault(q, {"weights": [], "adapter": []})
            for k in entry:
                entry[k] = sorted(set(entry[k]) | set(found.get(k, [])))
            # the weight sets this load tested: the full weights it read, the adapter's own
            sets = ([m.weights_dir] if read and m.weights_dir not in tested else []) + \
                ([m.path] if m.kind == "adapter" else [])
            for ws in sets:
                if ws not in report.tested:
                    report.tested.add(ws)
                    if on_checked is not None:
                        on_checked(ws)
    progress.close()
    bad = {q: found for q, found in report.checked.items() if found["weights"] or found["adapter"]}
    if bad:
        run_dir.delete(tmp)
        raise_if_nonfinite(nonfinite_by_label([(models[q], found) for q, found in sorted(bad.items())],
                                              weights_owner or {}))
    if not many:
        run_dir.replace_dir(tmp, rels[0])
        return report
    for q, rel in enumerate(rels):
        run_dir.replace_dir(f"{tmp}/model={q}", rel)
    run_dir.delete(tmp)
    return report
