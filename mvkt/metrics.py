"""Evaluation metrics for multi-label ECG classification (host side, pure NumPy).

This module owns every number that ends up in a results table:

* ROC-AUC per class and macro-averaged (`per_class_auc`, `macro_auc`), computed
  from rank statistics (Mann-Whitney U with average ranks for ties), numerically
  identical to ``sklearn.metrics.roc_auc_score(average="macro")``. Classes that
  have no positive (or no negative) record in the split have no AUC: they are
  listed in ``excluded_classes`` and left out of the macro average, never
  silently.
* Percentile bootstrap confidence intervals over records (`bootstrap_ci`) and
  paired bootstraps for "is method B better than method A on the same records"
  (`paired_bootstrap`, `paired_bootstrap_pooled` for several paired seeds).
  Following the PTB-XL benchmark (Strodthoff et al. 2020), a resample is only
  kept if every class that is valid on the full set has at least one positive
  and one negative in it.
* Thresholded metrics whose thresholds are chosen on the VALIDATION split only:
  `choose_thresholds` (per-class F1-optimal), `fmax_threshold` (one global
  threshold, CAFA-style Fmax); `f1_scores`, `fmax_at` and `challenge_scores`
  (ICBEB 2018 / PhysioNet 2020 F-beta and G-beta) then apply them to test.
  `evaluate_scores` takes the val and test splits as separate arguments so the
  test labels cannot leak into any threshold.
* Sliding-window inference helpers: `window_starts` and `aggregate_windows`.

Conventions: every public function takes keyword-only arguments; ``y_true`` is a
multi-hot ``(N, C)`` array (any integer / bool dtype), scores are ``(N, C)``
floats where larger means "more likely positive"; a thresholded prediction is
positive iff ``score >= threshold``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Global-threshold grid for Fmax, as in the CAFA / DeepGOPlus evaluation code
# (cut = c / 100 for c in 0..100). Scores are expected to be probabilities.
DEFAULT_FMAX_GRID = np.arange(101) / 100.0

# Resampling is done in chunks so the (R, N) index / count matrices stay small
# even for large test sets.
_MAX_CHUNK_ELEMENTS = 4_000_000

MetricFn = Callable[..., float]


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
def _as_labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 2:
        raise ValueError(f"y_true must be (N, C) multi-hot, got shape {y.shape}")
    if y.size and not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must contain only 0/1 values")
    return y.astype(bool)


def _as_scores(y_score: Any, *, like: np.ndarray, name: str = "y_score") -> np.ndarray:
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != like.shape:
        raise ValueError(f"{name} shape {s.shape} does not match y_true shape {like.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _class_names(label_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if label_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(n) for n in label_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} label_names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"label_names must be unique, got {names}")
    return names


def valid_class_mask(*, y_true: Any) -> np.ndarray:
    """(C,) bool: classes with at least one positive AND one negative record."""
    y = _as_labels(y_true)
    positives = y.sum(axis=0)
    return (positives > 0) & (positives < y.shape[0])


# --------------------------------------------------------------------------- #
# ROC-AUC
# --------------------------------------------------------------------------- #
def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (the U-statistic tie rule)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    group_ends = np.r_[group_starts[1:], values.size]  # exclusive
    group_rank = 0.5 * (group_starts + 1 + group_ends)  # mean of ranks start+1 .. end
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(group_rank, group_ends - group_starts)
    return ranks


def _binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC of one class; ties between a positive and a negative count 1/2."""
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    rank_sum_pos = float(_average_ranks(scores)[labels].sum())
    return (rank_sum_pos - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


@dataclasses.dataclass(frozen=True)
class AUCResult:
    """ROC-AUC of one split.

    macro_auc: mean AUC over the valid classes (NaN if there is none).
    per_class_auc: {class name: AUC, or None for an excluded class}.
    excluded_classes: names of classes without positives or without negatives.
    """

    macro_auc: float
    per_class_auc: dict[str, float | None]
    excluded_classes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def per_class_auc(*, y_true: Any, y_score: Any, label_names: Sequence[str] | None = None) -> AUCResult:
    """Per-class ROC-AUC plus the macro average over the classes where it is defined.

    On the valid classes this equals ``roc_auc_score(y_true[:, valid], y_score[:, valid],
    average="macro")``. Classes without a positive or without a negative are reported in
    ``excluded_classes`` (their per-class AUC is None) instead of raising or being dropped
    without a trace.
    """
    y = _as_labels(y_true)
    s = _as_scores(y_score, like=y)
    names = _class_names(label_names, y.shape[1])
    valid = valid_class_mask(y_true=y)
    aucs: dict[str, float | None] = {}
    for c, name in enumerate(names):
        aucs[name] = _binary_auc(y[:, c], s[:, c]) if valid[c] else None
    defined = [a for a in aucs.values() if a is not None]
    macro = float(np.mean(defined)) if defined else float("nan")
    excluded = [name for c, name in enumerate(names) if not valid[c]]
    return AUCResult(macro_auc=macro, per_class_auc=aucs, excluded_classes=excluded)


def macro_auc(*, y_true: Any, y_score: Any, label_names: Sequence[str] | None = None) -> float:
    """Macro ROC-AUC over valid classes as a float (usable as a bootstrap ``metric_fn``).

    Warns (``UserWarning``) when classes are excluded and raises if no class is valid;
    use `per_class_auc` to get the excluded names programmatically.
    """
    result = per_class_auc(y_true=y_true, y_score=y_score, label_names=label_names)
    if not math.isfinite(result.macro_auc):
        raise ValueError("no class has both positives and negatives: macro AUC is undefined")
    if result.excluded_classes:
        warnings.warn(
            f"macro AUC excludes classes without positives or negatives: {result.excluded_classes}",
            stacklevel=2,
        )
    return result.macro_auc


def _batched_macro_auc(*, y_true: np.ndarray, y_score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Macro AUC of R bootstrap resamples at once.

    A resample is represented by how many times each record was drawn (``counts``,
    shape (R, N)). Because the resample only contains values of the full set, the
    Mann-Whitney statistic needs no per-resample sort: sort each class once, sum the
    drawn positive / negative multiplicities per group of tied scores, and count for
    every positive the negatives strictly below plus half of the tied ones.
    """
    y = y_true
    valid = valid_class_mask(y_true=y)
    counts = counts.astype(np.float64)
    total = np.zeros(counts.shape[0])
    for c in np.flatnonzero(valid):
        order = np.argsort(y_score[:, c], kind="stable")
        sorted_scores = y_score[order, c]
        group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        is_pos = y[order, c]
        w = counts[:, order]
        pos_w = np.add.reduceat(np.where(is_pos, w, 0.0), group_starts, axis=1)
        neg_w = np.add.reduceat(np.where(is_pos, 0.0, w), group_starts, axis=1)
        neg_below = np.cumsum(neg_w, axis=1) - neg_w
        numerator = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
        total += numerator / (pos_w.sum(axis=1) * neg_w.sum(axis=1))
    return total / int(valid.sum())


# Bootstrap functions use these vectorised paths when metric_fn is the key function itself.
_BATCHED_METRICS: list[tuple[Callable[..., float], Callable[..., np.ndarray]]] = [(macro_auc, _batched_macro_auc)]


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
    valid = valid_class_mask(y_true=y_true)
    if not valid.any():
        raise ValueError("no class has both positives and negatives: nothing to bootstrap")
    y_valid = y_true[:, valid].astype(np.int64)
    num_valid_records = y_valid.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _MAX_CHUNK_ELEMENTS // num_records))
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
    *, y_true: np.ndarray, y_score: np.ndarray, metric_fn: MetricFn, index_chunks: list[np.ndarray]
) -> np.ndarray:
    """metric_fn on every resample, vectorised when a batched implementation exists."""
    batched = next((fast for fn, fast in _BATCHED_METRICS if fn is metric_fn), None)
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


def _quiet(metric_fn: MetricFn, **kwargs: Any) -> float:
    # The excluded-class warning of macro_auc is emitted once by the caller's point
    # estimate; resamples share the same excluded classes, so repeating it is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(metric_fn(**kwargs))


def bootstrap_ci(
    *,
    y_true: Any,
    y_score: Any,
    metric_fn: MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap CI of ``metric_fn(y_true=..., y_score=...)`` over records.

    Resamples in which a class that is valid on the full set has no positive or no
    negative are redrawn (as in the PTB-XL benchmark), so the metric is defined on
    every resample. ``macro_auc`` is evaluated vectorised over resamples.
    """
    y = _as_labels(y_true)
    s = _as_scores(y_score, like=y)
    point = float(metric_fn(y_true=y, y_score=s))
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
    metric_fn: MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Paired bootstrap of mean over seeds of metric(b_s) - metric(a_s).

    ``scores_a[s]`` and ``scores_b[s]`` are the (N, C) scores of seed ``s`` of the two
    methods on the same N records. Every resample uses one set of record indices for
    all seeds and both methods, so record difficulty cancels out of the difference.
    """
    y = _as_labels(y_true)
    if len(scores_a) != len(scores_b) or len(scores_a) == 0:
        raise ValueError(f"need the same non-zero number of seeds, got {len(scores_a)} and {len(scores_b)}")
    a_list = [_as_scores(a, like=y, name="scores_a") for a in scores_a]
    b_list = [_as_scores(b, like=y, name="scores_b") for b in scores_b]
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
    metric_fn: MetricFn,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Paired bootstrap of metric(b) - metric(a) for two runs scored on the same records."""
    return paired_bootstrap_pooled(
        y_true=y_true, scores_a=[score_a], scores_b=[score_b], metric_fn=metric_fn,
        n_resamples=n_resamples, alpha=alpha, seed=seed,
    )


# --------------------------------------------------------------------------- #
# Thresholds, F1, Fmax
# --------------------------------------------------------------------------- #
def apply_thresholds(*, y_score: Any, thresholds: Any, ensure_one_positive: bool = False) -> np.ndarray:
    """Binary (N, C) predictions: ``score >= threshold`` per class.

    ``ensure_one_positive`` reproduces the PTB-XL benchmark's ``apply_thresholds``: a
    record with no class above threshold gets its arg-max class. It is only used for
    the challenge scores (which assume every record has a prediction).
    """
    s = np.asarray(y_score, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if s.ndim != 2 or t.shape not in {(), (s.shape[1],)}:
        raise ValueError(f"thresholds shape {t.shape} does not fit scores {s.shape}")
    pred = s >= t
    if ensure_one_positive:
        empty = ~pred.any(axis=1)
        pred[np.flatnonzero(empty), np.argmax(s[empty], axis=1)] = True
    return pred.astype(np.uint8)


def choose_thresholds(*, y_true_val: Any, y_score_val: Any) -> np.ndarray:
    """Per-class threshold maximising F1 on the VALIDATION split, shape (C,).

    Every cut between two distinct validation scores is tried (exact, not a grid);
    the returned threshold is the midpoint between the lowest score predicted positive
    and the next lower score, so that ``score >= threshold`` reproduces the optimal
    validation predictions. Ties in F1 go to the higher threshold. A class without
    positives in validation gets ``+inf`` (never predicted): there is no evidence to
    place a threshold.
    """
    y = _as_labels(y_true_val)
    s = _as_scores(y_score_val, like=y, name="y_score_val")
    thresholds = np.full(y.shape[1], np.inf)
    for c in range(y.shape[1]):
        num_pos = int(y[:, c].sum())
        if num_pos == 0:
            continue
        order = np.argsort(-s[:, c], kind="stable")
        scores_desc = s[order, c]
        tp_cum = np.cumsum(y[order, c])
        # only cut after the last of a group of tied scores
        cut_ends = np.flatnonzero(np.r_[scores_desc[1:] != scores_desc[:-1], True])
        tp = tp_cum[cut_ends]
        predicted = cut_ends + 1
        f1 = 2.0 * tp / (predicted + num_pos)
        best = int(np.argmax(f1))
        end = cut_ends[best]
        lowest_positive = scores_desc[end]
        if end + 1 < len(scores_desc):
            thresholds[c] = 0.5 * (lowest_positive + scores_desc[end + 1])
        else:
            thresholds[c] = lowest_positive
    return thresholds


def f1_scores(*, y_true: Any, y_pred: Any) -> dict[str, float]:
    """Macro F1 (mean over classes) and sample F1 (mean over records) of binary predictions.

    Matches ``sklearn.metrics.f1_score(average="macro"|"samples", zero_division=0)``: a
    class (record) with no true and no predicted positive scores 0 and still counts in
    the mean.
    """
    y = _as_labels(y_true)
    p = _as_labels(y_pred)
    if p.shape != y.shape:
        raise ValueError(f"y_pred shape {p.shape} does not match y_true shape {y.shape}")

    def f1(axis: int) -> np.ndarray:
        tp = (y & p).sum(axis=axis).astype(np.float64)
        denominator = y.sum(axis=axis) + p.sum(axis=axis)
        return np.divide(2.0 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)

    return {"f1_macro": float(f1(0).mean()), "f1_samples": float(f1(1).mean())}


def _fmax_curve(y: np.ndarray, s: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """F(t) for every global threshold t (NaN where no record has a prediction)."""
    has_label = y.any(axis=1)
    if not has_label.any():
        raise ValueError("Fmax needs at least one record with a positive label")
    true_count = y.sum(axis=1)
    f = np.full(len(grid), np.nan)
    for i, t in enumerate(grid):
        pred = s >= t
        pred_count = pred.sum(axis=1)
        tp = (pred & y).sum(axis=1)
        predicted = pred_count > 0
        if not predicted.any():
            continue
        precision = np.mean(tp[predicted] / pred_count[predicted])
        recall = np.mean(tp[has_label] / true_count[has_label])
        f[i] = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return f


def _grid(thresholds: Any, scores: np.ndarray) -> np.ndarray:
    if thresholds is None and scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        # the default 0..1 grid would silently miss most of a logit range
        raise ValueError("scores outside [0, 1]: pass probabilities or an explicit thresholds grid")
    grid = np.asarray(DEFAULT_FMAX_GRID if thresholds is None else thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("thresholds must be a non-empty 1-d grid")
    return grid


def fmax(*, y_true: Any, y_score: Any, thresholds: Any = None) -> float:
    """CAFA-style Fmax (as used for PTB-XL): max over one global threshold t of F(t).

    F(t) is the harmonic mean of precision averaged over records with at least one
    prediction ``score >= t`` and recall averaged over records with at least one true
    label. ``thresholds`` defaults to 0.00, 0.01, ..., 1.00 (scores are probabilities).
    NOTE: the threshold is optimised on the data passed in; for test numbers choose it
    on validation with `fmax_threshold` and apply it with `fmax_at`.
    """
    y = _as_labels(y_true)
    s = _as_scores(y_score, like=y)
    curve = _fmax_curve(y, s, _grid(thresholds, s))
    return float(np.nanmax(curve)) if np.isfinite(curve).any() else 0.0


def fmax_threshold(*, y_true_val: Any, y_score_val: Any, thresholds: Any = None) -> float:
    """The global threshold maximising F(t) on the VALIDATION split (highest on ties)."""
    y = _as_labels(y_true_val)
    s = _as_scores(y_score_val, like=y, name="y_score_val")
    grid = _grid(thresholds, s)
    curve = _fmax_curve(y, s, grid)
    if not np.isfinite(curve).any():
        raise ValueError("no threshold of the grid yields any prediction")
    best = np.flatnonzero(curve == np.nanmax(curve))
    return float(grid[best].max())


def fmax_at(*, y_true: Any, y_score: Any, threshold: float) -> float:
    """F(t) at a fixed global threshold (0.0 if nothing is predicted at that threshold)."""
    y = _as_labels(y_true)
    s = _as_scores(y_score, like=y)
    value = _fmax_curve(y, s, np.array([float(threshold)]))[0]
    return 0.0 if math.isnan(value) else float(value)


# --------------------------------------------------------------------------- #
# ICBEB 2018 / PhysioNet 2020 challenge scores
# --------------------------------------------------------------------------- #
def challenge_scores(*, y_true: Any, y_pred: Any, beta: float = 2.0) -> dict[str, Any]:
    """Macro F-beta and G-beta of the ICBEB 2018 / PhysioNet-CinC 2020 challenges.

    As in ``challenge_metrics`` of the PTB-XL benchmark (helme/ecg_ptbxl_benchmarking,
    code/utils/utils.py): each record contributes 1 / (number of its true labels) to the
    TP/FP/FN counts of every class, F_beta = (1+b^2)TP / ((1+b^2)TP + b^2 FN + FP),
    G_beta = TP / (TP + FP + b FN), both averaged over classes. Two edge cases the
    benchmark does not handle follow the PhysioNet 2020 scorer: a record without labels
    has weight 1 (not 1/0), and a class with TP = FP = FN = 0 has an undefined score,
    left out of the mean and listed in ``undefined_classes`` (indices).
    """
    y = _as_labels(y_true)
    p = _as_labels(y_pred)
    if p.shape != y.shape:
        raise ValueError(f"y_pred shape {p.shape} does not match y_true shape {y.shape}")
    weight = 1.0 / np.maximum(y.sum(axis=1), 1)[:, None]
    tp = (weight * (y & p)).sum(axis=0)
    fp = (weight * (~y & p)).sum(axis=0)
    fn = (weight * (y & ~p)).sum(axis=0)
    b2 = beta**2
    f_denominator = (1 + b2) * tp + b2 * fn + fp
    g_denominator = tp + fp + beta * fn
    defined = f_denominator > 0
    if not defined.any():
        raise ValueError("no class has a positive label or a prediction: challenge scores undefined")
    f_beta = (1 + b2) * tp[defined] / f_denominator[defined]
    g_beta = tp[defined] / g_denominator[defined]
    return {
        "f_beta": float(f_beta.mean()),
        "g_beta": float(g_beta.mean()),
        "undefined_classes": [int(c) for c in np.flatnonzero(~defined)],
    }


# --------------------------------------------------------------------------- #
# Sliding windows
# --------------------------------------------------------------------------- #
def window_starts(*, length: int, window: int, stride: int) -> np.ndarray:
    """Start indices of windows covering ``[0, length)``, shape (W,) int64.

    Windows start at 0, stride, 2*stride, ...; if the record's tail is not covered, a
    last window aligned to the end (start = length - window) is added. A record shorter
    than (or equal to) one window gets the single start 0; the caller zero-pads it.
    """
    if window < 1 or stride < 1 or length < 0:
        raise ValueError(f"need window >= 1, stride >= 1, length >= 0; got {window}, {stride}, {length}")
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    last = length - window
    starts = np.arange(0, last + 1, stride, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, np.int64(last))
    return starts


def aggregate_windows(
    *, scores: Any, record_index: Any, num_records: int, how: str = "max"
) -> np.ndarray:
    """Per-window scores (W, C) -> per-record scores (N, C) by max (benchmark) or mean.

    ``record_index[w]`` is the record of window ``w``. Every record must own at least
    one window: a missing record would otherwise silently get a score.
    """
    s = np.asarray(scores, dtype=np.float64)
    idx = np.asarray(record_index)
    if s.ndim != 2 or idx.shape != (s.shape[0],):
        raise ValueError(f"scores must be (W, C) and record_index (W,), got {s.shape} and {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("record_index must be integer")
    if idx.size and (idx.min() < 0 or idx.max() >= num_records):
        raise ValueError(f"record_index out of range [0, {num_records})")
    windows_per_record = np.bincount(idx, minlength=num_records)
    if np.any(windows_per_record == 0):
        missing = np.flatnonzero(windows_per_record == 0)
        raise ValueError(f"{len(missing)} records have no window, e.g. {missing[:5].tolist()}")
    if how == "max":
        out = np.full((num_records, s.shape[1]), -np.inf)
        np.maximum.at(out, idx, s)
        return out
    if how == "mean":
        out = np.zeros((num_records, s.shape[1]))
        np.add.at(out, idx, s)
        return out / windows_per_record[:, None]
    raise ValueError(f"how must be 'max' or 'mean', got {how!r}")


# --------------------------------------------------------------------------- #
# Full evaluation of one run
# --------------------------------------------------------------------------- #
def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def evaluate_scores(
    *,
    label_names: Sequence[str],
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    challenge: bool = False,
) -> dict[str, Any]:
    """All reported metrics of one run; thresholds from ``val``, numbers on ``test``.

    ``val`` and ``test`` are ``(y_true, y_score)`` pairs. Test labels are used only to
    score; every threshold (per-class F1 thresholds, the Fmax threshold) comes from
    val. Returns a JSON-serialisable dict:

    macro_auc, macro_auc_ci [lo, hi], ci_level, n_resamples, per_class_auc {name: AUC|None},
    excluded_classes, val_macro_auc, val_excluded_classes, f1_macro, f1_samples, thresholds {name: float|None
    (None = never predicted: no val positives)}, fmax (test, val threshold),
    fmax_threshold, num_val_records, num_test_records; with ``challenge=True`` also
    challenge_f_beta2, challenge_g_beta2 (F1 thresholds from val, arg-max class forced
    for records without prediction as in the benchmark).
    """
    names = [str(n) for n in label_names]
    y_val = _as_labels(val[0])
    s_val = _as_scores(val[1], like=y_val, name="val scores")
    y_test = _as_labels(test[0])
    s_test = _as_scores(test[1], like=y_test, name="test scores")
    if y_val.shape[1] != len(names) or y_test.shape[1] != len(names):
        raise ValueError(f"{len(names)} label_names but val has {y_val.shape[1]} and test {y_test.shape[1]} classes")

    # Decisions first, from validation only.
    thresholds = choose_thresholds(y_true_val=y_val, y_score_val=s_val)
    global_threshold = fmax_threshold(y_true_val=y_val, y_score_val=s_val)

    auc = per_class_auc(y_true=y_test, y_score=s_test, label_names=names)
    if auc.excluded_classes:
        warnings.warn(
            f"test macro AUC excludes classes without positives or negatives: {auc.excluded_classes}",
            stacklevel=2,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # same exclusion, already reported by name
        ci = bootstrap_ci(y_true=y_test, y_score=s_test, metric_fn=macro_auc, n_resamples=n_resamples,
                          alpha=alpha, seed=seed)
    val_auc = per_class_auc(y_true=y_val, y_score=s_val, label_names=names)
    pred = apply_thresholds(y_score=s_test, thresholds=thresholds)
    f1 = f1_scores(y_true=y_test, y_pred=pred)
    result: dict[str, Any] = {
        "macro_auc": auc.macro_auc,
        "macro_auc_ci": [ci.lower, ci.upper],
        "ci_level": 1.0 - alpha,
        "n_resamples": ci.n_resamples,
        "per_class_auc": auc.per_class_auc,
        "excluded_classes": auc.excluded_classes,
        "val_macro_auc": _json_float(val_auc.macro_auc),
        "val_excluded_classes": val_auc.excluded_classes,
        "f1_macro": f1["f1_macro"],
        "f1_samples": f1["f1_samples"],
        "thresholds": {name: _json_float(t) for name, t in zip(names, thresholds)},
        "fmax": fmax_at(y_true=y_test, y_score=s_test, threshold=global_threshold),
        "fmax_threshold": global_threshold,
        "num_val_records": int(y_val.shape[0]),
        "num_test_records": int(y_test.shape[0]),
    }
    if challenge:
        forced = apply_thresholds(y_score=s_test, thresholds=thresholds, ensure_one_positive=True)
        scores = challenge_scores(y_true=y_test, y_pred=forced, beta=2.0)
        result["challenge_f_beta2"] = scores["f_beta"]
        result["challenge_g_beta2"] = scores["g_beta"]
    return result
