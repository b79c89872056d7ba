"""The merge rule for one tensor: theta = sum_q w_q theta_q, accumulated in float32.

Written as theta_ref + sum_q w_q (theta_q - theta_ref) with the weights summing to 1, which
is the same sum in exact arithmetic, but (1) merging K identical models returns theta_ref
bit for bit, because every difference is exactly 0, and (2) the float32 rounding error
scales with the (small) fine-tuning deltas instead of with the weights themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

# What a `delta(q)` loader returns for a model whose tensor equals the reference's (a LoRA
# adapter on the reference's own weights that does not touch this tensor): nothing to add.
UNCHANGED = object()
# delta(q): model q's difference from the reference as a fresh float32 tensor (the merge may
# modify it), UNCHANGED, or None when only load(q) can tell (then theta_q - theta_ref).
DeltaLoader = Callable[[int], "torch.Tensor | object | None"]


def model_delta(q: int, load: Callable[[int], torch.Tensor], ref32: torch.Tensor,
                delta: DeltaLoader | None) -> torch.Tensor | None:
    """theta_q - theta_ref in float32 (a fresh tensor), None when it is exactly 0. A LoRA
    expert on the reference's weights gives its low-rank product directly (`delta`), so the
    reference is never read again for it and no folded copy is made."""
    import torch

    d = delta(q) if delta is not None else None
    if d is UNCHANGED:
        return None
    if d is not None:
        return d
    d = load(q).to(torch.float32, copy=True)  # never modify the loader's tensor
    return d.sub_(ref32)


def weighted_merge(load: Callable[[int], torch.Tensor], weights: Sequence[float], ref: int = 0,
                   out_dtype: torch.dtype | None = None, delta: DeltaLoader | None = None) -> torch.Tensor:
    """Merge one tensor from K models, loading one model's copy at a time.

    load(q) returns model q's tensor (any float dtype); weights must sum to 1 (they are
    renormalised in float64 to make sure). Memory: the reference, the accumulator and one
    loaded copy, whatever K is. The result has `out_dtype` (default: the reference's).
    `delta` (see DeltaLoader) gives some models' differences from the reference directly.
    """
    import torch

    w = torch.tensor(list(weights), dtype=torch.float64)
    if w.ndim != 1 or len(w) == 0 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"merge weights must be finite, non-negative and not all zero, got {list(weights)}")
    w = (w / w.sum()).tolist()
    nonzero = [q for q, wq in enumerate(w) if wq != 0.0]
    if len(nonzero) == 1:  # one model takes it all (e.g. folding an adapter): its values exactly
        only = load(nonzero[0])
        return only.to(out_dtype or (only.dtype if nonzero[0] == ref else load(ref).dtype), copy=True)
    ref_t = load(ref)
    dtype = out_dtype or ref_t.dtype
    ref32 = ref_t.to(torch.float32)
    acc = torch.zeros_like(ref32)
    for q, wq in enumerate(w):
        if q == ref or wq == 0.0:
            continue
        d = model_delta(q, load, ref32, delta)
        if d is not None:
            acc.add_(d, alpha=wq)
    if not acc.any():  # every other model equals the reference: return it untouched
        return ref_t.to(dtype)
    return (ref32 + acc).to(dtype)
