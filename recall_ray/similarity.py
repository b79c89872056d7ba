"""Per-layer similarity of each model's representations to the new model's, and the
softmax that turns them into merge weights. Pure numpy; no Ray, no torch.

Paper (RECALL, eq. for S_i^q): S_i^q = mean_d exp(-||r_i^N(d) - r_i^q(d)||^2 / (2 sigma^2)),
w_i^q = softmax_q(S_i^q). The alternatives below are the options of DESIGN.md; each
returns S^N = 1 for the new model against itself, so weights stay comparable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("recall_ray.similarity")

SATURATED_LOW = 1e-6
SATURATED_HIGH = 0.999


def normalize(x: np.ndarray, mode: str, ref: np.ndarray | None = None) -> np.ndarray:
    """Rows of x ([n, H]) normalised.

    `standardize` uses the new model's per-feature mean and std (`ref`) for every model, so
    all models are measured in one frame and paired distances keep their meaning.
    """
    x = np.asarray(x, dtype=np.float64)
    if mode == "none":
        return x
    if mode == "l2":
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if mode == "standardize":
        r = np.asarray(x if ref is None else ref, dtype=np.float64)
        return (x - r.mean(axis=0)) / np.maximum(r.std(axis=0), 1e-12)
    raise ValueError(f"unknown normalize mode {mode!r}: use none, l2 or standardize")


def _sq_dists(a: np.ndarray, b: np.ndarray, pairing: str) -> np.ndarray:
    """Squared Euclidean distances: paired [n] or all pairs [n, m]."""
    if pairing == "paired":
        return ((a - b) ** 2).sum(axis=1)
    d = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _rbf_mean(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    return float(np.exp(-_sq_dists(a, b, "all_pairs") / (2 * sigma**2)).mean())


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between two [n, H] representation matrices."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = np.linalg.norm(b.T @ a, "fro") ** 2
    den = np.linalg.norm(a.T @ a, "fro") * np.linalg.norm(b.T @ b, "fro")
    return float(num / den) if den > 0 else 1.0


def median_sigma(new: np.ndarray, others: list[np.ndarray]) -> float:
    """The median heuristic: sigma = median paired distance between the new model and the
    others (1.0 when every distance is 0, e.g. embeddings a LoRA left untouched)."""
    d = np.concatenate([np.sqrt(_sq_dists(new, o, "paired")) for o in others]) if others else np.zeros(0)
    med = float(np.median(d)) if d.size else 0.0
    return med if med > 0 else 1.0


@dataclass(frozen=True)
class LayerSimilarity:
    sq_dist: np.ndarray  # [K] mean squared paired distance to the new model (after normalisation)
    similarity: np.ndarray  # [K]
    sigma: float


def layer_similarity(reps: list[np.ndarray], new_index: int, kernel: str = "rbf", sigma: float | str = 1.0,
                     normalize_mode: str = "none", pairing: str = "paired") -> LayerSimilarity:
    """Similarity of each model q (reps[q]: [n, H], same samples in the same order) to the
    new model reps[new_index], for one layer."""
    new_raw = np.asarray(reps[new_index], dtype=np.float64)
    xs = [normalize(r, normalize_mode, ref=new_raw) for r in reps]
    new = xs[new_index]
    others = [x for q, x in enumerate(xs) if q != new_index]
    s = median_sigma(new, others) if sigma == "median" else float(sigma)
    sq = np.array([_sq_dists(new, x, "paired").mean() for x in xs])
    sims = []
    for q, x in enumerate(xs):
        if kernel == "rbf":
            if pairing == "paired":
                v = float(np.exp(-_sq_dists(new, x, "paired") / (2 * s**2)).mean())
            else:  # all pairs, normalised by the new model's self term so S^N = 1
                v = _rbf_mean(new, x, s) / _rbf_mean(new, new, s)
        elif kernel == "cosine":
            an = normalize(new, "l2")
            bn = normalize(x, "l2")
            v = float((an * bn).sum(1).mean()) if pairing == "paired" else float((an @ bn.T).mean() / (an @ an.T).mean())
        elif kernel == "linear_cka":
            v = linear_cka(new, x)
        elif kernel == "mmd":
            # MMD^2 with an RBF kernel lies in [0, 2]; 1 - MMD^2 / 2 is 1 for identical sets.
            mmd2 = _rbf_mean(new, new, s) + _rbf_mean(x, x, s) - 2 * _rbf_mean(new, x, s)
            v = 1.0 - max(mmd2, 0.0) / 2.0
        elif kernel == "euclidean":
            v = 1.0 / (1.0 + float(np.sqrt(_sq_dists(new, x, "paired")).mean()))
        else:
            raise ValueError(f"unknown kernel {kernel!r}: use rbf, cosine, linear_cka, mmd or euclidean")
        sims.append(v)
    sim = np.array(sims, dtype=np.float64)
    sim[new_index] = 1.0  # by construction; avoids 0.9999999 from rounding
    return LayerSimilarity(sq, sim, s)


def softmax_weights(similarity: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """w_i^q = softmax over models q of S_i^q / T; rows ([layers, K]) sum to 1."""
    z = np.asarray(similarity, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def saturated_layers(similarity: np.ndarray, new_index: int) -> list[int]:
    """Layers whose similarities (new model excluded) are all < 1e-6 or all > 0.999: the
    kernel no longer tells models apart there and the weights are a constant."""
    others = np.delete(np.asarray(similarity), new_index, axis=1)
    low = (others < SATURATED_LOW).all(axis=1)
    high = (others > SATURATED_HIGH).all(axis=1)
    return [int(i) for i in np.flatnonzero(low | high)]
