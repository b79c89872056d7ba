"""Per-layer sample representations: the mean of the hidden states over a sample's real
tokens (DESIGN step 1: attention mask applied, padding excluded, float32)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def mean_pool(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor,
              exclude_first_token: bool = False) -> np.ndarray:
    """[B, L+1, H] float32: for each layer, the mean of the hidden states over each sample's
    real tokens (mask 1). With `exclude_first_token`, each sample's first real token is left
    out (its massive activations dominate short samples) unless it is the only token."""
    mask = attention_mask.to(torch.float32).clone()
    if exclude_first_token:
        first = mask.argmax(dim=1)  # position of the first real token (left or right padding)
        drop = mask.sum(dim=1) > 1
        mask[torch.arange(mask.shape[0])[drop], first[drop]] = 0.0
    denom = mask.sum(dim=1, keepdim=True)  # [B, 1]
    pooled = [(h.to(torch.float32) * mask[:, :, None]).sum(dim=1) / denom for h in hidden_states]
    return torch.stack(pooled, dim=1).numpy()
