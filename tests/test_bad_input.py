"""Bad input: a clear error that names the problem, raised before any work, and no output
directory (merged model or staging) left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA, REPO, load_job, make_tiny_llama
from recall_ray.config import ConfigError, build_config, load_config
from recall_ray.pipeline import run_pipeline


def _cfg(tmp: Path, base: Path, experts: list[Path], new: Path, **over) -> dict:
    tree = {
        "run_dir": str(tmp / "run"),
        "output": str(tmp / "out" / "merged"),
        "base": {"path": str(base)},
        "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)],
        "new_model": {"name": "new", "path": str(new)},
        "task": {"data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 30},
        "typical": {"k": 4},
    }
    tree.update(over)
    return tree


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(model_dir: Path, fn) -> None:
    f = model_dir / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _expect_error(tmp: Path, tree: dict, exc, pattern: str, ray_needed: bool = False):
    with pytest.raises(exc, match=pattern):
        run_pipeline(build_config(tree))
    out = Path(tree.get("output", tmp / "out" / "merged"))
    assert not out.exists(), "an output directory was left behind"
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "staging left behind"
    assert not Path(tree["run_dir"]).exists(), "a run directory was left behind for a bad input"


@pytest.fixture
def two(tmp_path, tiny_dir, tiny_experts):
    return tmp_path, tiny_dir, tiny_experts


def test_different_architecture(two):
    tmp, base, experts = two
    other = make_tiny_llama(tmp / "wide", hidden=96, tokenizer_dir=base)
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError, r"different architecture.*hidden_size")


def test_different_vocabulary(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "vocab")
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError, r"different vocabulary size")


def test_different_tokenizer(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "tok")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k + "x" if i == 5 else k: v for i, (k, v) in enumerate(tok["model"]["vocab"].items())}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError, r"different tokenizer")


def test_missing_tensor(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "missing")
    _edit_tensors(other, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError,
                  r"'new' does not have the same tensors.*missing.*model\.layers\.1\.mlp\.up_proj\.weight")


def test_nan_weight(two, ray_session):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "nan")
    _edit_tensors(other, lambda sd: sd["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")))
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError,
                  r"'new' has NaN or Inf.*model\.layers\.0\.self_attn\.q_proj\.weight")


def test_truncated_safetensors(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "trunc")
    f = other / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError, r"truncated or corrupt")


def test_corrupt_header(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "corrupt")
    f = other / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError, r"corrupt safetensors header")


def test_pickle_checkpoint_refused(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "pickle")
    sd = load_file(other / "model.safetensors")
    (other / "model.safetensors").unlink()
    torch.save(sd, other / "pytorch_model.bin")
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], other), ValueError, r"pickle checkpoint.*allow_pickle")


def test_adapter_base_mismatch(two):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp, base, experts = two
    wide = make_tiny_llama(tmp / "wide_base", hidden=96, tokenizer_dir=base)
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(wide), LoraConfig(r=2, target_modules=["q_proj"]))
    lm.save_pretrained(tmp / "adapter")
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], tmp / "adapter"), ValueError, r"adapter .* does not match base")


def test_empty_task_data(two):
    tmp, base, experts = two
    (tmp / "empty.jsonl").write_text("")
    tree = _cfg(tmp, base, [experts[0]], experts[1])
    tree["task"] = {**tree["task"], "data": str(tmp / "empty.jsonl")}
    _expect_error(tmp, tree, ValueError, r"(?i)empty|no records")


def test_records_missing_field(two):
    tmp, base, experts = two
    (tmp / "bad.jsonl").write_text('{"text": "no sentence here", "label": 1}\n' * 30)
    tree = _cfg(tmp, base, [experts[0]], experts[1])
    tree["task"] = {**tree["task"], "data": str(tmp / "bad.jsonl")}
    _expect_error(tmp, tree, ValueError, r"sentence")


def test_fewer_samples_than_k(two):
    tmp, base, experts = two
    tree = _cfg(tmp, base, [experts[0]], experts[1])
    tree["task"] = {**tree["task"], "max_samples": 3}
    _expect_error(tmp, tree, ValueError, r"3 usable samples.*typical\.k=4")


def test_output_exists(two):
    tmp, base, experts = two
    tree = _cfg(tmp, base, [experts[0]], experts[1])
    out = Path(tree["output"])
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already exists.*--overwrite"):
        run_pipeline(build_config(tree))
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_architecture_unclaimed_tensors(two):
    tmp, base, experts = two
    other = _copy(experts[0], tmp / "extra")
    _edit_tensors(other, lambda sd: sd.__setitem__("model.adapter_gate.weight", torch.zeros(4)))
    b2 = _copy(base, tmp / "base_extra")
    _edit_tensors(b2, lambda sd: sd.__setitem__("model.adapter_gate.weight", torch.zeros(4)))
    _expect_error(tmp, _cfg(tmp, b2, [], other), ValueError, r"belong to no layer group.*model\.adapter_gate\.weight")


def test_unknown_model_type(two):
    tmp, base, experts = two
    b2, e2 = _copy(base, tmp / "b_unknown"), _copy(experts[0], tmp / "e_unknown")
    for d in (b2, e2):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "mystery"
        (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp, _cfg(tmp, b2, [], e2), ValueError, r"unknown architecture model_type='mystery'.*architecture:")


def test_unknown_config_key_and_wrong_type(tmp_path):
    base = {"base": {"path": "x"}, "task": {"data": "d", "template": "sst2"}}
    with pytest.raises(ConfigError, match=r"unknown config key 'similarity\.sigmaa'"):
        build_config({**base, "similarity": {"sigmaa": 1}})
    with pytest.raises(ConfigError, match=r"config key 'typical\.k'"):
        build_config({**base, "typical": {"k": "many"}})
    with pytest.raises(ConfigError, match=r"config key 'similarity\.kernel'"):
        load_config(None, ["similarity.kernel=gaussian"], defaults=base)


def test_job_cli_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {path: x}\ntask: {data: d, template: sst2}\ntypo_key: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("merge: error:") and "typo_key" in lines[-1]


def test_adapter_trained_on_another_base(two):
    """Same shapes, different base weights: caught by the base fingerprint the adapter records."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recall_ray.io.safetensors_io import content_fingerprint

    tmp, base, experts = two
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    lm.save_pretrained(tmp / "adapter")
    (tmp / "adapter" / "recall_ray.json").write_text(json.dumps({"base_fingerprint": content_fingerprint(base)}))
    # experts[0] has the same architecture and shapes as `base` but other weights
    _expect_error(tmp, _cfg(tmp, experts[0], [experts[1]], tmp / "adapter"), ValueError,
                  r"trained on a different base")


# ------------------------------------------------ an outside adapter names another base


def _outside_adapter(base: Path, out: Path, named: str | None) -> Path:
    """A PEFT adapter of `base` (so its shapes fit) whose adapter_config.json names `named`
    as its base, and no recall_ray.json (not trained by recall-ray)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    lm.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = named
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    assert not (out / "recall_ray.json").exists()
    return out


def test_adapter_naming_another_base_is_refused(two):
    tmp, base, experts = two
    adapter = _outside_adapter(base, tmp / "adapter", "HuggingFaceTB/SmolLM2-360M-Instruct")
    _expect_error(tmp, _cfg(tmp, base, [experts[0]], adapter), ValueError,
                  r"model 'new': adapter .* made for base 'HuggingFaceTB/SmolLM2-360M-Instruct'.*but the base is"
                  rf" '{base}'.*`base_name_check: false`")


def test_adapter_base_checks_say_what_was_possible(two):
    from recall_ray.pipeline import preflight

    tmp, base, experts = two
    other = _outside_adapter(base, tmp / "other", "/models/some-other-base")
    tree = _cfg(tmp, base, [experts[0]], other)
    tree["new_model"]["base_name_check"] = False  # the override the error names
    assert preflight(build_config(tree)).modelset.base_checks == {"new": "skipped"}
    same = _outside_adapter(base, tmp / "same", f"/elsewhere/{base.name}")  # the base's name, another place
    assert preflight(build_config(_cfg(tmp, base, [experts[0]], same))).modelset.base_checks == {"new": "name"}
    silent = _outside_adapter(base, tmp / "silent", None)
    assert preflight(build_config(_cfg(tmp, base, [experts[0]], silent))).modelset.base_checks == {"new": "none"}
    assert not Path(tree["run_dir"]).exists()


# ------------------------------------------------------ every check before Ray starts


@pytest.mark.parametrize("breakage, message", [
    ("data", r"task data .*no_such_file\.jsonl"),
    ("model", r"'e0'.*does not exist"),
    ("output", r"already exists.*--overwrite"),
])
def test_job_refuses_bad_input_before_ray_starts(two, monkeypatch, capsys, breakage, message):
    """A typo in a path is reported in a second, not after Ray has started (tens of seconds):
    the job makes every check that needs no forward pass first."""
    import re

    import recall_ray.cluster.runtime as runtime

    tmp, base, experts = two
    tree = _cfg(tmp, base, [experts[0]], experts[1])
    if breakage == "data":
        tree["task"] = {**tree["task"], "data": str(tmp / "no_such_file.jsonl")}
    elif breakage == "model":
        tree["experts"] = [{"name": "e0", "path": str(tmp / "no_such_model")}]
    else:
        Path(tree["output"]).mkdir(parents=True)
    (tmp / "job.yaml").write_text(json.dumps(tree))

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(runtime, "connect_ray", no_ray)
    assert load_job("merge").main(["--config", str(tmp / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("merge: error:") and re.search(message, err[-1]), err[-1]
    assert not (tmp / "run").exists()


# ------------------------------------------------------------ the checkout's own code


def test_every_job_runs_its_own_checkouts_recall_ray(tmp_path):
    """A second clone's jobs import that clone's recall_ray (and hand it to local Ray
    workers through PYTHONPATH), not the one pip installed from another checkout."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "recall_ray", clone / "recall_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "jobs", clone / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    for job in sorted((clone / "jobs").glob("*.py")):
        code = ("import os, runpy\n"  # in tmp_path: `import recall_ray` alone finds the installed one
                f"runpy.run_path({str(job)!r}, run_name='job')\n"
                "import recall_ray; print(recall_ray.__file__); print(os.environ['PYTHONPATH'])\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert out.returncode == 0, (job.name, out.stderr[-2000:])
        module_file, pythonpath = out.stdout.strip().splitlines()[-2:]
        assert module_file == str(clone / "recall_ray" / "__init__.py"), job.name
        assert pythonpath.split(os.pathsep)[0] == str(clone), job.name


def test_similarity_presets_expand_and_keep_the_weights_key():
    """A preset names a whole similarity setting; a key beside it wins; the weights stage's
    key is the resolved setting, so naming the paper's preset changes nothing cached."""
    from recall_ray.config import SIMILARITY_PRESETS, SimilarityConfig

    assert SimilarityConfig(preset="paper").key() == SimilarityConfig().key() == {
        k: v for k, v in SIMILARITY_PRESETS["paper"].items()}
    validated = SimilarityConfig(preset="validated", temperature=0.1)
    assert (validated.normalize, validated.temperature) == ("l2", 0.1)
    with pytest.raises(ConfigError, match=r"config key 'similarity\.preset'"):
        build_config({"base": {"path": "x"}, "task": {"data": "d", "template": "sst2"},
                      "similarity": {"preset": "best"}})


# ------------------------------------- answered before torch, Ray, sklearn, transformers

def _refusal(tmp_path: Path, job: str, *args: str, env: dict | None = None) -> tuple[dict, list[str]]:
    """Run a job in a fresh process (tests/scripts/heavy_imports.py): its exit status, the
    heavy libraries it imported, and its stderr lines; nothing may be left in tmp_path."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "heavy_imports.py"),
                           str(REPO / "jobs" / f"{job}.py"), *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, **(env or {})})
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.strip().splitlines()


@pytest.mark.parametrize("job, args, message", [
    ("merge", ["--set", "typo=1"], r"merge: error: ConfigError: unknown config key 'typo'"),
    ("merge", ["--set", "base.path={tmp}/no_such_model"], r"merge: error: CheckpointError: model 'base': .*no_such_model"
                                                           r" does not exist"),
    ("merge", ["--set", "experts=[{{name: e, path: {tmp}/no_such_model}}]"], r"merge: error: CheckpointError: model 'e': .*no_such_model does not"),
    ("evaluate", ["--model", "e={tmp}/no_such_model", "--tasks", "sst2", "--out", "{tmp}/eval"],
     r"evaluate: error: CheckpointError: model 'e': .*no_such_model does not exist"),
    ("finetune", ["--base", "{tmp}/no_such_model", "--data", str(DATA / "sst2" / "train.jsonl"), "--template", "sst2",
                  "--out", "{tmp}/adapter"], r"finetune: error: ValueError: base model .*no_such_model has no config"),
    # the builtin base is taken (as the merge job takes it): the refusal is about the data
    ("finetune", ["--base", "builtin:smollm2-135m-instruct", "--data", "{tmp}/no_such.jsonl", "--template", "sst2",
                  "--out", "{tmp}/adapter"], r"finetune: error: \w+Error: .*no_such\.jsonl"),
])
def test_a_typo_is_answered_before_the_heavy_libraries_are_imported(tmp_path, tmp_path_factory, job, args, message):
    """A refusal costs the config and the input checks (about half a second of CPU), not the
    import of torch, scikit-learn, transformers and Ray (5-20 s on a loaded machine): none of
    them is imported, the exit status is 2 and stderr holds the one line. (The builtin base
    is found in a stand-in cache: converting it, once per machine, does load a model.)"""
    import re

    cache = tmp_path_factory.mktemp("builtin_cache")
    (cache / "smollm2-135m-instruct").mkdir()
    for name in ("config.json", "model.safetensors"):
        (cache / "smollm2-135m-instruct" / name).write_text("{}")
    result, err = _refusal(tmp_path, job, *[a.format(tmp=tmp_path) for a in args], env={"RECALL_RAY_CACHE": str(cache)})
    assert result == {"rc": 2, "heavy": []}, (result, err)
    assert len(err) == 1 and re.fullmatch(message + r".*", err[0]), err
    assert list(tmp_path.iterdir()) == []  # no run directory, output or staging
