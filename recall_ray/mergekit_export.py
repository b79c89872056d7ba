"""Export a merge as a mergekit YAML that reproduces it (`mergekit-yaml merge.yaml OUT`).

Every `MergeMethod` maps onto the mergekit method of its kind's name (linear, task_arithmetic,
ties, dare_linear, dare_ties), with the global parameters its kind declares beside its rule
(core/merge_methods.py, `KINDS`). Per-layer-group weights become mergekit conditional parameters:
a list of `{filter: ..., value: ...}` per model, one entry per tensor-name pattern of a group,
then a default `{value: ...}`.

mergekit's rule (mergekit 0.1.5, mergekit/config.py `evaluate_setting`, the loop over the
entries with `(cond.filter is None) or (cond.filter == "*") or (tensor_name and cond.filter in
tensor_name)`): the entries are tried in order and the first whose `filter` is None, "*" or a
*substring* of the tensor name gives the value. So the filters are written most specific first
(exact names of the embedding/final tensors, then the block prefixes `model.layers.{i}.` from
the highest index down) and `block_filters` checks, with that same rule, that every tensor of
the grouping resolves to its own group: the trailing "." of a block prefix already keeps
`model.layers.1.` out of `model.layers.11.`, and the check makes the export fail loudly rather
than merge a tensor with another group's weight.

Semantics that match (cross-checked to allclose(atol=1e-6, rtol=1e-5) in
tests/test_mergekit_crosscheck.py): linear with `normalize: true` (recall-ray renormalises
every group's row to sum to 1, mergekit divides the weighted sum by the sum of the weights: the
same; a base with weight 0 everywhere is listed with its zeros and changes nothing);
task_arithmetic and ties (mergekit's generalized task arithmetic: magnitude top-k per delta with
k = max(1, int(density * numel)), weights applied to the trimmed deltas, sign election by sum
with 0 counted as +, disjoint mean divided by the sum of agreeing weights when `normalize`,
times `lambda`). Only exact ties in |delta| at the top-k cut may be broken differently
(recall-ray keeps the lowest index, mergekit's argsort is unstable). DARE is exported with
mergekit's dare_linear/dare_ties and `rescale: true`, but its masks are random (recall-ray's
come from a generator seeded per tensor and model; mergekit draws from torch's global one) and
mergekit rescales the survivors to the delta's L1 norm rather than by 1/density, so those
tensors differ from recall-ray's by construction.

Both compute in float32; recall-ray writes each tensor back in its input dtype, mergekit in
`out_dtype` (or the computation dtype): pass `out_dtype` for bf16/fp16 models.

The tokenizer is left as it is: no `tokenizer_source` (which would make mergekit rebuild the
vocabulary and permute embedding rows); mergekit then copies the tokenizer files of
`base_model` (model 0), which validate.check_models has already checked all models share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from .core.architectures import Architecture, Grouping
from .core.merge_methods import KINDS, MergeMethod
from .io.models import ResolvedModel

MERGEKIT_VERSION = "0.1.5"


def mergekit_model_path(model: str | ResolvedModel) -> str:
    """The mergekit model string: a directory, or `base+adapter` for a LoRA adapter.

    mergekit folds `base+adapter` itself (peft's merge_and_unload into a copy under
    `--lora-merge-cache`): W + scale * B @ A in the base's dtype, the fold recall-ray applies
    in float32, so for a float32 base the tensors agree to rounding.
    """
    if isinstance(model, ResolvedModel):
        if model.kind == "adapter":
            path = f"{model.base_path}+{model.path}"
        else:
            path = model.path
    else:
        path = str(model)
    parts = path.split("+")
    if len(parts) > 2 or any(c in p for p in parts for c in "@") or not all(parts):
        raise ValueError(
            f"{path!r} cannot be written as a mergekit model reference (mergekit splits on '+' for"
            " base+adapter and on '@' for a revision); move or symlink it to a path without them"
        )
    return path


def _matches(filt: str | None, name: str) -> bool:
    """mergekit 0.1.5 `evaluate_setting`: None or '*' match everything, else substring."""
    return filt is None or filt == "*" or filt in name


def block_filters(grouping: Grouping, arch: Architecture, num_layers: int) -> list[tuple[str, int]]:
    """(filter, group) pairs, in the order mergekit must try them, covering every tensor name
    of `grouping` (tied names included, with the group of the tensor they share storage with).

    Raises ValueError when, under mergekit's first-substring-match rule, some name would
    resolve to another group than its own.
    """
    if grouping.num_groups != num_layers + 1:
        raise ValueError(f"grouping has {grouping.num_groups} groups, expected num_layers + 1 = {num_layers + 1}")
    prefixes = [(arch.block_prefix.replace("{i}", str(i)), i + 1) for i in range(num_layers)]
    own: dict[str, int] = dict(grouping.groups)
    for name in grouping.tied:
        partner = arch.tied.get(name)
        if partner in own:
            own[name] = own[partner]
    exact = sorted((n, g) for n, g in own.items() if not any(n.startswith(p) for p, _ in prefixes))
    # exact names first; longer names before their own substrings; then blocks from the top down
    exact.sort(key=lambda ng: -len(ng[0]))
    filters = exact + sorted(prefixes, key=lambda pg: -pg[1])
    for name, group in own.items():
        first = next((g for f, g in filters if _matches(f, name)), None)
        if first != group:
            raise ValueError(
                f"tensor {name} (layer group {group}) would take the weight of group {first} in mergekit;"
                " the architecture's names cannot be told apart by substring filters"
            )
    return filters


def _per_group_setting(values: Sequence[float], filters: list[tuple[str, int]]) -> Any:
    """A scalar when one value serves every group, else the conditional list (+ default)."""
    vals = [float(v) for v in values]
    if all(v == vals[0] for v in vals):
        return vals[0]
    entries: list[dict[str, Any]] = [{"filter": f, "value": vals[g]} for f, g in filters]
    # Reached only by a tensor outside the grouping (none for the shipped templates): the
    # mean over groups, so that a default row still sums to 1 for the linear method.
    entries.append({"value": sum(vals) / len(vals)})
    return entries


def mergekit_config(method: MergeMethod, model_paths: Sequence[str | ResolvedModel], grouping: Grouping,
                    arch: Architecture, num_layers: int, dtype: str = "float32",
                    out_dtype: str | None = None) -> dict:
    """The mergekit configuration (a plain dict, as `yaml.safe_load` of the YAML gives it).

    model_paths: the K models in merge order, model 0 the base (directories, or ResolvedModel
    for adapters, which become `base+adapter`). dtype: mergekit's computation dtype (recall-ray
    computes in float32); out_dtype: the saved dtype, when it should differ from dtype (e.g.
    "bfloat16" for bf16 models: recall-ray writes each tensor in its input dtype).
    """
    weights = [list(map(float, row)) for row in method.weights]
    if len(weights) != grouping.num_groups:
        raise ValueError(f"method has {len(weights)} weight rows, the grouping {grouping.num_groups} groups")
    if any(len(row) != len(model_paths) for row in weights):
        raise ValueError(f"method weights are for {method.num_models} models, {len(model_paths)} paths given")
    if method.kind not in KINDS:
        raise ValueError(f"no mergekit export for merge kind {method.kind!r}")
    kind = KINDS[method.kind]
    paths = [mergekit_model_path(p) for p in model_paths]
    if "+" in paths[0]:
        raise ValueError("model 0 (the base) must be a full model, not an adapter")
    filters = block_filters(grouping, arch, num_layers)
    column = lambda q: [row[q] for row in weights]  # noqa: E731

    cfg: dict[str, Any] = {"merge_method": kind.name, "base_model": paths[0], "dtype": dtype}
    if out_dtype is not None and out_dtype != dtype:
        cfg["out_dtype"] = out_dtype
    cfg["parameters"] = kind.mergekit_parameters(method)
    if not kind.task_vectors:
        cfg["models"] = [{"model": p, "parameters": {"weight": _per_group_setting(column(q), filters)}}
                         for q, p in enumerate(paths)]
    else:
        cfg["models"] = [{"model": paths[0]}] + [
            {"model": p, "parameters": {"weight": _per_group_setting(column(q), filters),
                                        "density": float(method.density)}}
            for q, p in enumerate(paths) if q > 0
        ]
    return cfg


def _header(method: MergeMethod, cfg: dict, num_layers: int) -> str:
    has_lora = any("+" in m["model"] for m in cfg["models"])
    cmd = "mergekit-yaml merge.yaml OUT" + (" --lora-merge-cache LORA_CACHE_DIR" if has_lora else "")
    lines = [
        f"mergekit {MERGEKIT_VERSION} configuration written by recall-ray.",
        f"Reproduces recall-ray's merge {method.label!r} ({method.kind}) of {method.num_models} models over"
        f" {method.num_groups} layer groups",
        f"(group 0: embeddings; group i: decoder block i-1 of {num_layers}; final norm and LM head: the group",
        "their filter names).",
        f"Run: {cmd}",
        "Per-group weights are mergekit filters: the first entry whose filter is a substring of",
        "the tensor name gives the value (mergekit/config.py, evaluate_setting).",
    ]
    kind = KINDS[method.kind]
    if not kind.task_vectors:
        lines.append("normalize: true - each group's weights are divided by their sum, as recall-ray does.")
    else:
        lines.append("base_model is model 0; the task vectors are taken from it.")
    lines += kind.mergekit_note(method)
    if has_lora:
        lines.append("base+adapter models: mergekit folds the LoRA into the base (peft merge_and_unload).")
    return "".join(f"# {l}\n" for l in lines)


def to_yaml(method: MergeMethod, cfg: dict, num_layers: int) -> str:
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
    return _header(method, cfg, num_layers) + body


def write_mergekit_yaml(path: str | Path | None, method: MergeMethod, model_paths: Sequence[str | ResolvedModel],
                        grouping: Grouping, arch: Architecture, num_layers: int, dtype: str = "float32",
                        out_dtype: str | None = None) -> str:
    """The YAML text (header comment + config); also written to `path` unless it is None."""
    cfg = mergekit_config(method, model_paths, grouping, arch, num_layers, dtype, out_dtype)
    text = to_yaml(method, cfg, num_layers)
    if path is not None:
        Path(path).write_text(text)
    return text


_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def mergekit_file(method: MergeMethod, models: Sequence[ResolvedModel], modelset) -> dict[str, str]:
    """{"mergekit.yaml": text} for a merge's output directory: computed in float32 like
    recall-ray, saved in the models' dtype (that of their first merged tensor)."""
    first = next(iter(modelset.grouping.groups))
    out_dtype = _ST_NAMES.get(modelset.infos[first].dtype, "float32")
    text = write_mergekit_yaml(None, method, list(models), modelset.grouping, modelset.arch,
                               modelset.arch.num_layers(modelset.hf_config), "float32",
                               None if out_dtype == "float32" else out_dtype)
    return {"mergekit.yaml": text}
