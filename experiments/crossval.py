"""Cross-validated comparison of transfer methods: every record is a test record once per seed.

    python -m experiments.crossval --data_dir=SHARDS --workdir=runs/crossval --methods=bce,mvkt \
        --seeds=0,1 --epochs=20
    python -m experiments.crossval ... --rounds=0,1      # a pilot: two rounds only

Round r tests fold F[r] of the shards' folds F (PTB-XL: strat_fold 1-10), validates on
the next fold and trains on the others; the standardisation is re-fitted on each round's
training folds (read on the fly: no copy of the signals). Per seed and round: one 12-lead
teacher and one student per method (``experiments.study.train_group``), each evaluated
once on its round's test fold with thresholds from its validation fold. Pooled
out-of-fold scores (every record once per seed) give each method's macro-AUC with a
bootstrap CI pooled over seeds, per-round macro-AUCs with CIs, and the paired bootstrap of
every method against the BCE student over all records. Writes ``crossval.json``,
``report.md``, ``plots/crossval.png`` and the out-of-fold scores
(``oof/<method>_seed<s>/scores_oof.npz``). Resumable like every study: rerunning trains
only what is missing. Select on validation, never on the test folds.
"""

from __future__ import annotations

import datetime
import pathlib
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from experiments import cli
from experiments import report as report_lib
from experiments import study
from mvkt import data as data_lib
from mvkt import bootstrap
from mvkt import distributed
from mvkt import evaluate as evaluate_lib
from mvkt import metrics as metrics_lib
from mvkt import plots
from mvkt import run_config

OOF_SPLIT = "oof"


def round_folds(folds: Sequence[int], r: int) -> dict[str, list[int]]:
    """Round ``r``: test fold ``folds[r]``, validation the next fold, training the rest."""
    k = len(folds)
    test, val = folds[r], folds[(r + 1) % k]
    return {"train": [f for f in folds if f not in (test, val)], "val": [val], "test": [test]}


def shard_folds(data_dir: str | pathlib.Path) -> list[int]:
    manifest = data_lib.load_manifest(data_dir)
    return sorted({int(f) for split in manifest["splits"].values() for f in split["folds"]})


def run_crossval(*, workdir: str | pathlib.Path, data_dir: str | pathlib.Path, methods: Sequence[str],
                 seeds: Sequence[int], rounds: Sequence[int] | None, epochs: int, arch: str = "resnet1d_wang",
                 width_mult: float = 1.0, batch_size: int = 0, leads: str = "I", n_resamples: int = 1000,
                 split: str = "test", overrides: dict | None = None, teacher_dir: str | None = None,
                 command: str = "experiments.crossval.run_crossval", progress: bool = True) -> pathlib.Path:
    """Trains and evaluates what is missing, then writes the pooled results; returns the report.

    ``split="val"`` is the pilot mode: every run is scored on its round's validation fold
    only and the pooled validation results go to ``crossval_val.json`` / ``report_val.md``
    (the test folds are never scored), so recipes can be chosen without seeing a test fold.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, not {split!r}")
    if teacher_dir:
        raise ValueError("--teacher_dir cannot be used in cross-validation: every round trains its own teacher "
                         "on that round's training folds")
    methods = list(methods)
    study.check_methods(methods)
    study_dir = pathlib.Path(workdir).absolute()
    folds = shard_folds(data_dir)
    if len(folds) < 3:
        raise ValueError(f"{data_dir} has folds {folds}: cross-validation needs at least 3")
    rounds = list(range(len(folds))) if rounds is None else list(rounds)
    bad = [r for r in rounds if not 0 <= r < len(folds)]
    if bad:
        raise ValueError(f"--rounds {bad} outside 0..{len(folds) - 1} ({len(folds)} folds)")
    batch_size = study.auto_batch_size(data_dir, batch_size)
    runs: dict[int, dict[int, dict[str, pathlib.Path]]] = {}
    for seed in seeds:
        runs[seed] = {}
        for r in rounds:
            base = study.base_config(data_dir=pathlib.Path(data_dir).absolute(), arch=arch, epochs=epochs,
                                     batch_size=batch_size, seed=seed, width_mult=width_mult, overrides=overrides)
            round_split = round_folds(folds, r)
            base.data.train_folds, base.data.val_folds, base.data.test_folds = (
                ",".join(map(str, round_split[name])) for name in data_lib.SPLITS)
            base.lock()
            runs[seed][r] = study.train_group(base, study_dir, leads=leads, methods=methods, metrics=False,
                                              n_resamples=n_resamples, prefix=f"round{r}/", progress=progress,
                                              split=split)
    return distributed.on_chief(write_results, study_dir, data_dir=data_dir, runs=runs, methods=methods,
                                folds=folds, rounds=rounds, leads=leads, n_resamples=n_resamples, split=split,
                                command=command)


def _round_auc(workdir: pathlib.Path, n_resamples: int, split: str) -> tuple[float, float, float] | None:
    """(macro-AUC, CI low, CI high) of one round's ``split`` fold; None where no class has both
    positives and negatives in that fold (tiny folds)."""
    scores = evaluate_lib.load_scores(workdir, split)
    y = scores["y"]
    if not metrics_lib.valid_class_mask(y_true=y).any():
        return None
    ci = bootstrap.bootstrap_ci(y_true=y, y_score=scores["scores"], metric_fn=metrics_lib.macro_auc,
                                n_resamples=n_resamples, label_names=[str(n) for n in scores["label_names"]])
    return ci.point, ci.lower, ci.upper


def _pool(run_dirs: list[pathlib.Path], out: pathlib.Path, split: str) -> int:
    """Concatenates the ``split`` scores of one method's rounds (sorted by record id) into
    ``out/scores_oof.npz``; returns the number of records."""
    loaded = [evaluate_lib.load_scores(d, split) for d in run_dirs]
    ids = np.concatenate([s["record_ids"] for s in loaded])
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"a record is scored in two rounds of {run_dirs[0].parent}: the folds overlap")
    order = np.argsort(ids, kind="stable")
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / evaluate_lib.SCORES_FILE.format(split=OOF_SPLIT),
             scores=np.concatenate([s["scores"] for s in loaded])[order],
             y=np.concatenate([s["y"] for s in loaded])[order], record_ids=ids[order],
             label_names=loaded[0]["label_names"])
    return len(ids)


def write_results(study_dir: pathlib.Path, *, data_dir: str | pathlib.Path, runs: dict, methods: list[str],
                  folds: list[int], rounds: list[int], leads: str, n_resamples: int, command: str,
                  split: str = "test") -> pathlib.Path:
    seeds = list(runs)
    # Teachers (the 12-lead one, then any variant a recipe trained), then the students.
    groups = [g for g in runs[seeds[0]][rounds[0]] if g not in methods] + list(methods)
    suffix = "" if split == "test" else f"_{split}"
    oof = {g: [study_dir / f"oof{suffix}" / f"{g}_seed{s}" for s in seeds] for g in groups}
    counts = {g: [_pool([runs[s][r][g] for r in rounds], d, split) for s, d in zip(seeds, oof[g])]
              for g in groups}
    manifest = data_lib.load_manifest(data_dir)
    total = sum(int(manifest["splits"][s]["num_records"]) for s in data_lib.SPLITS)
    results = {}
    fold_kind = "validation" if split == "val" else "test"
    for g in groups:
        y = evaluate_lib.load_scores(oof[g][0], OOF_SPLIT)["y"]
        undefined = None
        if not metrics_lib.valid_class_mask(y_true=y).any():
            undefined = (f"{g}: the pooled {fold_kind}-fold macro-AUC of rounds {rounds} is undefined: no class has "
                         f"both positive and negative records among the {len(y)} records scored")
            logging.warning("%s", undefined)
            summary = {"macro_auc": None, "ci": None, "per_seed": [None] * len(seeds)}
        else:
            summary = study.method_summary(oof[g], n_resamples=n_resamples, split=OOF_SPLIT)
        per_round = {}
        for r in rounds:
            cis = [_round_auc(runs[s][r][g], n_resamples, split) for s in seeds]
            per_round[str(r)] = {"test_fold": round_folds(folds, r)["test"][0],
                                 "scored_fold": round_folds(folds, r)[split][0],
                                 "macro_auc_per_seed": [c and c[0] for c in cis],
                                 "ci_per_seed": [c and [c[1], c[2]] for c in cis]}
        results[g] = {
            "num_records_scored": counts[g][0],
            "pooled_macro_auc": summary["macro_auc"],
            "pooled_ci": summary["ci"],
            "per_seed": summary["per_seed"],
            "per_round": per_round,
            "undefined": undefined,
        }
        if g != "bce" and undefined is None:
            results[g]["vs_bce"] = evaluate_lib.compare_runs(oof["bce"], oof[g], split=OOF_SPLIT,
                                                             n_resamples=n_resamples)
    base_auc = results["bce"]["pooled_macro_auc"]
    for m in [m for m in methods if m != "bce" and "vs_bce" in results[m] and "vs_bce" in results["teacher"]]:
        results[m]["share_of_teacher_gap_closed"] = study.teacher_gap_share(
            difference=results[m]["pooled_macro_auc"] - base_auc,
            gap=results["teacher"]["pooled_macro_auc"] - base_auc, teacher_ci=results["teacher"]["vs_bce"]["ci"])
    out = {
        "command": command,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "folds": folds,
        "rounds": rounds,
        "seeds": seeds,
        "leads": leads,
        "num_records_in_shards": total,
        "all_rounds": len(rounds) == len(folds),
        "split": split,
        "methods": results,
        "selection": ("checkpoints on each round's validation fold; test folds only reported" if split == "test"
                      else "pilot: checkpoints and these scores both on the validation folds (optimistic for "
                           "every method alike); test folds not scored"),
    }
    study.write_json(study_dir / f"crossval{suffix}.json", out)
    return _write_report(study_dir, out, first_run=runs[seeds[0]][rounds[0]]["bce"], suffix=suffix)


def _write_report(study_dir: pathlib.Path, out: dict, *, first_run: pathlib.Path, suffix: str) -> pathlib.Path:
    results, groups = out["methods"], list(out["methods"])
    fold_kind = "validation" if out["split"] == "val" else "test"
    defined = [g for g in groups if results[g]["pooled_macro_auc"] is not None]
    png = None
    if "bce" in defined:
        png = plots.plot_ablation(
            study_dir / "plots" / f"crossval{suffix}.png", methods=defined,
            aucs=[results[g]["pooled_macro_auc"] for g in defined], cis=[results[g]["pooled_ci"] for g in defined],
            reference="bce", xlabel=f"Pooled {fold_kind}-fold macro-AUC (95% bootstrap CI)",
            title=(f"Cross-validation{' pilot' if suffix else ''}: {len(out['rounds'])} round(s), "
                   f"{len(out['seeds'])} seed(s), leads {out['leads']}"),
        )
    data_text, _ = report_lib.data_section(
        first_run, records_scored=min(r["num_records_scored"] for r in results.values()))
    lines = [
        f"# Cross-validation{' pilot on the validation folds' if suffix else ''} "
        f"({len(out['rounds'])} of {len(out['folds'])} rounds, seeds {out['seeds']})", "",
        f"Generated {out['created']} by:", "", f"```\n{out['command']}\n```", "", "## Data", data_text, "",
        "Round r tests fold r+1 of the folds below, validates on the next fold, trains on the rest "
        "(standardisation re-fitted on the training folds). Checkpoints and thresholds come from "
        "each round's validation fold; " + ("the test folds are only reported." if not suffix else
        "this pilot scores the validation folds too (optimistic for every method alike) and never "
        "the test folds."), "",
        f"- folds: {out['folds']}; rounds run: {out['rounds']}"
        + ("" if out["all_rounds"] else f" (a subset: pooled numbers cover only these rounds' {fold_kind} folds)"),
        "",
        "## Pooled out-of-fold results", "",
        "| method | records scored | pooled macro-AUC [95% CI] | per seed | difference vs BCE [95% CI] | "
        "P(diff <= 0) | share of teacher gap closed |",
        "|---|---|---|---|---|---|---|",
    ]
    undefined = [results[g]["undefined"] for g in groups if results[g]["undefined"]]
    if undefined:
        lines[-2:-2] = [f"**Undefined:** {text}." for text in undefined] + [""]
    for g in groups:
        r = results[g]
        if r["undefined"]:
            lines.append(f"| {g} | {r['num_records_scored']} | undefined (no class with positives and negatives) "
                         "| | | | |")
            continue
        lo, hi = r["pooled_ci"]
        diff = "(baseline)" if g == "bce" else ""
        share = p = ""
        if "vs_bce" in r:
            d = r["vs_bce"]
            diff = f"{d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
            p = f"{d['p_value']:.3f}"
        if "share_of_teacher_gap_closed" in r:
            share = study.format_gap_share(r["share_of_teacher_gap_closed"])
        seeds = ", ".join(f"{a:.4f}" for a in r["per_seed"])
        lines.append(f"| {g} | {r['num_records_scored']} | {r['pooled_macro_auc']:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{seeds} | {diff} | {p} | {share} |")
    lines += ["", f"## Per round ({fold_kind} macro-AUC of each seed)", "",
              f"| round | {fold_kind} fold | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for rnd in out["rounds"]:
        cells = [", ".join("undefined" if a is None else f"{a:.3f}"
                           for a in results[g]["per_round"][str(rnd)]["macro_auc_per_seed"]) for g in groups]
        lines.append(f"| {rnd} | {results[groups[0]]['per_round'][str(rnd)]['scored_fold']} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"![cross-validation]({study.relative(pathlib.Path(png), study_dir)})" if png else
              "(no plot: the BCE baseline's pooled macro-AUC is undefined)", "",
              f"Numbers: `crossval{suffix}.json`; pooled scores: "
              f"`oof{suffix}/<method>_seed<s>/scores_oof.npz`.", ""]
    path = study_dir / f"report{suffix}.md"
    path.write_text("\n".join(lines))
    return path


def define_flags() -> None:
    """The shared study flags plus this runner's own, defined only when run as a program."""
    study.define_flags(workdir="runs/crossval")
    flags.adopt_module_key_flags(study)  # --help lists them, not only --helpfull
    flags.DEFINE_string("rounds", "", "comma-separated rounds (0-based; default all)")
    flags.DEFINE_enum("split", "test", ["test", "val"],
                      "test: the cross-validated result; val: a pilot that scores only the validation folds")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_known_errors():
        cli.start()
        path = run_crossval(leads=",".join(run_config.parse_leads(f.leads)), split=f.split,
                            rounds=study.seeds_from(f.rounds) if f.rounds else None,
                            **study.flag_values("experiments.crossval"))
        cli.print_report(path)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
