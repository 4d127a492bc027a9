"""Evaluation of trained runs with the PTB-XL benchmark protocol, and paired comparisons.

``evaluate_run`` restores the run's best checkpoint (selected on the validation
split during training), scores every record of the validation split and of the
requested split with sliding windows (window = training crop, stride = half a
window, aggregated by max), picks thresholds on validation only, and writes
``eval_<split>.json`` plus ``scores_<split>.npz`` (per-record scores, labels,
record ids) so that runs can later be compared record by record.

``compare_runs`` is the paired bootstrap between two sets of runs (e.g. BCE
student vs MVKT student), pooled over seeds, on the same records.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np
from absl import logging

from mvkt import data as data_lib
from mvkt import distributed
from mvkt import metrics as metrics_lib
from mvkt import parallel as parallel_lib
from mvkt import run_dir
from mvkt import train as train_lib

SCORES_FILE = "scores_{split}.npz"
EVAL_FILE = "eval_{split}.json"


def score_split(
    workdir: str | pathlib.Path,
    split: str,
    *,
    which: str = "best",
    aggregate: str | None = None,
    data_dir: str | None = None,
    parallel: parallel_lib.Parallelism | None = None,
) -> dict:
    """Per-record sigmoid scores of a trained run on one split (also saved to ``scores_<split>.npz``)."""
    workdir = pathlib.Path(workdir)
    parallel = parallel or parallel_lib.make_parallelism()
    model, variables, run_config, info, meta = train_lib.load_trained_model(
        workdir, which=which, parallel=parallel
    )
    data = data_lib.open_split(data_dir or info["data_dir"], split)
    if list(data.label_names) != list(info["label_names"]):
        raise ValueError(
            f"{workdir} was trained on labels {info['label_names']}, the {split} split has {data.label_names}"
        )
    forward = train_lib.make_forward_fn(model, data_lib.lead_indices(info["leads"]), parallel)
    window = int(info["crop_length"])
    stride = max(int(window * run_config.data.eval_stride_fraction), 1)
    aggregate = aggregate or run_config.eval.aggregate
    batch_size = int(run_config.eval.batch_size)
    scores = train_lib.predict_records(
        forward,
        variables,
        data,
        window=window,
        stride=stride,
        batch_size=batch_size,
        parallel=parallel,
        aggregate=aggregate,
    )
    result = {
        "scores": scores,
        "y": np.asarray(data.y),
        "record_ids": np.asarray(data.record_ids),
        "label_names": list(data.label_names),
        "checkpoint_step": int(meta["step"]),
        "checkpoint_val_macro_auc": meta.get("val_macro_auc"),
        "window": window,
        "stride": stride,
        "aggregate": aggregate,
        "dataset": data.manifest.get("dataset"),
    }
    distributed.write_file(
        workdir / SCORES_FILE.format(split=split),
        lambda f: np.savez(
            f,
            scores=scores,
            y=result["y"],
            record_ids=result["record_ids"],
            label_names=np.asarray(result["label_names"]),
        ),
    )
    return result


def evaluate_run(
    workdir: str | pathlib.Path,
    *,
    split: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
    which: str = "best",
    aggregate: str | None = None,
    data_dir: str | None = None,
    parallel: parallel_lib.Parallelism | None = None,
) -> dict:
    """All metrics of one run on ``split`` with thresholds from the validation split.

    The run folder is locked while its files are written. A run that stopped before its
    last step is evaluated, but marked (``run_finished``, ``trained_steps`` in the JSON,
    a warning in ``format_table``).
    """
    workdir = pathlib.Path(workdir).absolute()
    parallel = parallel or parallel_lib.make_parallelism()
    with run_dir.writer(workdir):
        return _evaluate_run(workdir, split=split, n_resamples=n_resamples, seed=seed, which=which,
                             aggregate=aggregate, data_dir=data_dir, parallel=parallel)


def _evaluate_run(workdir: pathlib.Path, *, split: str, n_resamples: int, seed: int, which: str,
                  aggregate: str | None, data_dir: str | None, parallel: parallel_lib.Parallelism) -> dict:
    finished = run_dir.is_finished(workdir)
    done, total = run_dir.trained_steps(workdir)
    if not finished:
        logging.warning("%s is an unfinished run (%d of %s steps trained); its evaluation is marked so",
                        workdir, done, total)
    val = score_split(workdir, "val", which=which, aggregate=aggregate, data_dir=data_dir, parallel=parallel)
    target = (
        val
        if split == "val"
        else score_split(
            workdir, split, which=which, aggregate=aggregate, data_dir=data_dir, parallel=parallel
        )
    )
    result = metrics_lib.evaluate_scores(
        label_names=target["label_names"],
        val=(val["y"], val["scores"]),
        test=(target["y"], target["scores"]),
        n_resamples=n_resamples,
        seed=seed,
        challenge=target["dataset"] == "cpsc2018",
    )
    info = run_dir.load_info(workdir)
    result.update(
        {
            "split": split,
            "workdir": str(workdir),
            "run_finished": finished,
            "trained_steps": done,
            "total_steps": total,
            "method": info["method"],
            "leads": info["leads"],
            "checkpoint": which,
            "checkpoint_step": target["checkpoint_step"],
            "checkpoint_val_macro_auc": target["checkpoint_val_macro_auc"],
            "window": target["window"],
            "stride": target["stride"],
            "aggregate": target["aggregate"],
        }
    )
    distributed.write_text(workdir / EVAL_FILE.format(split=split), json.dumps(result, indent=2))
    distributed.barrier(f"evaluated:{workdir.absolute()}:{split}")
    return result


def load_scores(workdir: str | pathlib.Path, split: str = "test") -> dict:
    path = pathlib.Path(workdir) / SCORES_FILE.format(split=split)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `python -m experiments.evaluate "
            f"--workdir={workdir} --split={split}` first"
        )
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def compare_runs(
    runs_a: Sequence[str | pathlib.Path],
    runs_b: Sequence[str | pathlib.Path],
    *,
    split: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of macro-AUC(b) - macro-AUC(a), pooled over paired seeds.

    ``runs_a[i]`` and ``runs_b[i]`` are paired (same seed); every run must have been
    scored on the same records in the same order.
    """
    if len(runs_a) != len(runs_b) or not runs_a:
        raise ValueError(
            f"need the same non-zero number of runs on both sides, got {len(runs_a)} and {len(runs_b)}"
        )
    loaded_a = [load_scores(r, split) for r in runs_a]
    loaded_b = [load_scores(r, split) for r in runs_b]
    reference = loaded_a[0]
    for run, loaded in zip(list(runs_a) + list(runs_b), loaded_a + loaded_b):
        if not np.array_equal(loaded["record_ids"], reference["record_ids"]):
            raise ValueError(f"{run} was scored on different records than {runs_a[0]}")
    result = metrics_lib.paired_bootstrap_pooled(
        y_true=reference["y"],
        scores_a=[s["scores"] for s in loaded_a],
        scores_b=[s["scores"] for s in loaded_b],
        metric_fn=metrics_lib.macro_auc,
        n_resamples=n_resamples,
        seed=seed,
    )
    return {
        "difference": result.difference,
        "ci": [result.lower, result.upper],
        "p_value": result.p_value,
        "n_resamples": result.n_resamples,
        "num_seeds": len(runs_a),
        "split": split,
    }


def format_table(result: dict) -> str:
    """A short human-readable table of one evaluation."""
    lo, hi = result["macro_auc_ci"]
    lines = [
        f"{result['workdir']} ({result['method']}, leads {','.join(result['leads'])}, "
        f"{result['split']} split, checkpoint step {result['checkpoint_step']})",
    ]
    if result.get("run_finished") is False:
        lines.append(
            f"  WARNING: unfinished run ({result['trained_steps']} of {result['total_steps']} steps trained): "
            "these numbers are not those of the configured training"
        )
    lines += [
        f"  macro-AUC  {result['macro_auc']:.4f}  [{lo:.4f}, {hi:.4f}] ({result['n_resamples']} bootstrap resamples)",
        f"  F1 macro   {result['f1_macro']:.4f}   F1 samples {result['f1_samples']:.4f}   "
        f"Fmax {result['fmax']:.4f} (threshold {result['fmax_threshold']:.2f} from val)",
    ]
    if "challenge_f_beta2" in result:
        lines.append(
            f"  ICBEB F-beta2 {result['challenge_f_beta2']:.4f}  G-beta2 {result['challenge_g_beta2']:.4f}"
        )
    lines.append("  per class AUC:")
    for name, auc in result["per_class_auc"].items():
        lines.append(
            f"    {name:>10s}  {'excluded (no positives or negatives)' if auc is None else f'{auc:.4f}'}"
        )
    return "\n".join(lines)
