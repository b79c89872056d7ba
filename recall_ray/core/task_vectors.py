"""Task-vector merging of one tensor, streamed over the models: mergekit's generalized task
arithmetic (task arithmetic, TIES' trim and sign consensus, DARE's drop and rescale) as
small pure tensor functions, in the manner of peft's `utils/merge_utils.py`.

Model 0 is the base: every delta is taken from it. Models are loaded one at a time through
`load(q)`, so memory is a few copies of the tensor whatever the number of models.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

from .merge_rule import DeltaLoader, model_delta

Loader = Callable[[int], "torch.Tensor"]


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
    import torch

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
    import torch

    if density >= 1:
        return delta.clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=gen)
    keep = keep.to(device=delta.device, dtype=torch.bool)
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype, device=delta.device))


def task_vector_merge(load: Loader, weights: Sequence[float], name: str, *, sparsify: str | None,
                      density: float = 1.0, consensus: bool = False, normalize: bool = False,
                      lam: float = 1.0, seed: int = 0, out_dtype: torch.dtype | None = None,
                      delta: DeltaLoader | None = None) -> torch.Tensor:
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
    contribute nothing (d_q = 0) and are not loaded; nor are those whose delta is exactly 0
    (`delta`, see merge_rule.DeltaLoader), which no sparsification or vote can change.
    """
    import torch

    w = [float(x) for x in weights]
    base = load(0)
    dtype = out_dtype or base.dtype
    base32 = base.to(torch.float32)  # may alias `base` when it is float32: only read, never written
    active = [q for q in range(1, len(w)) if w[q] != 0.0]

    def weighted_delta(q: int) -> torch.Tensor | None:
        """w_q * sparse(theta_q - theta_0), or None when the delta is exactly 0 (nothing to count)."""
        d = model_delta(q, load, base32, delta)  # a fresh tensor: the loader's stays untouched
        if d is None:
            return None
        if sparsify == "magnitude":
            d = magnitude_sparsify(d, density)
        elif sparsify == "random":
            d = dare_sparsify(d, density, dare_seed(seed, name, q))
        elif sparsify is not None:
            raise ValueError(f"unknown sparsification {sparsify!r}; use None, 'magnitude' or 'random'")
        return d.mul_(w[q])

    mixed = torch.zeros_like(base32)
    if consensus:
        # pass 1: the sign vote, sum_q d_q; only its sign is kept
        for q in active:
            if (d := weighted_delta(q)) is not None:
                mixed.add_(d)
        positive = mixed >= 0  # a zero vote elects +, as mergekit
        mixed.zero_()
        divisor = torch.zeros_like(base32) if normalize else None
        # pass 2: the same d_q again, each entry counted where it agrees with the elected sign
        for q in active:
            d = weighted_delta(q)
            if d is None:  # a zero delta never agrees
                continue
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
            if (d := weighted_delta(q)) is not None:
                mixed.add_(d)
        if normalize:
            total = sum(w[1:])
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed.mul_(lam)
    if not mixed.any():  # every delta is zero (K identical models, or lam = 0): the base, bit for bit
        return base.to(dtype)
    return mixed.add_(base32).to(dtype)
