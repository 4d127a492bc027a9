"""Noise-stress evaluation: trained runs scored on a split under real wearable corruptions.

    python -m experiments.robustness --workdir=RUN [--workdir=RUN ...] --split=test --out=DIR \
        [--data_dir=SHARDS] [--noise_dir=../shared/datasets/nstdb] [--compare=A:B ...]

Every run is scored, with its own preprocessing, windows and best checkpoint, on the split
clean and under each condition of ``mvkt.robustness.default_conditions``: NSTDB baseline
wander, electrode motion and muscle artefact and white noise at 24-0 dB, reversed arm
electrodes, gain x0.5 and x2, a 1 mV offset, 0.5 s and 2 s of contact loss, clipping and
two sampling-rate round trips. The NSTDB noise comes from the evaluation half of each noise
record (training draws from the other half, ``config.augment.nstdb_noise``); the default
``--noise_dir`` is the 60-s excerpt embedded in data_prep/samples/nstdb, for studies use the
full records in ../shared/datasets/nstdb.

Runs whose folder names differ only in ``_seed<N>`` are pooled as the seeds of one model
(seed-averaged macro-AUC, bootstrap over records). Per model and condition: macro-AUC and
per-class AUC with 95% CIs, the paired difference to its clean score, and how many records
the signal-quality gate (``mvkt.quality``) calls unusable. ``--compare=A:B`` adds, per
condition, B - A and the difference of their drops from clean ([B - B clean] - [A - A
clean]: does B lose less?), paired over seeds and records. Writes ``robustness.json``,
``report.md`` and ``robustness_snr.png`` into ``--out``; scores are cached per run and
condition under ``--out/scores``, so a rerun continues where it stopped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import pathlib
import re
import shlex
import sys
import warnings
from typing import Sequence

import numpy as np
import tqdm
from absl import app, flags, logging

from experiments import cli
from mvkt import bootstrap
from mvkt import data as data_lib
from mvkt import distributed
from mvkt import evaluate as evaluate_lib
from mvkt import inference
from mvkt import metrics as metrics_lib
from mvkt import noise as noise_lib
from mvkt import parallel as parallel_lib
from mvkt import plots
from mvkt import quality
from mvkt import robustness as robustness_lib
from mvkt import run_dir

RESULT_FILE = "robustness.json"


def define_flags() -> None:
    flags.DEFINE_multi_string("workdir", None, "trained run folder (repeat for several; globs allowed, quoted: "
                              "'runs/study/runs/*_seed[01]')", required=True)
    flags.DEFINE_string("out", None, "output folder (robustness.json, report.md, plots, cached scores)",
                        required=True)
    flags.DEFINE_string("data_dir", None, "shards to score (default: each run's own shards and folds)")
    flags.DEFINE_enum("split", "test", list(data_lib.SPLITS), "split to score")
    flags.DEFINE_string("noise_dir", str(noise_lib.SAMPLE_NSTDB),
                        "NSTDB noise records bw, em, ma (default: the embedded 60-s excerpt; for studies "
                        "../shared/datasets/nstdb)")
    flags.DEFINE_list("conditions", [], "only these conditions (names from robustness.json; default all)")
    flags.DEFINE_list("snrs", [str(s) for s in robustness_lib.SNRS_DB], "SNRs (dB) of the noise conditions")
    flags.DEFINE_multi_string("compare", [], "A:B, two model names (run folder names without _seed<N>): "
                              "B - A per condition and the difference of their drops (repeatable)")
    flags.DEFINE_integer("seed", 0, "seed of every noise draw")
    flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")
    flags.DEFINE_bool("allow_unfinished", False, "score runs that stopped before their last step (marked)")


def model_name(workdir: pathlib.Path) -> str:
    """The model a run belongs to: its folder name without ``_seed<N>``."""
    return re.sub(r"_seed\d+$", "", pathlib.Path(workdir).name)


def expand_workdirs(patterns: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Run folders from folders and glob patterns, in the given order (a pattern's matches sorted)."""
    found: list[pathlib.Path] = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--workdir={pattern} matches no folder")
        found += [pathlib.Path(m).absolute() for m in matches]
    return list(dict.fromkeys(found))


def _cache_key(workdir: pathlib.Path) -> str:
    return f"{workdir.name}-{hashlib.sha256(str(workdir).encode()).hexdigest()[:8]}"


def score_run(workdir: pathlib.Path, conditions: Sequence[robustness_lib.Condition], *, out: pathlib.Path,
              split_name: str, data_dir: str | None, noise_dir: str, seed: int, parallel,
              banks: dict, progress: bool = True) -> dict[str, dict]:
    """{condition: {"scores", "usable", "y", "record_ids"}} of one run, from the cache or scored now."""
    info = run_dir.load_info(workdir)
    prep = inference.Preprocessing.of_run(workdir)
    folder = out / "scores" / _cache_key(workdir)
    fingerprint = json.dumps({"run": str(workdir), "split": split_name, "data_dir": data_dir, "seed": seed,
                              "noise_dir": str(pathlib.Path(noise_dir).absolute()),
                              "checkpoint_step": run_dir.training_status(workdir)["trained_steps"],
                              "quality_thresholds": quality.DEFAULT_THRESHOLDS.as_dict()}, sort_keys=True)
    results, todo = {}, []
    for condition in conditions:
        path = folder / f"{condition.name}.npz"
        if path.exists():
            with np.load(path) as f:
                if str(f["fingerprint"]) == fingerprint + json.dumps(condition.to_dict(), sort_keys=True):
                    results[condition.name] = {k: f[k] for k in ("scores", "usable", "y", "record_ids")}
                    continue
        todo.append(condition)
    if not todo:
        return results
    scorer = evaluate_lib.Scorer.load(workdir, which="best", aggregate=None, parallel=parallel)
    if data_dir:
        split = data_lib.open_split(data_dir, split_name)
    else:
        split = data_lib.open_split(info["data_dir"], split_name, folds=info.get("folds"))
    if list(split.label_names) != list(info["label_names"]):
        raise ValueError(f"{workdir} was trained on labels {info['label_names']}, the {split_name} split of "
                         f"{split.out_dir} has {split.label_names}")
    bank_key = (split.sampling_rate, tuple(prep.band_pass) if prep.band_pass else None)
    if bank_key not in banks and any(c.family == "nstdb" for c in todo):
        banks[bank_key] = noise_lib.load_nstdb(noise_dir, part="eval", sampling_rate=split.sampling_rate,
                                               band_pass=prep.band_pass)
    bank = banks.get(bank_key)
    folder.mkdir(parents=True, exist_ok=True)
    for condition in tqdm.tqdm(todo, desc=workdir.name, disable=not progress, unit="condition"):
        corrupted = robustness_lib.corrupt_split(split, condition, seed=seed, bank=bank, gate_leads=prep.leads)
        # The clean condition scores the split itself: exactly what experiments.evaluate scores.
        scored = split if condition.family == "clean" else corrupted.split
        scores = scorer.scores(data_lib.as_run_data(scored, info))
        result = {"scores": scores, "usable": corrupted.usable, "y": np.asarray(split.y),
                  "record_ids": np.asarray(split.record_ids)}
        distributed.write_file(folder / f"{condition.name}.npz", lambda f, r=result, c=condition: np.savez(
            f, fingerprint=fingerprint + json.dumps(c.to_dict(), sort_keys=True), **r))
        results[condition.name] = result
    return results


def _auc_with_ci(y: np.ndarray, score_list: list[np.ndarray], n_resamples: int) -> dict:
    """Seed-averaged macro-AUC (seeds stacked along the class axis) and per-class AUCs, with CIs."""
    stacked_y = np.concatenate([y] * len(score_list), axis=1)
    stacked = np.concatenate(score_list, axis=1)
    with warnings.catch_warnings():  # excluded classes are the per-class None entries, by name
        warnings.simplefilter("ignore", UserWarning)
        macro = bootstrap.bootstrap_ci(y_true=stacked_y, y_score=stacked, metric_fn=metrics_lib.macro_auc,
                                       n_resamples=n_resamples)
    return {"macro_auc": macro.point, "ci": [macro.lower, macro.upper]}


def _per_class(y: np.ndarray, score_list: list[np.ndarray], names: Sequence[str], n_resamples: int) -> dict:
    out = {}
    for k, name in enumerate(names):
        if not 0 < y[:, k].sum() < len(y):
            out[name] = None  # no positives or no negatives in the split
            continue
        column = [s[:, k:k + 1] for s in score_list]
        out[name] = _auc_with_ci(y[:, k:k + 1], column, n_resamples)
    return out


def _contrast(y: np.ndarray, terms: list[tuple[float, np.ndarray]], n_resamples: int) -> dict:
    r = bootstrap.bootstrap_contrast(y_true=y, terms=terms, metric_fn=metrics_lib.macro_auc, n_resamples=n_resamples)
    return {"difference": r.difference, "ci": [r.lower, r.upper], "p_value": r.p_value}


def summarise(scores: dict[str, dict[str, dict]], groups: dict[str, list[pathlib.Path]],
              conditions: Sequence[robustness_lib.Condition], *, label_names: Sequence[str],
              compare: Sequence[tuple[str, str]], n_resamples: int, progress: bool = True) -> dict:
    """robustness.json's ``models`` and ``comparisons`` from the per-run scores."""
    first = scores[str(next(iter(groups.values()))[0])]["clean"]
    y = first["y"]
    for run, by_condition in scores.items():
        for name, result in by_condition.items():
            if not np.array_equal(result["record_ids"], first["record_ids"]):
                raise ValueError(f"{run} was scored on other records than the first run: the runs of one "
                                 "robustness evaluation must share their split (same shards and folds)")
    nstdb = [c.name for c in conditions if c.family == "nstdb"]
    models = {}
    bar = tqdm.tqdm(total=len(groups) * len(conditions) + len(compare) * len(conditions), disable=not progress,
                    desc="bootstrap", unit="cell")
    for group, runs in groups.items():
        per_run = [scores[str(r)] for r in runs]
        entry = {"runs": [str(r) for r in runs], "conditions": {}}
        clean = [s["clean"]["scores"] for s in per_run]
        for condition in conditions:
            noisy = [s[condition.name]["scores"] for s in per_run]
            cell = _auc_with_ci(y, noisy, n_resamples)
            cell["per_class"] = _per_class(y, noisy, label_names, n_resamples)
            if condition.family != "clean":
                w = 1.0 / len(runs)
                cell["vs_clean"] = _contrast(y, [(w, s) for s in noisy] + [(-w, s) for s in clean], n_resamples)
            cell["unusable"] = [int((~s[condition.name]["usable"]).sum()) for s in per_run]
            cell["num_records"] = int(len(y))
            entry["conditions"][condition.name] = cell
            bar.update()
        for family in ("nstdb", "white"):
            names = [c.name for c in conditions if c.family == family]
            if names:
                w = 1.0 / len(runs)
                terms = [(w / len(names), s[n]["scores"]) for n in names for s in per_run] + [(-w, c) for c in clean]
                entry[f"{family}_mean_vs_clean"] = _contrast(y, terms, n_resamples)
        models[group] = entry
    comparisons = []
    for a, b in compare:
        runs_a, runs_b = [scores[str(r)] for r in groups[a]], [scores[str(r)] for r in groups[b]]
        if len(runs_a) != len(runs_b):
            raise ValueError(f"--compare={a}:{b}: {len(runs_a)} and {len(runs_b)} seeds; pairs need the same seeds")
        w = 1.0 / len(runs_a)
        rows = {}
        for condition in conditions:
            c = condition.name
            row = {"difference": _contrast(y, [(w, s[c]["scores"]) for s in runs_b]
                                           + [(-w, s[c]["scores"]) for s in runs_a], n_resamples)}
            if condition.family != "clean":
                row["difference_of_drops"] = _contrast(y, _drop_terms(runs_a, runs_b, [c], w), n_resamples)
            rows[c] = row
            bar.update()
        mean_drop = _contrast(y, _drop_terms(runs_a, runs_b, nstdb, w / len(nstdb)), n_resamples) if nstdb else None
        comparisons.append({"a": a, "b": b, "conditions": rows, "nstdb_mean_difference_of_drops": mean_drop})
    bar.close()
    return {"models": models, "comparisons": comparisons}


def _drop_terms(runs_a, runs_b, names, w) -> list[tuple[float, np.ndarray]]:
    """Terms of sum over conditions of [B(c) - B(clean)] - [A(c) - A(clean)], weight w each."""
    terms = []
    for c in names:
        for s in runs_b:
            terms += [(w, s[c]["scores"]), (-w, s["clean"]["scores"])]
        for s in runs_a:
            terms += [(-w, s[c]["scores"]), (w, s["clean"]["scores"])]
    return terms


def run_robustness(*, workdirs: Sequence[str | pathlib.Path], out: str | pathlib.Path, split: str = "test",
                   data_dir: str | None = None, noise_dir: str | pathlib.Path = noise_lib.SAMPLE_NSTDB,
                   conditions: Sequence[str] = (), snrs: Sequence[float] = robustness_lib.SNRS_DB,
                   compare: Sequence[str] = (), seed: int = 0, n_resamples: int = 1000,
                   allow_unfinished: bool = False, command: str = "experiments.robustness.run_robustness",
                   progress: bool = True) -> dict:
    out = pathlib.Path(out).absolute()
    workdirs = expand_workdirs(workdirs)
    for w in workdirs:
        cli.check_finished(w, allow_unfinished=allow_unfinished)
    chosen = robustness_lib.default_conditions(snrs)
    if conditions:
        known = {c.name for c in chosen}
        unknown = [c for c in conditions if c not in known]
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; known: {sorted(known)}")
        chosen = [c for c in chosen if c.family == "clean" or c.name in conditions]
    groups: dict[str, list[pathlib.Path]] = {}
    for w in workdirs:
        groups.setdefault(model_name(w), []).append(w)
    pairs = []
    for text in compare:
        a, sep, b = text.partition(":")
        if not sep or a not in groups or b not in groups:
            raise ValueError(f"--compare={text}: give A:B with two model names from {sorted(groups)}")
        pairs.append((a, b))
    label_names = run_dir.load_info(workdirs[0])["label_names"]
    for w in workdirs[1:]:
        if run_dir.load_info(w)["label_names"] != label_names:
            raise ValueError(f"{w} has other classes than {workdirs[0]}: score runs of one task together")
    parallel = parallel_lib.make_parallelism()
    banks: dict = {}
    scores = {str(w): score_run(w, chosen, out=out, split_name=split, data_dir=data_dir, noise_dir=str(noise_dir),
                                seed=seed, parallel=parallel, banks=banks, progress=progress) for w in workdirs}
    summary = summarise(scores, groups, chosen, label_names=label_names, compare=pairs, n_resamples=n_resamples,
                        progress=progress)
    bank = next(iter(banks.values()), None)
    result = {
        "command": command,
        "split": split,
        "seed": seed,
        "n_resamples": n_resamples,
        "label_names": list(label_names),
        "num_records": int(len(next(iter(next(iter(scores.values())).values()))["y"])),
        "noise": {"dir": str(pathlib.Path(noise_dir).resolve()), "part": "eval",
                  "source_samples_360Hz": list(bank.source_samples) if bank else None,
                  "training_part": list(noise_lib.PARTS["train"]), "evaluation_part": list(noise_lib.PARTS["eval"])},
        "snr_definition": "per lead: 10 log10(var(lead over the record) / mean square of the added noise)",
        "quality_thresholds": quality.DEFAULT_THRESHOLDS.as_dict(),
        "conditions": [c.to_dict() for c in chosen],
        **summary,
    }
    distributed.write_text(out / RESULT_FILE, json.dumps(result, indent=2, default=float))
    png = plot_snr(out / "robustness_snr.png", result)
    distributed.write_text(out / "report.md", report(result, png.name if png else None))
    return result


def plot_snr(path: pathlib.Path, result: dict):
    families = [("nstdb", "bw"), ("nstdb", "em"), ("nstdb", "ma"), ("white", "")]
    panels = {}
    for family, kind in families:
        conds = [c for c in result["conditions"] if c["family"] == family and c["kind"] == kind]
        if not conds:
            continue
        title = f"NSTDB {kind}" if family == "nstdb" else "white noise"
        panels[title] = {
            model: {"snr": [c["value"] for c in conds],
                    "auc": [entry["conditions"][c["name"]]["macro_auc"] for c in conds],
                    "ci": [entry["conditions"][c["name"]]["ci"] for c in conds],
                    "clean": entry["conditions"]["clean"]["macro_auc"]}
            for model, entry in result["models"].items()}
    if not panels:
        return None
    return pathlib.Path(plots.plot_robustness_snr(path, panels=panels, title=f"Macro-AUC under noise "
                                                  f"({result['split']} split, {result['num_records']} records)"))


def _ci(cell: dict) -> str:
    return f"{cell['macro_auc']:.4f} [{cell['ci'][0]:.4f}, {cell['ci'][1]:.4f}]"


def _diff(d: dict | None) -> str:
    if d is None:
        return ""
    return f"{d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def report(result: dict, png: str | None) -> str:
    lines = [f"# Robustness to wearable noise ({result['split']} split, {result['num_records']} records)", "",
             f"Command: `{result['command']}`", "",
             f"Noise: NSTDB records in `{result['noise']['dir']}`, evaluation part (the first half of each "
             f"record; training noise comes from the second half). SNR {result['snr_definition']}. Seed "
             f"{result['seed']}; {result['n_resamples']} bootstrap resamples over records; models with several "
             "seeds are seed-averaged. Unusable: records the signal-quality gate withholds (per seed).", ""]
    if png:
        lines += [f"![macro-AUC against SNR]({png})", ""]
    lines += ["## Summary", "", "Mean drop: the mean over the noise conditions of (macro-AUC under the condition - "
              "clean macro-AUC), paired over records and seeds.", "",
              "| model | clean macro-AUC [95% CI] | mean drop, NSTDB bw/em/ma 24-0 dB [95% CI] | "
              "mean drop, white noise [95% CI] |", "|---|---|---|---|"]
    for model, entry in result["models"].items():
        lines.append(f"| {model} | {_ci(entry['conditions']['clean'])} | {_diff(entry.get('nstdb_mean_vs_clean'))} | "
                     f"{_diff(entry.get('white_mean_vs_clean'))} |")
    lines.append("")
    for model, entry in result["models"].items():
        lines += [f"## {model} ({len(entry['runs'])} run(s))", "",
                  "| condition | macro-AUC [95% CI] | vs clean [paired 95% CI] | P(diff <= 0) | unusable |",
                  "|---|---|---|---|---|"]
        for c in result["conditions"]:
            cell = entry["conditions"][c["name"]]
            vs = cell.get("vs_clean")
            unusable = ", ".join(f"{u}/{cell['num_records']}" for u in cell["unusable"])
            lines.append(f"| {c['name']} | {_ci(cell)} | {_diff(vs) or '(reference)'} | "
                         f"{'' if vs is None else format(vs['p_value'], '.3f')} | {unusable} |")
        lines.append("")
    for comp in result["comparisons"]:
        a, b = comp["a"], comp["b"]
        lines += [f"## {b} vs {a}", "",
                  f"difference: {b} - {a} under the condition; difference of drops: "
                  f"[{b} - {b} clean] - [{a} - {a} clean] (> 0: {b} loses less).", "",
                  "| condition | difference [95% CI] | difference of drops [95% CI] | P(drops diff <= 0) |",
                  "|---|---|---|---|"]
        for c in result["conditions"]:
            row = comp["conditions"][c["name"]]
            drop = row.get("difference_of_drops")
            lines.append(f"| {c['name']} | {_diff(row['difference'])} | {_diff(drop)} | "
                         f"{'' if drop is None else format(drop['p_value'], '.3f')} |")
        if comp["nstdb_mean_difference_of_drops"]:
            m = comp["nstdb_mean_difference_of_drops"]
            lines += ["", f"Mean over the NSTDB conditions: difference of drops {_diff(m)}, "
                      f"P(<= 0) {m['p_value']:.3f}."]
        lines.append("")
    lines += ["## Conditions", ""] + [f"- `{c['name']}`: {c['about']}" for c in result["conditions"]]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        f = flags.FLAGS
        result = run_robustness(
            workdirs=f.workdir, out=f.out, split=f.split, data_dir=f.data_dir, noise_dir=f.noise_dir,
            conditions=f.conditions, snrs=[float(s) for s in f.snrs], compare=f.compare, seed=f.seed,
            n_resamples=f.bootstrap_resamples, allow_unfinished=f.allow_unfinished,
            command=" ".join(["python -m experiments.robustness", *map(shlex.quote, sys.argv[1:])]))
        cli.print_report(pathlib.Path(f.out) / "report.md")
        logging.info("%d models x %d conditions", len(result["models"]), len(result["conditions"]))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
