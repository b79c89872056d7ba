"""Job configuration: frozen pydantic models, loaded from YAML and `--set key=value`.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting that is silently ignored. Validation happens before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    """One model taking part in the merge.

    `path` is a Hugging Face model directory (safetensors), a PEFT LoRA adapter directory
    (then it is folded into the base model exactly), or `builtin:smollm2-135m-instruct`.
    """

    name: str | None = None
    path: str
    adapter_base: str | None = None  # the model a LoRA adapter was trained on, when not `base` (sequential runs)

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name


class TaskConfig(_Section):
    """The new task's data: JSONL records rendered to prompt/target by a template."""

    name: str = "task"
    data: str
    template: str
    max_samples: int = Field(256, gt=0)
    max_length: int = Field(128, gt=8)


class FinetuneConfig(_Section):
    """LoRA supervised fine-tuning through Ray Train (paper: r 8, alpha 32, dropout 0.1)."""

    enabled: bool = False  # fine-tune the new model even when `new_model` is given
    r: int = Field(8, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]
    steps: int = Field(40, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float = Field(3e-4, gt=0)
    max_length: int = Field(128, gt=8)
    max_samples: int = Field(2000, gt=0)
    num_workers: int = Field(1, gt=0)
    # CPUs (and torch threads) per Ray Train worker. "auto": 1 per GPU worker; without GPUs the
    # cluster's CPUs shared among the workers, since a worker holding 1 CPU gets 1 torch thread
    # (Ray sets OMP_NUM_THREADS to the CPUs it grants) and leaves the other cores idle.
    cpus_per_worker: int | Literal["auto"] = "auto"
    use_gpu: bool = False
    deepspeed: str | None = None  # path to a DeepSpeed (ZeRO-3) JSON config; GPUs only
    bf16: bool = False
    seed: int = 0

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive_cpus(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"must be a positive integer or 'auto', got {v}")
        return v


class RepresentationConfig(_Section):
    batch_size: int = Field(16, gt=0)
    num_actors: int | Literal["auto"] = "auto"
    exclude_first_token: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"  # model compute dtype; pooling is float32


class TypicalConfig(_Section):
    k: int = Field(20, gt=0)
    seed: int = 0
    n_init: int = Field(4, gt=0)


class SimilarityConfig(_Section):
    kernel: Literal["rbf", "cosine", "linear_cka", "mmd", "euclidean"] = "rbf"
    sigma: float | Literal["median"] = 1.0
    normalize: Literal["none", "l2", "standardize"] = "none"
    temperature: float = Field(1.0, gt=0)
    pairing: Literal["paired", "all_pairs"] = "paired"

    @field_validator("sigma")
    @classmethod
    def _positive_sigma(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v <= 0:
            raise ValueError("sigma must be > 0 or 'median'")
        return v


class MergeConfig(_Section):
    num_actors: int | Literal["auto"] = "auto"
    head_group: Literal["last", "embedding"] = "last"  # where the final norm and LM head go
    placement: Literal["SPREAD", "PACK", "DEFAULT"] = "SPREAD"
    max_shard_bytes: int = Field(2 * 1024**3, gt=0)
    check_finite: bool = True


class EvaluateConfig(_Section):
    """Optional scoring at the end of the job (recall_ray.evaluate): the merge, the new model
    alone and each baseline merge, on the first `max_samples` of each task's split."""

    tasks: list[str] = []  # empty: no evaluation
    split: Literal["test", "validation"] = "test"
    max_samples: int = Field(32, gt=0)
    data_dir: str = "data"  # holds <task>/train.jsonl and test.jsonl
    baselines: list[Literal["average"]] = ["average"]  # merged beside the RECALL merge for comparison
    batch_size: int = Field(16, gt=0)


class RayConfig(_Section):
    address: str | None = None  # None: join RAY_ADDRESS if set, else start local Ray
    num_cpus: int | None = None
    object_store_memory: int | None = 512 * 1024**2


class RunConfig(_Section):
    run_dir: str = "runs/default"
    output: str | None = None  # default: <run_dir>/merged
    overwrite: bool = False
    allow_pickle: bool = False
    base: ModelSpec
    experts: list[ModelSpec] = []
    new_model: ModelSpec | None = None
    include_base: bool = True
    task: TaskConfig
    architecture: str | None = None  # path to a JSON template for an unknown family
    finetune: FinetuneConfig = FinetuneConfig()
    representations: RepresentationConfig = RepresentationConfig()
    typical: TypicalConfig = TypicalConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        labels = [m.label for m in self.experts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"experts have duplicate names {labels}: give each a distinct `name`")
        return self

    @property
    def output_dir(self) -> str:
        return self.output or f"{self.run_dir.rstrip('/')}/merged"


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/lists: `true`, `3`, `0.5`, `[a, b]`, `median`."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; list items are addressed by index."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set typical.k=10")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = _parse_scalar(value)
    else:
        node[last] = _parse_scalar(value)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{loc}' (check the spelling; see README 'Config reference')")
        else:
            lines.append(f"config key '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def build_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | None, overrides: list[str] = (), defaults: dict | None = None) -> RunConfig:
    """Load a YAML file (or `defaults` when no file), apply `--set` overrides, validate."""
    tree: dict = dict(defaults or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping at the top level")
        tree = loaded
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_config(tree)
