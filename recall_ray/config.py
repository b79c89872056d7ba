"""Job configuration: frozen pydantic models, loaded from YAML and `--set key=value`.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting that is silently ignored. Validation happens before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class Section(BaseModel):
    """A config section: frozen, and an unknown key is an error (never a silent default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    """One model taking part in the merge.

    `path` is a Hugging Face model directory (safetensors), a PEFT LoRA adapter directory
    (then it is folded into the base model exactly), or `builtin:smollm2-135m-instruct`.
    """

    name: str | None = None
    path: str
    adapter_base: str | None = None  # the model a LoRA adapter was trained on, when not `base` (sequential runs)
    # An adapter without recall_ray.json is tied to its base by the name PEFT recorded
    # (adapter_config.json base_model_name_or_path); false accepts a base of another name.
    base_name_check: bool = True

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name


class TaskConfig(Section):
    """The new task's data: JSONL records rendered to prompt/target by a template."""

    name: str = "task"
    data: str
    template: str
    max_samples: int = Field(256, gt=0)
    max_length: int = Field(128, gt=8)


class FinetuneConfig(Section):
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

    # Fault tolerance: every `checkpoint_every` steps (0: never) the LoRA weights, the
    # optimizer and the random state are checkpointed, and a worker that dies is restarted
    # up to `max_failures` times from the last checkpoint; the adapter is the same bit for bit.
    checkpoint_every: int = Field(0, ge=0)
    max_failures: int = Field(0, ge=0)
    # Snapshots (with `finetune_lora(..., snapshot_dir=...)`): every `snapshot_every` steps and
    # at the last one, the adapter and the full training state are written to the snapshot
    # directory. A later run with more `steps` and the same directory goes on from the newest
    # snapshot, so a budget ladder (1, 2, 3 epochs) is trained once, in resumable pieces: the
    # learning rate is constant and the batch order's prefix does not depend on `steps`, so
    # the snapshot at step k is the adapter of a k-step run, bit for bit.
    snapshot_every: int = Field(0, ge=0)

    # Settings of how the training runs, not of what it learns: left out of the fine-tune
    # stages' keys, so that adding one keeps finished (and exported) adapters reusable.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures", "snapshot_every"})

    def key(self) -> dict:
        return self.model_dump(exclude=set(self.OPERATIONAL))


class RepresentationConfig(Section):
    batch_size: int = Field(16, gt=0)
    num_actors: int | Literal["auto"] = "auto"
    exclude_first_token: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"  # model compute dtype; pooling is float32


class TypicalConfig(Section):
    k: int = Field(20, gt=0)
    seed: int = 0
    n_init: int = Field(4, gt=0)


# Named similarity settings (`similarity.preset`): "paper" is RECALL's formula read literally
# (raw mean-pooled vectors, RBF with sigma 1, softmax at temperature 1); "validated" is the
# setting chosen on the validation split of the multi scenario (docs/results/selection/).
SIMILARITY_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"kernel": "rbf", "sigma": 1.0, "normalize": "none", "temperature": 1.0, "pairing": "paired"},
    "validated": {"kernel": "rbf", "sigma": 1.0, "normalize": "l2", "temperature": 0.02, "pairing": "paired"},
}


class SimilarityConfig(Section):
    """RECALL's similarity (core.similarity): a kernel of KERNELS, a row normalisation of
    NORMALIZERS, the RBF width and the softmax temperature. A `preset` (SIMILARITY_PRESETS)
    sets them all; a key given beside it wins over the preset's."""

    preset: Literal["paper", "validated"] | None = None
    kernel: str = "rbf"
    sigma: float | Literal["median"] = 1.0
    normalize: str = "none"
    temperature: float = Field(1.0, gt=0)
    pairing: Literal["paired", "all_pairs"] = "paired"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            if data["preset"] not in SIMILARITY_PRESETS:
                return data  # the Literal names the choices
            return {**SIMILARITY_PRESETS[data["preset"]], **data}
        return data

    def key(self) -> dict:
        """What decides the weights: the resolved settings, not the preset's name."""
        return self.model_dump(exclude={"preset"})

    @field_validator("kernel", "normalize")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        from .core.similarity import KERNELS, NORMALIZERS

        known = KERNELS if info.field_name == "kernel" else NORMALIZERS
        if v not in known:
            raise ValueError(f"unknown {info.field_name} {v!r}: use one of {', '.join(known)}")
        return v

    @field_validator("sigma")
    @classmethod
    def _positive_sigma(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v <= 0:
            raise ValueError("sigma must be > 0 or 'median'")
        return v


class MergeConfig(Section):
    num_actors: int | Literal["auto"] = "auto"
    head_group: Literal["last", "embedding"] = "last"  # where the final norm and LM head go
    placement: Literal["SPREAD", "PACK", "DEFAULT"] = "SPREAD"
    max_shard_bytes: int = Field(2 * 1024**3, gt=0)
    check_finite: bool = True

    # The settings that decide the merged bytes or the output's layout: the merge stages'
    # keys hold these only, so settings of how the work runs (actor counts, retries) can be
    # added or changed without invalidating finished merges and their cached scores.
    KEYED: ClassVar[tuple[str, ...]] = ("head_group", "placement", "max_shard_bytes", "check_finite")

    def key(self) -> dict:
        return self.model_dump(include=set(self.KEYED))


class EvaluateConfig(Section):
    """Optional scoring at the end of the job (recall_ray.evaluate): the merge, the new model
    alone and each baseline merge, on the first `max_samples` of each task's split."""

    tasks: list[str] = []  # empty: no evaluation
    split: Literal["test", "validation"] = "test"
    max_samples: int = Field(32, gt=0)
    data_dir: str = "data"  # holds <task>/train.jsonl and test.jsonl
    # merged beside the RECALL merge for comparison: named methods that need nothing but the
    # models (core.merge_methods.METHODS), with the default `BaselineConfig` settings
    baselines: list[str] = ["average"]
    batch_size: int = Field(16, gt=0)
    # closed-label tasks by log-likelihood (default) or greedy generation (evaluate.PROTOCOLS);
    # options ranked by the sum of their tokens' log-probabilities, or their mean
    protocol: Literal["loglik", "generate"] = "loglik"
    normalization: Literal["sum", "mean"] = "sum"
    templates: Literal["default", "paper"] = "default"  # core.templates.TEMPLATE_SETS: the prompts asked

    @field_validator("baselines")
    @classmethod
    def _standalone_methods(cls, v: list[str]) -> list[str]:
        from .core.merge_methods import METHODS

        bad = [m for m in v if m not in METHODS or METHODS[m].needs]
        if bad:
            ok = [m for m, spec in METHODS.items() if not spec.needs]
            raise ValueError(f"{bad} cannot be merged beside the job's RECALL merge: use methods of {ok}")
        return v


class BaselineConfig(Section):
    """Settings of the baselines (core.merge_methods.METHODS); choose them on the validation
    split, never on test."""

    lam: float = Field(1.0, gt=0)  # task-vector scale: task arithmetic, TIES, DARE + task arithmetic
    ties_density: float = Field(0.2, gt=0, le=1)  # fraction of each task vector TIES keeps
    dare_drop: float = Field(0.9, ge=0, lt=1)  # fraction of each task vector DARE drops
    seed: int = 0  # DARE's masks
    cocktail_temperature: float = Field(1.0, gt=0)
    cocktail_examples: int = Field(8, gt=0)  # new-task examples LM-Cocktail's losses are measured on


class RayConfig(Section):
    address: str | None = None  # None: join RAY_ADDRESS if set, else start local Ray
    num_cpus: int | None = None
    object_store_memory: int | None = 512 * 1024**2
    # The cluster grows on request (KubeRay's in-tree autoscaler, the cluster launcher): numeric
    # num_actors are targets, asked for up-front (recall_ray.cluster.pools), not cut to what is up.
    autoscaler: bool = False


class RecallSections(Section):
    """The sections that decide a RECALL merge once its models and data are given: shared
    by the job's config (RunConfig) and a study's `recall:` section (RecallSettings)."""

    typical: TypicalConfig = TypicalConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    representations: RepresentationConfig = RepresentationConfig()
    merge: MergeConfig = MergeConfig()


class RecallSettings(RecallSections):
    """RECALL's settings in a study: the job's sections, and how much of the new task's
    train split it represents."""

    max_samples: int = Field(200, gt=0)  # new-task train samples represented and clustered
    max_length: int = Field(128, gt=8)
    # per new task, the tokens represented when not max_length: the fine-tune's length for the
    # tasks whose prompts carry a passage (e.g. {squad_v2: 256, race: 256}), so that the
    # typical samples are the text the expert was trained on
    task_max_length: dict[str, int] = {}

    @field_validator("task_max_length")
    @classmethod
    def _lengths(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {t: n for t, n in v.items() if n <= 8}
        if bad:
            raise ValueError(f"every task_max_length must be > 8 tokens, got {bad}")
        return v

    def max_length_for(self, task: str) -> int:
        return self.task_max_length.get(task, self.max_length)


class RunConfig(RecallSections):
    """The RECALL job (jobs/merge.py)."""

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
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()
    # Run directories of other RECALL runs whose finished representation and typical-sample
    # stages this run copies when their keys equal its own (the same models, data and
    # settings): a study's runs that differ only in the similarity or in whether the base is
    # weighted share every forward pass. A directory not there yet, or a stage with another
    # key, is simply not used.
    reuse_from: list[str] = []

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        labels = [m.label for m in self.experts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"experts have duplicate names {labels}: give each a distinct `name`")
        if not self.include_base:
            from .core.merge_methods import METHODS

            bad = [m for m in self.evaluate.baselines if METHODS[m].needs_base]
            if bad:
                raise ValueError(f"evaluate.baselines {bad} average the base in: set include_base: true or drop them")
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


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line per problem, naming the dotted key (under `prefix`)."""
    lines = []
    for e in err.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{loc}' (check the spelling; see README 'Config reference')")
        else:
            lines.append(f"config key '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def build_config(tree: dict) -> RunConfig:
    return validate(RunConfig, tree)


def load_tree(path: str, overrides: Sequence[str] = (), what: str = "config file") -> dict:
    """A YAML mapping from `path` with `--set` overrides applied (not validated yet)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must hold a YAML mapping at the top level")
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def validate(model: type[BaseModel], tree: dict, prefix: str = "") -> Any:
    """`model` validated from `tree`, or ConfigError with one line per problem (keys named
    under `prefix`, e.g. "finetune")."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, prefix)) from None


def load_config(path: str | None, overrides: Sequence[str] = (), defaults: dict | None = None) -> RunConfig:
    """Load a YAML file (or `defaults` when no file), apply `--set` overrides, validate."""
    if path is not None:
        return build_config(load_tree(path, overrides))
    tree: dict = dict(defaults or {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_config(tree)
