"""The rule that chooses each long expert's training budget (configs/adapters/forgetting.yaml),
pure: a rung of the budget ladder (1, 2, 3 epochs) is accepted when, against the base and
paired on the same validation samples, the expert is better on its own task and worse on the
general-ability probe, each by a one-sided exact sign test; each expert takes the smallest
accepted rung, or the largest rung when none is accepted (and says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05


def one_sided_sign_test(wins: int, losses: int) -> float:
    """P(at least `wins` of the wins + losses discordant pairs go one way | no difference):
    the exact binomial tail at p = 1/2 (ties are left out, as the sign test does)."""
    wins, losses = int(wins), int(losses)
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


@dataclass(frozen=True)
class Rung:
    """One rung of one expert, paired with the base on validation. `own_better` / `own_worse`:
    samples where the expert is right and the base wrong, and the reverse (IWSLT: the
    reference log-likelihood per token higher / lower). `general_worse` / `general_better`:
    the same on the general-ability probe, counted from the side of forgetting."""

    steps: int
    own_better: int
    own_worse: int
    general_worse: int
    general_better: int

    @property
    def p_learns(self) -> float:
        return one_sided_sign_test(self.own_better, self.own_worse)

    @property
    def p_forgets(self) -> float:
        return one_sided_sign_test(self.general_worse, self.general_better)

    def accepted(self, alpha: float = ALPHA) -> bool:
        return self.p_learns < alpha and self.p_forgets < alpha


def choose_rung(rungs: list[Rung], alpha: float = ALPHA) -> tuple[Rung, bool]:
    """(the chosen rung, whether it met the rule): the smallest accepted rung by steps, else
    the largest rung with False."""
    if not rungs:
        raise ValueError("no rungs to choose from: train the ladder first")
    ordered = sorted(rungs, key=lambda r: r.steps)
    for rung in ordered:
        if rung.accepted(alpha):
            return rung, True
    return ordered[-1], False


def paired_counts_of(expert, base) -> tuple[int, int]:
    """(samples where the expert is ahead, samples where the base is): hits (bool) or any
    per-sample score where higher is better (IWSLT's reference log-likelihood), paired by
    position; equal values are ties and count for neither."""
    import numpy as np

    a, b = np.asarray(expert), np.asarray(base)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired per-sample values must be two vectors of one length, got {a.shape} and {b.shape}")
    if a.dtype == bool:
        a, b = a.astype(np.int8), b.astype(np.int8)
    return int((a > b).sum()), int((a < b).sum())
