"""PEFT LoRA adapters folded exactly into their base: theta + scale * B @ A, in float32.

Pure: the fold is a function of tensors, `parse_adapter` maps PEFT's parameter names (given
the adapter's config and tensor shapes, read by `recall_ray.io.models.read_adapter`) onto the
base model's, and the checks below decide whether an adapter was made for a base before
anything is computed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import CheckpointError

if TYPE_CHECKING:  # the tensors come from the caller: the adapter checks need no torch
    import torch

PEFT_PREFIX = "base_model.model."
META_FILE = "recall_ray.json"  # written beside an adapter recall-ray trained: its base's fingerprint


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """scale * (B @ A) in float32 (A: [r, in], B: [out, r]): what the adapter adds to W."""
    delta = lora_b.float() @ lora_a.float()
    if fan_in_fan_out:  # GPT-2 style Conv1D stores W as [in, out]
        delta = delta.T
    return scale * delta


def fold_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + scale * (B @ A), computed in float32 (A: [r, in], B: [out, r], W: [out, in])."""
    return weight.float() + lora_delta(lora_a, lora_b, scale, fan_in_fan_out)


@dataclass(frozen=True)
class LoraTarget:
    """One base weight the adapter changes."""

    weight: str  # base parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    lora_a: str  # adapter tensor names
    lora_b: str
    scale: float


@dataclass(frozen=True)
class Adapter:
    path: str
    config: dict  # adapter_config.json
    infos: Mapping[str, Any]  # adapter tensor name -> info with .shape (safetensors_io.TensorInfo)
    targets: dict[str, LoraTarget]  # by base weight name
    meta: dict | None = field(default=None)  # recall_ray.json, when recall-ray trained it


def lora_scale(config: Mapping[str, Any]) -> float:
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def parse_adapter(path: str, config: dict, infos: Mapping[str, Any], meta: dict | None = None) -> Adapter:
    """An Adapter from its config and tensor infos; refuses what cannot be folded exactly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: adapter type {config.get('peft_type')} is not LoRA; only LoRA adapters can be"
                              " folded")
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: use_dora=true is not supported; merge the adapter with peft first")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path}: rank_pattern/alpha_pattern are not supported; merge the adapter with peft first")
    scale = lora_scale(config)
    targets: dict[str, LoraTarget] = {}
    for name in infos:
        if ".lora_A." not in name:
            if ".lora_B." not in name:
                raise CheckpointError(
                    f"{path}: adapter tensor {name} is not a LoRA A/B matrix (modules_to_save or trained"
                    " embeddings?); merge the adapter with peft first"
                )
            continue
        module = name.split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in infos:
            raise CheckpointError(f"{path}: {name} has no matching {b_name}")
        base_module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        weight = f"{base_module}.weight"
        targets[weight] = LoraTarget(weight, name, b_name, scale)
    if not targets:
        raise CheckpointError(f"{path}: adapter holds no LoRA tensors")
    return Adapter(str(path), config, infos, targets, meta)


def check_adapter_fits(adapter: Adapter, base_infos: Mapping[str, Any], base_fingerprint: str | None,
                       base_path: str) -> None:
    """Raise CheckpointError if the adapter was not made for this base: the fingerprint it
    recorded (when recall-ray trained it) differs, or a target's shape does not fit."""
    recorded = (adapter.meta or {}).get("base_fingerprint")
    if recorded and base_fingerprint is not None and recorded != base_fingerprint:
        raise CheckpointError(
            f"adapter {adapter.path} was trained on a different base than {base_path} (base fingerprint"
            f" {recorded[:12]} != {base_fingerprint[:12]}); point `base` at the model it was trained on"
        )
    fan = bool(adapter.config.get("fan_in_fan_out"))
    for t in adapter.targets.values():
        if t.weight not in base_infos:
            raise CheckpointError(f"adapter {adapter.path} changes {t.weight}, which base {base_path} does not have")
        out_dim, in_dim = base_infos[t.weight].shape[::-1] if fan else base_infos[t.weight].shape
        a, b = adapter.infos[t.lora_a].shape, adapter.infos[t.lora_b].shape
        if a[1] != in_dim or b[0] != out_dim or a[0] != b[1]:
            raise CheckpointError(
                f"adapter {adapter.path} does not match base {base_path}: {t.weight} is"
                f" {base_infos[t.weight].shape} but lora_A is {a} and lora_B is {b}"
            )


# ------------------------------------------------------------ the base an adapter names

def _squash(name: str) -> str:
    """A model name reduced for comparison: its last path component, lower case, letters and
    digits only ("HuggingFaceTB/SmolLM2-135M-Instruct" -> "smollm2135minstruct")."""
    last = PurePath(name.strip().rstrip("/\\")).name or name
    return re.sub(r"[^a-z0-9]", "", last.lower())


def names_agree(named: str, identities: Iterable[str]) -> bool:
    """Whether the base an adapter names (`base_model_name_or_path`) can be one of the base's
    names (its directory, its config's `_name_or_path`): one reduced name contains the other
    ("llama-7b" and "/models/Llama-7B-hf" agree; "SmolLM2-135M" and "smollm2-360m" do not)."""
    a = _squash(named)
    if not a:
        return True  # nothing named: nothing to compare
    return any(b and (a in b or b in a) for b in map(_squash, identities))


BASE_CHECKS = {
    "fingerprint": "fingerprint: the base recorded in recall_ray.json matches the weights",
    "name": "name: adapter_config.json's base_model_name_or_path agrees with the base's name",
    "none": "none possible: the adapter records no base (no recall_ray.json, no base_model_name_or_path)",
    "skipped": "skipped: base_name_check is false for this model",
}


def base_check(adapter: Adapter, base_identities: Iterable[str], label: str, name_check: bool = True) -> str:
    """Which check ties `adapter` to its base (a key of BASE_CHECKS), raising CheckpointError
    on a clear name mismatch. The fingerprint (check_adapter_fits) wins when recall-ray
    trained the adapter; otherwise the base PEFT recorded is compared by name, since an
    adapter of another base with the same shapes would fold without a word."""
    if (adapter.meta or {}).get("base_fingerprint"):
        return "fingerprint"
    named = adapter.config.get("base_model_name_or_path")
    if not named:
        return "none"
    if not name_check:
        return "skipped"
    identities = [i for i in base_identities if i]
    if not names_agree(str(named), identities):
        raise CheckpointError(
            f"model {label!r}: adapter {adapter.path} was made for base {named!r} (base_model_name_or_path in"
            f" adapter_config.json), but the base is {' / '.join(map(repr, identities))}: point `base` (or the"
            f" model's `adapter_base`) at the model it was trained on, or set `base_name_check: false` on model"
            f" {label!r} if it is the same model under another name")
    return "name"
