"""Architectures as data, and the pure layer-grouping rule of RECALL.

A template (one JSON file per model family, beside this module) lists the parameter names
of the embedding, of one decoder block (with `{i}` for its index) and of the final part
(final norm, LM head). Grouping is then one function of names: group 0 owns the
embeddings, group i >= 1 owns decoder block i-1, the final part belongs to the last group
(or to group 0 with `head_group="embedding"`). A floating-point tensor that no group
claims is an error, never a silent copy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

TEMPLATE_DIR = Path(__file__).resolve().parent


class GroupingError(ValueError):
    """Tensors the architecture template does not place in any layer group."""


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    num_layers_key: str
    embedding: tuple[str, ...]
    block_prefix: str
    block_params: tuple[str, ...]
    final: tuple[str, ...]
    optional_block_params: tuple[str, ...] = ()
    tied: dict[str, str] = field(default_factory=dict)  # tied name -> the name it shares storage with

    @classmethod
    def from_json(cls, path: str | Path) -> "Architecture":
        d = json.loads(Path(path).read_text())
        d.pop("ignored", None)
        for key in ("model_types", "architectures", "embedding", "block_params", "optional_block_params", "final"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)

    def num_layers(self, hf_config: dict) -> int:
        return int(hf_config[self.num_layers_key])


def shipped_architectures() -> list[Architecture]:
    return [Architecture.from_json(p) for p in sorted(TEMPLATE_DIR.glob("*.json"))]


def architecture_for(hf_config: dict, template_path: str | None = None) -> Architecture:
    """The template for a model's config.json (`model_type`), or the user's own JSON."""
    if template_path:
        return Architecture.from_json(template_path)
    model_type = hf_config.get("model_type")
    for arch in shipped_architectures():
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in shipped_architectures() for t in a.model_types)
    raise GroupingError(
        f"unknown architecture model_type={model_type!r} (known: {known}); write a template like"
        f" {TEMPLATE_DIR / 'llama.json'} and pass it as `architecture: my_family.json`"
    )


@dataclass(frozen=True)
class Grouping:
    """name -> layer group (0..num_layers) for every merged tensor; `tied` are not written."""

    groups: dict[str, int]
    tied: tuple[str, ...]
    num_groups: int

    def names_in(self, group: int) -> list[str]:
        return [n for n, g in self.groups.items() if g == group]


def assign_groups(
    names: Iterable[str],
    arch: Architecture,
    num_layers: int,
    tie_word_embeddings: bool = False,
    head_group: Literal["last", "embedding"] = "last",
) -> Grouping:
    """Assign every tensor name to exactly one layer group (pure; no I/O).

    Raises GroupingError listing the names that no group claims.
    """
    block_re = re.compile("^" + re.escape(arch.block_prefix).replace(re.escape("{i}"), r"(\d+)") + "(.+)$")
    block_known = set(arch.block_params) | set(arch.optional_block_params)
    final_group = num_layers if head_group == "last" else 0
    groups: dict[str, int] = {}
    tied: list[str] = []
    unclaimed: list[str] = []
    for name in names:
        if tie_word_embeddings and name in arch.tied:
            tied.append(name)  # shares storage with its partner: merged once, stays tied
            continue
        if name in arch.embedding:
            groups[name] = 0
            continue
        if name in arch.final:
            groups[name] = final_group
            continue
        m = block_re.match(name)
        if m and m.group(2) in block_known and int(m.group(1)) < num_layers:
            groups[name] = int(m.group(1)) + 1
            continue
        unclaimed.append(name)
    if unclaimed:
        shown = ", ".join(sorted(unclaimed)[:8]) + (" ..." if len(unclaimed) > 8 else "")
        raise GroupingError(
            f"{len(unclaimed)} tensor(s) belong to no layer group of the {arch.name!r} template: {shown}."
            " Add them to the template (embedding/block_params/final) or pass your own with `architecture:`"
        )
    return Grouping(groups=groups, tied=tuple(tied), num_groups=num_layers + 1)
