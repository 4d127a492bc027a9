"""Each report plot writes a valid, non-trivial PNG from realistic inputs."""

import struct

import numpy as np
import pytest

from mvkt import metrics, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PTBXL_SUPERCLASSES = ["NORM", "MI", "STTC", "CD", "HYP"]
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _assert_png(path, *, min_kb=15, min_size=(400, 250)):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_kb * 1024, f"{path} is only {len(data)} bytes"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_size[0] and height >= min_size[1]
    assert data.rstrip()[-8:-4] == b"IEND"


@pytest.fixture(scope="module")
def ptbxl_like_scores():
    """Test-fold-sized labels with three models of increasing quality."""
    rng = np.random.default_rng(0)
    prevalence = np.array([0.44, 0.25, 0.24, 0.22, 0.12])
    y = (rng.random((800, 5)) < prevalence).astype(np.uint8)

    def model(separation):
        logits = rng.normal(separation * (y - 0.5), 1.0)
        return 1.0 / (1.0 + np.exp(-logits))

    return y, {"teacher (12 leads)": model(3.0), "BCE (lead I)": model(1.6), "MVKT (lead I)": model(2.0)}


def test_roc_curves_png(tmp_path, ptbxl_like_scores):
    y, scores = ptbxl_like_scores
    path = plots.plot_roc_curves(tmp_path / "roc.png", y_true=y, scores=scores, label_names=PTBXL_SUPERCLASSES)
    assert path == str(tmp_path / "roc.png")
    _assert_png(path, min_kb=60)


def test_roc_curves_with_a_class_absent_from_the_split(tmp_path, ptbxl_like_scores):
    y, scores = ptbxl_like_scores
    y = y.copy()
    y[:, 4] = 0
    path = plots.plot_roc_curves(tmp_path / "sub" / "roc.png", y_true=y, scores=scores,
                                 label_names=PTBXL_SUPERCLASSES)
    _assert_png(path, min_kb=40)


def test_roc_points_match_the_auc():
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # heavy ties
    fpr, tpr = plots._roc_points(labels, scores)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    expected = metrics.macro_auc(y_true=labels[:, None].astype(int), y_score=scores[:, None])
    assert abs(trapezoid - expected) < 1e-12  # the curve drawn is the curve whose AUC we report


def test_auc_gain_png(tmp_path, ptbxl_like_scores):
    y, scores = ptbxl_like_scores
    a = metrics.per_class_auc(y_true=y, y_score=scores["BCE (lead I)"], label_names=PTBXL_SUPERCLASSES)
    b = metrics.per_class_auc(y_true=y, y_score=scores["MVKT (lead I)"], label_names=PTBXL_SUPERCLASSES)
    per_class_b = dict(b.per_class_auc, HYP=None)  # one class without AUC shows as n/a
    path = plots.plot_auc_gain(tmp_path / "gain.png", per_class_auc_a=a.per_class_auc,
                               per_class_auc_b=per_class_b, label_names=PTBXL_SUPERCLASSES,
                               name_a="BCE", name_b="MVKT")
    _assert_png(path)


def test_training_curves_png_with_missing_keys(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    steps_per_epoch = 50
    for epoch in range(1, 21):
        for step in range((epoch - 1) * steps_per_epoch + 10, epoch * steps_per_epoch + 1, 10):
            decay = np.exp(-step / 400)
            row = {"step": step, "epoch": epoch, "loss_bce": 0.25 + 0.3 * decay + rng.normal(0, 0.01),
                   "loss_mkd": 0.1 + 0.2 * decay, "learning_rate": 1e-3 * min(1.0, step / 100)}
            if epoch > 2:  # CLT switched on later: key missing from the first rows
                row["loss_clt"] = 1.5 + decay
            row["loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
            rows.append(row)
        rows.append({"step": epoch * steps_per_epoch, "epoch": epoch,
                     "val_macro_auc": 0.9 - 0.1 * np.exp(-epoch / 4) + rng.normal(0, 0.003)})
    path = plots.plot_training_curves(tmp_path / "curves.png", metrics_rows=rows)
    _assert_png(path, min_kb=40)


def test_training_curves_png_with_only_losses(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 50)]
    _assert_png(plots.plot_training_curves(tmp_path / "curves.png", metrics_rows=rows))


def test_lead_sweep_png(tmp_path):
    rng = np.random.default_rng(3)
    baseline = 0.80 + 0.05 * rng.random(12)
    method = baseline + rng.normal(0.01, 0.008, 12)
    ci_base = np.stack([baseline - 0.01, baseline + 0.01], axis=1)
    ci_method = np.stack([method - 0.012, method + 0.009], axis=1)
    path = plots.plot_lead_sweep(tmp_path / "leads.png", leads=LEADS, auc_baseline=baseline,
                                 auc_method=method, ci_baseline=ci_base, ci_method=ci_method,
                                 teacher_auc=0.925)
    _assert_png(path, min_kb=30)
    with pytest.raises(ValueError, match="contain"):
        plots.plot_lead_sweep(tmp_path / "bad.png", leads=LEADS, auc_baseline=baseline, auc_method=method,
                              ci_method=ci_base + 0.5)


def test_ablation_png(tmp_path):
    methods = ["BCE baseline", "+ MKD", "+ CLT (in-batch)", "+ CLT (memory bank)", "MVKT (MKD + CLT)"]
    aucs = [0.842, 0.851, 0.848, 0.853, 0.861]
    cis = [[a - 0.011, a + 0.010] for a in aucs]
    path = plots.plot_ablation(tmp_path / "ablation.png", methods=methods, aucs=aucs, cis=cis,
                               reference="BCE baseline")
    _assert_png(path, min_kb=20)


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    figures = []
    real_close = plots.plt.close

    def keep(fig=None):
        figures.append(fig)

    monkeypatch.setattr(plots.plt, "close", keep)
    yield figures
    for fig in figures:
        real_close(fig)


def _inside(inner, outer, tolerance=1.0):
    return (inner.x0 >= outer.x0 - tolerance and inner.x1 <= outer.x1 + tolerance
            and inner.y0 >= outer.y0 - tolerance and inner.y1 <= outer.y1 + tolerance)


def test_lead_sweep_gain_labels_stay_inside_the_axes_and_chance_is_drawn(tmp_path, kept_figures):
    """Whiskers up to the top of the data once pushed the gain labels into the title; AUCs
    below 0.5 had no chance line to be read against."""
    baseline = np.array([0.62, 0.55, 0.48, 0.60, 0.45, 0.52, 0.58, 0.61, 0.66, 0.70, 0.64, 0.59])
    method = baseline + np.linspace(-0.04, 0.04, 12)
    plots.plot_lead_sweep(tmp_path / "leads.png", leads=LEADS, auc_baseline=baseline, auc_method=method,
                          ci_baseline=[[b - 0.08, b + 0.08] for b in baseline],
                          ci_method=[[m - 0.08, m + 0.08] for m in method], teacher_auc=0.74)
    fig = kept_figures[-1]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    gains = [t for t in ax.texts if t.get_text().startswith(("+", "-"))]
    assert len(gains) == 12
    for text in gains:
        assert _inside(text.get_window_extent(renderer), ax.get_window_extent(renderer)), text.get_text()
    chance = [line for line in ax.get_lines() if line.get_label() == "chance (0.5)"]
    assert chance and list(chance[0].get_ydata()) == [0.5, 0.5] and ax.get_ylim()[0] < 0.45


def test_roc_legend_covers_no_curve_and_training_terms_get_their_own_axes(ptbxl_like_scores, tmp_path,
                                                                          kept_figures):
    y, scores = ptbxl_like_scores
    plots.plot_roc_curves(tmp_path / "roc.png", y_true=y, scores=scores, label_names=PTBXL_SUPERCLASSES)
    fig = kept_figures[-1]
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert all(ax.get_xlim()[0] < 0 and ax.get_ylim()[1] > 1 for ax in fig.axes if ax.lines)  # AUC 1 visible
    rows = [{"step": s, "loss": 16.0 + 1 / s, "loss_bce": 0.3 + 1 / s, "loss_clt": 16.0 - 1 / s} for s in range(1, 30)]
    plots.plot_training_curves(tmp_path / "curves.png", metrics_rows=rows)
    titles = [ax.get_title() for ax in kept_figures[-1].axes]
    assert {"total loss", "BCE term (loss_bce)", "CLT term (loss_clt)", "Validation macro-AUC"} <= set(titles)
