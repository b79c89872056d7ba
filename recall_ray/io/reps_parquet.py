"""The Parquet layout of per-layer representations: one row per sample (`sample_idx`,
`sample_id`), one `fixed_size_list<float32>[hidden]` column per layer (`layer_0` is the
embedding output, `layer_i` block i's output), readable by any Parquet reader. A reader
of one layer reads one column."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from .storage import filesystem


def layer_column(i: int) -> str:
    return f"layer_{i}"


def reps_table(sample_idx: np.ndarray, sample_id: Sequence[str], reps: np.ndarray) -> pa.Table:
    """Arrow table of [n, L+1, H] representations with fixed-size float32 list columns."""
    n, layers, hidden = reps.shape
    cols = {"sample_idx": pa.array(np.asarray(sample_idx, dtype=np.int64)),
            "sample_id": pa.array(list(sample_id), pa.string())}
    for i in range(layers):
        flat = pa.array(np.ascontiguousarray(reps[:, i, :]).reshape(-1), pa.float32())
        cols[layer_column(i)] = pa.FixedSizeListArray.from_arrays(flat, hidden)
    return pa.table(cols)


def read_layer(path: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample_idx [n], reps [n, H]) of one layer, sorted by sample_idx. Reads one column."""
    fs, p = filesystem(path)
    table = pads.dataset(p, format="parquet", filesystem=fs).to_table(columns=["sample_idx", layer_column(layer)])
    table = table.sort_by("sample_idx")
    col = table.column(layer_column(layer)).combine_chunks()
    hidden = col.type.list_size
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, hidden)
    return table.column("sample_idx").to_numpy(), x


def iter_layers(models: Sequence[str], keep: Sequence[int], num_layers: int) -> Iterator[list[np.ndarray]]:
    """For each layer in order, every model's representations of the samples `keep` (in
    that order), each model's layer read from its Parquet directory `models[q]` one column
    at a time: one layer of every model is in memory at once."""
    for layer in range(num_layers):
        row = []
        for path in models:
            idx, x = read_layer(path, layer)
            pos = {int(s): j for j, s in enumerate(idx)}
            row.append(x[[pos[int(s)] for s in keep]])  # same samples, same order for every model
        yield row
