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

import csv
import dataclasses
import json
import math
import pathlib
import warnings
from typing import Any, Sequence

import numpy as np
from absl import logging

from mvkt import bootstrap
from mvkt import data as data_lib
from mvkt import distributed
from mvkt import inference
from mvkt import metrics as metrics_lib
from mvkt import parallel as parallel_lib
from mvkt import run_dir

SCORES_FILE = "scores_{split}.npz"
EVAL_FILE = "eval_{split}.json"
EXTERNAL_SPLIT = "external_{name}"  # scores_external_<name>.npz, eval_external_<name>.json


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
    y_val = metrics_lib._as_labels(val[0])
    s_val = metrics_lib._as_scores(val[1], like=y_val, name="val scores")
    y_test = metrics_lib._as_labels(test[0])
    s_test = metrics_lib._as_scores(test[1], like=y_test, name="test scores")
    if y_val.shape[1] != len(names) or y_test.shape[1] != len(names):
        raise ValueError(f"{len(names)} label_names but val has {y_val.shape[1]} and test {y_test.shape[1]} classes")

    # Decisions first, from validation only.
    thresholds = metrics_lib.choose_thresholds(y_true_val=y_val, y_score_val=s_val)
    global_threshold = metrics_lib.fmax_threshold(y_true_val=y_val, y_score_val=s_val)

    auc = metrics_lib.per_class_auc(y_true=y_test, y_score=s_test, label_names=names)
    if auc.excluded_classes:
        warnings.warn(
            f"test macro AUC excludes classes without positives or negatives: {auc.excluded_classes}",
            stacklevel=2,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # same exclusion, already reported by name
        ci = bootstrap.bootstrap_ci(y_true=y_test, y_score=s_test, metric_fn=metrics_lib.macro_auc, n_resamples=n_resamples,
                          alpha=alpha, seed=seed)
    val_auc = metrics_lib.per_class_auc(y_true=y_val, y_score=s_val, label_names=names)
    pred = metrics_lib.apply_thresholds(y_score=s_test, thresholds=thresholds)
    f1 = metrics_lib.f1_scores(y_true=y_test, y_pred=pred)
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
        "fmax": metrics_lib.fmax_at(y_true=y_test, y_score=s_test, threshold=global_threshold),
        "fmax_threshold": global_threshold,
        "num_val_records": int(y_val.shape[0]),
        "num_test_records": int(y_test.shape[0]),
    }
    if challenge:
        forced = metrics_lib.apply_thresholds(y_score=s_test, thresholds=thresholds, ensure_one_positive=True)
        scores = metrics_lib.challenge_scores(y_true=y_test, y_pred=forced, beta=2.0)
        result["challenge_f_beta2"] = scores["f_beta"]
        result["challenge_g_beta2"] = scores["g_beta"]
    return result



@dataclasses.dataclass(frozen=True)
class Scorer:
    """A trained run loaded once per evaluation."""

    variables: Any
    forward: Any
    info: dict
    meta: dict
    window: int
    stride: int
    aggregate: str
    batch_size: int
    parallel: parallel_lib.Parallelism

    @classmethod
    def load(cls, workdir, *, which: str, aggregate: str | None, parallel: parallel_lib.Parallelism) -> "Scorer":
        model, variables, run_config, info, meta = run_dir.load_trained_model(workdir, which=which, parallel=parallel)
        prep = inference.Preprocessing.of_run(workdir)
        return cls(
            variables=variables,
            forward=inference.make_forward_fn(model, data_lib.lead_indices(info["leads"]), parallel),
            info=info,
            meta=meta,
            window=prep.window,
            stride=prep.stride,
            aggregate=aggregate or prep.aggregate,
            batch_size=int(run_config.eval.batch_size),
            parallel=parallel,
        )

    def scores(self, split) -> np.ndarray:
        return inference.predict_records(
            self.forward, self.variables, split, window=self.window, stride=self.stride,
            batch_size=self.batch_size, parallel=self.parallel, aggregate=self.aggregate,
        )


def read_label_map(path: str | pathlib.Path, *, source_labels: Sequence[str], run_labels: Sequence[str]) -> dict:
    """``source_label,target_label`` CSV (many-to-one) -> {source: target}, checked against both label sets."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"source_label", "target_label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns source_label,target_label (got {reader.fieldnames})")
        pairs = [(row["source_label"].strip(), row["target_label"].strip()) for row in reader]
    mapping: dict[str, str] = {}
    for source, target in pairs:
        if source in mapping and mapping[source] != target:
            raise ValueError(f"{path}: {source} maps to both {mapping[source]} and {target}")
        mapping[source] = target
    # Row numbers count the header as row 1, as a spreadsheet shows them.
    bad = [f"row {i} {s} -> {t}" for i, (s, t) in enumerate(pairs, start=2) if t not in run_labels]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)}: not a label of the run ({list(run_labels)})")
    unknown = sorted({s for s in mapping if s not in source_labels})
    present = {s: t for s, t in mapping.items() if s in source_labels}
    if not present:
        raise ValueError(f"{path}: none of its source labels {sorted(mapping)} occurs in the shards "
                         f"({list(source_labels)})")
    if unknown:  # a typo would silently drop a class; a label absent from these shards is fine
        logging.warning("%s: source label(s) %s do not occur in the shards (%s); their rows are unused",
                        path, unknown, list(source_labels))
    return present


def _mapped_labels(y: np.ndarray, source_labels: Sequence[str], mapping: dict, run_labels: Sequence[str]) -> np.ndarray:
    """(N, C_source) -> (N, C_run): a run class is positive when any source label mapped onto it is."""
    out = np.zeros((len(y), len(run_labels)), np.uint8)
    for k, source in enumerate(source_labels):
        if source in mapping:
            out[:, list(run_labels).index(mapping[source])] |= y[:, k].astype(np.uint8)
    return out


def _save_scores(path: pathlib.Path, *, scores, y, record_ids, label_names) -> None:
    distributed.write_file(
        path,
        lambda f: np.savez(f, scores=scores, y=y, record_ids=record_ids, label_names=np.asarray(label_names)),
    )


def score_split(
    workdir: str | pathlib.Path,
    split: str,
    *,
    which: str = "best",
    aggregate: str | None = None,
    parallel: parallel_lib.Parallelism | None = None,
    scorer: Scorer | None = None,
    save: bool = True,
) -> dict:
    """Per-record sigmoid scores of a trained run on one split of its own shards (saved to
    ``scores_<split>.npz`` unless ``save=False``)."""
    workdir = pathlib.Path(workdir)
    parallel = parallel or parallel_lib.make_parallelism()
    scorer = scorer or Scorer.load(workdir, which=which, aggregate=aggregate, parallel=parallel)
    info = scorer.info
    data = data_lib.open_split(info["data_dir"], split, folds=info.get("folds"))
    if list(data.label_names) != list(info["label_names"]):
        raise ValueError(
            f"{workdir} was trained on labels {info['label_names']}, the {split} split of {info['data_dir']} "
            f"has {data.label_names}"
        )
    scores = scorer.scores(data_lib.as_run_data(data, info))
    result = {
        "scores": scores,
        "y": np.asarray(data.y),
        "record_ids": np.asarray(data.record_ids),
        "label_names": list(data.label_names),
        "checkpoint_step": int(scorer.meta["step"]),
        "checkpoint_val_macro_auc": scorer.meta.get("val_macro_auc"),
        "window": scorer.window,
        "stride": scorer.stride,
        "aggregate": scorer.aggregate,
        "dataset": data.manifest.get("dataset"),
    }
    if save:
        _save_scores(workdir / SCORES_FILE.format(split=split), scores=scores, y=result["y"],
                     record_ids=result["record_ids"], label_names=result["label_names"])
    return result


def score_only(workdir: str | pathlib.Path, split: str = "test", *,
               parallel: parallel_lib.Parallelism | None = None) -> dict:
    """Only the best checkpoint's scores on ``split`` (``scores_<split>.npz``), no metrics:
    for studies that pool scores over splits too small for metrics of their own."""
    workdir = pathlib.Path(workdir).absolute()
    with run_dir.writer(workdir):
        result = score_split(workdir, split, parallel=parallel)
    distributed.barrier(f"scored:{workdir}:{split}")
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
    label_map: str | None = None,
    name: str | None = None,
    parallel: parallel_lib.Parallelism | None = None,
) -> dict:
    """All metrics of one run with thresholds from the run's validation split.

    In-domain (``data_dir`` None or the run's own shards): ``split`` of the run's shards,
    written to ``eval_<split>.json``, ``scores_<split>.npz`` and, for the best checkpoint,
    ``thresholds.json``. External (other shards): every record of ``data_dir``, its labels
    mapped onto the run's with ``label_map`` (or identical label sets), its scaler undone
    and the run's applied; written to ``eval_external_<name>.json`` and
    ``scores_external_<name>.npz`` only.

    The run folder is locked while its files are written. A run that stopped before its
    last step is evaluated, but marked (``run_finished``, ``trained_steps`` in the JSON,
    a warning in ``format_table``).
    """
    workdir = pathlib.Path(workdir).absolute()
    parallel = parallel or parallel_lib.make_parallelism()
    info = run_dir.load_info(workdir)
    external = data_dir is not None and pathlib.Path(data_dir).absolute() != pathlib.Path(info["data_dir"])
    if external and not name:
        raise ValueError("evaluating on other shards needs --name=NAME (writes eval_external_NAME.json; the "
                         "run's own eval_<split>.json and scores stay untouched)")
    if label_map and not external:
        raise ValueError("--label_map is for other shards: give --data_dir=OTHER_SHARDS and --name=NAME")
    with run_dir.writer(workdir):
        scorer = Scorer.load(workdir, which=which, aggregate=aggregate, parallel=parallel)
        if external:
            return _evaluate_external(workdir, scorer, data_dir=data_dir, label_map=label_map, name=name,
                                      n_resamples=n_resamples, seed=seed, which=which)
        return _evaluate_run(workdir, scorer, split=split, n_resamples=n_resamples, seed=seed, which=which)


def _run_status(workdir: pathlib.Path, scorer: Scorer, which: str) -> dict:
    status = run_dir.training_status(workdir)
    if not status["run_finished"]:
        logging.warning("%s is an unfinished run (%d of %s steps trained); its evaluation is marked so",
                        workdir, status["trained_steps"], status["total_steps"])
    return {
        "workdir": str(workdir),
        **status,
        "method": scorer.info["method"],
        "leads": scorer.info["leads"],
        "checkpoint": which,
        "checkpoint_step": int(scorer.meta["step"]),
        "checkpoint_val_macro_auc": scorer.meta.get("val_macro_auc"),
        "window": scorer.window,
        "stride": scorer.stride,
        "aggregate": scorer.aggregate,
    }


def _evaluate_run(workdir: pathlib.Path, scorer: Scorer, *, split: str, n_resamples: int, seed: int,
                  which: str) -> dict:
    val = score_split(workdir, "val", scorer=scorer)
    target = val if split == "val" else score_split(workdir, split, scorer=scorer)
    result = evaluate_scores(
        label_names=target["label_names"],
        val=(val["y"], val["scores"]),
        test=(target["y"], target["scores"]),
        n_resamples=n_resamples,
        seed=seed,
        challenge=target["dataset"] == "cpsc2018",
    )
    result.update({"split": split, **_run_status(workdir, scorer, which)})
    distributed.write_text(workdir / EVAL_FILE.format(split=split), json.dumps(result, indent=2))
    if which == "best":  # what predictions use: the decision thresholds of the best checkpoint
        names = list(target["label_names"])
        thresholds = [np.inf if result["thresholds"][n] is None else result["thresholds"][n] for n in names]
        distributed.write_text(workdir / inference.THRESHOLDS_FILE, json.dumps({
            "per_class": result["thresholds"],
            "fmax_threshold": result["fmax_threshold"],
            "chosen_on": f"validation split of {scorer.info['data_dir']} (F1 per class; Fmax for fmax_threshold)",
            "checkpoint_step": result["checkpoint_step"],
            # Decisions from these classes' thresholds are not to be trusted (predict says so).
            "caveats": metrics_lib.threshold_caveats(y_true_val=val["y"], thresholds=thresholds, label_names=names),
            "validation_positives": {n: int(k) for n, k in zip(names, np.asarray(val["y"]).sum(axis=0))},
        }, indent=2))
    distributed.barrier(f"evaluated:{workdir}:{split}")
    return result


def _evaluate_external(workdir: pathlib.Path, scorer: Scorer, *, data_dir: str, label_map: str | None,
                       name: str, n_resamples: int, seed: int, which: str) -> dict:
    info = scorer.info
    run_labels = list(info["label_names"])
    # Thresholds come from the run's own validation scores: cached by its in-domain
    # evaluation, else computed now (and not saved: the in-domain files stay as they are).
    val_path = workdir / SCORES_FILE.format(split="val")
    if val_path.exists():
        val = load_scores(workdir, "val")
    else:
        val = score_split(workdir, "val", scorer=scorer, save=False)
    splits = [data_lib.open_split(data_dir, s) for s in data_lib.SPLITS]
    splits = [s for s in splits if len(s)]
    source_labels = list(splits[0].label_names)
    if label_map:
        mapping = read_label_map(label_map, source_labels=source_labels, run_labels=run_labels)
    elif source_labels == run_labels:
        mapping = {name_: name_ for name_ in run_labels}
    else:
        raise ValueError(f"{data_dir} has labels {source_labels}, the run {run_labels}: give --label_map=FILE "
                         "(source_label,target_label rows; maps ship in data_prep/mappings/)")
    scores = np.concatenate([scorer.scores(data_lib.as_run_data(s, info)) for s in splits])
    y = np.concatenate([_mapped_labels(np.asarray(s.y), source_labels, mapping, run_labels) for s in splits])
    record_ids = np.concatenate([np.asarray(s.record_ids) for s in splits])
    covered = [k for k, label in enumerate(run_labels) if label in mapping.values()]
    excluded = [label for k, label in enumerate(run_labels) if k not in covered]
    if not any(0 < y[:, k].sum() < len(y) for k in covered):
        source = f"the label map {label_map}" if label_map else "the shared labels"
        raise ValueError(f"{data_dir}: no class that {source} gives ({[run_labels[k] for k in covered]}) has both "
                         f"positive and negative records among the {len(y)} scored: the macro-AUC is undefined")
    _save_scores(workdir / SCORES_FILE.format(split=EXTERNAL_SPLIT.format(name=name)), scores=scores, y=y,
                 record_ids=record_ids, label_names=run_labels)
    result = evaluate_scores(
        label_names=[run_labels[k] for k in covered],
        val=(np.asarray(val["y"])[:, covered], np.asarray(val["scores"])[:, covered]),
        test=(y[:, covered], scores[:, covered]),
        n_resamples=n_resamples,
        seed=seed,
    )
    # Fields named for what they count here: "test" is the external data, "val" the run's own
    # validation split (thresholds only), and classes are excluded for one of two reasons.
    result["num_external_records"] = result.pop("num_test_records")
    result["num_run_val_records"] = result.pop("num_val_records")
    result["run_val_macro_auc_on_scored_classes"] = result.pop("val_macro_auc")
    result.pop("val_excluded_classes", None)
    no_pos_neg = result.pop("excluded_classes")
    result["excluded_classes"] = (
        [{"class": c, "reason": "no source label maps onto it"} for c in excluded]
        + [{"class": c, "reason": "no positive or no negative among the external records"} for c in no_pos_neg])
    result["positives_per_class"] = {label: int(y[:, k].sum()) for k, label in enumerate(run_labels)
                                     if k in covered}
    result["notes"] = {
        "run_val_macro_auc_on_scored_classes": "the run's own validation macro-AUC over the classes scored here "
                                               "(the external data's classes), at the same checkpoint",
        "checkpoint_val_macro_auc": "the validation macro-AUC over all of the run's classes when the checkpoint "
                                    "was selected in training; the two differ when classes are excluded",
    }
    result.update({
        "split": EXTERNAL_SPLIT.format(name=name),
        "external": {
            "name": name,
            "data_dir": str(pathlib.Path(data_dir).absolute()),
            "dataset": splits[0].manifest.get("dataset"),
            "splits_used": [s.name for s in splits],
            "num_records": int(len(record_ids)),
            "label_map": str(pathlib.Path(label_map).absolute()) if label_map else None,
            "mapping": mapping,
            "run_classes_without_source": excluded,
            "standardization": "the shards' own scaler undone, the run's applied",
            "thresholds": "from the run's own validation split",
        },
        **_run_status(workdir, scorer, which),
    })
    distributed.write_text(workdir / EVAL_FILE.format(split=EXTERNAL_SPLIT.format(name=name)),
                           json.dumps(result, indent=2))
    distributed.barrier(f"evaluated:{workdir}:external:{name}")
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
    result = bootstrap.paired_bootstrap_pooled(
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
    external = result.get("external")
    if external:
        lines.append(
            f"  external data: {external['data_dir']} ({external['num_records']} records of {external['dataset']}, "
            f"splits {', '.join(external['splits_used'])}); thresholds from the run's own validation split"
        )
        for item in result.get("excluded_classes", []):
            if isinstance(item, dict):
                lines.append(f"  excluded class {item['class']}: {item['reason']}")
        if result.get("positives_per_class"):
            lines.append("  positives per class: " + ", ".join(f"{k} {v}" for k, v in result["positives_per_class"].items()))
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
