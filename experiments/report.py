"""Markdown reports with plots for studies (pipeline, ablation, lead sweep).

A reader should understand the result without opening JSON: every report states
the data and its size, the comparison table with CIs and paired differences, a
one-sentence verdict, per-class AUCs, plots, and the command that produced it.
The numbers behind every report are also written next to it as JSON.
"""

from __future__ import annotations

import datetime
import json
import pathlib

import numpy as np

from experiments import study
from mvkt import data as data_lib
from mvkt import evaluate as evaluate_lib
from mvkt import plots
from mvkt import run_dir

SMALL_TEST_SPLIT = 500


def data_section(workdir: pathlib.Path, *, records_scored: int | None = None) -> tuple[str, dict]:
    """The data lines of a report. ``records_scored``: how many records its numbers rest on, where
    that is not the shards' test split (cross-validation scores every record of its folds)."""
    info = run_dir.load_info(workdir)
    manifest = data_lib.load_manifest(info["data_dir"])
    splits = manifest["splits"]
    lines = [
        f"- data: `{info['data_dir']}` ({manifest.get('dataset')}, task `{manifest.get('task')}`, "
        f"{manifest['sampling_rate']} Hz, source `{manifest.get('source')}`)",
        "- records: "
        + ", ".join(f"{name} {splits[name]['num_records']}" for name in ("train", "val", "test"))
        + ("" if records_scored is None else
           f" (the shards' split; the folds below re-split them and score {records_scored} records once per seed)"),
        f"- labels: {', '.join(manifest['label_names'])}",
    ]
    num_scored = int(splits["test"]["num_records"]) if records_scored is None else records_scored
    if num_scored < SMALL_TEST_SPLIT:
        what = "test records" if records_scored is None else "records scored"
        lines.append(
            f"\n> **Warning: only {num_scored} {what}.** Numbers this small give no meaningful "
            "accuracy estimate (CIs are wide, classes may be missing); this run shows that the "
            "pipeline works end to end, nothing more. Use the full PTB-XL (`--ptbxl_dir`) for results."
        )
    return "\n".join(lines), manifest


def per_class_table(groups: dict[str, list[pathlib.Path]], label_names: list[str]) -> tuple[str, dict]:
    """Mean over seeds of each class's test AUC, per group."""
    means = {}
    for group, dirs in groups.items():
        per_class = [json.loads((d / "eval_test.json").read_text())["per_class_auc"] for d in dirs]
        means[group] = {
            name: (
                float(np.mean([p[name] for p in per_class]))
                if all(p[name] is not None for p in per_class)
                else None
            )
            for name in label_names
        }
    lines = ["| class | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for name in label_names:
        cells = ["excluded" if means[g][name] is None else f"{means[g][name]:.4f}" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), means


def verdict(row: dict, *, method: str, baseline: str) -> str:
    d = row["vs_baseline"]
    lo, hi = d["ci"]
    if lo > 0:
        return (
            f"{method} beats {baseline} by {d['difference']:+.4f} macro-AUC; the paired 95% CI "
            f"[{lo:+.4f}, {hi:+.4f}] lies above 0."
        )
    if hi < 0:
        return (
            f"{method} is worse than {baseline} by {d['difference']:+.4f} macro-AUC; the paired 95% CI "
            f"[{lo:+.4f}, {hi:+.4f}] lies below 0."
        )
    return (
        f"No significant difference between {method} and {baseline}: {d['difference']:+.4f} macro-AUC, "
        f"paired 95% CI [{lo:+.4f}, {hi:+.4f}] contains 0."
    )


def _plots(groups: dict[str, list[pathlib.Path]], study_dir: pathlib.Path, *, label_names: list[str],
           class_means: dict, baseline_group: str, method_group: str) -> list[str]:
    """The report's figures (ROC curves of the first seed, per-class AUC gain, training curves)
    as markdown image lines."""
    plot_dir = study_dir / "plots"
    seed0 = {g: dirs[0] for g, dirs in groups.items()}
    num_seeds = max(len(dirs) for dirs in groups.values())
    scores = {g: evaluate_lib.load_scores(d)["scores"] for g, d in seed0.items()}
    y_test = evaluate_lib.load_scores(seed0[baseline_group])["y"]
    roc = plots.plot_roc_curves(
        plot_dir / "roc_curves.png",
        y_true=y_test,
        scores=scores,
        label_names=label_names,
        title=(f"Test ROC curves per class, seed {_seed_of(seed0[baseline_group])}"
               + (f" only (of {num_seeds} seeds; the others are not drawn)" if num_seeds > 1 else "")),
    )
    gain = plots.plot_auc_gain(
        plot_dir / "auc_gain.png",
        per_class_auc_a=class_means[baseline_group],
        per_class_auc_b=class_means[method_group],
        label_names=label_names,
        name_a=baseline_group,
        name_b=method_group,
    )
    curve_lines = []
    for group, workdir in seed0.items():
        slug = "".join(c if c.isalnum() else "_" for c in group).strip("_").lower()
        png = plots.plot_training_curves(
            plot_dir / f"training_{slug}.png",
            metrics_rows=run_dir.metric_rows(workdir),
            title=f"Training curves: {group} ({workdir.name})",
        )
        curve_lines.append(f"![training curves {group}]({study.relative(png, study_dir)})")

    return [f"![ROC curves]({study.relative(roc, study_dir)})", "",
            f"![AUC gain per class]({study.relative(gain, study_dir)})", "", *curve_lines]


def write_comparison_report(
    study_dir: pathlib.Path,
    *,
    groups: dict[str, list[pathlib.Path]],
    teacher_group: str | None,
    baseline_group: str,
    method_group: str,
    n_resamples: int,
    title: str,
    command: str,
    extra_sections: list[str] | None = None,
) -> pathlib.Path:
    """``report.md`` + ``report.json`` + PNGs comparing groups of runs (each group = seeds)."""
    study_dir = pathlib.Path(study_dir)
    first_run = next(iter(groups.values()))[0]
    data_text, manifest = data_section(first_run)
    label_names = list(manifest["label_names"])

    rows = study.comparison_rows(groups, baseline=baseline_group, n_resamples=n_resamples)
    by_name = {r["method"]: r for r in rows}
    teacher_row = by_name.get(teacher_group) if teacher_group else None
    table = study.comparison_table(rows, baseline=baseline_group, teacher=teacher_row)
    class_table, class_means = per_class_table(groups, label_names)

    plot_lines = _plots(groups, study_dir, label_names=label_names, class_means=class_means,
                        baseline_group=baseline_group, method_group=method_group)
    lines = [
        f"# {title}",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by:",
        "",
        f"```\n{command}\n```",
        "",
        "## Data",
        data_text,
        "",
        "## Result",
        "",
        verdict(by_name[method_group], method=method_group, baseline=baseline_group),
        "",
        table,
        "",
        f"Test macro-AUC is averaged over seeds; its 95% CI and the paired differences are "
        f"bootstraps over the test records ({n_resamples} resamples, every class present in each "
        "resample, the same resamples for every seed). The best checkpoint of every run was chosen "
        "on the validation split; thresholds (F1, Fmax) also come from validation only.",
    ]
    if teacher_row is not None:
        lines += ["", "Share of the teacher gap closed = (method - baseline) / (teacher - baseline), given only "
                  "where the teacher beats the baseline with a paired 95% CI above 0."]
    lines += [
        "",
        "## Per-class test AUC (mean over seeds)",
        "",
        class_table,
        "",
        "## Plots",
        "",
        *plot_lines,
        "",
    ]
    lines += extra_sections or []
    lines += ["## Runs", "", "| group | run | eval |", "|---|---|---|"]
    for group, dirs in groups.items():
        for d in dirs:
            lines.append(
                f"| {group} | `{study.relative(d, study_dir)}` | "
                f"`{study.relative(d / 'eval_test.json', study_dir)}` |"
            )
    report = study_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    study.write_json(
        study_dir / "report.json",
        {
            "rows": rows,
            "per_class_auc": class_means,
            "groups": {g: [str(d) for d in ds] for g, ds in groups.items()},
        },
    )
    return report


def _seed_of(workdir: pathlib.Path) -> int:
    return int(run_dir.load_config(workdir).seed)
