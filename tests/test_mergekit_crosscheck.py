"""mergekit cross-check: the YAML that recall_ray.mergekit_export writes for a merge, run
through mergekit 0.1.5 in-process (CPU, offline), gives the same tensors as recall-ray's own
sharded merge, for linear with per-layer weights, task_arithmetic and TIES, on tiny Llama
models (2 layers, and 12 layers for the `model.layers.1.` vs `model.layers.11.` filters),
and with a LoRA adapter as an expert (mergekit's `base+adapter`). DARE's YAML is checked
for its content only: its masks are random, so its tensors cannot agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration, evaluate_setting  # noqa: E402
from mergekit.merge import run_merge as mergekit_run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import make_lora, make_tiny_llama, perturbed_copy  # noqa: E402
from recall_ray.cluster.merge import run_merge  # noqa: E402
from recall_ray.core.merge_methods import MergeMethod  # noqa: E402
from recall_ray.mergekit_export import block_filters, mergekit_config, write_mergekit_yaml  # noqa: E402
from recall_ray.io.models import resolve_model  # noqa: E402
from recall_ray.validate import check_models  # noqa: E402

ATOL, RTOL = 1e-6, 1e-5


# ---------------------------------------------------------------- models and helpers


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory, tiny_dir) -> list[Path]:
    """Base + 2 experts with 12 decoder blocks (hidden 32) and an untied LM head."""
    root = tmp_path_factory.mktemp("mk_deep")
    base = make_tiny_llama(root / "base", seed=1, layers=12, hidden=32, tie=False, tokenizer_dir=tiny_dir)
    return [base] + [perturbed_copy(base, root / f"e{i}", seed=200 + i) for i in range(2)]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir) -> Path:
    """A PEFT LoRA adapter on tiny_dir with non-zero B (so it really changes q/v_proj)."""
    out = tmp_path_factory.mktemp("mk_adapter") / "lora"
    make_lora(tiny_dir, out, seed=0, scale=0.1)
    return out


def model_set(dirs: list[Path], base: Path, head_group: str = "last"):
    models = [resolve_model(f"m{q}", str(d), str(base)) for q, d in enumerate(dirs)]
    return models, check_models(models, None, head_group)


def group_varying_weights(num_groups: int, num_models: int, seed: int, base_zero: bool) -> np.ndarray:
    """[G, K] rows summing to 1 that differ in every group (and per model across groups)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.0, size=(num_groups, num_models))
    if base_zero:
        w[:, 0] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    assert len({tuple(r) for r in w.round(12)}) == num_groups
    return w


def read_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """mergekit must not reach the Hugging Face hub: it is given local paths only (it only
    asks the hub for a path that does not exist locally, mergekit/common.py local_path)."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"mergekit tried to reach the hub: {args} {kwargs}")

    for fn in ("snapshot_download", "list_repo_files", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, fn, refuse)


def run_mergekit(text: str, out: Path, lora_cache: Path | None = None) -> None:
    options = MergeOptions(device="cpu", lazy_unpickle=False, quiet=True, write_model_card=False,
                           lora_merge_cache=str(lora_cache) if lora_cache else None)
    mergekit_run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options)


def crosscheck(tmp_path: Path, dirs: list[Path], method: MergeMethod, ray_session, lora_cache: bool = False):
    """recall-ray's merge and mergekit's run of the exported YAML: same tensors."""
    models, ms = model_set(dirs, dirs[0])
    num_layers = ms.arch.num_layers(ms.hf_config)
    ours = tmp_path / "ours"
    run_merge(models, ms.grouping, ms.infos, method, str(ours), overwrite=False, num_actors=1, side_dir=str(dirs[0]))
    text = write_mergekit_yaml(tmp_path / "merge.yaml", method, models, ms.grouping, ms.arch, num_layers)
    assert text.startswith("# ") and "mergekit-yaml merge.yaml OUT" in text
    theirs = tmp_path / "mergekit"
    run_mergekit(text, theirs, tmp_path / "lora_cache" if lora_cache else None)

    a, b = read_tensors(ours), read_tensors(theirs)
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    assert set(a) == set(ms.grouping.groups)
    base = read_tensors(dirs[0]) if not lora_cache else None
    changed = 0
    for name in sorted(a):
        assert a[name].dtype == b[name].dtype == torch.float32, name
        assert torch.allclose(a[name], b[name], atol=ATOL, rtol=RTOL), (
            f"{name} (group {ms.grouping.groups[name]}): max |diff| {(a[name] - b[name]).abs().max().item():.3g}")
        if base is not None and not torch.allclose(a[name], base[name], atol=1e-4):
            changed += 1
    if base is not None:
        assert changed > len(a) // 2  # the merge is not (close to) a copy of the base
    # the tokenizer came along unchanged (copied from base_model, no vocabulary rebuild)
    assert (theirs / "tokenizer.json").read_bytes() == (Path(dirs[0]) / "tokenizer.json").read_bytes()
    return ms, a


# ---------------------------------------------------------------- end-to-end cross-checks


def test_linear_per_layer_base_zero(tmp_path, tiny_dir, tiny_experts, ray_session):
    """RECALL's case: the base has weight 0 in every group, experts' weights vary per group."""
    dirs = [tiny_dir, *tiny_experts]
    _, ms = model_set(dirs, tiny_dir)
    w = group_varying_weights(ms.grouping.num_groups, 3, seed=0, base_zero=True)
    crosscheck(tmp_path, dirs, MergeMethod("recall", "linear", w), ray_session)


def test_linear_12_layers_filters_do_not_collide(tmp_path, deep_models, ray_session):
    """13 groups with distinct weights: a filter `model.layers.1.` that also caught
    `model.layers.11.` (or lm_head/final norm caught by a block filter) would show here."""
    _, ms = model_set(deep_models, deep_models[0])
    assert ms.grouping.num_groups == 13 and "lm_head.weight" in ms.grouping.groups
    w = group_varying_weights(13, 3, seed=1, base_zero=False)
    crosscheck(tmp_path, deep_models, MergeMethod("recall", "linear", w), ray_session)


@pytest.mark.parametrize("kind,density,lam,normalize", [
    ("task_arithmetic", 1.0, 0.7, False),
    ("ties", 0.3, 0.9, True),
])
def test_task_vector_kinds(tmp_path, tiny_dir, tiny_experts, ray_session, kind, density, lam, normalize):
    dirs = [tiny_dir, *tiny_experts]
    _, ms = model_set(dirs, tiny_dir)
    w = group_varying_weights(ms.grouping.num_groups, 3, seed=2, base_zero=True)
    crosscheck(tmp_path, dirs, MergeMethod(kind, kind, w, density=density, lam=lam, normalize=normalize), ray_session)


def test_adapter_expert_task_arithmetic(tmp_path, tiny_dir, tiny_experts, adapter_dir, ray_session):
    """A LoRA adapter expert: mergekit folds `base+adapter` with peft, recall-ray in float32."""
    dirs = [tiny_dir, tiny_experts[0], adapter_dir]
    _, ms = model_set(dirs, tiny_dir)
    w = group_varying_weights(ms.grouping.num_groups, 3, seed=4, base_zero=True)
    crosscheck(tmp_path, dirs, MergeMethod("ta", "task_arithmetic", w, lam=1.0, normalize=True), ray_session,
               lora_cache=True)


# ---------------------------------------------------------------- the YAML itself


@pytest.mark.parametrize("head_group", ["last", "embedding"])
def test_filters_resolve_with_mergekits_own_rule(deep_models, head_group):
    """Every tensor of the 12-layer model gets its own group's weight when mergekit's
    `evaluate_setting` (first entry whose filter is a substring of the name) reads the YAML,
    with the final norm and LM head in the last group or in group 0."""
    models, ms = model_set(deep_models, deep_models[0], head_group)
    assert ms.grouping.groups["lm_head.weight"] == (12 if head_group == "last" else 0)
    w = group_varying_weights(13, 3, seed=5, base_zero=False)
    method = MergeMethod("recall", "linear", w)
    cfg = yaml.safe_load(write_mergekit_yaml(None, method, models, ms.grouping, ms.arch, 12))
    assert cfg["merge_method"] == "linear" and cfg["parameters"] == {"normalize": True}
    assert cfg["dtype"] == "float32" and "tokenizer_source" not in cfg and "tokenizer" not in cfg
    assert [m["model"] for m in cfg["models"]] == [str(d) for d in deep_models]
    filters = [e.get("filter") for e in cfg["models"][0]["parameters"]["weight"]]
    assert filters.index("model.layers.11.") < filters.index("model.layers.1.")
    assert filters[-1] is None  # the default entry comes last
    assert "model.layers.1." not in "model.layers.11.self_attn.q_proj.weight"  # the trailing dot
    for q, m in enumerate(cfg["models"]):
        setting = MergeConfiguration.model_validate(cfg).models[q].parameters["weight"]
        for name, g in ms.grouping.groups.items():
            assert evaluate_setting(name, setting, validate=float) == w[g, q], (name, q)


def test_block_filters_refuse_a_grouping_filters_cannot_express(deep_models):
    _, ms = model_set(deep_models, deep_models[0])
    groups = dict(ms.grouping.groups)
    groups["model.layers.3.mlp.up_proj.weight"] = 1  # not the group its name says
    bad = dataclasses.replace(ms.grouping, groups=groups)
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        block_filters(bad, ms.arch, 12)


def test_constant_weights_become_scalars(tiny_dir, tiny_experts):
    models, ms = model_set([tiny_dir, *tiny_experts], tiny_dir)
    G = ms.grouping.num_groups
    method = MergeMethod("avg", "linear", [[1 / 3] * 3] * G)
    cfg = mergekit_config(method, [m.path for m in models], ms.grouping, ms.arch, G - 1)
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [1 / 3] * 3


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_yaml(tmp_path, tiny_dir, tiny_experts, kind):
    models, ms = model_set([tiny_dir, *tiny_experts], tiny_dir)
    G = ms.grouping.num_groups
    w = group_varying_weights(G, 3, seed=6, base_zero=True)
    method = MergeMethod("dare", kind, w, density=0.4, lam=0.8, normalize=kind == "dare_linear", seed=7)
    text = write_mergekit_yaml(tmp_path / "dare.yaml", method, models, ms.grouping, ms.arch, G - 1)
    assert (tmp_path / "dare.yaml").read_text() == text
    header = "".join(l for l in text.splitlines(keepends=True) if l.startswith("#"))
    assert "random" in header and "differ" in header
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == kind and cfg["base_model"] == str(tiny_dir)
    assert cfg["parameters"] == {"lambda": 0.8, "normalize": kind == "dare_linear", "rescale": True}
    assert cfg["models"][0] == {"model": str(tiny_dir)}  # the base: no weight, no density
    for q, m in enumerate(cfg["models"][1:], start=1):
        assert m["parameters"]["density"] == 0.4
        entries = m["parameters"]["weight"]
        block_values = {e["value"] for e in entries if e.get("filter", "").startswith("model.layers.")}
        assert block_values == {w[g, q] for g in range(1, G)}
    MergeConfiguration.model_validate(cfg)  # mergekit accepts it
    # and runs it (same tensor names; values differ: random masks)
    run_mergekit(text, tmp_path / "out")
    assert set(read_tensors(tmp_path / "out")) == set(ms.grouping.groups)


def test_adapter_expert_yaml(tiny_dir, tiny_experts, adapter_dir):
    models, ms = model_set([tiny_dir, tiny_experts[0], adapter_dir], tiny_dir)
    assert models[2].kind == "adapter"
    G = ms.grouping.num_groups
    method = MergeMethod("ties", "ties", [[0.0, 0.5, 0.5]] * G, density=0.5)
    text = write_mergekit_yaml(None, method, models, ms.grouping, ms.arch, G - 1)
    cfg = yaml.safe_load(text)
    assert cfg["models"][2]["model"] == f"{tiny_dir}+{adapter_dir}"
    assert "--lora-merge-cache" in text
    ref = MergeConfiguration.model_validate(cfg).models[2].model
    assert ref.model.path == str(tiny_dir) and ref.lora.path == str(adapter_dir)
    with pytest.raises(ValueError, match="base"):
        mergekit_config(method, [models[2], models[1], models[0]], ms.grouping, ms.arch, G - 1)


def test_the_jobs_own_mergekit_yaml_reproduces_its_merges(tiny_run, tmp_path):
    """Every merge the job writes carries mergekit.yaml; mergekit run on that very file gives
    the same tensors (the RECALL merge and the uniform-average baseline of the tiny run)."""
    cfg, _ = tiny_run
    for merged in (Path(cfg.output_dir), Path(cfg.run_dir) / "baselines" / "average"):
        text = (merged / "mergekit.yaml").read_text()
        out = tmp_path / merged.name
        run_mergekit(text, out)
        a, b = read_tensors(merged), read_tensors(out)
        assert set(a) == set(b)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=ATOL, rtol=RTOL), name
