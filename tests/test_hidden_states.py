"""The layer -> hidden_states mapping on the pinned transformers version: entry 0 is the
embedding output, entry i the output of block i (captured by hooks), and the last entry is
taken AFTER the final norm, which is why the final norm belongs to the last layer group."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recall_ray.io.models import load_causal_lm, resolve_model
from recall_ray.cluster.representations import RepresentationExtractor, hidden_states_of
from recall_ray.io.reps_parquet import layer_column


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


def test_long_record_is_represented_as_the_fine_tune_cuts_it(tiny_dir):
    """A RACE record far longer than max_length: the represented ids are its prompt's end and
    its target (the fine-tune's rule: the article's start is cut, the question, options and
    answer stay), and the extractor pools exactly those tokens (float64 reference)."""
    from recall_ray.core.sft import build_example, represented_batch
    from recall_ray.core.templates import load_task_records

    from conftest import DATA

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rec = load_task_records(str(DATA / "race" / "train.jsonl"), "race", 1)[0]
    p_ids = tok(rec["prompt"])["input_ids"]
    t_ids = tok(rec["target"], add_special_tokens=False)["input_ids"]
    end = rec["prompt"][rec["prompt"].index("### Question:"):]  # question, options, response cue
    L = len(tok(end)["input_ids"]) + len(t_ids) + 8  # room for them and a little of the article
    assert len(p_ids) > 2 * L  # the article overflows
    enc = represented_batch(tok, [rec["prompt"]], [rec["target"]], L)
    ids = enc["input_ids"][0].tolist()
    assert len(ids) == L and enc["attention_mask"].sum() == L
    # ends with the target, after the prompt's last tokens: the options and the response cue
    assert ids[-len(t_ids):] == t_ids
    assert ids[:-len(t_ids)] == p_ids[-(L - len(t_ids)):]
    text = tok.decode(ids)
    assert text.endswith(end + rec["target"])  # the whole question, options and target
    assert not text.startswith(rec["prompt"][:40])  # the article's start is what went
    # the fine-tune's example is the same tokens, with its EOS and one prompt token less
    train_ids, _ = build_example(p_ids, t_ids, tok.eos_token_id, L)
    assert train_ids[:-1] == ids[1:] and train_ids[-1] == tok.eos_token_id

    model = resolve_model("m", str(tiny_dir), str(tiny_dir))
    ext = RepresentationExtractor(model, max_length=L, exclude_first_token=False, dtype="float32")
    short = load_task_records(str(DATA / "sst2" / "train.jsonl"), "sst2", 1)[0]
    table = ext({"prompt": np.array([rec["prompt"], short["prompt"]], dtype=object),
                 "target": np.array([rec["target"], short["target"]], dtype=object),
                 "text": np.array([rec["prompt"] + rec["target"], short["prompt"] + short["target"]], dtype=object),
                 "sample_idx": np.arange(2), "sample_id": np.array(["long", "short"], dtype=object)})
    lm = load_causal_lm(model)
    short_ids = tok(short["prompt"])["input_ids"] + tok(short["target"], add_special_tokens=False)["input_ids"]
    assert len(short_ids) < L  # a record that fits is represented whole
    for j, want in enumerate([ids, short_ids]):
        with torch.no_grad():
            hs = lm(input_ids=torch.tensor([want]), output_hidden_states=True).hidden_states
        for i, h in enumerate(hs):
            expect = h[0].to(torch.float64).numpy().mean(axis=0)
            got = np.asarray(table.column(layer_column(i))[j].as_py())
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
