"""Layer grouping from the shipped architecture templates, on the real parameter names of
tiny transformers models of each family, against a mapping derived here independently
(by parsing the names), not from the templates."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from recall_ray.core.architectures import (
    GroupingError,
    architecture_for,
    assign_groups,
    shipped_architectures,
)

LAYERS = 3
BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def hf_names(model_type: str, tie: bool, **extra) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    return list(model.state_dict().keys())


def expected_group(name: str, num_layers: int, head_group: str) -> int:
    """The RECALL rule written from docs/design.md, by name parsing only."""
    if name == "model.embed_tokens.weight":
        return 0
    m = BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name in ("model.norm.weight", "lm_head.weight"):
        return num_layers if head_group == "last" else 0
    raise AssertionError(f"test does not know {name}")


def check_grouping(names, arch, tie, head_group):
    g = assign_groups(names, arch, LAYERS, tie_word_embeddings=tie, head_group=head_group)
    assert g.num_groups == LAYERS + 1
    # every tensor exactly once: in groups or in tied, never both, none dropped, none invented
    assert set(g.groups) | set(g.tied) == set(names)
    assert not set(g.groups) & set(g.tied)
    assert len(g.groups) + len(g.tied) == len(names)
    expected_tied = {"lm_head.weight"} & set(names) if tie else set()
    assert set(g.tied) == expected_tied
    for name, grp in g.groups.items():
        assert grp == expected_group(name, LAYERS, head_group), name
    for grp in range(g.num_groups):
        want = [n for n in names if n not in expected_tied and expected_group(n, LAYERS, head_group) == grp]
        assert sorted(g.names_in(grp)) == sorted(want)
        assert want, f"group {grp} is empty"
    # group 0 owns the embeddings; the tied head is never written separately
    assert g.groups["model.embed_tokens.weight"] == 0
    final = LAYERS if head_group == "last" else 0
    assert g.groups["model.norm.weight"] == final
    if not tie:
        assert g.groups["lm_head.weight"] == final
    return g


ARCHS = shipped_architectures()


def test_shipped_templates_cover_llama_qwen2_mistral():
    assert {t for a in ARCHS for t in a.model_types} >= {"llama", "qwen2", "mistral"}


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("head_group", ["last", "embedding"])
def test_every_tensor_of_real_model_assigned_once(arch, tie, head_group):
    names = hf_names(arch.model_types[0], tie)
    assert architecture_for({"model_type": arch.model_types[0]}).name == arch.name
    check_grouping(names, arch, tie, head_group)


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
@pytest.mark.parametrize("tie", [True, False])
def test_names_from_saved_checkpoint(arch, tie, tmp_path):
    """What the merge reads: the safetensors keys of save_pretrained (tied head dropped or not)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch.model_types[0], vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=tie)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert arch.num_layers(cfg.to_dict()) == LAYERS
    g = check_grouping(names, arch, tie, "last")
    if not tie:
        assert "lm_head.weight" in g.groups


@pytest.mark.parametrize("arch", [a for a in ARCHS if "llama" in a.model_types], ids=lambda a: a.name)
def test_llama_attention_and_mlp_bias_are_grouped(arch):
    names = hf_names("llama", False, attention_bias=True, mlp_bias=True)
    assert any(n.endswith("o_proj.bias") for n in names) and any(n.endswith("down_proj.bias") for n in names)
    check_grouping(names, arch, False, "last")


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
@pytest.mark.parametrize("extra", [
    "model.extra_adapter.weight",                       # unknown top-level tensor
    f"model.layers.{LAYERS}.mlp.up_proj.weight",        # block index beyond num_layers
    "model.layers.0.self_attn.q_norm.weight",           # unknown block parameter
    "model.layers.1.mlp.up_proj.weight_scale",          # suffix that only starts like a known one
])
def test_unknown_name_raises_naming_it(arch, extra):
    names = hf_names(arch.model_types[0], False) + [extra]
    with pytest.raises(GroupingError) as e:
        assign_groups(names, arch, LAYERS)
    assert extra in str(e.value)
    assert "1 tensor" in str(e.value)


def test_tied_head_is_a_group_member_when_not_tied():
    arch = architecture_for({"model_type": "llama"})
    g = assign_groups(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"], arch, 0)
    assert g.groups == {"model.embed_tokens.weight": 0, "lm_head.weight": 0, "model.norm.weight": 0}
    assert g.tied == ()


def test_architecture_for_unknown_model_type_is_helpful():
    with pytest.raises(GroupingError) as e:
        architecture_for({"model_type": "gpt_neox"})
    msg = str(e.value)
    assert "gpt_neox" in msg
    for known in ("llama", "qwen2", "mistral"):
        assert known in msg
    assert "architecture" in msg and ".json" in msg
    with pytest.raises(GroupingError, match="None"):
        architecture_for({})


def test_architecture_for_user_template(tmp_path):
    import json

    src = next(a for a in ARCHS if a.name == "llama")
    d = {"name": "mine", "model_types": ["my_llama"], "architectures": [], "num_layers_key": "n_layer",
         "embedding": list(src.embedding), "block_prefix": src.block_prefix, "block_params": list(src.block_params),
         "final": list(src.final), "tied": dict(src.tied)}
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(d))
    arch = architecture_for({"model_type": "unknown"}, template_path=str(p))
    assert arch.name == "mine" and arch.num_layers({"n_layer": 7}) == 7
