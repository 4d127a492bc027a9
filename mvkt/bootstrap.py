"""Percentile bootstrap confidence intervals over records (``bootstrap_ci``) and paired
bootstraps for "is method B better than method A on the same records" (``paired_bootstrap``,
``paired_bootstrap_pooled`` for several paired seeds).

Following the PTB-XL benchmark (Strodthoff et al. 2020), a resample is only kept if every
class that is valid on the full set has at least one positive and one negative in it.
Keyword-only arguments, the conventions of ``mvkt.metrics``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from mvkt import metrics


# --------------------------------------------------------------------------- #
# Bootstrap
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap CI of a metric: point estimate on the full set, [lower, upper]."""

    point: float
    lower: float
    upper: float
    n_resamples: int
    n_rejected: int  # draws thrown away because a valid class lost all positives or negatives
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PairedBootstrapResult:
    """Bootstrap of metric(b) - metric(a) on shared resamples.

    p_value: fraction of resamples whose difference is <= 0, a one-sided
    bootstrap p-value for "b is better than a".
    """

    difference: float
    lower: float
    upper: float
    p_value: float
    n_resamples: int
    n_rejected: int
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _draw_resamples(
    *, y_true: np.ndarray, n_resamples: int, seed: int, max_draw_factor: int = 100
) -> tuple[list[np.ndarray], int]:
    """Draw record resamples (with replacement) that keep every valid class valid.

    Returns the accepted resamples as chunks of index matrices (r, N) and the number of
    rejected draws. Raises RuntimeError after ``max_draw_factor * n_resamples`` draws
    if not enough resamples could be accepted (e.g. a class with a single positive in a
    huge split), instead of looping forever.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    num_records = y_true.shape[0]
    if num_records < 2:
        raise ValueError("bootstrap needs at least two records")
    valid = metrics.valid_class_mask(y_true=y_true)
    if not valid.any():
        raise ValueError("no class has both positives and negatives: nothing to bootstrap")
    y_valid = y_true[:, valid].astype(np.int64)
    num_valid_records = y_valid.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, metrics._MAX_CHUNK_ELEMENTS // num_records))
    accepted: list[np.ndarray] = []
    num_accepted = 0
    num_drawn = 0
    num_rejected = 0
    max_draws = max_draw_factor * n_resamples
    while num_accepted < n_resamples:
        if num_drawn >= max_draws:
            raise RuntimeError(
                f"only {num_accepted} of {n_resamples} bootstrap resamples kept every valid class "
                f"with a positive and a negative after {num_drawn} draws; the split is too small "
                "or too imbalanced for a bootstrap CI"
            )
        indices = rng.integers(0, num_records, size=(chunk, num_records))
        num_drawn += chunk
        positives = y_valid[indices].sum(axis=1)  # (chunk, C_valid)
        ok = np.all((positives > 0) & (positives < num_valid_records), axis=1)
        num_rejected += int((~ok).sum())
        indices = indices[ok][: n_resamples - num_accepted]
        if len(indices):
            accepted.append(indices)
            num_accepted += len(indices)
    return accepted, num_rejected


def _resample_stats(
    *, y_true: np.ndarray, y_score: np.ndarray, metric_fn: metrics.MetricFn, index_chunks: list[np.ndarray]
) -> np.ndarray:
    """metric_fn on every resample, vectorised when a batched implementation exists."""
    batched = next((fast for fn, fast in metrics._BATCHED_METRICS if fn is metric_fn), None)
    out = []
    for indices in index_chunks:
        if batched is not None:
            num_records = y_true.shape[0]
            offsets = (np.arange(len(indices)) * num_records)[:, None]
            counts = np.bincount((indices + offsets).ravel(), minlength=len(indices) * num_records)
            out.append(batched(y_true=y_true, y_score=y_score, counts=counts.reshape(len(indices), num_records)))
        else:
            out.append(np.array([metric_fn(y_true=y_true[idx], y_score=y_score[idx]) for idx in indices]))
    stats = np.concatenate(out)
    if not np.all(np.isfinite(stats)):
        raise ValueError("metric_fn returned NaN/inf on a bootstrap resample")
    return stats


def _percentile_interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lower, upper = np.percentile(stats, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(lower), float(upper)


def _quiet(metric_fn: metrics.MetricFn, **kwargs: Any) -> float:
    # The excluded-class warning of metrics.macro_auc is emitted once by the caller's point
    # estimate; resamples share the same excluded classes, so repeating it is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(metric_fn(**kwargs))


def bootstrap_ci(
    *,
    y_true: Any,
    y_score: Any,
    metric_fn: metrics.MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> BootstrapResult:
    """Percentile bootstrap CI of ``metric_fn(y_true=..., y_score=...)`` over records.

    Resamples in which a class that is valid on the full set has no positive or no
    negative are redrawn (as in the PTB-XL benchmark), so the metric is defined on
    every resample. ``metrics.macro_auc`` is evaluated vectorised over resamples.
    ``label_names`` go to the point estimate's ``metric_fn``, so that its warning about
    excluded classes names them (not their column numbers).
    """
    y = metrics._as_labels(y_true)
    s = metrics._as_scores(y_score, like=y)
    named = {"label_names": list(label_names)} if label_names is not None else {}
    point = float(metric_fn(y_true=y, y_score=s, **named))
    chunks, rejected = _draw_resamples(y_true=y, n_resamples=n_resamples, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stats = _resample_stats(y_true=y, y_score=s, metric_fn=metric_fn, index_chunks=chunks)
    lower, upper = _percentile_interval(stats, alpha)
    return BootstrapResult(
        point=point, lower=lower, upper=upper, n_resamples=len(stats), n_rejected=rejected, alpha=alpha
    )


def paired_bootstrap_pooled(
    *,
    y_true: Any,
    scores_a: Sequence[Any],
    scores_b: Sequence[Any],
    metric_fn: metrics.MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Paired bootstrap of mean over seeds of metric(b_s) - metric(a_s).

    ``scores_a[s]`` and ``scores_b[s]`` are the (N, C) scores of seed ``s`` of the two
    methods on the same N records. Every resample uses one set of record indices for
    all seeds and both methods, so record difficulty cancels out of the difference.
    """
    y = metrics._as_labels(y_true)
    if len(scores_a) != len(scores_b) or len(scores_a) == 0:
        raise ValueError(f"need the same non-zero number of seeds, got {len(scores_a)} and {len(scores_b)}")
    a_list = [metrics._as_scores(a, like=y, name="scores_a") for a in scores_a]
    b_list = [metrics._as_scores(b, like=y, name="scores_b") for b in scores_b]
    point = float(
        np.mean([_quiet(metric_fn, y_true=y, y_score=b) - _quiet(metric_fn, y_true=y, y_score=a)
                 for a, b in zip(a_list, b_list)])
    )
    chunks, rejected = _draw_resamples(y_true=y, n_resamples=n_resamples, seed=seed)
    differences = np.zeros(sum(len(c) for c in chunks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for a, b in zip(a_list, b_list):
            differences += _resample_stats(y_true=y, y_score=b, metric_fn=metric_fn, index_chunks=chunks)
            differences -= _resample_stats(y_true=y, y_score=a, metric_fn=metric_fn, index_chunks=chunks)
    differences /= len(a_list)
    lower, upper = _percentile_interval(differences, alpha)
    return PairedBootstrapResult(
        difference=point,
        lower=lower,
        upper=upper,
        p_value=float(np.mean(differences <= 0.0)),
        n_resamples=len(differences),
        n_rejected=rejected,
        alpha=alpha,
    )


def paired_bootstrap(
    *,
    y_true: Any,
    score_a: Any,
    score_b: Any,
    metric_fn: metrics.MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Paired bootstrap of metric(b) - metric(a) for two runs scored on the same records."""
    return paired_bootstrap_pooled(
        y_true=y_true, scores_a=[score_a], scores_b=[score_b], metric_fn=metric_fn,
        n_resamples=n_resamples, alpha=alpha, seed=seed,
    )


def bootstrap_contrast(
    *,
    y_true: Any,
    terms: Sequence[tuple[float, Any]],
    metric_fn: metrics.MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Bootstrap of ``sum_i w_i * metric(scores_i)`` for ``terms`` [(w_i, scores_i)] of models
    scored on the same records, on shared resamples: e.g. a difference of differences
    ``[m(B, noisy) - m(B, clean)] - [m(A, noisy) - m(A, clean)]`` (does B lose less than A?).
    ``p_value``: share of resamples with a contrast <= 0."""
    y = metrics._as_labels(y_true)
    if not terms:
        raise ValueError("a contrast needs at least one (weight, scores) term")
    weighted = [(float(w), metrics._as_scores(s, like=y, name=f"scores of term {i}")) for i, (w, s) in enumerate(terms)]
    point = float(sum(w * _quiet(metric_fn, y_true=y, y_score=s) for w, s in weighted))
    chunks, rejected = _draw_resamples(y_true=y, n_resamples=n_resamples, seed=seed)
    contrast = np.zeros(sum(len(c) for c in chunks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for w, s in weighted:
            contrast += w * _resample_stats(y_true=y, y_score=s, metric_fn=metric_fn, index_chunks=chunks)
    lower, upper = _percentile_interval(contrast, alpha)
    return PairedBootstrapResult(difference=point, lower=lower, upper=upper,
                                 p_value=float(np.mean(contrast <= 0.0)), n_resamples=len(contrast),
                                 n_rejected=rejected, alpha=alpha)
