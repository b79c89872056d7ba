"""EWC: the diagonal Fisher, LoRA deltas and penalty against independent float64 references,
the Fisher's file format, and the penalty's effect on a Ray Train fine-tune. (The sequential
scenario's EWC line is tested in test_sequential.py, on its shared run.)"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, small_finetune_cfg
from recall_ray.cluster.finetune import finetune_lora
from recall_ray.core.ewc import accumulate, check_keys, diagonal_fisher, ewc_penalty, lora_deltas, target_weight_names
from recall_ray.core.lora import META_FILE
from recall_ray.core.sft import IGNORE_INDEX, tokenize_records
from recall_ray.io.safetensors_io import load_fisher, save_fisher
from recall_ray.core.templates import load_task_records

TARGETS = ["q_proj", "v_proj"]


def _model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir)


def _examples(tiny_dir, n: int = 3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    recs = (load_task_records(str(DATA / "sst2" / "train.jsonl"), "sst2", max_samples=n)
            + load_task_records(str(DATA / "ag_news" / "train.jsonl"), "ag_news", max_samples=n))
    return tokenize_records(tok, recs, max_length=40), tok.pad_token_id


def _target_names(model) -> list[str]:
    return target_weight_names([n for n, _ in model.named_parameters()], TARGETS)


def reference_fisher(tiny_dir, examples, names) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Float64, by hand: each example's summed NLL over its labelled positions from
    log_softmax of the logits, its gradient by torch.autograd.grad, squared, averaged. Also
    returns the square of the mean gradient (what a batch gradient would give)."""
    model = _model(tiny_dir).to(torch.float64)
    params = dict(model.named_parameters())
    targets = [params[n] for n in names]
    sq = {n: np.zeros(params[n].shape) for n in names}
    mean = {n: np.zeros(params[n].shape) for n in names}
    for ids, labels in examples:
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        nll = sum(-logp[j - 1, labels[j]] for j in range(1, len(ids)) if labels[j] != IGNORE_INDEX)
        for n, g in zip(names, torch.autograd.grad(nll, targets)):
            sq[n] += g.numpy() ** 2 / len(examples)
            mean[n] += g.numpy() / len(examples)
    return sq, {n: m ** 2 for n, m in mean.items()}


# ----------------------------------------------------------------------------- pure core


def test_target_weight_names_follow_peft_matching():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.xq_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "q_proj.weight"]
    assert target_weight_names(names, TARGETS) == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight", "q_proj.weight"]
    assert target_weight_names(names, ["self_attn.v_proj"]) == ["model.layers.1.self_attn.v_proj.weight"]


def test_diagonal_fisher_matches_float64_per_example_reference(tiny_dir):
    model = _model(tiny_dir)
    examples, pad_id = _examples(tiny_dir)
    assert len({sum(x != IGNORE_INDEX for x in lab) for _, lab in examples}) > 1  # answers of several lengths
    names = _target_names(model)
    assert len(names) == 4  # q and v of both layers
    model.train()
    got = diagonal_fisher(model, examples, names, pad_id)
    ref, squared_mean = reference_fisher(tiny_dir, examples, names)
    assert list(got) == names
    for n in names:
        assert got[n].dtype == torch.float32 and got[n].shape == ref[n].shape
        assert np.allclose(got[n].numpy(), ref[n], rtol=1e-4, atol=1e-6 * ref[n].max()), n
        # per-example squares, not the square of the batch gradient (which is much smaller)
        assert not np.allclose(ref[n], squared_mean[n], rtol=0.1), n
    # the model is left as it was: training mode, every parameter trainable
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_diagonal_fisher_refuses_unknown_names_and_no_examples(tiny_dir):
    model = _model(tiny_dir)
    examples, pad_id = _examples(tiny_dir, 1)
    with pytest.raises(KeyError, match="nope.weight"):
        diagonal_fisher(model, examples, ["nope.weight"], pad_id)
    with pytest.raises(ValueError, match="at least one example"):
        diagonal_fisher(model, [], _target_names(model), pad_id)


def test_lora_deltas_and_penalty_match_numpy(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_model(tiny_dir), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero: give it values
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = {k: v.to(torch.float64).numpy()
             for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()}
    scale = 12 / 4

    deltas = lora_deltas(peft_model)
    assert sorted(deltas) == sorted(_target_names(_model(tiny_dir)))
    ref = {}
    for k, a in saved.items():
        if ".lora_A." in k:
            name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            ref[name] = (scale * (saved[k.replace("lora_A", "lora_B")] @ a), a)
    assert sorted(ref) == sorted(deltas)
    for n, d in deltas.items():
        assert d.requires_grad and d.grad_fn is not None  # it goes into the loss
        assert np.allclose(d.detach().numpy(), ref[n][0], rtol=1e-5, atol=1e-7), n

    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(d.shape, generator=g) for n, d in deltas.items()}
    lam = 0.7
    pen = ewc_penalty(fisher, deltas, lam)
    expected = lam / 2 * sum((fisher[n].double().numpy() * ref[n][0] ** 2).sum() for n in deltas)
    assert np.isclose(pen.item(), expected, rtol=1e-5)
    # its gradient in B: lam * scale * (F * delta) @ A^T
    pen.backward()
    params = dict(peft_model.named_parameters())
    for n in deltas:
        module = "base_model.model." + n.removesuffix(".weight")
        grad_b = params[f"{module}.lora_B.default.weight"].grad.double().numpy()
        want = lam * scale * (fisher[n].double().numpy() * ref[n][0]) @ ref[n][1].T
        assert np.allclose(grad_b, want, rtol=1e-4, atol=1e-8), n
    assert ewc_penalty(fisher, deltas, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="missing 1 key.*q_proj"):
        ewc_penalty({n: f for n, f in fisher.items() if "layers.0.self_attn.q_proj" not in n}, deltas, lam)


def test_fisher_file_round_trip_and_accumulate(tmp_path):
    a = {"x.weight": torch.rand(3, 2), "y.weight": torch.rand(4, 4)}
    b = {"x.weight": torch.rand(3, 2), "y.weight": torch.rand(4, 4)}
    path = save_fisher(a, str(tmp_path / "sub" / "fisher.safetensors"), {"tasks": "sst2"})
    back = load_fisher(path)
    assert all(torch.equal(back[k], a[k]) for k in a) and back.keys() == a.keys()
    assert not [f for f in os.listdir(tmp_path / "sub") if f != "fisher.safetensors"]  # no temp file left
    s = accumulate(a, b)
    assert all(torch.allclose(s[k], a[k] + b[k]) for k in a)
    with pytest.raises(ValueError, match="y.weight"):
        accumulate(a, {"x.weight": b["x.weight"]})
    save_fisher({"x.weight": -torch.ones(2)}, str(tmp_path / "neg.safetensors"))
    with pytest.raises(ValueError, match="negative or non-finite"):
        load_fisher(str(tmp_path / "neg.safetensors"))
    check_keys(a, b)  # same keys: no error


# ----------------------------------------------------------------------------- finetune_lora


def _ones_fisher(tiny_dir, path: Path, drop: str | None = None, extra: str | None = None) -> str:
    model = _model(tiny_dir)
    params = dict(model.named_parameters())
    fisher = {n: torch.ones_like(params[n]) for n in _target_names(model) if drop is None or drop not in n}
    if extra:
        fisher[extra] = torch.ones(2, 2)
    return save_fisher(fisher, str(path))


def test_mismatched_fisher_is_refused_before_training(tiny_dir, tmp_path):
    recs = [{"prompt": "p\n", "target": "t"}]
    out, st = str(tmp_path / "a"), str(tmp_path / "ray")
    bad = _ones_fisher(tiny_dir, tmp_path / "bad.safetensors", drop="v_proj", extra="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"missing 2 key\(s\).*layers\.0\.self_attn\.v_proj\.weight.*"
                                         r"1 key\(s\) that no LoRA module targets: model\.layers\.0\.mlp\.up_proj"):
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(), out, st, ewc_fisher=bad, ewc_lambda=1.0)
    good = _ones_fisher(tiny_dir, tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match=r"missing 2 key\(s\).*mlp\.up_proj"):  # other target modules
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(target_modules=["q_proj", "up_proj"]), out, st,
                      ewc_fisher=good, ewc_lambda=1.0)
    shape = save_fisher({n: torch.ones(3, 3) for n in _target_names(_model(tiny_dir))}, str(tmp_path / "shape.st"))
    with pytest.raises(ValueError, match="has shape"):
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(), out, st, ewc_fisher=shape, ewc_lambda=1.0)
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(ValueError, match="not supported with DeepSpeed"):
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(deepspeed=str(tmp_path / "ds.json"), use_gpu=True),
                      out, st, ewc_fisher=good, ewc_lambda=1.0)
    with pytest.raises(ValueError, match="needs an ewc_fisher"):
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(), out, st, ewc_lambda=1.0)
    with pytest.raises(ValueError, match="ewc_lambda must be"):
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(), out, st, ewc_fisher=good, ewc_lambda=-1.0)
    with pytest.raises(ValueError, match="does not exist"):
        finetune_lora(str(tiny_dir), recs, small_finetune_cfg(), out, st, ewc_fisher=str(tmp_path / "nope"),
                      ewc_lambda=1.0)
    assert not os.path.exists(st) and not os.path.exists(out)


@pytest.fixture(scope="module")
def ewc_runs(two_runs, tiny_dir, sst2_records, tmp_path_factory):
    """conftest's `two_runs` (a plain fine-tune, and the same with a Fisher of ones at lambda
    0), and the same fine-tune at lambda 1e4."""
    _, (plain, lam0), ones = two_runs
    root = tmp_path_factory.mktemp("ewc_ft")
    held = finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(), str(root / "lam1e4"), str(root / "ray"),
                         task="sst2", ewc_fisher=ones, ewc_lambda=1e4)
    return plain, {0.0: lam0, 1e4: held}, ones


def _adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _delta_norm(path) -> float:
    t, cfg = _adapter(path), json.loads((Path(path) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    return float(sum((scale * t[k.replace("lora_A", "lora_B")] @ a).pow(2).sum()
                     for k, a in t.items() if "lora_A" in k) ** 0.5)


def test_lambda_zero_gives_the_adapter_without_fisher_bit_for_bit(ewc_runs):
    plain, runs, _ = ewc_runs
    a, b = _adapter(plain), _adapter(runs[0.0])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((Path(runs[0.0]) / META_FILE).read_text())["final_loss"] == \
        json.loads((Path(plain) / META_FILE).read_text())["final_loss"]


def test_large_lambda_keeps_the_adapter_near_the_start(ewc_runs):
    plain, runs, ones = ewc_runs
    free, held = _delta_norm(runs[0.0]), _delta_norm(runs[1e4])
    assert free > 0.1 and held < 0.25 * free, (free, held)
    meta = json.loads((Path(runs[1e4]) / META_FILE).read_text())
    assert meta["ewc"]["fisher_sha256"] == hashlib.sha256(Path(ones).read_bytes()).hexdigest() and meta["ewc"]["lambda"] == 1e4
    # the last step's penalty, recorded, is lam / 2 * |delta before that step|^2 > 0 (F = 1)
    assert meta["ewc"]["final_penalty"] > 0
    assert json.loads((Path(runs[0.0]) / META_FILE).read_text())["ewc"]["final_penalty"] == 0.0
