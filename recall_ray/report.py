"""What the user reads: the weight table (Parquet + CSV), PNG plots, the model card, and a
plain-text per-layer summary for the job's log."""

from __future__ import annotations

import io

import pandas as pd


def weight_table_text(table: pd.DataFrame, max_rows: int = 200) -> str:
    """Layers as rows, one weight column per model (then the saturation flag)."""
    pivot = table.pivot(index="layer", columns="model", values="weight")
    pivot = pivot[list(dict.fromkeys(table["model"]))]  # models in merge order
    pivot["saturated"] = table.groupby("layer")["saturated"].first()
    return pivot.head(max_rows).to_string(float_format=lambda v: f"{v:.4f}")


def weight_log_lines(table: pd.DataFrame) -> list[str]:
    """One line per layer: every model's squared distance, similarity and weight (merge order)."""
    lines = []
    for layer, sub in table.groupby("layer", sort=True):
        lines.append(f"layer {int(layer):2d}: sq_dist {' '.join(f'{v:.3g}' for v in sub['sq_distance'])}"
                     f" | sim {' '.join(f'{v:.3g}' for v in sub['similarity'])}"
                     f" | w {' '.join(f'{v:.3f}' for v in sub['weight'])}"
                     + ("  SATURATED" if bool(sub["saturated"].iloc[0]) else ""))
    return lines


def markdown_table(df: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub-flavoured Markdown table (floats rounded to `digits`), without tabulate."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def plot_png(table: pd.DataFrame, value: str, ylabel: str, log_scale: bool = False) -> bytes:
    """One line per model over layers, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for model in dict.fromkeys(table["model"]):
        sub = table[table["model"] == model].sort_values("layer")
        ax.plot(sub["layer"], sub[value], marker="o", markersize=3, label=model)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def model_card(inputs: list[dict], table: pd.DataFrame, settings: dict, typical_count: int) -> str:
    rows = "\n".join(f"| {m['label']} | {m['kind']} | `{m['path']}` |" for m in inputs)
    return f"""---
library_name: transformers
tags: [merge, recall, recall-ray]
---
# Merged with RECALL (recall-ray)

Layer-wise, representation-aligned merge (RECALL, arXiv 2510.20479): each layer's weights
are a softmax over the models' representation similarity to the new model, measured on
{typical_count} typical samples of the new task.

## Inputs

| model | kind | path |
|---|---|---|
{rows}

## Settings

```
{settings}
```

## Per-layer weights

```
{weight_table_text(table)}
```
"""
