"""Report figures (matplotlib, Agg backend; host side, no JAX).

This module owns the PNGs that go into reports: per-class ROC curves of several
models, per-class AUC gains of one method over another, training curves from a
``metrics.jsonl``, the single-lead sweep and the ablation CI plot. Every function
takes the output path first, keyword-only data after it, writes one PNG (creating
the parent folder) and returns the path. Numbers come from `mvkt.metrics`; nothing
here computes a statistic that a table could disagree with, except the ROC curve
points themselves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from mvkt import metrics  # noqa: E402

_DPI = 130


def _save(fig: plt.Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False / true positive rates at every distinct score, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    cut_ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    tp = np.cumsum(sorted_labels)[cut_ends]
    fp = (cut_ends + 1) - tp
    num_pos = sorted_labels.sum()
    num_neg = labels.size - num_pos
    return np.r_[0.0, fp / num_neg], np.r_[0.0, tp / num_pos]


def plot_roc_curves(
    path: str | os.PathLike,
    *,
    y_true: Any,
    scores: Mapping[str, Any],
    label_names: Sequence[str],
    title: str = "ROC curves per class",
) -> str:
    """One subplot per class with the ROC curve of every model in ``scores``.

    ``scores`` maps a model name (e.g. "teacher (12 leads)", "BCE (lead I)", "MVKT (lead I)")
    to its (N, C) scores on the same records. The legend gives each model's AUC; a class
    without positives or negatives has no ROC curve and says so in its panel.
    """
    y = np.asarray(y_true).astype(bool)
    names = list(label_names)
    if y.ndim != 2 or y.shape[1] != len(names):
        raise ValueError(f"y_true shape {y.shape} does not match {len(names)} label_names")
    if not scores:
        raise ValueError("scores is empty")
    aucs = {model: metrics.per_class_auc(y_true=y, y_score=s, label_names=names) for model, s in scores.items()}
    num_cols = min(len(names), 3)
    num_rows = math.ceil(len(names) / num_cols)
    # constrained layout makes room for the figure legend under the panels.
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(4.2 * num_cols, 5.0 * num_rows), squeeze=False,
                             layout="constrained")
    colours = {model: f"C{i}" for i, model in enumerate(scores)}
    handles = {}
    for c, name in enumerate(names):
        ax = axes[c // num_cols][c % num_cols]
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        num_pos = int(y[:, c].sum())
        panel_title = f"{name} (n+ = {num_pos} / {len(y)})"
        if 0 < num_pos < len(y):
            # Earlier models on top and a little wider: a perfect teacher (AUC 1) runs along the
            # frame, where a thin line underneath the others would be lost.
            for k, (model, s) in enumerate(scores.items()):
                fpr, tpr = _roc_points(y[:, c], np.asarray(s, dtype=np.float64)[:, c])
                (handles[model],) = ax.plot(fpr, tpr, linewidth=2.4 - 0.4 * min(k, 2), color=colours[model],
                                            zorder=10 - k)
            # AUCs in the title, models in one legend under the figure: legends inside the
            # panels covered the curves.
            panel_title += "\nAUC " + " | ".join(f"{aucs[m].per_class_auc[name]:.3f}" for m in scores)
        else:
            ax.text(0.5, 0.5, "no AUC:\nno positives or no negatives", ha="center", va="center",
                    transform=ax.transAxes, color="firebrick")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    for k in range(len(names), num_rows * num_cols):
        axes[k // num_cols][k % num_cols].axis("off")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4),
                   fontsize=9, frameon=False)
    fig.suptitle(title + "\n(panel AUCs in the order of the legend; dashed: chance)")
    return _save(fig, path)


def plot_auc_gain(
    path: str | os.PathLike,
    *,
    per_class_auc_a: Mapping[str, float | None],
    per_class_auc_b: Mapping[str, float | None],
    label_names: Sequence[str],
    name_a: str,
    name_b: str,
    title: str | None = None,
) -> str:
    """Bars of AUC(b) - AUC(a) per class (green = b better, red = b worse).

    Classes without an AUC in either run (None, as reported by `metrics.per_class_auc`)
    are shown as "n/a" rather than as a zero-height bar.
    """
    names = list(label_names)
    gains = []
    for name in names:
        a, b = per_class_auc_a.get(name), per_class_auc_b.get(name)
        gains.append(None if a is None or b is None else float(b) - float(a))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 2.0), 4.0))
    positions = np.arange(len(names))
    heights = [0.0 if g is None else g for g in gains]
    colours = ["0.8" if g is None else ("seagreen" if g >= 0 else "firebrick") for g in gains]
    ax.bar(positions, heights, color=colours)
    valid = [g for g in gains if g is not None]
    lowest, highest = min(valid + [0.0]), max(valid + [0.0])
    span = max(highest - lowest, 0.01)
    for x, g in zip(positions, gains):
        text = "n/a" if g is None else f"{g:+.3f}"
        y_text = 0.0 if g is None else g
        ax.text(x, y_text + (0.03 * span if y_text >= 0 else -0.03 * span), text, ha="center",
                va="bottom" if y_text >= 0 else "top", fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylim(lowest - 0.2 * span, highest + 0.2 * span)
    ax.set_ylabel(f"AUC gain ({name_b} − {name_a})")
    ax.set_xlabel("Class")
    mean_gain = f"\n(mean over {len(valid)} classes with an AUC: {np.mean(valid):+.3f})" if valid else ""
    ax.set_title(title or f"Per-class AUC gain of {name_b} over {name_a}{mean_gain}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


_LOSS_KEYS = ("loss", "loss_bce", "loss_mkd", "loss_clt")


def plot_training_curves(
    path: str | os.PathLike, *, metrics_rows: Sequence[Mapping[str, Any]], title: str = "Training curves"
) -> str:
    """Loss terms vs step (left), validation macro-AUC vs epoch (right).

    ``metrics_rows`` are the rows of a ``metrics.jsonl``; any key may be missing on any
    row (train rows have losses, eval rows have ``val_macro_auc``). Besides the known
    loss terms, any other numeric ``loss_*`` key is plotted too. The learning rate, when
    present, gets a panel of its own; epochs are ticked as integers.
    """
    rows = list(metrics_rows)
    loss_keys = list(_LOSS_KEYS) + sorted(
        {k for r in rows for k in r if k.startswith("loss_") and k not in _LOSS_KEYS}
    )

    def series(key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(r[x_key], r[key]) for r in rows
                 if r.get(x_key) is not None and r.get(key) is not None and math.isfinite(float(r[key]))]
        if not pairs:
            return np.empty(0), np.empty(0)
        xs, ys = zip(*sorted(pairs))
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    # One panel per loss term: on a shared axis a CLT term near 16 flattens a BCE term near 0.3.
    # The learning rate gets a panel of its own (overlaid, its line hid the loss).
    loss_series = {key: series(key, "step") for key in loss_keys}
    present = [key for key, (steps, _) in loss_series.items() if steps.size]
    lr_steps, lr = series("learning_rate", "step")
    panels = max(len(present), 1) + bool(lr_steps.size) + 1
    num_cols = min(panels, 3)
    num_rows = math.ceil(panels / num_cols)
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(4.6 * num_cols, 3.6 * num_rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, present):
        steps, values = loss_series[key]
        ax.plot(steps, values, linewidth=1.4, color="black" if key == "loss" else "tab:blue")
        ax.set_title("total loss" if key == "loss" else f"{key[5:].upper()} term ({key})", fontsize=10)
        ax.set_xlabel("Step")
        ax.grid(alpha=0.3)
    if not present:
        flat[0].text(0.5, 0.5, "no loss values logged", ha="center", va="center", transform=flat[0].transAxes)
    if lr_steps.size:
        ax_lr = flat[panels - 2]
        ax_lr.plot(lr_steps, lr, color="tab:gray", linewidth=1.2)
        ax_lr.set_title("Learning rate", fontsize=10)
        ax_lr.set_xlabel("Step")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax_lr.grid(alpha=0.3)

    ax_auc = flat[panels - 1]
    epochs, auc = series("val_macro_auc", "epoch")
    if epochs.size:
        ax_auc.plot(epochs, auc, marker="o", markersize=3, color="tab:blue", label="val macro-AUC")
        best = int(np.argmax(auc))
        ax_auc.scatter([epochs[best]], [auc[best]], s=90, facecolors="none", edgecolors="firebrick",
                       zorder=3, label=f"best {auc[best]:.4f} (epoch {epochs[best]:g})")
        ax_auc.legend(loc="lower right", fontsize=8)
    else:
        ax_auc.text(0.5, 0.5, "no validation AUC logged", ha="center", va="center", transform=ax_auc.transAxes)
    ax_auc.set_xlabel("Epoch")
    ax_auc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no epoch 2.5
    ax_auc.set_title("Validation macro-AUC", fontsize=10)
    ax_auc.grid(alpha=0.3)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _error_bars(values: Sequence[float], cis: Sequence[Sequence[float]] | None) -> np.ndarray | None:
    if cis is None:
        return None
    cis_arr = np.asarray(cis, dtype=float)
    values_arr = np.asarray(values, dtype=float)
    if cis_arr.shape != (len(values_arr), 2):
        raise ValueError(f"CIs must be (n, 2) [lower, upper], got shape {cis_arr.shape}")
    if np.any(cis_arr[:, 0] > values_arr + 1e-12) or np.any(cis_arr[:, 1] < values_arr - 1e-12):
        raise ValueError("every CI must contain its point estimate")
    return np.stack([values_arr - cis_arr[:, 0], cis_arr[:, 1] - values_arr])


def plot_lead_sweep(
    path: str | os.PathLike,
    *,
    leads: Sequence[str],
    auc_baseline: Sequence[float],
    auc_method: Sequence[float],
    ci_baseline: Sequence[Sequence[float]] | None = None,
    ci_method: Sequence[Sequence[float]] | None = None,
    teacher_auc: float | None = None,
    name_baseline: str = "BCE baseline",
    name_method: str = "MVKT",
    title: str = "Single-lead students: test macro-AUC per lead",
) -> str:
    """Grouped bars (with optional 95% CI whiskers) of baseline vs method per input lead.

    The gain (method - baseline) is written above each pair; the 12-lead teacher's AUC,
    if given, is a dashed horizontal line. The y axis starts near the data, not at 0, and
    says so, so small gains stay visible without being mistaken for large ones.
    """
    leads = list(leads)
    base = np.asarray(auc_baseline, dtype=float)
    method = np.asarray(auc_method, dtype=float)
    if base.shape != (len(leads),) or method.shape != (len(leads),):
        raise ValueError("auc_baseline and auc_method need one value per lead")
    err_base = _error_bars(base, ci_baseline)
    err_method = _error_bars(method, ci_method)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(leads) + 2.5), 4.5))
    positions = np.arange(len(leads))
    width = 0.38
    ax.bar(positions - width / 2, base, width, yerr=err_base, capsize=3, color="tab:gray", label=name_baseline)
    ax.bar(positions + width / 2, method, width, yerr=err_method, capsize=3, color="tab:blue", label=name_method)
    tops = [np.max([base, method], axis=0)]
    if err_method is not None:
        tops.append(method + err_method[1])
    if err_base is not None:
        tops.append(base + err_base[1])
    top = np.max(tops, axis=0)
    lows = [base.min(), method.min()]
    if err_base is not None:
        lows.append((base - err_base[0]).min())
    if err_method is not None:
        lows.append((method - err_method[0]).min())
    if teacher_auc is not None:
        ax.axhline(teacher_auc, color="firebrick", linestyle="--", linewidth=1.2,
                   label=f"12-lead teacher ({teacher_auc:.3f})")
        lows.append(teacher_auc)
    low = max(0.0, min(lows) - 0.03)
    if low < 0.55:
        # Bars near or below chance: draw chance, so "below 0.5" is seen as worse than guessing.
        low = min(low, 0.45)
        ax.axhline(0.5, color="0.35", linestyle=":", linewidth=1.2, label="chance (0.5)")
    span = max(top.max(), teacher_auc or 0.0) - low
    # Gain labels sit above the whiskers; the top limit leaves them a line of room inside the axes.
    for x, gain, height in zip(positions, method - base, top):
        ax.text(x, height + 0.02 * span, f"{gain:+.3f}", ha="center", va="bottom", fontsize=8,
                color="seagreen" if gain >= 0 else "firebrick", zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0})
    high = max(top.max() + 0.12 * span, (teacher_auc or 0.0) + 0.05 * span)
    ax.set_ylim(low, high)
    ax.set_xticks(positions, leads)
    ax.set_xlabel("Input lead of the student")
    ax.set_ylabel("Test macro-AUC" + (f" (axis starts at {low:.2f})" if low > 0 else ""))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    # below the axes: inside, it would hide bars or the teacher line
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def plot_ablation(
    path: str | os.PathLike,
    *,
    methods: Sequence[str],
    aucs: Sequence[float],
    cis: Sequence[Sequence[float]],
    reference: str | None = None,
    xlabel: str = "Test macro-AUC (95% bootstrap CI)",
    title: str = "Ablation",
) -> str:
    """Horizontal point-and-interval plot, one row per method, first method on top.

    ``reference`` names a method whose point estimate is drawn as a vertical line (e.g.
    the BCE baseline), so overlaps with its value are easy to read.
    """
    methods = list(methods)
    values = np.asarray(aucs, dtype=float)
    if values.shape != (len(methods),):
        raise ValueError("need one AUC per method")
    err = _error_bars(values, cis)
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(methods) + 1.6))
    rows = np.arange(len(methods))[::-1]
    ax.errorbar(values, rows, xerr=err, fmt="o", color="tab:blue", ecolor="tab:blue", capsize=4,
                label="point estimate and CI")
    cis_arr = np.asarray(cis, dtype=float)
    for row, value, (lo, hi) in zip(rows, values, cis_arr):
        ax.text(hi, row + 0.18, f" {value:.3f} [{lo:.3f}, {hi:.3f}]", va="bottom", ha="right", fontsize=7)
    if reference is not None:
        if reference not in methods:
            raise ValueError(f"reference {reference!r} is not one of the methods")
        ax.axvline(values[methods.index(reference)], color="0.5", linestyle="--", linewidth=1,
                   label=f"{reference} point estimate")
    ax.set_yticks(rows, methods)
    span = cis_arr[:, 1].max() - cis_arr[:, 0].min()
    ax.set_xlim(cis_arr[:, 0].min() - 0.1 * span, cis_arr[:, 1].max() + 0.1 * span)
    ax.set_ylim(-0.7, len(methods) - 0.3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55 / (0.45 * len(methods) + 1.6) - 0.12),
              ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness_snr(
    path: str | os.PathLike,
    *,
    panels: Mapping[str, Mapping[str, Mapping[str, Any]]],
    title: str = "Macro-AUC under noise",
) -> str:
    """One panel per noise type: macro-AUC against SNR (high SNR, little noise, on the left),
    one line per model with its 95% CI band, and the model's clean score as a dotted line.

    ``panels``: {panel title: {model: {"snr": [...], "auc": [...], "ci": [[lo, hi], ...],
    "clean": float}}}.
    """
    titles = list(panels)
    fig, axes = plt.subplots(1, len(titles), figsize=(3.6 * len(titles), 3.6), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(m for t in titles for m in panels[t]))
    for ax, panel in zip(axes[0], titles):
        for k, model in enumerate(models):
            line = panels[panel].get(model)
            if line is None:
                continue
            color = colors[k % len(colors)]
            snr = np.asarray(line["snr"], float)
            order = np.argsort(-snr)
            auc = np.asarray(line["auc"], float)[order]
            ci = np.asarray(line["ci"], float)[order]
            ax.plot(snr[order], auc, "o-", color=color, label=model, markersize=3.5)
            ax.fill_between(snr[order], ci[:, 0], ci[:, 1], color=color, alpha=0.15, linewidth=0)
            ax.axhline(line["clean"], color=color, linestyle=":", linewidth=1)
        ax.invert_xaxis()
        ax.set_xlabel("SNR (dB)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("macro-AUC (dotted: clean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(models), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.04 * math.ceil(len(models) / 4)))
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
