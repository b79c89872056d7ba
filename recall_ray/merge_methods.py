"""Merge methods: RECALL and the baselines, as one description (`MergeMethod`) that the
sharded merge actors apply tensor by tensor, and pure functions of the tensors of one
parameter (in the manner of peft's `merge_utils` and mergekit's generalized task arithmetic).

Models are indexed 0..K-1 in merge order; model 0 is always the base, the numerical
reference (and for task-vector methods the model whose parameters the deltas are taken
from). Weights are per layer group: `weights[g][q]` is model q's weight in group g.

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
time through `load(q)` (consensus methods make two passes rather than holding K deltas).
DARE's masks come from a generator seeded by (seed, tensor name, model index), so a merge
is reproducible whatever the shard layout or actor count.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from .merge_rule import weighted_merge

Kind = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
KINDS: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
Loader = Callable[[int], torch.Tensor]

# kinds that elect a sign per entry and keep only the agreeing deltas (TIES' consensus)
CONSENSUS_KINDS: frozenset[str] = frozenset({"ties", "dare_ties"})
# kinds that drop delta entries at random and rescale the survivors (DARE)
DARE_KINDS: frozenset[str] = frozenset({"dare_linear", "dare_ties"})


def _weight_table(weights: object) -> tuple[tuple[float, ...], ...]:
    """`weights` (nested sequences or a 2-D array) as a [G][K] tuple of python floats, so
    that a MergeMethod hashes, compares and pickles as plain data."""
    if isinstance(weights, (np.ndarray, torch.Tensor)):
        if weights.ndim != 2:
            raise ValueError(f"weights must be a 2-D [groups][models] table, got an array of shape "
                             f"{tuple(weights.shape)}; reshape it to (num_groups, num_models)")
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise ValueError(f"weights must be a non-empty [groups][models] table (one row per layer group), "
                         f"got {weights!r}")
    rows: list[tuple[float, ...]] = []
    for g, row in enumerate(weights):
        if isinstance(row, (np.ndarray, torch.Tensor)):
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
    kind: one of KINDS.
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
    kind: Kind
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
        if self.kind == "linear":
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

    def merge_tensor(self, load: Loader, group: int, name: str, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Merge parameter `name` (in layer group `group`) of the K models.

        load(q) returns model q's copy of the tensor (never modified here). The result has
        `out_dtype`, by default the base's dtype.
        """
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} out of range: this method has weights for {self.num_groups} "
                             f"layer group(s)")
        w = self.weights[group]
        if self.kind == "linear":
            return weighted_merge(load, w, ref=0, out_dtype=out_dtype)
        return task_vector_merge(
            load, w, name,
            sparsify="magnitude" if self.kind == "ties" else "random" if self.kind in DARE_KINDS else None,
            density=self.density, consensus=self.kind in CONSENSUS_KINDS, normalize=self.normalize,
            lam=self.lam, seed=self.seed, out_dtype=out_dtype)


# ---------------------------------------------------------------- task-vector merging


def dare_seed(seed: int, name: str, q: int) -> int:
    """The seed of DARE's mask for model q's copy of tensor `name`: a stable hash (not
    python's salted `hash`), so the mask is the same in every process, shard layout and run."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(q)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the k = max(1, int(density * numel)) entries of largest |delta|
    (exactly k, as mergekit's `sparsify.magnitude`), zero the rest, no rescale.

    Among entries of equal magnitude at the cut the lowest flat indices are kept (mergekit's
    unstable argsort leaves that choice to the sort), so the selection is a function of the
    values alone: the two passes of a consensus merge select the same entries, and a plain
    stable sort reproduces it. O(numel) (a k-th value selection, not a full sort).
    Returns a new tensor."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta.clone()
    k = max(1, int(density * n))
    flat = delta.reshape(-1)
    mag = flat.abs()
    thr = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > thr
    if thr > 0:  # at a zero threshold the tied entries are zeros: keeping them changes nothing
        need = k - int(keep.sum())
        tied = torch.nonzero(mag == thr).squeeze(1)[:need]
        keep[tied] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(delta.shape)


def dare_sparsify(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE's drop and rescale: keep each entry with probability `density` and multiply the
    kept ones by 1/density, as in the DARE paper (Yu et al. 2023), so the expected delta is
    unchanged. (mergekit instead rescales the kept entries to match the L1 norm of the whole
    delta; we follow the paper.) The mask is drawn on the CPU from a generator seeded with
    `seed` in float32, so it depends only on (seed, shape), not on device or dtype.
    Returns a new tensor."""
    if density >= 1:
        return delta.clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=gen)
    keep = keep.to(device=delta.device, dtype=torch.bool)
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype, device=delta.device))


def task_vector_merge(load: Loader, weights: Sequence[float], name: str, *, sparsify: str | None,
                      density: float = 1.0, consensus: bool = False, normalize: bool = False,
                      lam: float = 1.0, seed: int = 0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """mergekit's generalized task arithmetic for one tensor, streamed over the models.

    delta_q = theta_q - theta_0 (float32, q = 1..K-1), sparsified (`sparsify`: None,
    "magnitude" (TIES) or "random" (DARE)) and weighted: d_q = w_q * sparse(delta_q).
    consensus: elected sign s = +1 where sum_q d_q >= 0 else -1; only the d_q whose sign is s
    count (zeros never do); divisor = sum of the agreeing w_q (0 -> 1). Otherwise all d_q
    count and divisor = sum_q w_q (|.| < 1e-8 -> 1). mixed = sum of the counted d_q, divided
    by the divisor when `normalize`, times `lam`; the result is theta_0 + mixed.

    Memory: the base, a few accumulators and one model's delta at a time, whatever K is. A
    consensus merge makes two passes (the sign vote, then the sum) and so loads each model
    twice, recomputing the same sparsification (magnitude selection is deterministic, the DARE
    mask seeded by (seed, name, q)) instead of holding K deltas. Models with weight 0
    contribute nothing (d_q = 0) and are not loaded.
    """
    w = [float(x) for x in weights]
    base = load(0)
    dtype = out_dtype or base.dtype
    base32 = base.to(torch.float32)  # may alias `base` when it is float32: only read, never written
    active = [q for q in range(1, len(w)) if w[q] != 0.0]

    def weighted_delta(q: int) -> torch.Tensor:
        delta = load(q).to(torch.float32, copy=True)  # a copy: the loader's tensor stays untouched
        delta.sub_(base32)
        if sparsify == "magnitude":
            delta = magnitude_sparsify(delta, density)
        elif sparsify == "random":
            delta = dare_sparsify(delta, density, dare_seed(seed, name, q))
        elif sparsify is not None:
            raise ValueError(f"unknown sparsification {sparsify!r}; use None, 'magnitude' or 'random'")
        return delta.mul_(w[q])

    mixed = torch.zeros_like(base32)
    if consensus:
        # pass 1: the sign vote, sum_q d_q; only its sign is kept
        for q in active:
            mixed.add_(weighted_delta(q))
        positive = mixed >= 0  # a zero vote elects +, as mergekit
        mixed.zero_()
        divisor = torch.zeros_like(base32) if normalize else None
        # pass 2: the same d_q again, each entry counted where it agrees with the elected sign
        for q in active:
            d = weighted_delta(q)
            agree = torch.where(positive, d > 0, d < 0)
            mixed.add_(torch.where(agree, d, torch.zeros((), dtype=d.dtype)))
            if divisor is not None:
                divisor.add_(agree.to(torch.float32), alpha=w[q])
            del d, agree
        if divisor is not None:
            divisor[divisor == 0] = 1.0  # no model agrees: mixed is 0 there anyway
            mixed.div_(divisor)
    else:
        for q in active:
            mixed.add_(weighted_delta(q))
        if normalize:
            total = sum(w[1:])
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed.mul_(lam)
    if not mixed.any():  # every delta is zero (K identical models, or lam = 0): the base, bit for bit
        return base.to(dtype)
    return mixed.add_(base32).to(dtype)


# ---------------------------------------------------------------- weight builders


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
