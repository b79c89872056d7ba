"""Per-layer similarity of each model's representations to the new model's, and the
softmax that turns them into merge weights. Pure numpy; no Ray, no torch.

RECALL (arXiv 2510.20479): for layer i and model q,

    S_i^q = mean_d exp(-||r_i^N(d) - r_i^q(d)||^2 / (2 sigma^2)),   w_i^q = softmax_q(S_i^q / T)

`layer_weights` is that computation for every layer at once, from each model's
representations of the same typical samples. The kernel is one entry of `KERNELS` (the
paper's Appendix F alternatives beside the RBF, and two built for per-layer contrast), the
row normalisation one of `NORMALIZERS`; each kernel gives the new model its own fixed value
against itself (1, or 0 for relative_distance). Adding a kernel is one function registered
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

SATURATED_LOW = 1e-6
SATURATED_HIGH = 0.999


# ------------------------------------------------------------------------ normalisation

def _none(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return x


def _l2(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _standardize(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    # The new model's per-feature mean and std for every model: all models are measured in
    # one frame, so paired distances keep their meaning.
    return (x - ref.mean(axis=0)) / np.maximum(ref.std(axis=0), 1e-12)


NORMALIZERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "none": _none, "l2": _l2, "standardize": _standardize,
}


def normalize(x: np.ndarray, mode: str, ref: np.ndarray | None = None) -> np.ndarray:
    """Rows of x ([n, H]) normalised by `mode` (a key of NORMALIZERS), in float64; `ref` is
    the new model's raw representations (the frame of `standardize`; x itself if None)."""
    if mode not in NORMALIZERS:
        raise ValueError(f"unknown normalize mode {mode!r}: use {', '.join(NORMALIZERS)}")
    x = np.asarray(x, dtype=np.float64)
    return NORMALIZERS[mode](x, x if ref is None else np.asarray(ref, dtype=np.float64))


# ----------------------------------------------------------------------------- kernels

def sq_dists(a: np.ndarray, b: np.ndarray, pairing: str) -> np.ndarray:
    """Squared Euclidean distances: paired [n] or all pairs [n, m]."""
    if pairing == "paired":
        return ((a - b) ** 2).sum(axis=1)
    d = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _rbf_mean(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    return float(np.exp(-sq_dists(a, b, "all_pairs") / (2 * sigma**2)).mean())


def rbf(new: np.ndarray, x: np.ndarray, sigma: float, pairing: str) -> float:
    """The paper's kernel. all_pairs is normalised by the new model's self term so S^N = 1."""
    if pairing == "paired":
        return float(np.exp(-sq_dists(new, x, "paired") / (2 * sigma**2)).mean())
    return _rbf_mean(new, x, sigma) / _rbf_mean(new, new, sigma)


def cosine(new: np.ndarray, x: np.ndarray, sigma: float, pairing: str) -> float:
    an, bn = _l2(new, new), _l2(x, x)
    if pairing == "paired":
        return float((an * bn).sum(1).mean())
    return float((an @ bn.T).mean() / (an @ an.T).mean())


def linear_cka(a: np.ndarray, b: np.ndarray, sigma: float = 1.0, pairing: str = "paired") -> float:
    """Linear CKA (Kornblith et al. 2019) between two [n, H] representation matrices."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = np.linalg.norm(b.T @ a, "fro") ** 2
    den = np.linalg.norm(a.T @ a, "fro") * np.linalg.norm(b.T @ b, "fro")
    return float(num / den) if den > 0 else 1.0


def mmd(new: np.ndarray, x: np.ndarray, sigma: float, pairing: str) -> float:
    """1 - MMD^2 / 2 with an RBF kernel: MMD^2 lies in [0, 2], so identical sets give 1."""
    mmd2 = _rbf_mean(new, new, sigma) + _rbf_mean(x, x, sigma) - 2 * _rbf_mean(new, x, sigma)
    return 1.0 - max(mmd2, 0.0) / 2.0


def euclidean(new: np.ndarray, x: np.ndarray, sigma: float, pairing: str) -> float:
    return 1.0 / (1.0 + float(np.sqrt(sq_dists(new, x, "paired")).mean()))


@dataclass(frozen=True)
class LayerInputs:
    """What a kernel sees of one layer: every model's representations of the same samples
    (normalised), the base's (for kernels that measure moves away from it), the RBF width,
    the pairing, and each model's mean paired distance to the new model."""

    models: Sequence[np.ndarray]
    new_index: int
    base: np.ndarray | None
    sigma: float
    pairing: str
    distance: np.ndarray  # [K] mean paired Euclidean distance to the new model

    @property
    def new(self) -> np.ndarray:
        return self.models[self.new_index]


def shift(inp: LayerInputs, q: int) -> float:
    """How model q moved from the base, against how the new model moved: the mean over
    samples of cos(r^q - r^0, r^N - r^0), in [-1, 1] (0 where either did not move, e.g. the
    base itself). Large representation norms cancel in the cosine, and what every model
    shares (the base's representation) is taken out, so layers differ by direction."""
    if inp.base is None:
        raise ValueError("the shift kernel needs the base's representations (a base in the merge)")
    a, b = inp.models[q] - inp.base, inp.new - inp.base
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide((a * b).sum(axis=1), den, out=np.zeros(len(a)), where=den > 0)
    return float(cos.mean())


def relative_distance(inp: LayerInputs, q: int) -> float:
    """Minus model q's mean paired distance to the new model, in units of the layer's
    median distance over the other models: 0 for the new model, -1 for a model at the median
    distance. The layer's own scale is divided out, so no layer saturates whatever its
    norms; the softmax temperature sets how sharply distance turns into weight."""
    others = np.delete(inp.distance, inp.new_index)
    scale = float(np.median(others)) if others.size else 0.0
    return -float(inp.distance[q]) / (scale if scale > 0 else 1.0)


@dataclass(frozen=True)
class Kernel:
    """A similarity of model q to the new model in one layer.

    fn: (LayerInputs, q) -> S^q.  self_value: the new model's own value (set exactly).
    bounded: S lies in [0, 1], so a layer whose other models are all near 0 or 1 is
    saturated (the weights are a constant there); unbounded kernels never saturate."""

    fn: Callable[[LayerInputs, int], float]
    self_value: float = 1.0
    bounded: bool = True


def _pairwise(f: Callable[[np.ndarray, np.ndarray, float, str], float]) -> Callable[[LayerInputs, int], float]:
    return lambda inp, q: f(inp.new, inp.models[q], inp.sigma, inp.pairing)


# name -> Kernel. The paper's RBF, its Appendix F alternatives, and two kernels built to
# give per-layer contrast where the RBF saturates (shift, relative_distance).
KERNELS: dict[str, Kernel] = {
    "rbf": Kernel(_pairwise(rbf)),
    "cosine": Kernel(_pairwise(cosine)),
    "linear_cka": Kernel(_pairwise(linear_cka)),
    "mmd": Kernel(_pairwise(mmd)),
    "euclidean": Kernel(_pairwise(euclidean)),
    "shift": Kernel(shift, self_value=1.0, bounded=False),
    "relative_distance": Kernel(relative_distance, self_value=0.0, bounded=False),
}
PAIRINGS = ("paired", "all_pairs")


def median_sigma(new: np.ndarray, others: list[np.ndarray]) -> float:
    """The median heuristic: sigma = median paired distance between the new model and the
    others (1.0 when every distance is 0, e.g. embeddings a LoRA left untouched)."""
    d = np.concatenate([np.sqrt(sq_dists(new, o, "paired")) for o in others]) if others else np.zeros(0)
    med = float(np.median(d)) if d.size else 0.0
    return med if med > 0 else 1.0


# --------------------------------------------------------------------------- one layer

@dataclass(frozen=True)
class LayerSimilarity:
    sq_dist: np.ndarray  # [K] mean squared paired distance to the new model (after normalisation)
    similarity: np.ndarray  # [K]
    sigma: float


def layer_similarity(reps: Sequence[np.ndarray], new_index: int, kernel: str = "rbf", sigma: float | str = 1.0,
                     normalize_mode: str = "none", pairing: str = "paired",
                     base: np.ndarray | None = None) -> LayerSimilarity:
    """Similarity of each model q (reps[q]: [n, H], same samples in the same order) to the
    new model reps[new_index], for one layer; `base`: the base's representations of the same
    samples (the shift kernel), normalised like the others."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: use {', '.join(KERNELS)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}: use {' or '.join(PAIRINGS)}")
    new_raw = np.asarray(reps[new_index], dtype=np.float64)
    xs = [normalize(r, normalize_mode, ref=new_raw) for r in reps]
    new = xs[new_index]
    others = [x for q, x in enumerate(xs) if q != new_index]
    s = median_sigma(new, others) if sigma == "median" else float(sigma)
    sq = np.array([sq_dists(new, x, "paired").mean() for x in xs])
    dist = np.array([np.sqrt(sq_dists(new, x, "paired")).mean() for x in xs])
    base_x = normalize(base, normalize_mode, ref=new_raw) if base is not None else None
    k = KERNELS[kernel]
    inp = LayerInputs(xs, new_index, base_x, s, pairing, dist)
    sim = np.array([k.fn(inp, q) for q in range(len(xs))], dtype=np.float64)
    sim[new_index] = k.self_value  # by construction; avoids 0.9999999 from rounding
    return LayerSimilarity(sq, sim, s)


def softmax_weights(similarity: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """w_i^q = softmax over models q of S_i^q / T; rows ([layers, K]) sum to 1."""
    z = np.asarray(similarity, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def saturated_layers(similarity: np.ndarray, new_index: int, kernel: str = "rbf") -> list[int]:
    """Layers whose similarities (new model excluded) are all < 1e-6 or all > 0.999: the
    kernel no longer tells models apart there and the weights are a constant. Only bounded
    kernels (similarity in [0, 1]) saturate."""
    if not KERNELS[kernel].bounded:
        return []
    others = np.delete(np.asarray(similarity), new_index, axis=1)
    low = (others < SATURATED_LOW).all(axis=1)
    high = (others > SATURATED_HIGH).all(axis=1)
    return [int(i) for i in np.flatnonzero(low | high)]


# -------------------------------------------------------------------------- all layers

@dataclass(frozen=True)
class LayerWeights:
    """RECALL's per-layer result for K models over G = L + 1 layers (0 = embeddings)."""

    sq_distance: np.ndarray  # [G, K]
    similarity: np.ndarray  # [G, K]
    weight: np.ndarray  # [G, K], rows sum to 1
    sigma: np.ndarray  # [G]
    new_rep_norm: np.ndarray  # [G] mean norm of the new model's raw representations
    saturated: tuple[int, ...]  # layers where the weights are a constant (see saturated_layers)

    def rows(self, labels: Sequence[str]) -> list[dict]:
        """One record per (layer, model), in layer then model order: the weights table."""
        sat = set(self.saturated)
        return [{"layer": i, "model": lbl, "sq_distance": float(self.sq_distance[i, q]),
                 "similarity": float(self.similarity[i, q]), "weight": float(self.weight[i, q]),
                 "sigma": float(self.sigma[i]), "new_rep_norm": float(self.new_rep_norm[i]), "saturated": i in sat}
                for i in range(self.weight.shape[0]) for q, lbl in enumerate(labels)]


def layer_weights(reps_per_layer: Iterable[Sequence[np.ndarray]], new_index: int, kernel: str = "rbf",
                  sigma: float | str = 1.0, normalize_mode: str = "none", pairing: str = "paired",
                  temperature: float = 1.0, base_per_layer: Iterable[np.ndarray] | None = None) -> LayerWeights:
    """RECALL's merge weights. reps_per_layer yields, for each layer i in order, the list
    of every model's [n, H] representations of the same n typical samples in the same order
    (model q at index q); it may be a generator, so that one layer at a time is in memory.
    base_per_layer yields the base's, for kernels that need it (shift). Returns the
    per-layer squared distances, similarities, softmax weights and saturated layers."""
    sims, norms = [], []
    bases = iter(base_per_layer) if base_per_layer is not None else None
    for reps in reps_per_layer:
        base = next(bases) if bases is not None else None
        sims.append(layer_similarity(reps, new_index, kernel, sigma, normalize_mode, pairing, base))
        norms.append(float(np.linalg.norm(np.asarray(reps[new_index], dtype=np.float64), axis=1).mean()))
    if not sims:
        raise ValueError("no layers: reps_per_layer must yield one list of per-model arrays per layer")
    similarity = np.stack([s.similarity for s in sims])
    return LayerWeights(
        sq_distance=np.stack([s.sq_dist for s in sims]),
        similarity=similarity,
        weight=softmax_weights(similarity, temperature),
        sigma=np.array([s.sigma for s in sims]),
        new_rep_norm=np.array(norms),
        saturated=tuple(saturated_layers(similarity, new_index, kernel)),
    )
