"""Evaluation metrics for multi-label ECG classification (host side, pure NumPy).

This module owns every number that ends up in a results table:

* ROC-AUC per class and macro-averaged (`per_class_auc`, `macro_auc`), computed
  from rank statistics (Mann-Whitney U with average ranks for ties), numerically
  identical to ``sklearn.metrics.roc_auc_score(average="macro")``. Classes that
  have no positive (or no negative) record in the split have no AUC: they are
  listed in ``excluded_classes`` and left out of the macro average, never
  silently.
* Confidence intervals are in ``mvkt.bootstrap``; the whole evaluation of a split's
  scores (``evaluate_scores``) in ``mvkt.evaluate``.
* Thresholded metrics whose thresholds are chosen on the VALIDATION split only:
  `choose_thresholds` (per-class F1-optimal), `fmax_threshold` (one global
  threshold, CAFA-style Fmax); `f1_scores`, `fmax_at` and `challenge_scores`
  (ICBEB 2018 / PhysioNet 2020 F-beta and G-beta) then apply them to test.
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


MIN_VAL_POSITIVES = 10  # fewer validation positives than this: a threshold placed on a handful of records
DEGENERATE_MARGIN = 1e-3  # a threshold this close to 0 or 1 says "always" or "never", not a cut


def threshold_caveats(*, y_true_val: Any, thresholds: Any, label_names: Sequence[str]) -> dict[str, str]:
    """{class: why its validation threshold should not be trusted for yes/no decisions}: at 0
    or 1 (within ``DEGENERATE_MARGIN``: the cut says always or never), never predicted (no
    validation positives), or placed on fewer than ``MIN_VAL_POSITIVES`` positives."""
    y = _as_labels(y_true_val)
    t = np.asarray(thresholds, np.float64)
    caveats = {}
    for c, name in enumerate(label_names):
        positives = int(y[:, c].sum())
        reasons = []
        if not np.isfinite(t[c]):
            reasons.append("no validation positives: never decided")
        elif t[c] <= DEGENERATE_MARGIN:
            reasons.append(f"threshold {t[c]:.3g} is at 0: every record is called positive")
        elif t[c] >= 1 - DEGENERATE_MARGIN:
            reasons.append(f"threshold {t[c]:.6g} is at 1: almost no record is called positive")
        if 0 < positives < MIN_VAL_POSITIVES:
            reasons.append(f"only {positives} validation positive(s) of {len(y)}")
        if reasons:
            caveats[str(name)] = "; ".join(reasons)
    return caveats


def sensitivity_thresholds(*, y_true_val: Any, y_score_val: Any, sensitivity: float) -> np.ndarray:
    """Per class the highest threshold whose validation sensitivity (recall) is at least
    ``sensitivity``, shape (C,): an operating point instead of the F1 optimum; ``+inf`` for a
    class without validation positives."""
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    y = _as_labels(y_true_val)
    s = _as_scores(y_score_val, like=y, name="y_score_val")
    out = np.full(y.shape[1], np.inf)
    for c in range(y.shape[1]):
        positive_scores = np.sort(s[y[:, c] == 1, c])[::-1]
        if len(positive_scores) == 0:
            continue
        needed = int(math.ceil(sensitivity * len(positive_scores) - 1e-9))
        out[c] = positive_scores[max(needed, 1) - 1]  # score >= it keeps `needed` positives
    return out


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
