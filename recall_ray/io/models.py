"""Input models: resolve, validate (before any work), read tensors lazily, load for inference.

A model is either a Hugging Face directory or a LoRA adapter on the base. Both are seen
through `ModelTensors`, which yields each parameter by name (adapters folded exactly), so
the merge never needs a folded copy on disk.

Either may be a URI (s3://bucket/prefix, storage.model_path): its tensors are read in place,
by range reads; only what transformers must load from a local directory (a whole model for
`load_causal_lm`, the config and tokenizer files otherwise) is copied to the local cache
(storage.local_copy, which logs it with the size).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Literal, Sequence

from ..core.errors import CheckpointError
from ..core.lora import META_FILE, Adapter, fold_lora, lora_delta, parse_adapter
from .storage import check_model_location, is_uri, local_copy, model_path, replace_json
from .safetensors_io import (
    LazyTensorReader,
    TensorInfo,
    files_fingerprint,
    fingerprint_pieces,
    list_weight_files,
    tensor_infos,
)

if TYPE_CHECKING:  # resolving and checking models needs no torch; loading them does
    import torch

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")
# what else a tokenizer or a model's config is loaded from (copied from a URI with them)
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                      "config.json")
CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec with its kind decided and paths made absolute (picklable, for actors).

    base_name_check: whether an adapter's recorded base name (adapter_config.json) must
    agree with its base's (core.lora.base_check); the config's `base_name_check` key."""

    label: str
    kind: Literal["hf", "adapter"]
    path: str
    base_path: str
    allow_pickle: bool = False
    base_name_check: bool = True

    @property
    def weights_dir(self) -> str:
        """The directory holding the full weights (the base for an adapter)."""
        return self.path if self.kind == "hf" else self.base_path

    @property
    def tokenizer_dir(self) -> str:
        if self.kind == "adapter" and any((model_path(self.path) / f).is_file() for f in TOKENIZER_FILES):
            return self.path
        return self.weights_dir

    def hf_config(self) -> dict:
        return json.loads((model_path(self.weights_dir) / "config.json").read_text())


def resolve_path(path: str) -> str:
    """Builtin names -> converted local directory; a URI -> itself (no trailing slash), its
    credentials and bucket checked (storage.check_model_location); else -> absolute path."""
    if path.startswith("builtin:"):
        from .builtin_models import builtin_model_dir

        return str(builtin_model_dir(path.split(":", 1)[1]))
    if is_uri(path):
        check_model_location(path)
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def is_adapter_dir(path: str | Path) -> bool:
    return (model_path(path) / "adapter_config.json").is_file()


def read_adapter(path: str | Path) -> Adapter:
    """Parse a PEFT LoRA adapter directory (config, tensor headers, recall_ray.json if any)."""
    path = model_path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    return parse_adapter(str(path), config, tensor_infos(list_weight_files(path)), meta)


def resolve_model(label: str, path: str, base_path: str, allow_pickle: bool = False,
                  base_name_check: bool = True) -> ResolvedModel:
    p = model_path(resolve_path(path))
    if not p.exists():
        raise CheckpointError(f"model {label!r}: {path} does not exist")
    if is_adapter_dir(p):
        return ResolvedModel(label, "adapter", str(p), base_path, allow_pickle, base_name_check)
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"model {label!r}: {p} is neither a Hugging Face model directory (no config.json) nor a PEFT adapter"
            " (no adapter_config.json)"
        )
    return ResolvedModel(label, "hf", str(p), base_path, allow_pickle, base_name_check)


MADE_BY_FILE = "recall_ray_made_by.json"  # in a model directory a stage wrote: that stage's key


def write_made_by(model_dir: str, key: str) -> None:
    """Record, beside the weights a stage just wrote, the key of what made them, with the
    weights' fingerprint as written. The model's identity in stage keys is then that key
    (`made_by`), not its bytes: a merge or fold recomputed on another machine is the same
    model in its last bits' spite, so what was computed or scored downstream of it (exported
    fine-tunes, cached scores) is found again there. A URI is left unlabelled (made_by reads
    local directories only): its model keeps the identity of its bytes."""
    if is_uri(str(model_dir)):
        return
    d = model_path(model_dir)
    replace_json(d / MADE_BY_FILE, {"key": key, "weights_fingerprint": files_fingerprint(list_weight_files(d))},
                 indent=1)


def made_by(model_dir: str, weights_fp: str | None = None) -> str | None:
    """The key `write_made_by` recorded for these weights, if they are still the ones it
    fingerprinted (`weights_fp`: their files_fingerprint, when known); None otherwise."""
    if is_uri(str(model_dir)):  # the stages that label their outputs write them locally
        return None
    f = model_path(model_dir) / MADE_BY_FILE
    if not f.is_file():
        return None
    record = json.loads(f.read_text())
    fp = weights_fp or files_fingerprint(list_weight_files(model_path(model_dir)))
    return record["key"] if record.get("weights_fingerprint") == fp else None


class ModelTensors:
    """Lazy, by-name access to one model's parameters (adapter deltas folded in float32)."""

    def __init__(self, model: ResolvedModel, keep_fingerprint_pieces: bool = False):
        self.model = model
        self.weight_files = list_weight_files(model.weights_dir, allow_pickle=model.allow_pickle)
        self.infos: dict[str, TensorInfo] = tensor_infos(self.weight_files)
        # keep_fingerprint_pieces: a load that reads every tensor gives `fingerprint_of_reads`
        self.reader = LazyTensorReader(self.infos, keep_fingerprint_pieces)
        self.adapter: Adapter | None = read_adapter(model.path) if model.kind == "adapter" else None
        self.adapter_reader = LazyTensorReader(self.adapter.infos, keep_fingerprint_pieces) if self.adapter else None

    def get(self, name: str) -> torch.Tensor:
        """The parameter; adapter targets come back folded, as float32."""
        t = self.reader.get(name)
        if self.adapter is not None and name in self.adapter.targets:
            tgt = self.adapter.targets[name]
            return fold_lora(t, self.adapter_reader.get(tgt.lora_a), self.adapter_reader.get(tgt.lora_b), tgt.scale,
                             fan_in_fan_out=bool(self.adapter.config.get("fan_in_fan_out")))
        return t

    def delta(self, name: str) -> torch.Tensor | object:
        """What this adapter adds to its base's parameter `name`: the low-rank product
        scale * B @ A (a fresh float32 tensor), or merge_rule.UNCHANGED for a parameter it
        does not touch; the base is not read. For a full model, ValueError."""
        from ..core.merge_rule import UNCHANGED

        if self.adapter is None:
            raise ValueError(f"{self.model.label} is a full model, not an adapter: it has no low-rank delta")
        tgt = self.adapter.targets.get(name)
        if tgt is None:
            return UNCHANGED
        return lora_delta(self.adapter_reader.get(tgt.lora_a), self.adapter_reader.get(tgt.lora_b), tgt.scale,
                          fan_in_fan_out=bool(self.adapter.config.get("fan_in_fan_out")))

    def fingerprint(self, weights_fp: str | None = None) -> str:
        """The model's identity in stage keys (safetensors_io.files_fingerprint of its weights,
        and of its adapter's): two small pieces of every tensor are read. `weights_fp`: the
        weights' own part when it is known (a LoRA base that its other adapters share), so
        that only the adapter's pieces are read."""
        return self._fingerprint(None, None, weights_fp)

    def fingerprint_of_reads(self) -> str | None:
        """`fingerprint()`, from the pieces this object's readers kept (keep_fingerprint_pieces)
        while they read every tensor: no byte is read for it. None when some tensor was not
        read whole (a LoRA swap reads only its targets) or a file is a pickle."""
        if self.reader.fingerprint_pieces is None:
            return None
        try:
            return self._fingerprint(self.reader.fingerprint_pieces,
                                     self.adapter_reader.fingerprint_pieces if self.adapter else None)
        except KeyError:
            return None

    def weights_fingerprint(self) -> str:
        """The weights' own part of `fingerprint()` (all of it for a full model)."""
        return self._identity(files_fingerprint(self.weight_files))

    def _identity(self, weights_fp: str) -> str:
        """The weights' files_fingerprint, or, for weights a stage wrote and labelled
        (write_made_by), the key of that stage."""
        key = made_by(self.model.weights_dir, weights_fp)
        return weights_fp if key is None else hashlib.sha256(f"made_by:{key}".encode()).hexdigest()

    def fingerprint_bytes(self, weights: bool = True) -> int:
        """The tensor bytes `fingerprint()` reads: its pieces (a pickle file: all of it);
        without `weights`, the adapter's alone (`fingerprint(weights_fp=...)`)."""
        infos = [*(self.infos.values() if weights else ()), *(self.adapter.infos.values() if self.adapter else ())]
        pickles = {i.file for i in infos if i.offset < 0}
        return sum(n for i in infos if i.offset >= 0 for _, n in fingerprint_pieces(i.offset, i.nbytes)) + \
            sum(model_path(f).stat().st_size for f in pickles)

    def _fingerprint(self, pieces, adapter_pieces, weights_fp: str | None = None) -> str:
        fp = weights_fp or self._identity(files_fingerprint(self.weight_files, pieces))
        if self.adapter is not None:
            own = files_fingerprint(list_weight_files(self.adapter.path), adapter_pieces)
            fp = hashlib.sha256((fp + own).encode()).hexdigest()
        return fp


def tokenizer_fingerprint(model_dir: str) -> str | None:
    """sha256 of the files that define the vocabulary (not chat templates or settings)."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = model_path(model_dir) / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest() if found else None


def load_causal_lm(model: ResolvedModel, dtype: torch.dtype | None = None, device: str = "cpu"):
    """A transformers causal LM for inference (float32 unless `dtype`), with an adapter folded
    exactly (same rule as the merge)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    lm = AutoModelForCausalLM.from_pretrained(local_copy(model.weights_dir), dtype=dtype)
    if model.kind == "adapter":
        tensors = ModelTensors(model)
        params = dict(lm.named_parameters())
        with torch.no_grad():
            for name in tensors.adapter.targets:
                params[name].copy_(tensors.get(name).to(dtype))
    return lm.to(device).eval()


@dataclass
class WeightsRead:
    """What reading a model's weights into memory found (`load_causal_lm_read`, a
    `LoadedModelSlot` swap): its floating tensors holding NaN or Inf, the full weights'
    (`weights_nonfinite`, by name; empty when they were not read, `weights_read` False: a
    swap to a LoRA adapter reads only the adapter and its targets) and, for an adapter, its
    own (`adapter_nonfinite`, named `<adapter dir>:<tensor>`); the tensor bytes read; the
    seconds spent on the NaN/Inf test itself."""

    weights_read: bool = False
    weights_nonfinite: list[str] = field(default_factory=list)
    adapter_nonfinite: list[str] = field(default_factory=list)
    bytes_read: int = 0
    check_seconds: float = 0.0
    # the model's fingerprint (ModelTensors.fingerprint), from the pieces of this read, when
    # it read every tensor (a full load; not a LoRA swap)
    fingerprint: str | None = None

    @property
    def finite(self) -> bool:
        return not (self.weights_nonfinite or self.adapter_nonfinite)


# IEEE-754 floats hold NaN or Inf exactly where every exponent bit is set: testing the bits
# as integers is exact and several times faster on CPU than torch.isfinite (8x for bf16)
@functools.lru_cache(maxsize=1)
def _exponent_bits() -> dict:
    import torch  # built on first use: checking models before any work needs no torch

    return {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
            torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN or +-Inf (torch.isfinite's answer)."""
    import torch

    bits = _exponent_bits().get(t.dtype)
    if bits is None or t.numel() == 0:
        return bool(t.numel()) and not bool(torch.isfinite(t).all())
    as_int, mask = bits
    return bool(((t.reshape(-1).view(as_int) & mask) == mask).any())


def _read_checked(reader: LazyTensorReader, infos: dict[str, TensorInfo], names, check: bool, bad: list[str],
                  read: WeightsRead, prefix: str = "") -> dict[str, torch.Tensor]:
    """{name: tensor} of `names`, each read once; with `check`, the floating ones holding
    NaN or Inf are appended to `bad` (the same test the merge's inputs must pass)."""
    out = {}
    for name in names:
        t = reader.get(name)
        if check and infos[name].is_float:
            t0 = time.perf_counter()
            if has_nonfinite(t):
                bad.append(prefix + name)
            read.check_seconds += time.perf_counter() - t0
        out[name] = t
    return out


def _adapter_tensors(tensors: "ModelTensors", check: bool, read: WeightsRead) -> dict[str, torch.Tensor]:
    """All of an adapter's own tensors, read once (and checked): they are a few MB."""
    ad = tensors.adapter
    got = _read_checked(tensors.adapter_reader, ad.infos, ad.infos, check, read.adapter_nonfinite, read,
                        prefix=f"{ad.path}:")
    read.bytes_read += tensors.adapter_reader.bytes_read
    return got


def _fold(tensors: "ModelTensors", name: str, base_weight: torch.Tensor, own: dict[str, torch.Tensor]) -> torch.Tensor:
    tgt = tensors.adapter.targets[name]
    return fold_lora(base_weight, own[tgt.lora_a], own[tgt.lora_b], tgt.scale,
                     fan_in_fan_out=bool(tensors.adapter.config.get("fan_in_fan_out")))


def load_causal_lm_read(model: ResolvedModel, dtype: torch.dtype | None = None, device: str = "cpu",
                        check_finite: bool = False, check_weights: bool = True):
    """`load_causal_lm`, with every tensor read by this project's reader (each byte once,
    counted) and, with `check_finite`, tested for NaN/Inf as it is read: the representation
    stage's loads are the job's NaN/Inf check (docs/design.md, "Bad input"), so the inputs
    are not read a third time for it. `check_weights` False: the full weights' test was
    done already (an adapter's base tested by an earlier stage), only an adapter's own
    tensors are tested. Float32 unless `dtype`. Returns (model, WeightsRead)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    tensors = ModelTensors(model, keep_fingerprint_pieces=True)
    read = WeightsRead(weights_read=True)
    state = _read_checked(tensors.reader, tensors.infos, tensors.infos, check_finite and check_weights,
                          read.weights_nonfinite, read)
    read.bytes_read += tensors.reader.bytes_read
    if tensors.adapter is not None:  # folded exactly as load_causal_lm does
        own = _adapter_tensors(tensors, check_finite, read)
        for name in tensors.adapter.targets:
            state[name] = _fold(tensors, name, state[name], own)
    read.fingerprint = tensors.fingerprint_of_reads()
    # the weights were read in place above; transformers wants its config from a local folder
    config = AutoConfig.from_pretrained(local_copy(model.weights_dir, CONFIG_FILES))
    # the concrete class: from_pretrained takes a state_dict only without a path to read
    cls = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    lm = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype or torch.float32)
    del state
    return lm.to(device).eval(), read


def load_tokenizer(model: ResolvedModel):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_copy(model.tokenizer_dir, TOKENIZER_FILES + TOKENIZER_SETTINGS))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class LoadedModelSlot:
    """One of several models loaded at a time, for a Ray Data actor that serves a list of
    models (its rows sorted by model, so each model loads once per actor): `get(i)` frees
    the model held before loading model i, so an actor never holds two.

    Models on the same base weights (the base itself and LoRA adapters of it) are swapped in
    place instead: the parameters the previous adapter changed get the base's values back,
    those the next one changes get its folded values (the same fold as `load_causal_lm`), and
    nothing else is read, so moving to the next LoRA expert costs its few target tensors,
    not a model load."""

    def __init__(self, models: Sequence[ResolvedModel], dtype: torch.dtype, device: str, padding_side: str,
                 truncation_side: str | None = None, read_weights: bool = False, check_finite: bool = False,
                 tested: Collection[str] = ()):
        self.models = list(models)
        # read_weights: load through this project's reader (load_causal_lm_read), keeping
        # what each load or swap read in `reads` (`take_read`); check_finite: and test it,
        # but for the full weights in `tested` (weights directories an earlier stage tested:
        # a LoRA expert's base is not tested again by every actor that loads it)
        self.read_weights, self.check_finite = read_weights or check_finite, check_finite
        self.tested = frozenset(tested)
        self.reads: dict[int, WeightsRead] = {}
        self.dtype, self.device = dtype, device
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.index: int | None = None
        self.tok = self.lm = None
        self.swaps = 0  # how many models were swapped in rather than loaded (for tests and benchmarks)

    def get(self, index: int):
        """(tokenizer, model) of model `index`, loading (or swapping in) it if another is held."""
        if self.index != index:
            new = self.models[index]
            held = self.models[self.index] if self.index is not None else None
            if held is not None and self.lm is not None and held.weights_dir == new.weights_dir:
                self._swap(held, new, index)
                self.swaps += 1
            else:
                self.lm = None  # drop the previous model first: peak memory stays one model
                if self.read_weights:
                    self.lm, self.reads[index] = load_causal_lm_read(new, self.dtype, self.device, self.check_finite,
                                                                     new.weights_dir not in self.tested)
                else:
                    self.lm = load_causal_lm(new, dtype=self.dtype, device=self.device)
            if self.tok is None or held is None or held.tokenizer_dir != new.tokenizer_dir:
                self.tok = load_tokenizer(new)
                self.tok.padding_side = self.padding_side
                if self.truncation_side is not None:
                    self.tok.truncation_side = self.truncation_side
            self.index = index
        return self.tok, self.lm

    def take_read(self, index: int) -> WeightsRead | None:
        """What the last load or swap of model `index` read and found, once (None after)."""
        return self.reads.pop(index, None)

    def _swap(self, held: ResolvedModel, new: ResolvedModel, index: int) -> None:
        import torch

        params = dict(self.lm.named_parameters())
        old_t = ModelTensors(held) if held.kind == "adapter" else None
        new_t = ModelTensors(new) if new.kind == "adapter" else None
        restore = set(old_t.adapter.targets if old_t else ()) - set(new_t.adapter.targets if new_t else ())
        read = WeightsRead()
        with torch.no_grad():
            if restore:
                base = (new_t or old_t).reader
                before = base.bytes_read
                for name in sorted(restore):
                    params[name].copy_(base.get(name).to(self.dtype))
                read.bytes_read += base.bytes_read - before
            if new_t is not None and self.read_weights:  # the adapter's tensors read once, and checked
                own = _adapter_tensors(new_t, self.check_finite, read)
                before = new_t.reader.bytes_read
                for name in sorted(new_t.adapter.targets):
                    params[name].copy_(_fold(new_t, name, new_t.reader.get(name), own).to(self.dtype))
                read.bytes_read += new_t.reader.bytes_read - before
            else:
                for name in sorted(new_t.adapter.targets if new_t else ()):
                    params[name].copy_(new_t.get(name).to(self.dtype))
        if self.read_weights:
            self.reads[index] = read
