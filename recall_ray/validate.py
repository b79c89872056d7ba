"""Checks on the set of input models, run before any work: same architecture, same tensors,
same tokenizer, adapters that fit their base, every tensor in a layer group; and the error for
weights with NaN/Inf, which the representation stage's loads find (docs/design.md, "Bad input").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from .core.architectures import Architecture, Grouping, architecture_for, assign_groups
from .core.errors import CheckpointError
from .core.lora import base_check, check_adapter_fits
from .io.models import ModelTensors, ResolvedModel, tokenizer_fingerprint
from .io.safetensors_io import TensorInfo, content_fingerprint
from .io.storage import model_path

# config.json keys that must agree for a tensor-by-tensor merge to make sense.
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")


class ModelMismatchError(ValueError):
    """Models that cannot be merged with each other."""


class Fingerprints(Mapping[str, str]):
    """label -> the model's fingerprint (ModelTensors.fingerprint: the identity its stage keys
    are built from), made when first asked for: either given by a load that read every tensor
    anyway (`learn`, the representation stages') or read for itself (two small pieces of every
    tensor; `bytes_read` counts them). So a job whose keys can wait for its loads reads no
    input byte a third time for them.

    Not JSON: a key needs every fingerprint (`all()`), never the few known so far."""

    def __init__(self, models: Sequence[ResolvedModel]):
        self._models = {m.label: m for m in models}
        self._known: dict[str, str] = {}
        self._weights: dict[str, str] = {}  # weights dir -> its part (a LoRA base's, read once for its adapters)
        self.bytes_read = 0  # tensor bytes read for fingerprints that no load gave

    def __getitem__(self, label: str) -> str:
        if label not in self._known:
            m = self._models[label]  # KeyError for a label not in the set
            t = ModelTensors(m)
            weights = self._weights.get(m.weights_dir)
            if weights is None:
                weights = self._weights[m.weights_dir] = t.weights_fingerprint()
                self.bytes_read += t.fingerprint_bytes()
            elif t.adapter is not None:
                self.bytes_read += t.fingerprint_bytes(weights=False)
            self._known[label] = t.fingerprint(weights_fp=weights)
        return self._known[label]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def learn(self, label: str, fingerprint: str) -> None:
        """The fingerprint a load that read every tensor of model `label` made of the pieces
        it read (models.WeightsRead.fingerprint)."""
        known = self._known.setdefault(label, fingerprint)
        if known != fingerprint:
            raise CheckpointError(f"model {label!r} ({self._models[label].path}) changed while the job read it: its"
                                  " weights are not those it was checked with; rerun once they are no longer written")

    def all(self) -> dict[str, str]:
        """Every model's fingerprint, as a plain dict (for keys)."""
        return {label: self[label] for label in self._models}

    def __str__(self) -> str:  # stable_hash turns what is not JSON into str: refuse, loudly
        raise TypeError("Fingerprints is not a key: use .all()")

    def __repr__(self) -> str:
        return f"Fingerprints(known={self._known!r}, of={list(self._models)!r})"


@dataclass(frozen=True)
class ModelSet:
    models: list[ResolvedModel]
    arch: Architecture
    hf_config: dict
    grouping: Grouping
    infos: dict[str, TensorInfo]  # of the first model (all agree)
    fingerprints: Fingerprints  # label -> weights (+ adapter) fingerprint, made when first needed
    base_checks: dict[str, str]  # adapter label -> how it was tied to its base (core.lora.BASE_CHECKS)


def check_models(models: list[ResolvedModel], architecture_path: str | None = None,
                 head_group: str = "last") -> ModelSet:
    """Validate that `models` (base first) can be merged; raise with the model and tensor named."""
    if len(models) < 2:
        raise ModelMismatchError("a merge needs at least two models (e.g. the base and the new model)")
    configs = [m.hf_config() for m in models]
    ref_cfg = configs[0]
    for m, cfg in zip(models[1:], configs[1:]):
        for key in SHAPE_KEYS:
            if cfg.get(key) != ref_cfg.get(key):
                what = "vocabulary size" if key == "vocab_size" else "architecture"
                raise ModelMismatchError(
                    f"model {m.label!r} has a different {what} from {models[0].label!r}: {key}={cfg.get(key)!r}"
                    f" vs {ref_cfg.get(key)!r}; RECALL merges fine-tuned copies of one base model"
                )
    arch = architecture_for(ref_cfg, architecture_path)

    tok_ref = tokenizer_fingerprint(models[0].tokenizer_dir)
    for m in models[1:]:
        tok = tokenizer_fingerprint(m.tokenizer_dir)
        if tok_ref and tok and tok != tok_ref:
            raise ModelMismatchError(
                f"model {m.label!r} has a different tokenizer from {models[0].label!r} ({m.tokenizer_dir} vs"
                f" {models[0].tokenizer_dir}); merged models must share one vocabulary"
            )

    tensors = [ModelTensors(m) for m in models]
    base_fp_cache: dict[str, str] = {}
    base_checks: dict[str, str] = {}
    ref_infos = tensors[0].infos
    for m, t in zip(models, tensors):
        if t.adapter is not None:
            if m.base_path not in base_fp_cache:
                base_fp_cache[m.base_path] = content_fingerprint(m.base_path, m.allow_pickle)
            check_adapter_fits(t.adapter, t.infos, base_fp_cache[m.base_path], m.base_path)  # shapes, fingerprint
            base_checks[m.label] = base_check(t.adapter, base_names(m.base_path), m.label, m.base_name_check)
        _check_same_tensors(models[0].label, ref_infos, m.label, t.infos)

    grouping = assign_groups(
        ref_infos.keys(), arch, arch.num_layers(ref_cfg),
        tie_word_embeddings=bool(ref_cfg.get("tie_word_embeddings")), head_group=head_group,
    )
    non_float = [n for n in grouping.groups if not ref_infos[n].is_float]
    if non_float:
        raise ModelMismatchError(f"non-floating-point tensors in layer groups are not mergeable: {non_float[:5]}")
    return ModelSet(models, arch, ref_cfg, grouping, ref_infos, Fingerprints(models), base_checks)


def base_names(model_dir: str) -> list[str]:
    """The names a base model goes by: its directory, and the `_name_or_path` its
    config.json records (the hub name it was saved from), when there is one."""
    names = [model_dir]
    cfg = model_path(model_dir) / "config.json"
    if cfg.is_file():
        recorded = json.loads(cfg.read_text()).get("_name_or_path")
        if recorded:
            names.append(str(recorded))
    return names


def _check_same_tensors(ref_label: str, ref: dict[str, TensorInfo], label: str, infos: dict[str, TensorInfo]) -> None:
    missing = sorted(set(ref) - set(infos))
    extra = sorted(set(infos) - set(ref))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"extra {extra[:5]}")
        raise ModelMismatchError(
            f"model {label!r} does not have the same tensors as {ref_label!r}: {'; '.join(parts)};"
            " all models must be copies of one architecture"
        )
    for name, info in ref.items():
        other = infos[name]
        if other.shape != info.shape:
            raise ModelMismatchError(
                f"model {label!r} tensor {name} has shape {list(other.shape)}, {ref_label!r} has {list(info.shape)}"
            )


def nonfinite_by_label(found: list[tuple[ResolvedModel, dict]], weights_owner: dict[str, str]) -> dict[str, list[str]]:
    """{label: tensors with NaN/Inf} from what loads found ({"weights": names in the full
    weights, "adapter": "<adapter dir>:<name>"}): a full weights' tensor goes to the full
    model holding those weights (`weights_owner[weights_dir]`, e.g. the base that an adapter
    was loaded on), or to the loaded model when no full model of the job holds them."""
    out: dict[str, list[str]] = {}
    for model, bad in found:
        if bad.get("weights"):
            owner = weights_owner.get(model.weights_dir, model.label)
            out[owner] = sorted(set(out.get(owner, [])) | set(bad["weights"]))
        if bad.get("adapter"):
            out[model.label] = sorted(set(out.get(model.label, [])) | set(bad["adapter"]))
    return out


def raise_if_nonfinite(results: dict[str, list[str]]) -> None:
    """The refusal of weights with NaN/Inf (the representation stages' loads find them)."""
    for label, bad in results.items():
        if bad:
            raise CheckpointError(
                f"model {label!r} has NaN or Inf in {len(bad)} tensor(s), e.g. {bad[:3]}; a diverged fine-tune"
                " cannot be merged: retrain it or drop it from `experts`"
            )
