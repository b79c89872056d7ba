"""Merge methods, by name: RECALL and the baselines it is compared with, each one function
registered here, which the sharded merge actors apply tensor by tensor.

Two registries, both plain data:

- `KINDS`: the per-tensor rules (`linear`, `task_arithmetic`, `ties`, `dare_linear`,
  `dare_ties`), each with its mergekit export beside it (the mergekit method of the same
  name, its global parameters, and where mergekit's result differs by construction).
- `METHODS`: the named merges a user asks for (`recall`, `average`, `ties`, ...), each a
  function of the merge's shape and settings returning a `MergeMethod` (one kind plus its
  per-layer-group weights and parameters), with what it needs besides (RECALL's weights,
  LM-Cocktail's losses).

Adding a merge method is one `@method` (and, for a new rule, one `@kind`) in this file and
its test; configs, the scenarios and the mergekit export read the registries.

Models are indexed 0..K-1 in merge order; model 0 is always the base, the numerical
reference (and for task-vector kinds the model the deltas are taken from). Weights are per
layer group: `weights[g][q]` is model q's weight in group g.

kinds:
  linear           theta = sum_q w[g,q] theta_q, rows of w sum to 1 (RECALL, uniform average /
                   model soup, layer-constant RECALL, LM-Cocktail; the base may have weight 0)
  task_arithmetic  theta = theta_0 + lam * sum_{q>=1} w[g,q] (theta_q - theta_0)
  ties             trim each delta to its top `density` fraction by magnitude, elect a sign per
                   entry (sign of the sum of weighted trimmed deltas, 0 counts as +), keep the
                   entries that agree, disjoint mean (divide by the sum of agreeing weights when
                   `normalize`), scale by lam
  dare_linear      drop each delta entry with probability 1 - density, rescale the kept ones by
                   1 / density (DARE), then the weighted sum (divided by sum of weights when
                   `normalize`: "DARE on average"; else "DARE on task arithmetic"), scale by lam
  dare_ties        DARE's drop-and-rescale, then TIES' sign election and disjoint mean

Every kind is computed in float32 from the base outward and cast to the output dtype; when
every delta is exactly zero (K identical models) the base tensor is returned unchanged, bit
for bit. Memory per tensor is a few copies of it whatever K is: models are loaded one at a
time through `load(q)` (consensus kinds make two passes rather than holding K deltas).
DARE's masks come from a generator seeded by (seed, tensor name, model index), so a merge
is reproducible whatever the shard layout or actor count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from .merge_rule import DeltaLoader, weighted_merge
from .task_vectors import Loader, dare_seed, task_vector_merge

if TYPE_CHECKING:  # the registry is read by the config's checks, which must not import torch
    import torch

__all__ = ["KINDS", "METHODS", "Kind", "MergeMethod", "NamedMethod", "MethodSettings", "build_method", "dare_seed",
           "uniform_weights", "layer_constant", "cocktail_weights", "task_vector_weights"]


def _is_array(x: object) -> bool:
    """A numpy array or a torch tensor (checked without importing torch)."""
    return isinstance(x, np.ndarray) or type(x).__module__.split(".")[0] == "torch"


def _weight_table(weights: object) -> tuple[tuple[float, ...], ...]:
    """`weights` (nested sequences or a 2-D array) as a [G][K] tuple of python floats, so
    that a MergeMethod hashes, compares and pickles as plain data."""
    if _is_array(weights):
        if weights.ndim != 2:
            raise ValueError(f"weights must be a 2-D [groups][models] table, got an array of shape "
                             f"{tuple(weights.shape)}; reshape it to (num_groups, num_models)")
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise ValueError(f"weights must be a non-empty [groups][models] table (one row per layer group), "
                         f"got {weights!r}")
    rows: list[tuple[float, ...]] = []
    for g, row in enumerate(weights):
        if _is_array(row):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"weights must be a [groups][models] table, but row {g} is {row!r}, not a "
                             f"sequence; a single row of weights must still be wrapped: [[w_0, ..., w_K-1]]")
        try:
            vals = tuple(float(x) for x in row)
        except (TypeError, ValueError) as e:
            raise ValueError(f"weights row {g} has a non-numeric entry: {list(row)!r}") from e
        rows.append(vals)
    k = len(rows[0])
    for g, row in enumerate(rows):
        if len(row) != k:
            raise ValueError(f"weights must be rectangular: row 0 has {k} models but row {g} has "
                             f"{len(row)}; give every layer group one weight per model")
        if not all(math.isfinite(x) for x in row):
            raise ValueError(f"weights must be finite, row {g} is {list(row)} (NaN or inf)")
    if k < 2:
        raise ValueError(f"a merge needs at least 2 models (the base and one other), got K={k} "
                         f"weight(s) per row")
    return tuple(rows)


@dataclass(frozen=True)
class MergeMethod:
    """What the merge actors compute. Plain data, so it pickles to Ray actors and into the
    run manifest.

    label: the name of the result in tables and paths (`recall`, `average`, `ties`, ...).
    kind: a key of KINDS.
    weights: [G][K] weight of each model in each layer group (task-vector kinds ignore column 0).
        Nested lists or a 2-D array are accepted and stored as tuples of python floats.
    density: fraction of each delta kept (ties: by magnitude; dare: at random). 1 keeps all.
        Only the ties and dare kinds sparsify; linear and task_arithmetic ignore it.
    lam: scale of the merged task vector (task-vector kinds; linear ignores it).
    normalize: divide the merged task vector by the sum of the (agreeing) weights
        (task-vector kinds; linear rows are always renormalised to sum to 1).
    seed: DARE's random seed.
    """

    label: str
    kind: str
    weights: tuple[tuple[float, ...], ...]
    density: float = 1.0
    lam: float = 1.0
    normalize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must be a non-empty string (it names the result), got {self.label!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown merge kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        weights = _weight_table(self.weights)
        if not KINDS[self.kind].task_vectors:
            for g, row in enumerate(weights):
                # weighted_merge renormalises each row, so only the signs and a non-zero sum matter
                if any(x < 0 for x in row) or sum(row) <= 0:
                    raise ValueError(f"linear weights must be non-negative and not all zero in every "
                                     f"group, row {g} is {list(row)}")
        else:
            for g, row in enumerate(weights):
                # column 0 is the base, which has no task vector: its weight is ignored
                if any(x < 0 for x in row[1:]) or not any(x > 0 for x in row[1:]):
                    raise ValueError(f"{self.kind} weights of models 1..K-1 must be non-negative with at "
                                     f"least one > 0 in every group, row {g} is {list(row)} (column 0, "
                                     f"the base, is ignored)")
        if isinstance(self.density, bool) or not isinstance(self.density, Real) or not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1] (the fraction of each delta kept; 1 keeps all), "
                             f"got {self.density!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, Real) or not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite number (the scale of the merged task vector), got {self.lam!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "density", float(self.density))
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "normalize", bool(self.normalize))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def num_groups(self) -> int:
        return len(self.weights)

    @property
    def num_models(self) -> int:
        return len(self.weights[0]) if self.weights else 0

    def merge_tensor(self, load: Loader, group: int, name: str, out_dtype: torch.dtype | None = None,
                     delta: DeltaLoader | None = None) -> torch.Tensor:
        """Merge parameter `name` (in layer group `group`) of the K models.

        load(q) returns model q's copy of the tensor (never modified here); `delta` (see
        merge_rule.DeltaLoader) gives some models' differences from the base directly (LoRA
        experts on the base's own weights). The result has `out_dtype`, by default the base's.
        """
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} out of range: this method has weights for {self.num_groups} "
                             f"layer group(s)")
        return KINDS[self.kind].rule(self, load, self.weights[group], name, out_dtype, delta)


# ------------------------------------------------------------------ kinds (tensor rules)

Rule = Callable[[MergeMethod, Loader, Sequence[float], str, "torch.dtype | None", "DeltaLoader | None"],
                "torch.Tensor"]


@dataclass(frozen=True)
class Kind:
    """A per-tensor merge rule, and how mergekit (0.1.5) writes the same merge.

    task_vectors: the rule merges deltas from the base (model 0), whose weight it ignores;
        mergekit then lists the base without parameters and gives every other model a
        `density`. Otherwise every model, the base included, has a weight.
    mergekit_parameters: mergekit's global `parameters` for a MergeMethod of this kind.
    mergekit_note: lines for the exported YAML's header where mergekit's tensors differ
        from ours by construction.
    """

    name: str
    rule: Rule
    task_vectors: bool
    mergekit_parameters: Callable[[MergeMethod], dict[str, Any]]
    mergekit_note: Callable[[MergeMethod], list[str]] = lambda m: []


KINDS: dict[str, Kind] = {}


def kind(name: str, *, task_vectors: bool, mergekit_parameters: Callable[[MergeMethod], dict[str, Any]],
         mergekit_note: Callable[[MergeMethod], list[str]] = lambda m: []) -> Callable[[Rule], Rule]:
    """Register a tensor rule under `name` (also the mergekit method it exports to)."""
    def register(rule: Rule) -> Rule:
        KINDS[name] = Kind(name, rule, task_vectors, mergekit_parameters, mergekit_note)
        return rule
    return register


def _task_vector_parameters(**extra: Any) -> Callable[[MergeMethod], dict[str, Any]]:
    return lambda m: {"lambda": float(m.lam), "normalize": bool(m.normalize), **extra}


def _dare_note(m: MergeMethod) -> list[str]:
    return ["DARE: masks are random, so tensors will differ from recall-ray's merge (its masks come",
            f"from its own generator, seed {m.seed}, and it rescales by 1/density where mergekit's",
            "rescale: true matches the L1 norm); same method and parameters, not the same tensors."]


@kind("linear", task_vectors=False, mergekit_parameters=lambda m: {"normalize": True})
def _linear(m: MergeMethod, load: Loader, w: Sequence[float], name: str, out_dtype,
        delta: DeltaLoader | None = None) -> torch.Tensor:
    return weighted_merge(load, w, ref=0, out_dtype=out_dtype, delta=delta)


@kind("task_arithmetic", task_vectors=True, mergekit_parameters=_task_vector_parameters())
def _task_arithmetic(m: MergeMethod, load: Loader, w: Sequence[float], name: str, out_dtype,
        delta: DeltaLoader | None = None) -> torch.Tensor:
    return task_vector_merge(load, w, name, sparsify=None, density=m.density, normalize=m.normalize, lam=m.lam,
                             seed=m.seed, out_dtype=out_dtype, delta=delta)


@kind("ties", task_vectors=True, mergekit_parameters=_task_vector_parameters(rescale=False))
def _ties(m: MergeMethod, load: Loader, w: Sequence[float], name: str, out_dtype,
        delta: DeltaLoader | None = None) -> torch.Tensor:
    return task_vector_merge(load, w, name, sparsify="magnitude", density=m.density, consensus=True,
                             normalize=m.normalize, lam=m.lam, seed=m.seed, out_dtype=out_dtype, delta=delta)


@kind("dare_linear", task_vectors=True, mergekit_parameters=_task_vector_parameters(rescale=True),
      mergekit_note=_dare_note)
def _dare_linear(m: MergeMethod, load: Loader, w: Sequence[float], name: str, out_dtype,
        delta: DeltaLoader | None = None) -> torch.Tensor:
    return task_vector_merge(load, w, name, sparsify="random", density=m.density, normalize=m.normalize, lam=m.lam,
                             seed=m.seed, out_dtype=out_dtype, delta=delta)


@kind("dare_ties", task_vectors=True, mergekit_parameters=_task_vector_parameters(rescale=True),
      mergekit_note=_dare_note)
def _dare_ties(m: MergeMethod, load: Loader, w: Sequence[float], name: str, out_dtype,
        delta: DeltaLoader | None = None) -> torch.Tensor:
    return task_vector_merge(load, w, name, sparsify="random", density=m.density, consensus=True,
                             normalize=m.normalize, lam=m.lam, seed=m.seed, out_dtype=out_dtype, delta=delta)


# ------------------------------------------------------------------------ weight builders


def _check_shape(num_groups: int, num_models: int) -> None:
    if int(num_groups) < 1 or int(num_models) < 2:
        raise ValueError(f"need num_groups >= 1 and num_models >= 2, got {num_groups} and {num_models}")


def uniform_weights(num_groups: int, num_models: int, include_base: bool = True) -> np.ndarray:
    """Model soup: [G, K] equal weights summing to 1 in every group; with include_base=False
    the base (column 0) gets 0 and the fine-tuned models share the weight."""
    _check_shape(num_groups, num_models)
    w = np.zeros((num_groups, num_models), dtype=np.float64)
    if include_base:
        w[:] = 1.0 / num_models
    else:
        w[:, 1:] = 1.0 / (num_models - 1)
    return w


def layer_constant(weights: np.ndarray) -> np.ndarray:
    """The "layer-constant RECALL" ablation: each model's weight averaged over the G groups
    and the same row used in every group (the global weights without the per-layer part)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1 or not np.isfinite(w).all():
        raise ValueError(f"weights must be a finite [groups, models] array, got shape {w.shape}")
    return np.tile(w.mean(axis=0, keepdims=True), (w.shape[0], 1))


def cocktail_weights(losses: Sequence[float], temperature: float) -> np.ndarray:
    """LM-Cocktail's merge weights: softmax(-loss / temperature) over the K models (lower
    loss on the few-shot examples, larger weight). The maximum is subtracted before exp so
    large losses neither overflow nor underflow to 0/0."""
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"losses must be a non-empty list of finite numbers, got {losses!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    z = -x / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def task_vector_weights(num_groups: int, num_models: int, weight: float = 1.0) -> np.ndarray:
    """[G, K] weights for task arithmetic / TIES / DARE: 0 for the base (column 0, which has
    no task vector), `weight` for every fine-tuned model."""
    _check_shape(num_groups, num_models)
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    w = np.full((num_groups, num_models), float(weight), dtype=np.float64)
    w[:, 0] = 0.0
    return w


# --------------------------------------------------------------------- named methods


class MethodSettings(Protocol):
    """The baselines' settings (config.BaselineConfig): choose them on the validation split."""

    lam: float  # task-vector scale: task arithmetic, TIES, DARE + task arithmetic
    ties_density: float  # fraction of each task vector TIES keeps
    dare_drop: float  # fraction of each task vector DARE drops
    seed: int  # DARE's masks
    cocktail_temperature: float


@dataclass(frozen=True)
class MethodInputs:
    """What a named method is built from: K models (model 0 the base) in G layer groups.

    include_base: whether the base takes part in the weighted (linear) merges; the
    task-vector methods always start from the base, which is their reference.
    recall_weights: [G, K] RECALL weights, for the methods that need them.
    losses: [K] each model's loss on the new task's examples (LM-Cocktail).
    """

    num_groups: int
    num_models: int
    include_base: bool
    settings: MethodSettings
    recall_weights: np.ndarray | None = None
    losses: Sequence[float] | None = None


@dataclass(frozen=True)
class NamedMethod:
    name: str
    build: Callable[[MethodInputs], MergeMethod]
    needs: tuple[str, ...]  # of "recall_weights", "losses": computed by the caller first
    summary: str
    needs_base: bool = False  # only defined for a merge with the base among its models (include_base)


METHODS: dict[str, NamedMethod] = {}


def method(name: str, summary: str, needs: tuple[str, ...] = (), needs_base: bool = False) -> Callable:
    """Register a named merge: a function of MethodInputs returning its MergeMethod."""
    def register(build: Callable[[MethodInputs], MergeMethod]) -> Callable[[MethodInputs], MergeMethod]:
        METHODS[name] = NamedMethod(name, build, needs, summary, needs_base)
        return build
    return register


@method("recall", "per-layer RECALL weights", needs=("recall_weights",))
def _recall(x: MethodInputs) -> MergeMethod:
    return MergeMethod("recall", "linear", x.recall_weights)


@method("recall_layer_constant", "each model's RECALL weight averaged over layers, in every layer (what the"
        " per-layer part adds)", needs=("recall_weights",))
def _recall_layer_constant(x: MethodInputs) -> MergeMethod:
    return MergeMethod("recall_layer_constant", "linear", layer_constant(x.recall_weights))


@method("average", "uniform average of the merged models (model soup)")
def _average(x: MethodInputs) -> MergeMethod:
    return MergeMethod("average", "linear", uniform_weights(x.num_groups, x.num_models, x.include_base))


@method("task_arithmetic", "base + lam * sum of task vectors")
def _task_arithmetic_method(x: MethodInputs) -> MergeMethod:
    return MergeMethod("task_arithmetic", "task_arithmetic", task_vector_weights(x.num_groups, x.num_models),
                       lam=x.settings.lam)


@method("ties", "TIES: trim to ties_density, elect signs, disjoint mean, * lam")
def _ties_method(x: MethodInputs) -> MergeMethod:
    return MergeMethod("ties", "ties", task_vector_weights(x.num_groups, x.num_models),
                       density=x.settings.ties_density, lam=x.settings.lam, normalize=True)


@method("dare_average", "DARE (drop dare_drop, rescale by 1/(1-drop)) on the average of task vectors")
def _dare_average(x: MethodInputs) -> MergeMethod:
    return MergeMethod("dare_average", "dare_linear", task_vector_weights(x.num_groups, x.num_models),
                       density=1 - x.settings.dare_drop, normalize=True, seed=x.settings.seed)


@method("dare_average_with_base", "DARE on the average of all K models, the base one of them (its task vector is 0):"
        " base + sum of the experts' DARE'd task vectors / K, as the paper's DARE+Avg with the base", needs_base=True)
def _dare_average_with_base(x: MethodInputs) -> MergeMethod:
    # dare_average divides by the K - 1 experts; counting the base among the averaged models
    # divides by K instead: each expert's weight 1/K, no renormalisation (column 0 is ignored)
    return MergeMethod("dare_average_with_base", "dare_linear", np.full((x.num_groups, x.num_models), 1.0 / x.num_models),
                       density=1 - x.settings.dare_drop, normalize=False, seed=x.settings.seed)


@method("dare_task_arithmetic", "DARE on task arithmetic (* lam)")
def _dare_task_arithmetic(x: MethodInputs) -> MergeMethod:
    return MergeMethod("dare_task_arithmetic", "dare_linear", task_vector_weights(x.num_groups, x.num_models),
                       density=1 - x.settings.dare_drop, lam=x.settings.lam, seed=x.settings.seed)


@method("lm_cocktail", "LM-Cocktail: global weights softmax(-loss / T) of each model's loss on a few new-task"
        " examples", needs=("losses",))
def _lm_cocktail(x: MethodInputs) -> MergeMethod:
    row = np.zeros(x.num_models)
    first = 0 if x.include_base else 1
    row[first:] = cocktail_weights(list(x.losses)[first:], x.settings.cocktail_temperature)
    return MergeMethod("lm_cocktail", "linear", np.tile(row, (x.num_groups, 1)))


def build_method(name: str, num_groups: int, num_models: int, include_base: bool, settings: MethodSettings,
                 recall_weights: np.ndarray | None = None, losses: Sequence[float] | None = None) -> MergeMethod:
    """The MergeMethod called `name` for K = num_models models (model 0 the base) in G =
    num_groups layer groups; `recall_weights` ([G, K]) and `losses` ([K]) for the methods
    that need them (METHODS[name].needs)."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}: choose from {', '.join(METHODS)}")
    G, K = num_groups, num_models
    needs = METHODS[name].needs
    if "recall_weights" in needs and (recall_weights is None or np.shape(recall_weights) != (G, K)):
        raise ValueError(f"{name} needs the [{G}, {K}] RECALL weights, got {np.shape(recall_weights)}")
    if "losses" in needs and (losses is None or len(losses) != K):
        raise ValueError(f"{name} needs one loss per model ({K}), got {losses}")
    if METHODS[name].needs_base and not include_base:
        raise ValueError(f"{name} averages the base with the other models: use it with include_base true")
    return METHODS[name].build(MethodInputs(G, K, include_base, settings, recall_weights, losses))
