"""PEFT LoRA adapters folded exactly into their base: theta + scale * B @ A, in float32.

The fold is a pure function of tensors; the rest maps PEFT's parameter names onto the
base model's and checks that the adapter fits the base before anything is computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_io import CheckpointError, TensorInfo, list_weight_files, tensor_infos

PEFT_PREFIX = "base_model.model."


def fold_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + scale * (B @ A), computed in float32 (A: [r, in], B: [out, r], W: [out, in])."""
    delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    if fan_in_fan_out:  # GPT-2 style Conv1D stores W as [in, out]
        delta = delta.T
    return weight.to(torch.float32) + scale * delta


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
    config: dict
    infos: dict[str, TensorInfo]
    targets: dict[str, LoraTarget]  # by base weight name


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_adapter(path: str | Path) -> Adapter:
    """Parse an adapter directory; refuse what cannot be folded exactly."""
    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: adapter type {cfg.get('peft_type')} is not LoRA; only LoRA adapters can be folded")
    for unsupported in ("use_dora",):
        if cfg.get(unsupported):
            raise CheckpointError(f"{path}: {unsupported}=true is not supported; merge the adapter with peft first")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path}: rank_pattern/alpha_pattern are not supported; merge the adapter with peft first")
    infos = tensor_infos(list_weight_files(path))
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
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
    return Adapter(str(path), cfg, infos, targets)


def check_adapter_fits(adapter: Adapter, base_infos: dict[str, TensorInfo], base_fingerprint: str | None,
                       base_path: str) -> None:
    """Raise CheckpointError if the adapter was not made for this base."""
    meta = Path(adapter.path) / "recall_ray.json"
    if meta.is_file() and base_fingerprint is not None:
        recorded = json.loads(meta.read_text()).get("base_fingerprint")
        if recorded and recorded != base_fingerprint:
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
