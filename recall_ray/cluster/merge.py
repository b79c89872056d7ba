"""The merge stage: a pool of Ray actors, each owning a contiguous range of layer groups
(one output shard), reading only its tensors lazily from the inputs' safetensors and
streaming its shard to disk. Tensors never pass through the driver or the object store;
the driver sends names and the merge method (RECALL or a baseline, see
core/merge_methods.py) and writes the index.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from pyarrow.fs import FileType
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..core.architectures import Grouping
from ..core.merge_methods import MergeMethod
from ..io.models import ModelTensors, ResolvedModel
from ..io.safetensors_io import ST_TO_TORCH, StreamingShardWriter, TensorInfo
from ..io.storage import (discard, filesystem, is_uri, model_path, publish, put_file, refuse_existing_output,
                          staging_location)
from ..procmem import peak_rss_mb, rss_anon_mb
from ..progress import Progress
from .events import actor_restarts, report, short
from .faults import fault_point
from .pools import merge_pool, request_pool

log = logging.getLogger("recall_ray.merge")

# Files copied from the base into the output so that it loads unchanged.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "chat_template.jinja")


def plan_shards(grouping: Grouping, infos: dict[str, TensorInfo], num_shards: int) -> list[list[int]]:
    """Split groups 0..G-1 into `num_shards` contiguous, non-empty ranges of about equal bytes."""
    sizes = np.array([sum(infos[n].nbytes for n in grouping.names_in(g)) for g in range(grouping.num_groups)], dtype=float)
    num_shards = max(1, min(num_shards, grouping.num_groups))
    bounds = np.cumsum(sizes)
    total = bounds[-1]
    shards: list[list[int]] = []
    start = 0
    for s in range(num_shards):
        remaining_shards = num_shards - s - 1
        if remaining_shards == 0:
            end = grouping.num_groups
        else:
            target = total * (s + 1) / num_shards
            end = int(np.searchsorted(bounds, target, side="left")) + 1
            end = max(end, start + 1)
            end = min(end, grouping.num_groups - remaining_shards)
        shards.append(list(range(start, end)))
        start = end
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


@ray.remote
class ShardMergeActor:
    """Holds lazy readers of every input model; merges one shard per call."""

    def __init__(self, models: list[ResolvedModel], threads: int | None = None):
        torch.set_num_threads(threads or max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.models = models
        self.tensors = [ModelTensors(m) for m in models]
        self.ref = 0  # the base: its dtypes and shapes define the output
        # LoRA experts on the base's own weights: merged from their low-rank products, so the
        # base is read once per tensor (not once per expert) and no folded copy is made
        self.low_rank = {q for q, m in enumerate(models)
                         if q != self.ref and m.kind == "adapter" and m.base_path == models[self.ref].weights_dir}

    def _bytes_read(self) -> int:
        return sum(t.reader.bytes_read + (t.adapter_reader.bytes_read if t.adapter_reader else 0)
                   for t in self.tensors)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def merge_shard(self, names: list[str], groups: dict[str, int], method: MergeMethod, staging: str,
                    filename: str, metadata: dict[str, str]) -> dict:
        t0 = time.perf_counter()
        read0 = self._bytes_read()
        infos = self.tensors[self.ref].infos
        plan = [(n, infos[n].dtype, infos[n].shape) for n in names]
        local_dir = staging if not is_uri(staging) else tempfile.mkdtemp(prefix="recall-ray-shard-")
        tmp_path = os.path.join(local_dir, f".{filename}.partial")
        writer = StreamingShardWriter(tmp_path, plan, metadata)
        peak_anon = rss_anon_mb() or 0.0
        try:
            for name in names:
                def load(q: int, name: str = name) -> torch.Tensor:
                    nonlocal peak_anon
                    t = self.tensors[q].get(name)
                    peak_anon = max(peak_anon, rss_anon_mb() or 0.0)  # reference, accumulator and this copy alive
                    return t

                def delta(q: int, name: str = name):
                    return self.tensors[q].delta(name) if q in self.low_rank else None

                merged = method.merge_tensor(load, groups[name], name, out_dtype=ST_TO_TORCH[infos[name].dtype],
                                             delta=delta)
                writer.write(name, merged)
                fault_point(f"merge-shard-{filename}")  # tests: a merge actor that dies mid-shard
                peak_anon = max(peak_anon, rss_anon_mb() or 0.0)  # sampled while the result is alive
                del merged
            writer.close()
        except BaseException:
            Path(tmp_path).unlink(missing_ok=True)
            raise
        if is_uri(staging):
            put_file(tmp_path, staging, filename)
            shutil.rmtree(local_dir, ignore_errors=True)
        else:
            os.replace(tmp_path, os.path.join(staging, filename))
        return {
            "file": filename,
            "names": names,
            "bytes": int(sum(infos[n].nbytes for n in names)),
            "bytes_read": self._bytes_read() - read0,  # from every input, for this shard
            "seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
            "peak_anon_mb": peak_anon,
            "node_id": ray.get_runtime_context().get_node_id(),
        }


@dataclass
class MergeReport:
    output: str
    shards: list[dict]
    seconds: float
    resumed: list[str] = field(default_factory=list)  # shards an earlier, interrupted run had finished
    events: list[dict] = field(default_factory=list)  # resumed shards, actor restarts, shard retries (cluster.events)

    @property
    def peak_rss_mb(self) -> float:
        return max(s["peak_rss_mb"] for s in self.shards)

    @property
    def peak_anon_mb(self) -> float:
        return max(s["peak_anon_mb"] for s in self.shards)


# Errors of the output filesystem itself: no retry or resume helps, the output must go elsewhere.
OUTPUT_ERRNOS = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota", errno.EROFS: "is read-only",
                 errno.EACCES: "is not writable", errno.EPERM: "is not writable"}
PLAN_FILE = "merge_plan.json"
# A merge actor whose process or node dies is restarted up to MAX_RESTARTS times, and the
# shard it was merging retried up to MAX_TASK_RETRIES times.
MAX_RESTARTS = MAX_TASK_RETRIES = 3


def output_error(err: BaseException) -> int | None:
    """The errno of an output-filesystem error (OUTPUT_ERRNOS), raised here or in an actor."""
    for e in (err, getattr(err, "cause", None), err.__cause__):
        code = getattr(e, "errno", None)
        if isinstance(e, OSError) and code in OUTPUT_ERRNOS:
            return code
    return None


def resume_staging(output: str, resume_key: str) -> str:
    """The staging directory of a merge that a rerun of the same stage finds again: beside
    the output (same filesystem), named by the stage's key."""
    tag = f"partial-{resume_key[:16]}"
    if is_uri(output):
        return f"{output.rstrip('/')}.{tag}"
    out = Path(output).resolve()
    return str(out.parent / f".{out.name}.{tag}")


def finished_shards(staging: str, plan: dict) -> dict[str, dict]:
    """Shards an earlier run of the same merge completed in `staging`: its plan must be this
    one, and a shard counts once its record (written after the shard was moved into place)
    exists. {file: the shard's result record}."""
    fs, path = filesystem(staging)
    if fs.get_file_info(f"{path}/{PLAN_FILE}").type != FileType.File:
        return {}
    with fs.open_input_stream(f"{path}/{PLAN_FILE}") as f:
        if json.loads(f.read()) != plan:
            return {}
    done = {}
    for shard in plan["shards"]:
        rec, data = f"{path}/{shard['file']}.done.json", f"{path}/{shard['file']}"
        if fs.get_file_info(rec).type == FileType.File and fs.get_file_info(data).type == FileType.File:
            with fs.open_input_stream(rec) as f:
                done[shard["file"]] = json.loads(f.read())
    return done


def run_merge(models: list[ResolvedModel], grouping: Grouping, infos: dict[str, TensorInfo], method: MergeMethod,
              output: str, overwrite: bool, num_actors: int | str = "auto", placement: str = "SPREAD",
              max_shard_bytes: int = 2 * 1024**3, side_dir: str | None = None, card: str | None = None,
              extra_files: dict[str, str] | None = None, resume_key: str | None = None,
              before_publish: Callable[[str, MergeReport], None] | None = None) -> MergeReport:
    """Merge `models` (model 0: the base) by `method` into a Hugging Face directory `output`.

    The output is built in a staging directory on the same filesystem and moved into place
    only when complete. What survives what:
    - a merge actor that dies (its process, or its node) is restarted and its shard retried
      (the shard is written under a temporary name, so a retry starts it clean);
    - with `resume_key` (the merge stage's key) the staging directory is found again by a
      rerun: shards an interrupted run finished (the driver killed, say) are kept, and only
      the others are merged (`MergeReport.resumed`);
    - an output filesystem that is full or read-only: a clear error, the staging removed.
    Each resumed shard, actor restart and shard retry is said on one line and listed in
    `MergeReport.events`. `before_publish(staging, report)` is called with the complete
    report just before the staging directory is moved into place (the manifest records it
    there, so that a driver killed right after the move leaves a rerun nothing to redo).
    """
    if (method.num_groups, method.num_models) != (grouping.num_groups, len(models)):
        raise ValueError(f"merge method {method.label!r} has weights for {method.num_groups} groups x {method.num_models}"
                         f" models, expected {grouping.num_groups} x {len(models)}")
    refuse_existing_output(output, overwrite)
    t0 = time.perf_counter()
    pool = merge_pool(ray.cluster_resources(), num_actors, grouping.num_groups)
    request_pool(pool)  # an autoscaling cluster grows for the whole pool at once
    n_actors = pool.size
    total = sum(infos[n].nbytes for n in grouping.groups)
    n_shards = max(n_actors, int(np.ceil(total / max_shard_bytes)))
    shards = plan_shards(grouping, infos, n_shards)
    n_shards = len(shards)
    work = [(shard_name(i, n_shards), [n for g in groups for n in sorted(grouping.names_in(g))])
            for i, groups in enumerate(shards)]
    plan = {"key": resume_key, "shards": [{"file": f, "names": names} for f, names in work]}
    if resume_key is not None:
        staging = resume_staging(output, resume_key)
        filesystem(staging)[0].create_dir(filesystem(staging)[1], recursive=True)
        done = finished_shards(staging, plan)
        _write_text(staging, PLAN_FILE, json.dumps(plan))
    else:
        staging, done = staging_location(output), {}
    stage = f"merge {method.label}"
    events: list[dict] = []
    for f in sorted(done):
        report(events, log, stage, "resumed_shard", f"shard {f} kept: an earlier, interrupted run of this merge"
               f" finished it ({len(done)} of {n_shards} kept)", shard=f)
    pg = None
    results: list[dict] = list(done.values())
    try:
        todo = [(f, names) for f, names in work if f not in done]
        n_actors = max(1, min(n_actors, len(todo)))
        if placement in ("SPREAD", "PACK") and todo:
            pg = placement_group([{"CPU": pool.num_cpus}] * n_actors, strategy=placement)
            ray.get(pg.ready(), timeout=600)
        actors = []
        for i in range(n_actors if todo else 0):
            # restarted if its process or node dies; the shard it was merging is retried
            opts = {"num_cpus": pool.num_cpus, "max_restarts": MAX_RESTARTS, "max_task_retries": MAX_TASK_RETRIES}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            actors.append(ShardMergeActor.options(**opts).remote(models, pool.threads))
        method_ref = ray.put(method)  # the weights travel once, not once per shard
        meta = {"format": "pt", "merged_by": "recall-ray", "merge_method": method.label}
        pending = {}
        restarts = [0] * len(actors)  # each actor's restarts seen so far
        retries: dict[str, int] = {}  # shard -> retries seen so far
        nodes: list[str | None] = ray.get([a.node_id.remote() for a in actors])  # to name a node that is lost
        progress = Progress(stage, n_shards, "shards")
        progress.update(len(done))
        queue = list(todo)
        idle = list(range(len(actors)))
        while queue or pending:
            while queue and idle:
                filename, names = queue.pop(0)
                sub_groups = {n: grouping.groups[n] for n in names}
                i = idle.pop(0)
                pending[actors[i].merge_shard.remote(names, sub_groups, method_ref, staging, filename, meta)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for d in ready:
                i = pending.pop(d)
                res = ray.get(d)
                _note_restarts(events, stage, actors[i], i, len(actors), restarts, retries, nodes[i], res["file"])
                nodes[i] = res["node_id"]
                results.append(res)
                if resume_key is not None:  # the shard is in place: a rerun may keep it
                    _write_text(staging, f"{res['file']}.done.json", json.dumps(res))
                idle.append(i)
                log.info("merge: shard %s done (%d/%d, %.1f MB, %.1fs)", res["file"], len(results), n_shards,
                         res["bytes"] / 1e6, res["seconds"])
                progress.update()
                fault_point("merge-driver-after-shard")
        _write_side_files(staging, results, total, side_dir, card, extra_files or {})
        _delete_records(staging, plan)
        outcome = MergeReport(output, sorted(results, key=lambda r: r["file"]), time.perf_counter() - t0,
                             resumed=sorted(done), events=events)
        if before_publish is not None:
            before_publish(staging, outcome)
        publish(staging, output, overwrite)
        fault_point("merge-after-publish")  # tests: a driver killed between the move and the manifest's record
    except BaseException as err:
        code = output_error(err)
        if code is not None or resume_key is None or len(results) == len(done):
            discard(staging)  # nothing a rerun could keep
        else:
            log.warning("merge %s stopped after %d of %d shards; a rerun of the same stage keeps them (%s)",
                        method.label, len(results), n_shards, staging)
        if code is not None:
            raise OSError(code, f"the output filesystem of {output} {OUTPUT_ERRNOS[code]} ({os.strerror(code)}):"
                                " free space or choose another `output`; nothing was left there") from err
        raise
    finally:
        if pg is not None:
            remove_placement_group(pg)
    return outcome


def _note_restarts(events: list[dict], stage: str, actor, index: int, n_actors: int, restarts: list[int],
                   retries: dict[str, int], last_node: str | None, shard: str) -> None:
    """After `actor` returned `shard`: if the GCS counts more restarts of it than seen so far,
    it died while merging that shard (an actor holds one shard at a time), was restarted and
    the shard retried. One event per restart."""
    count, node = actor_restarts(actor._actor_id.hex())
    while restarts[index] < count:
        restarts[index] += 1
        retries[shard] = retries.get(shard, 0) + 1
        moved = f", was on node {short(last_node)}" if last_node and last_node != node else ""
        report(events, log, stage, "actor_restart",
               f"merge actor {index + 1} of {n_actors} restarted on node {short(node)}{moved} (restart"
               f" {restarts[index]} of {MAX_RESTARTS}); shard {shard} retried ({MAX_TASK_RETRIES - retries[shard]}"
               " retries left)", actor=index, node=node, previous_node=last_node, shard=shard,
               restarts_left=MAX_RESTARTS - restarts[index], retries_left=MAX_TASK_RETRIES - retries[shard])


def _write_text(location: str, name: str, text: str) -> None:
    fs, path = filesystem(location)
    with fs.open_output_stream(f"{path}/{name}.tmp") as f:
        f.write(text.encode())
    fs.move(f"{path}/{name}.tmp", f"{path}/{name}")


def _delete_records(staging: str, plan: dict) -> None:
    """The resume records are not part of the output."""
    fs, path = filesystem(staging)
    for name in [PLAN_FILE] + [f"{s['file']}.done.json" for s in plan["shards"]]:
        if fs.get_file_info(f"{path}/{name}").type == FileType.File:
            fs.delete_file(f"{path}/{name}")


def _write_side_files(staging: str, shards: list[dict], total_bytes: int, side_dir: str | None, card: str | None,
                      extra_files: dict[str, str]) -> None:
    index = {
        "metadata": {"total_size": int(total_bytes)},
        "weight_map": {n: s["file"] for s in sorted(shards, key=lambda r: r["file"]) for n in s["names"]},
    }
    files = {"model.safetensors.index.json": json.dumps(index, indent=2, sort_keys=True) + "\n"}
    if card is not None:
        files["README.md"] = card
    files.update(extra_files)
    if side_dir is not None:
        for name in SIDE_FILES:
            src = model_path(side_dir) / name
            if src.is_file():
                files.setdefault(name, src.read_text())
    fs, path = filesystem(staging)
    for name, text in files.items():
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(text.encode())
