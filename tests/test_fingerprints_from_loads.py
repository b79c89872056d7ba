"""Fingerprints made of the pieces a load read (issue 21: each input read at most twice).

A model's fingerprint (safetensors_io.files_fingerprint) hashes two small pieces of every
tensor. A load that reads every tensor anyway keeps those pieces (LazyTensorReader's
keep_fingerprint_pieces), so the job's stage keys need no read of their own: these tests
check that the value made from the pieces is the value made by reading, bit for bit,
whatever order the tensors were read in, and that a job in a new run directory reads no
tensor byte for its fingerprints while a rerun (which needs them before its loads) gets the
same keys and reuses every stage."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_lora, tiny_run_tree
from recall_ray.core.errors import CheckpointError
from recall_ray.io.models import ModelTensors, load_causal_lm_read, resolve_model
from recall_ray.io.safetensors_io import (
    LazyTensorReader,
    files_fingerprint,
    list_weight_files,
    model_fingerprint,
    tensor_infos,
)
from recall_ray.validate import Fingerprints, check_models


def _write(d: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / name))
    return d


def _reference_fingerprint(files: list[Path]) -> str:
    """files_fingerprint's definition, written out: per file (sorted), its name, its size, its
    header bytes, then for every tensor in data order its first and last 4 KiB (once when it
    is that small)."""
    h = hashlib.sha256()
    for f in sorted(files):
        data = f.read_bytes()
        n_header = int.from_bytes(data[:8], "little")
        raw = data[8:8 + n_header]
        header = json.loads(raw)
        h.update(f.name.encode())
        h.update(str(len(data)).encode())
        h.update(raw)
        start = 8 + n_header
        for b, e in sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"):
            n = min(4096, e - b)
            h.update(data[start + b:start + b + n])
            if e - n != b:
                h.update(data[start + e - n:start + e])
    return h.hexdigest()


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.f32": torch.randn(64, 1024, generator=g),  # 256 KiB: two pieces
        "mid.bf16": torch.randn(3000, generator=g).to(torch.bfloat16),  # 6,000 bytes: two overlapping pieces
        "small.f16": torch.randn(5, generator=g).to(torch.float16),  # one piece
        "empty.f32": torch.zeros(0, 4),  # nothing to read
        "exact.f32": torch.randn(1024, generator=g),  # 4 KiB exactly: one piece
    }


def test_pieces_of_a_full_read_give_the_read_fingerprint_in_any_order(tmp_path):
    d = tmp_path / "m"
    _write(d, dict(list(_tensors(0).items())[:3]), "model-00001-of-00002.safetensors")
    _write(d, dict(list(_tensors(1).items())[3:]), "model-00002-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in list(_tensors(0))[:3]},
        **{k: "model-00002-of-00002.safetensors" for k in list(_tensors(0))[3:]}}}))
    files = list_weight_files(d)
    want = _reference_fingerprint(files)
    assert model_fingerprint(d) == want
    infos = tensor_infos(files)
    for seed in range(3):
        reader = LazyTensorReader(infos, keep_fingerprint_pieces=True)
        names = list(infos)
        random.Random(seed).shuffle(names)
        for name in names:
            reader.get(name)
        assert files_fingerprint(files, reader.fingerprint_pieces) == want
    # a tensor not read, or only its first row: no value rather than a wrong one
    reader = LazyTensorReader(infos, keep_fingerprint_pieces=True)
    for name in infos:
        if name == "big.f32":
            reader.first_row(name)
        else:
            reader.get(name)
    with pytest.raises(KeyError):
        files_fingerprint(files, reader.fingerprint_pieces)
    # a reader that keeps nothing keeps nothing
    plain = LazyTensorReader(infos)
    plain.get("big.f32")
    assert plain.fingerprint_pieces is None


def test_a_load_gives_the_fingerprint_of_a_full_model_and_of_an_adapter(tmp_path, tiny_dir):
    base = resolve_model("base", str(tiny_dir), str(tiny_dir))
    _, read = load_causal_lm_read(base)
    assert read.fingerprint == ModelTensors(base).fingerprint() == model_fingerprint(tiny_dir)
    assert read.fingerprint == _reference_fingerprint(list_weight_files(tiny_dir))
    adapter = tmp_path / "lora"
    make_lora(tiny_dir, adapter, seed=3)
    ad = resolve_model("lora", str(adapter), str(tiny_dir))
    _, read = load_causal_lm_read(ad)
    want = hashlib.sha256((_reference_fingerprint(list_weight_files(tiny_dir))
                           + _reference_fingerprint(list_weight_files(adapter))).encode()).hexdigest()
    assert read.fingerprint == ModelTensors(ad).fingerprint() == want


def test_fingerprint_bytes_counts_the_pieces(tmp_path):
    d = _write(tmp_path / "m", _tensors(0))
    (d / "config.json").write_text("{}")  # a model directory to resolve_model; its weights are what counts
    sizes = {k: t.numel() * t.element_size() for k, t in _tensors(0).items()}
    want = sum(min(4096, n) * (2 if n > 4096 else 1) for n in sizes.values() if n)  # written plainly
    m = resolve_model("m", str(d), str(d))
    assert ModelTensors(m).fingerprint_bytes() == want == 2 * 4096 + 2 * 4096 + 10 + 4096


def test_fingerprints_are_made_when_asked_and_a_load_that_disagrees_is_refused(tmp_path, tiny_dir, tiny_experts):
    models = [resolve_model("base", str(tiny_dir), str(tiny_dir)),
              resolve_model("e0", str(tiny_experts[0]), str(tiny_dir))]
    ms = check_models(models)
    fps = ms.fingerprints
    assert isinstance(fps, Fingerprints) and fps.bytes_read == 0  # the checks read no tensor for them
    fps.learn("base", model_fingerprint(tiny_dir))  # a load's value: nothing read
    assert fps["base"] == model_fingerprint(tiny_dir) and fps.bytes_read == 0
    assert fps["e0"] == model_fingerprint(tiny_experts[0])  # read for itself, and counted
    assert fps.bytes_read == ModelTensors(models[1]).fingerprint_bytes() > 0
    assert fps.all() == {"base": model_fingerprint(tiny_dir), "e0": model_fingerprint(tiny_experts[0])}
    with pytest.raises(CheckpointError, match="changed while the job read it"):
        fps.learn("e0", model_fingerprint(tiny_dir))
    with pytest.raises(TypeError, match="all"):  # never hashed into a key half-made
        str(fps)


def test_a_new_run_keys_its_stages_by_the_fingerprints_and_a_rerun_reuses_every_stage(tmp_path, tiny_run):
    """tiny_run is a job run in a new directory: its keys were made after its loads (that it
    read nothing for them: tests/test_input_reads.py)."""
    from recall_ray.pipeline import run_pipeline

    cfg, result = tiny_run
    manifest = json.loads((Path(cfg.run_dir).parent / "first_manifest.json").read_text())
    for label, entry in manifest["inputs"]["models"].items():
        assert entry["fingerprint"] == model_fingerprint(entry["path"]), label
    again = run_pipeline(cfg)  # its fingerprints read before any stage, to look the stages up
    assert all(t["skipped"] for t in again.timings.values()), again.timings
    assert again.merge_key == result.merge_key


def test_the_merged_models_key_is_its_content_not_its_place(tmp_path, tiny_dir, tiny_experts, ray_session):
    """The same job in another run directory (another machine's, a session's) writes the same
    merged tensors under the same merge_key, which the scenarios cache its scores by, while
    the merge stage's own key names its place. Two fresh directories, not `tiny_run`'s, which
    other tests rerun with changed settings."""
    from safetensors.torch import load_file

    from recall_ray.config import build_config
    from recall_ray.pipeline import run_pipeline

    def job(name: str):
        tree = tiny_run_tree(str(tmp_path / name), str(tiny_dir), str(tiny_experts[0]), str(tiny_experts[1]))
        tree.pop("evaluate")  # the merge is what is compared; scoring it adds nothing here
        cfg = build_config(tree)
        return cfg, run_pipeline(cfg)

    (cfg, result), (moved, again) = job("here"), job("there")
    assert again.merge_key == result.merge_key
    stage = lambda c: json.loads((Path(c.run_dir) / "manifest.json").read_text())["stages"]["merge"]["key"]
    assert stage(moved) != stage(cfg)
    tensors = lambda d: {k: t for f in sorted(Path(d).glob("*.safetensors")) for k, t in load_file(str(f)).items()}
    a, b = tensors(result.output), tensors(again.output)
    assert again.output != result.output
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapters_of_one_base_read_its_pieces_once(tmp_path, tiny_dir):
    base = resolve_model("base", str(tiny_dir), str(tiny_dir))
    loras = []
    for i in range(2):
        make_lora(tiny_dir, tmp_path / f"lora{i}", seed=i)
        loras.append(resolve_model(f"lora{i}", str(tmp_path / f"lora{i}"), str(tiny_dir)))
    fps = check_models([base, *loras]).fingerprints
    assert fps.bytes_read == 0
    for m in loras:  # each its own value, the base's pieces read for the first alone
        assert fps[m.label] == ModelTensors(m).fingerprint()
    adapter_only = [ModelTensors(m).fingerprint_bytes(weights=False) for m in loras]
    base_pieces = ModelTensors(base).fingerprint_bytes()
    assert 0 < adapter_only[0] < base_pieces
    assert fps.bytes_read == base_pieces + sum(adapter_only)
    assert fps["base"] == model_fingerprint(tiny_dir) and fps.bytes_read == base_pieces + sum(adapter_only)


def test_a_stage_keyed_after_its_work_is_recorded_with_that_key_and_found_by_it(tmp_path):
    from recall_ray.io.storage import RunDir
    from recall_ray.manifest import Manifest, stable_hash

    m = Manifest(RunDir(str(tmp_path / "run")), {})
    learnt = {}
    calls = []

    def work():
        calls.append(m.data["stages"]["s"]["key"])  # no key while it runs
        learnt["fp"] = "abc"
        return {"n": 1}

    first = m.run("s", lambda: ["key", learnt["fp"]], [], work)
    assert calls == [None] and not first.skipped and first.key == stable_hash(["key", "abc"])
    assert m.data["stages"]["s"]["key"] == first.key
    again = Manifest(RunDir(str(tmp_path / "run")), {}).run("s", ["key", "abc"], [], work)  # a rerun, key first
    assert again.skipped and again.key == first.key and calls == [None]


def test_a_computed_merge_is_keyed_by_what_computed_its_weights_not_their_last_bits():
    """Representations and losses computed again on another CPU differ in their last bits,
    and so do the weights computed from them; the scenarios cache a merge's scores by its
    key, so a merge with computed weights is keyed by their inputs (weights_from), while a
    merge's own stage key, and a merge with fixed weights, keep the values."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from recall_ray.config import MergeConfig
    from recall_ray.core.merge_methods import MergeMethod
    from recall_ray.manifest import stable_hash
    from recall_ray.pipeline import _merge_key, _merged_content, merge_method_key

    models = [SimpleNamespace(label="base"), SimpleNamespace(label="new")]
    ms = SimpleNamespace(fingerprints={"base": "f0", "new": "f1"})
    w = np.array([[0.25, 0.75], [0.4, 0.6]])
    here = MergeMethod("m", "linear", w)
    there = MergeMethod("m", "linear", w + np.array([[1e-9, -1e-9], [0.0, 0.0]]))  # another CPU's last bits
    cfg = MergeConfig()
    key = lambda m, src=None: stable_hash(merge_method_key(models, ms, m, cfg, src))
    assert key(here) != key(there)  # fixed weights: the values are the merge
    assert key(here, "losses:abc") == key(there, "losses:abc")
    assert key(here, "losses:abc") != key(there, "losses:abd")
    assert key(here, "losses:abc") != key(MergeMethod("m", "linear", w, lam=0.5), "losses:abc")

    def run(weights: np.ndarray):  # what pipeline._merged_content and _merge_key read of a run
        table = pd.DataFrame([{"layer": g, "model": lbl, "weight": weights[g, q]}
                              for g in range(2) for q, lbl in enumerate(["base", "new"])])
        return SimpleNamespace(parts={"weights": ["typical", "settings"]}, cfg=SimpleNamespace(merge=cfg, output_dir="o"),
                               models=models, fp=lambda lbl: ms.fingerprints[lbl], table=table, num_groups=2)

    a, b = run(w), run(w + 1e-9)
    assert stable_hash(_merged_content(a)) == stable_hash(_merged_content(b))
    assert stable_hash(_merge_key(a, None)) != stable_hash(_merge_key(b, None))


def test_weights_a_stage_labelled_are_identified_by_its_key_while_they_are_the_ones_it_wrote(tmp_path, tiny_dir):
    """A merge or fold recomputed on another machine differs in its last bits; labelled with
    the key of the stage that wrote it (write_made_by), its identity in stage keys is that key,
    the same on both machines, and it falls back to the bytes once they are not the ones
    the stage wrote."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from recall_ray.io.models import MADE_BY_FILE, ModelTensors, made_by, resolve_model, write_made_by

    def fp(d):
        return ModelTensors(resolve_model("m", str(d), str(d))).fingerprint()

    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(tiny_dir, here)
    shutil.copytree(tiny_dir, there)
    f = sorted(there.glob("*.safetensors"))[0]
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    flat = tensors[name].view(-1).clone()
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))  # one last bit
    tensors[name] = flat.view(tensors[name].shape)
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert fp(here) != fp(there)  # bytes: two models

    write_made_by(str(here), "stage-key")
    write_made_by(str(there), "stage-key")
    assert made_by(str(here)) == made_by(str(there)) == "stage-key"
    assert fp(here) == fp(there) != model_fingerprint(str(here))
    write_made_by(str(there), "another stage's key")
    assert fp(here) != fp(there)

    save_file({**tensors, name: tensors[name] * 2}, str(f), metadata={"format": "pt"})  # rewritten after the label
    assert made_by(str(there)) is None and fp(there) == model_fingerprint(str(there))
    assert (there / MADE_BY_FILE).is_file()
