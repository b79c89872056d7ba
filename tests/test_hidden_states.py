"""The layer -> hidden_states mapping on the pinned transformers version: entry 0 is the
embedding output, entry i the output of block i (captured by hooks), and the last entry is
taken AFTER the final norm, which is why the final norm belongs to the last layer group."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recall_ray.models import load_causal_lm, resolve_model
from recall_ray.cluster.representations import RepresentationExtractor, hidden_states_of
from recall_ray.reps_parquet import layer_column


def test_hidden_states_mapping(tiny_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    enc = tok(["a moving and funny film", "dull"], padding=True, return_tensors="pt")
    captured: dict[str, torch.Tensor] = {}
    hooks = [lm.model.embed_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__("embed", o))]
    for b, layer in enumerate(lm.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, b=b: captured.__setitem__(f"block{b}", o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        hs = hidden_states_of(lm, enc["input_ids"], enc["attention_mask"])
    for h in hooks:
        h.remove()
    L = lm.config.num_hidden_layers
    assert len(hs) == L + 1
    assert torch.equal(hs[0], captured["embed"])
    for b in range(L - 1):
        assert torch.equal(hs[b + 1], captured[f"block{b}"])
    last_block = captured[f"block{L - 1}"]
    assert not torch.allclose(hs[L], last_block)  # not the raw block output...
    torch.testing.assert_close(hs[L], lm.model.norm(last_block))  # ...but after the final norm


def test_extractor_matches_manual_pooling(tiny_dir):
    """The Ray Data UDF, called directly, equals a float64 masked mean of the HF outputs."""
    model = resolve_model("m", str(tiny_dir), str(tiny_dir))
    ext = RepresentationExtractor(model, max_length=32, exclude_first_token=False, dtype="float32")
    texts = ["a moving and funny film", "dull", "it is what it is , and nothing more"]
    table = ext({"text": np.array(texts), "sample_idx": np.arange(3), "sample_id": np.array(["a", "b", "c"])})
    lm = load_causal_lm(model)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for j, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]  # unpadded: every token is real
        with torch.no_grad():
            hs = lm(input_ids=ids, output_hidden_states=True).hidden_states
        for i, h in enumerate(hs):
            expect = h[0].to(torch.float64).numpy().mean(axis=0)
            got = np.asarray(table.column(layer_column(i))[j].as_py())
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)


def test_one_extractor_for_several_models_equals_one_per_model(tiny_dir, tiny_experts):
    """Rows of two models in one batch (as the shared pool sends them) give each model's own
    representations, tagged with its index."""
    models = [resolve_model("a", str(tiny_dir), str(tiny_dir)), resolve_model("b", str(tiny_experts[0]), str(tiny_dir))]
    texts = ["a moving and funny film", "dull", "it is what it is"]
    batch = {"model": np.array([0, 0, 0, 1, 1, 1]), "text": np.array(texts * 2, dtype=object),
             "sample_idx": np.array([0, 1, 2, 0, 1, 2]), "sample_id": np.array(["x", "y", "z"] * 2, dtype=object)}
    many = RepresentationExtractor(models, max_length=32, exclude_first_token=False, dtype="float32")(batch)
    assert many.column("model").to_pylist() == [0, 0, 0, 1, 1, 1]
    for q, m in enumerate(models):
        one = RepresentationExtractor(m, max_length=32, exclude_first_token=False, dtype="float32")(
            {"text": np.array(texts, dtype=object), "sample_idx": np.arange(3), "sample_id": np.array(["x", "y", "z"])})
        for i in range(one.num_columns - 2):
            got = np.asarray(many.column(layer_column(i)).to_pylist()[3 * q:3 * q + 3])
            assert np.array_equal(got, np.asarray(one.column(layer_column(i)).to_pylist())), (q, i)
    # the two models differ, so a swapped model index would fail above
    assert not np.array_equal(np.asarray(many.column(layer_column(2)).to_pylist()[:3]),
                              np.asarray(many.column(layer_column(2)).to_pylist()[3:]))
