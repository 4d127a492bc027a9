"""Tests of mvkt.metrics against scikit-learn (reference only) and hand-computed values."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from mvkt import bootstrap as B
from mvkt import evaluate as E
from mvkt import metrics as M


def _random_split(*, seed, num_records=400, prevalences=(0.3, 0.1, 0.05, 0.5, 0.02), decimals=1):
    """Multi-hot labels and informative scores rounded so that many scores tie."""
    rng = np.random.default_rng(seed)
    prevalences = np.asarray(prevalences)
    y = (rng.random((num_records, prevalences.size)) < prevalences).astype(np.uint8)
    y[np.arange(len(prevalences)), np.arange(len(prevalences))] = 1  # every class has a positive
    scores = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    return y, np.round(scores, decimals)


def _loop_macro_auc(*, y_true, y_score):
    # A different callable than M.macro_auc, so the bootstrap takes the per-resample loop.
    return M.macro_auc(y_true=y_true, y_score=y_score)


# ----------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 2, 8])
def test_auc_equals_sklearn_with_ties(seed, decimals):
    y, s = _random_split(seed=seed, decimals=decimals)
    assert len(np.unique(s)) < s.size  # ties really occur
    result = M.per_class_auc(y_true=y, y_score=s, label_names=list("ABCDE"))
    assert result.excluded_classes == []
    assert abs(result.macro_auc - roc_auc_score(y, s, average="macro")) < 1e-12
    for c, name in enumerate("ABCDE"):
        assert abs(result.per_class_auc[name] - roc_auc_score(y[:, c], s[:, c])) < 1e-12
    assert abs(M.macro_auc(y_true=y, y_score=s) - roc_auc_score(y, s, average="macro")) < 1e-12


def test_auc_all_tied_scores_is_one_half_and_perfect_ranking_is_one():
    y = np.array([[1], [0], [1], [0]])
    assert M.macro_auc(y_true=y, y_score=np.full((4, 1), 0.3)) == 0.5
    assert M.macro_auc(y_true=y, y_score=y * 0.9) == 1.0
    assert M.macro_auc(y_true=y, y_score=1 - y) == 0.0


def test_classes_without_positives_or_negatives_are_excluded_and_reported():
    y, s = _random_split(seed=3)
    y[:, 1] = 0  # no positives
    y[:, 3] = 1  # no negatives
    names = ["NORM", "MI", "STTC", "CD", "HYP"]
    result = M.per_class_auc(y_true=y, y_score=s, label_names=names)
    assert result.excluded_classes == ["MI", "CD"]
    assert result.per_class_auc["MI"] is None and result.per_class_auc["CD"] is None
    valid = [0, 2, 4]
    assert abs(result.macro_auc - roc_auc_score(y[:, valid], s[:, valid], average="macro")) < 1e-12
    with pytest.warns(UserWarning, match="MI"):
        value = M.macro_auc(y_true=y, y_score=s, label_names=names)
    assert value == result.macro_auc
    json.dumps(result.to_dict())


def test_macro_auc_raises_when_no_class_is_valid():
    y = np.zeros((5, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="undefined"):
        M.macro_auc(y_true=y, y_score=np.random.default_rng(0).random((5, 2)))


def test_bad_inputs_are_rejected():
    y = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="shape"):
        M.macro_auc(y_true=y, y_score=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.macro_auc(y_true=y, y_score=np.array([[np.nan, 0], [0, 1]]))
    with pytest.raises(ValueError, match="0/1"):
        M.macro_auc(y_true=np.array([[2, 0], [0, 1]]), y_score=np.zeros((2, 2)))


# ----------------------------------------------------------------------------- bootstrap
def test_vectorised_bootstrap_matches_per_resample_loop():
    y, s = _random_split(seed=4, num_records=300)
    fast = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=M.macro_auc, n_resamples=200, seed=7)
    slow = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=_loop_macro_auc, n_resamples=200, seed=7)
    assert fast.n_resamples == slow.n_resamples == 200
    assert fast.point == slow.point
    assert abs(fast.lower - slow.lower) < 1e-12 and abs(fast.upper - slow.upper) < 1e-12
    assert fast.lower < fast.point < fast.upper


def test_bootstrap_is_seeded_and_fast_on_a_ptbxl_sized_test_fold():
    y, s = _random_split(seed=5, num_records=2000, decimals=3)
    start = time.perf_counter()
    first = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=M.macro_auc, n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"1000 resamples took {elapsed:.1f}s"
    again = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=M.macro_auc, n_resamples=1000, seed=0)
    other = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=M.macro_auc, n_resamples=1000, seed=1)
    assert first == again
    assert (first.lower, first.upper) != (other.lower, other.upper)


def test_bootstrap_ci_width_matches_normal_theory_for_a_mean():
    rng = np.random.default_rng(6)
    n = 1000
    y = (rng.random((n, 1)) < 0.5).astype(np.uint8)
    s = rng.normal(size=(n, 1))

    def mean_score(*, y_true, y_score):
        return float(y_score[:, 0].mean())

    ci = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=mean_score, n_resamples=2000, seed=0)
    expected_half_width = 1.96 * s[:, 0].std() / np.sqrt(n)
    assert abs((ci.upper - ci.lower) / 2 - expected_half_width) < 0.1 * expected_half_width
    assert ci.alpha == 0.05


def test_every_resample_keeps_positives_and_negatives_of_valid_classes():
    rng = np.random.default_rng(8)
    y = np.zeros((60, 3), dtype=np.uint8)
    y[:30, 0] = 1
    y[[5, 40], 1] = 1  # rare class: two positives, often lost in a resample
    # class 2 has no positives: invalid on the full set, so it is not required
    s = rng.random((60, 3))
    seen = []

    def checking_metric(*, y_true, y_score):
        positives = y_true.sum(axis=0)
        seen.append(positives)
        assert 0 < positives[1] < len(y_true)
        return float(positives[1])

    result = B.bootstrap_ci(y_true=y, y_score=s, metric_fn=checking_metric, n_resamples=300, seed=0)
    assert result.n_resamples == 300
    assert result.n_rejected > 0  # P(no positive of class 1) ~ 0.13 per draw
    assert len(seen) == 301  # the point estimate + one call per kept resample


def test_bootstrap_gives_up_with_a_clear_error_when_resamples_cannot_be_valid():
    # 20 classes with a single positive each: a draw keeps all of them with p ~ 0.36**20.
    num_records = 40
    y = np.zeros((num_records, 20), dtype=np.uint8)
    y[np.arange(20), np.arange(20)] = 1
    s = np.random.default_rng(0).random(y.shape)
    with pytest.raises(RuntimeError, match="too small or too imbalanced"):
        B.bootstrap_ci(y_true=y, y_score=s, metric_fn=M.macro_auc, n_resamples=50, seed=0)


def test_paired_bootstrap_detects_a_real_improvement_and_not_a_null_one():
    y, worse = _random_split(seed=9, num_records=600, decimals=3)
    rng = np.random.default_rng(10)
    better = np.clip(worse + 0.15 * (y - 0.5) + rng.normal(0, 0.02, y.shape), 0, 1)
    gain = B.paired_bootstrap(y_true=y, score_a=worse, score_b=better, metric_fn=M.macro_auc,
                              n_resamples=500, seed=0)
    expected = M.macro_auc(y_true=y, y_score=better) - M.macro_auc(y_true=y, y_score=worse)
    assert abs(gain.difference - expected) < 1e-12
    assert 0 < gain.lower < gain.difference < gain.upper
    assert gain.p_value < 0.01
    null = B.paired_bootstrap(y_true=y, score_a=worse, score_b=worse.copy(), metric_fn=M.macro_auc,
                              n_resamples=200, seed=0)
    assert null.difference == 0.0 and null.lower == 0.0 and null.upper == 0.0
    assert null.p_value == 1.0  # every difference is <= 0


def test_paired_bootstrap_uses_the_same_resamples_as_the_single_run_bootstrap():
    y, a = _random_split(seed=11, num_records=300, decimals=2)
    b = np.clip(a + 0.1 * y, 0, 1)
    paired = B.paired_bootstrap(y_true=y, score_a=a, score_b=b, metric_fn=_loop_macro_auc,
                                n_resamples=100, seed=3)
    # Recompute the per-resample differences through bootstrap_ci with a metric that
    # records the statistic: identical seeds must give identical resamples.
    stats = {}
    for name, scores in (("a", a), ("b", b)):
        stats[name] = []

        def recording(*, y_true, y_score, _sink=stats[name]):
            value = M.macro_auc(y_true=y_true, y_score=y_score)
            _sink.append(value)
            return value

        B.bootstrap_ci(y_true=y, y_score=scores, metric_fn=recording, n_resamples=100, seed=3)
    differences = np.array(stats["b"][1:]) - np.array(stats["a"][1:])
    lower, upper = np.percentile(differences, [2.5, 97.5])
    assert abs(paired.lower - lower) < 1e-12 and abs(paired.upper - upper) < 1e-12
    assert paired.p_value == np.mean(differences <= 0)


def test_pooled_paired_bootstrap_averages_seed_differences():
    y, a0 = _random_split(seed=12, num_records=300, decimals=3)
    rng = np.random.default_rng(13)
    a1 = np.clip(a0 + rng.normal(0, 0.05, y.shape), 0, 1)
    b0 = np.clip(a0 + 0.1 * y, 0, 1)
    b1 = np.clip(a1 + 0.05 * y, 0, 1)
    pooled = B.paired_bootstrap_pooled(y_true=y, scores_a=[a0, a1], scores_b=[b0, b1],
                                       metric_fn=M.macro_auc, n_resamples=300, seed=0)
    per_seed = [B.paired_bootstrap(y_true=y, score_a=a, score_b=b, metric_fn=M.macro_auc,
                                   n_resamples=300, seed=0) for a, b in ((a0, b0), (a1, b1))]
    assert abs(pooled.difference - np.mean([r.difference for r in per_seed])) < 1e-12
    single = B.paired_bootstrap_pooled(y_true=y, scores_a=[a0], scores_b=[b0], metric_fn=M.macro_auc,
                                       n_resamples=300, seed=0)
    assert single == per_seed[0]
    assert pooled.lower > 0
    with pytest.raises(ValueError, match="seeds"):
        B.paired_bootstrap_pooled(y_true=y, scores_a=[a0, a1], scores_b=[b0], metric_fn=M.macro_auc)


# ----------------------------------------------------------------------------- thresholds / F1 / Fmax
def test_f1_scores_match_sklearn_including_empty_rows_and_columns():
    rng = np.random.default_rng(14)
    y = (rng.random((50, 4)) < 0.3).astype(np.uint8)
    p = (rng.random((50, 4)) < 0.3).astype(np.uint8)
    y[:5] = 0
    p[:3] = 0  # records without labels and/or predictions
    y[:, 2] = 0
    p[:, 2] = 0  # a class never present nor predicted
    got = M.f1_scores(y_true=y, y_pred=p)
    assert abs(got["f1_macro"] - f1_score(y, p, average="macro", zero_division=0)) < 1e-12
    assert abs(got["f1_samples"] - f1_score(y, p, average="samples", zero_division=0)) < 1e-12


def test_chosen_thresholds_are_f1_optimal_on_validation():
    y, s = _random_split(seed=15, num_records=200, decimals=2)
    thresholds = M.choose_thresholds(y_true_val=y, y_score_val=s)
    assert thresholds.shape == (5,)
    for c in range(5):
        candidates = np.unique(s[:, c])
        best = max(f1_score(y[:, c], s[:, c] >= t, zero_division=0) for t in candidates)
        got = f1_score(y[:, c], s[:, c] >= thresholds[c], zero_division=0)
        assert abs(got - best) < 1e-12
    # the threshold sits strictly between val scores, not on one (robust to >= vs >)
    for c in range(5):
        assert thresholds[c] not in s[:, c] or thresholds[c] == s[:, c].min()


def test_class_without_validation_positives_is_never_predicted():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.8], [0.2, 0.1], [0.7, 0.3], [0.4, 0.6]])
    thresholds = M.choose_thresholds(y_true_val=y, y_score_val=s)
    assert thresholds[0] == pytest.approx(0.55)  # midpoint between 0.7 (lowest positive) and 0.4
    assert thresholds[1] == np.inf
    pred = M.apply_thresholds(y_score=s, thresholds=thresholds)
    np.testing.assert_array_equal(pred, y)


def test_apply_thresholds_can_force_one_prediction_like_the_benchmark():
    s = np.array([[0.1, 0.4], [0.9, 0.2]])
    plain = M.apply_thresholds(y_score=s, thresholds=np.array([0.5, 0.5]))
    forced = M.apply_thresholds(y_score=s, thresholds=np.array([0.5, 0.5]), ensure_one_positive=True)
    np.testing.assert_array_equal(plain, [[0, 0], [1, 0]])
    np.testing.assert_array_equal(forced, [[0, 1], [1, 0]])


def test_fmax_hand_computed():
    y = np.array([[1, 0], [0, 1], [1, 1]])
    s = np.array([[0.9, 0.2], [0.6, 0.7], [0.8, 0.3]])
    grid = np.array([0.25, 0.5, 0.75])
    # t=0.25: precision (1 + 1/2 + 1)/3 = 5/6, recall 1        -> F = 10/11
    # t=0.50: precision 5/6, recall (1 + 1 + 1/2)/3 = 5/6       -> F = 5/6
    # t=0.75: precision 1 (2 records predict), recall 1.5/3      -> F = 2/3
    assert M.fmax(y_true=y, y_score=s, thresholds=grid) == pytest.approx(10 / 11)
    assert M.fmax_at(y_true=y, y_score=s, threshold=0.5) == pytest.approx(5 / 6)
    assert M.fmax_at(y_true=y, y_score=s, threshold=0.75) == pytest.approx(2 / 3)
    assert M.fmax_at(y_true=y, y_score=s, threshold=0.95) == 0.0  # nothing predicted
    assert M.fmax_threshold(y_true_val=y, y_score_val=s, thresholds=grid) == 0.25


def test_fmax_default_grid_refuses_logits():
    y = np.array([[1, 0], [0, 1]])
    logits = np.array([[2.0, -1.0], [-3.0, 0.5]])
    with pytest.raises(ValueError, match="probabilities"):
        M.fmax(y_true=y, y_score=logits)
    assert M.fmax(y_true=y, y_score=logits, thresholds=np.linspace(-3, 3, 61)) == 1.0


def test_fmax_is_the_max_of_fmax_at_over_the_default_grid():
    y, s = _random_split(seed=16, num_records=150, decimals=3)
    best = max(M.fmax_at(y_true=y, y_score=s, threshold=t) for t in M.DEFAULT_FMAX_GRID)
    assert M.fmax(y_true=y, y_score=s) == pytest.approx(best, abs=1e-12)
    t = M.fmax_threshold(y_true_val=y, y_score_val=s)
    assert M.fmax_at(y_true=y, y_score=s, threshold=t) == pytest.approx(best, abs=1e-12)


# ----------------------------------------------------------------------------- challenge scores
def _benchmark_challenge_loop(y_true, y_pred, beta):
    """Record-by-record transcription of the benchmark's challenge_metrics formulas."""
    f_sum = g_sum = 0.0
    weights = y_true.sum(axis=1)
    for c in range(y_true.shape[1]):
        tp = fp = fn = 0.0
        for i in range(len(y_true)):
            if y_true[i, c] == 1 and y_pred[i, c] == 1:
                tp += 1.0 / weights[i]
            elif y_pred[i, c] == 1:
                fp += 1.0 / weights[i]
            elif y_true[i, c] == 1:
                fn += 1.0 / weights[i]
        f_sum += (1 + beta**2) * tp / ((1 + beta**2) * tp + fp + beta**2 * fn)
        g_sum += tp / (tp + fp + beta * fn)
    return f_sum / y_true.shape[1], g_sum / y_true.shape[1]


def test_challenge_scores_hand_computed():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]])
    p = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0]])
    # weights 1, 1/2, 1, 1.  class 0: TP 1.5 FP 1 FN 0; class 1: TP 1 FP 0 FN 0.5;
    # class 2: TP 0 FP 0.5 FN 1.
    got = M.challenge_scores(y_true=y, y_pred=p, beta=2)
    assert got["f_beta"] == pytest.approx((7.5 / 8.5 + 5 / 7 + 0) / 3)
    assert got["g_beta"] == pytest.approx((1.5 / 2.5 + 1 / 2 + 0) / 3)
    assert got["undefined_classes"] == []


def test_challenge_scores_match_the_benchmark_formulas_on_random_data():
    rng = np.random.default_rng(17)
    y = (rng.random((80, 6)) < 0.25).astype(np.uint8)
    y[np.arange(80), rng.integers(0, 6, 80)] = 1  # ICBEB: every record has a label
    p = (rng.random((80, 6)) < 0.3).astype(np.uint8)
    f_ref, g_ref = _benchmark_challenge_loop(y, p, beta=2)
    got = M.challenge_scores(y_true=y, y_pred=p, beta=2)
    assert got["f_beta"] == pytest.approx(f_ref, abs=1e-12)
    assert got["g_beta"] == pytest.approx(g_ref, abs=1e-12)


def test_challenge_scores_report_undefined_classes():
    y = np.array([[1, 0], [1, 0]])
    p = np.array([[1, 0], [0, 0]])  # class 1: never true, never predicted
    got = M.challenge_scores(y_true=y, y_pred=p)
    assert got["undefined_classes"] == [1]
    assert got["f_beta"] == pytest.approx(5 * 1 / (5 * 1 + 4 * 1))


# ----------------------------------------------------------------------------- windows
def test_window_starts_cover_the_record_with_the_last_window_at_the_end():
    np.testing.assert_array_equal(M.window_starts(length=10, window=4, stride=3), [0, 3, 6])
    np.testing.assert_array_equal(M.window_starts(length=11, window=4, stride=3), [0, 3, 6, 7])
    np.testing.assert_array_equal(M.window_starts(length=4, window=4, stride=2), [0])
    np.testing.assert_array_equal(M.window_starts(length=3, window=4, stride=2), [0])
    # PTB-XL style: 10 s at 100 Hz, 2.5 s windows, 1.25 s stride
    starts = M.window_starts(length=1000, window=250, stride=125)
    np.testing.assert_array_equal(starts, np.arange(0, 751, 125))
    for length, window, stride in [(1234, 250, 125), (5000, 1000, 333), (251, 250, 250)]:
        starts = M.window_starts(length=length, window=window, stride=stride)
        covered = np.zeros(length, bool)
        for st in starts:
            covered[st:st + window] = True
        assert covered.all() and starts[-1] + window == length and np.all(np.diff(starts) > 0)


def test_aggregate_windows_max_and_mean():
    scores = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.3], [0.7, 0.0]])
    record_index = np.array([0, 0, 1, 2])
    np.testing.assert_allclose(
        M.aggregate_windows(scores=scores, record_index=record_index, num_records=3, how="max"),
        [[0.5, 0.9], [0.3, 0.3], [0.7, 0.0]])
    np.testing.assert_allclose(
        M.aggregate_windows(scores=scores, record_index=record_index, num_records=3, how="mean"),
        [[0.3, 0.55], [0.3, 0.3], [0.7, 0.0]])
    with pytest.raises(ValueError, match="no window"):
        M.aggregate_windows(scores=scores, record_index=record_index, num_records=4)
    with pytest.raises(ValueError, match="how"):
        M.aggregate_windows(scores=scores, record_index=record_index, num_records=3, how="median")


# ----------------------------------------------------------------------------- evaluate_scores
def test_threshold_selection_never_sees_test():
    names = ["NORM", "MI", "STTC", "CD", "HYP"]
    val = _random_split(seed=18, num_records=300, decimals=3)
    y_test, s_test = _random_split(seed=19, num_records=300, decimals=3)
    honest = E.evaluate_scores(label_names=names, val=val, test=(y_test, s_test), n_resamples=50, seed=0)
    flipped = E.evaluate_scores(label_names=names, val=val, test=(1 - y_test, s_test), n_resamples=50, seed=0)
    assert honest["thresholds"] == flipped["thresholds"]
    assert honest["fmax_threshold"] == flipped["fmax_threshold"]
    assert honest["macro_auc"] > 0.7 and flipped["macro_auc"] < 0.3  # the test labels are really used to score
    expected = M.choose_thresholds(y_true_val=val[0], y_score_val=val[1])
    assert list(honest["thresholds"].values()) == pytest.approx(list(expected))


def test_evaluate_scores_is_json_serialisable_and_consistent():
    names = ["NORM", "MI", "STTC", "CD", "HYP"]
    val = _random_split(seed=20, num_records=300, decimals=3)
    y_test, s_test = _random_split(seed=21, num_records=300, decimals=3)
    y_test[:, 4] = 0  # HYP absent from the test split
    with pytest.warns(UserWarning, match="HYP"):
        report = E.evaluate_scores(label_names=names, val=val, test=(y_test, s_test),
                                   n_resamples=100, seed=0, challenge=True)
    parsed = json.loads(json.dumps(report, allow_nan=False))
    assert parsed["excluded_classes"] == ["HYP"] and parsed["per_class_auc"]["HYP"] is None
    assert parsed["macro_auc"] == pytest.approx(roc_auc_score(y_test[:, :4], s_test[:, :4], average="macro"))
    lower, upper = parsed["macro_auc_ci"]
    assert lower < parsed["macro_auc"] < upper and parsed["n_resamples"] == 100
    thresholds = M.choose_thresholds(y_true_val=val[0], y_score_val=val[1])
    pred = M.apply_thresholds(y_score=s_test, thresholds=thresholds)
    assert parsed["f1_macro"] == pytest.approx(f1_score(y_test, pred, average="macro", zero_division=0))
    assert parsed["f1_samples"] == pytest.approx(f1_score(y_test, pred, average="samples", zero_division=0))
    assert parsed["fmax"] == pytest.approx(
        M.fmax_at(y_true=y_test, y_score=s_test, threshold=parsed["fmax_threshold"]))
    assert 0 < parsed["challenge_f_beta2"] <= 1 and 0 < parsed["challenge_g_beta2"] <= 1
    for key in ("val_macro_auc", "ci_level", "num_val_records", "num_test_records"):
        assert key in parsed


def test_metrics_module_does_not_import_sklearn():
    code = "import sys, mvkt.metrics; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sensitivity_thresholds_keep_the_share_of_validation_positives():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 3))
    y[:, 2] = 0  # no positives: never decided
    s = rng.random((200, 3))
    for sensitivity in (0.5, 0.9, 1.0):
        t = M.sensitivity_thresholds(y_true_val=y, y_score_val=s, sensitivity=sensitivity)
        for c in (0, 1):
            kept = np.mean(s[y[:, c] == 1, c] >= t[c])
            assert kept >= sensitivity
            # the highest such threshold: any higher score drops below the target
            higher = np.sort(s[y[:, c] == 1, c])
            higher = higher[higher > t[c]]
            if len(higher):
                assert np.mean(s[y[:, c] == 1, c] >= higher[0]) < sensitivity
        assert np.isinf(t[2])
    with pytest.raises(ValueError, match="sensitivity"):
        M.sensitivity_thresholds(y_true_val=y, y_score_val=s, sensitivity=0)


def test_threshold_caveats_flag_cuts_at_0_or_1_and_thin_validation():
    y = np.zeros((40, 4), np.uint8)
    y[:20, 0] = 1  # 20 positives, a normal cut
    y[:20, 1] = 1  # 20 positives, a cut at 0
    y[:3, 2] = 1  # 3 positives
    caveats = M.threshold_caveats(y_true_val=y, thresholds=[0.4, 2e-4, 0.5, np.inf],
                                        label_names=["A", "B", "C", "D"])
    assert set(caveats) == {"B", "C", "D"}
    assert "at 0" in caveats["B"] and "only 3 validation positive(s) of 40" == caveats["C"]
    assert caveats["D"] == "no validation positives: never decided"
