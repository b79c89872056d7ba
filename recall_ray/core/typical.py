"""Typical samples: per layer, KMeans on the new model's representations, and for each
centre the distinct sample nearest to it; the union over layers is D_type. Pure numpy +
scikit-learn."""

from __future__ import annotations

import numpy as np


class TooFewSamplesError(ValueError):
    pass


def typical_indices(x: np.ndarray, k: int = 20, seed: int = 0, n_init: int = 4) -> list[int]:
    """Indices (rows of x, [n, H]) of the k samples nearest the k KMeans centres.

    k-means++ with a fixed seed on float64 data, so the same data in the same order gives
    the same answer. Each centre takes the nearest sample no earlier centre has taken, so
    the k indices are distinct.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < k:
        raise TooFewSamplesError(
            f"only {n} samples for k={k} clusters: give the task more records (task.max_samples) or lower typical.k"
        )
    from sklearn.cluster import KMeans  # here: importing it costs seconds, which the job's checks must not pay

    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(x)
    d = ((x[None, :, :] - km.cluster_centers_[:, None, :]) ** 2).sum(-1)  # [k, n]
    chosen: list[int] = []
    taken = np.zeros(n, dtype=bool)
    for c in range(k):
        order = np.argsort(d[c], kind="stable")
        idx = next(int(i) for i in order if not taken[i])
        taken[idx] = True
        chosen.append(idx)
    return chosen


def union_in_order(per_layer: list[list[int]]) -> tuple[list[int], dict[int, list[int]]]:
    """D_type: first occurrence order over (layer, centre); plus which layers chose each sample."""
    order: list[int] = []
    chosen_by: dict[int, list[int]] = {}
    for layer, idxs in enumerate(per_layer):
        for i in idxs:
            if i not in chosen_by:
                order.append(i)
                chosen_by[i] = []
            if layer not in chosen_by[i]:
                chosen_by[i].append(layer)
    return order, chosen_by
