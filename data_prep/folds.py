"""Stratified fold assignment for multi-label datasets without official folds (CPSC 2018, CinC).

Owns `iterative_stratification`: Sechidis, Tsoumakas & Vlahavas (2011), "On the
stratification of multi-label data" (the scheme PTB-XL's own `strat_fold` builds on),
with a seeded random generator so that the same records always get the same folds.
"""

from __future__ import annotations

import numpy as np


def iterative_stratification(labels: np.ndarray, num_folds: int = 10, seed: int = 0) -> np.ndarray:
    """Assign each row of a (N, C) multi-hot matrix to a fold in 1..num_folds.

    Labels are handled rarest first, so that rare classes are spread over the folds
    before common ones fill them; each record goes to the fold that still wants most
    of that label (ties: the fold that wants most records overall, then random).
    Records without any label fill the folds with most room left.
    """
    labels = np.asarray(labels).astype(bool)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, C), got shape {labels.shape}")
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    n, _ = labels.shape
    rng = np.random.default_rng(seed)
    want_total = np.full(num_folds, n / num_folds)
    want_label = np.outer(labels.sum(axis=0), np.full(num_folds, 1.0 / num_folds))
    folds = np.zeros(n, dtype=np.int16)
    remaining = np.ones(n, dtype=bool)
    # A fixed random visiting order within each label keeps the result seed-determined
    # without depending on the input order of equally-labelled records.
    order = rng.permutation(n)

    def pick(candidates: np.ndarray) -> int:
        best = np.flatnonzero(np.isclose(candidates, candidates.max()))
        if len(best) > 1:
            totals = want_total[best]
            best = best[np.isclose(totals, totals.max())]
        return int(best[0] if len(best) == 1 else rng.choice(best))

    while True:
        counts = labels[remaining].sum(axis=0)
        if not counts.any():
            break
        label = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
        members = order[labels[order, label] & remaining[order]]
        for i in members:
            fold = pick(want_label[label])
            folds[i] = fold + 1
            remaining[i] = False
            want_total[fold] -= 1
            want_label[labels[i], fold] -= 1
    for i in order[remaining[order]]:
        fold = pick(want_total)
        folds[i] = fold + 1
        want_total[fold] -= 1
    return folds
