"""Lead sweep: BCE vs MVKT students for every single lead (and chosen lead subsets).

    python -m experiments.lead_sweep --ptbxl_dir=/data/ptb-xl --workdir=runs/lead_sweep \
        --seeds=0,1,2 --epochs=50                       # 12 single leads
    python -m experiments.lead_sweep --data_dir=SHARDS --workdir=runs/lead_sweep \
        --leads=I,II --subsets="I,II;I,II,V2" --teacher_dir='runs/pipeline/runs/teacher_seed{seed}'

Per seed: one 12-lead teacher (trained here, or reused with ``--teacher_dir``),
then for every lead set a BCE student and an MVKT student, each evaluated once
on the test split (thresholds from validation). Writes ``<workdir>/lead_sweep.md``
(lead | BCE AUC [CI] | MVKT AUC [CI] | gain [paired CI] | P), ``lead_sweep.json``
and ``plots/lead_sweep.png`` (both AUCs and the gain per lead, with the teacher
line). Run folders are ``<workdir>/runs/<name>-<config_hash>``: re-running skips
finished runs and cached evaluations, and a changed setting trains new runs.
"""

from __future__ import annotations

import datetime
import glob
import pathlib
import shlex
import sys
from typing import Any, Sequence

from absl import app, flags

from experiments import hyper
from experiments import report as report_lib
from experiments import study
from experiments import cli
from mvkt import data as data_lib
from mvkt import distributed
from mvkt import evaluate as evaluate_lib
from mvkt import plots
from mvkt import run_dir
from mvkt import train as train_lib

ALL_SINGLE = "all12"


def lead_sets(leads: str, subsets: str = "") -> list[str]:
    """``--leads`` (``all12`` or ``I,II``: one single-lead student each) + ``--subsets``
    (``"I,II;I,II,V2"``: one student per subset) -> canonical lead strings, in order."""
    singles = list(data_lib.LEADS) if leads.strip() == ALL_SINGLE else [
        s.strip() for s in leads.split(",") if s.strip()]
    sets = [",".join(train_lib.parse_leads(s)) for s in singles]
    sets += [",".join(train_lib.parse_leads(s)) for s in subsets.split(";") if s.strip()]
    sets = list(dict.fromkeys(sets))
    if not sets:
        raise ValueError("no lead sets: give --leads (all12 or e.g. I,II) and/or --subsets (e.g. 'I,II;I,II,V2')")
    return sets


def _keyed(run: study.Run) -> study.Run:
    """The run with its config hash in the folder name, so a changed setting never resumes an old run."""
    return study.Run(f"{run.name}-{run_dir.config_hash(run.config)}", run.config)


def _train(run: study.Run, study_dir: pathlib.Path, *, n_resamples: int, progress: bool) -> pathlib.Path:
    workdir = study.train_run(run, study_dir, progress=progress)
    study.evaluate_run(workdir, n_resamples=n_resamples)
    return workdir


def _existing_teacher(pattern: str, seed: int, data_dir: pathlib.Path) -> pathlib.Path:
    text = pattern.format(seed=seed)
    matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
    if len(matches) != 1:
        raise FileNotFoundError(f"--teacher_dir={pattern!r} for seed {seed} matches {len(matches)} "
                                f"folders ({', '.join(matches[:5])}); it must match exactly one")
    teacher = pathlib.Path(matches[0]).absolute()
    if not run_dir.is_finished(teacher):
        raise FileNotFoundError(f"teacher {teacher} is not a finished training run")
    info = run_dir.load_info(teacher)
    # Same files, not the same path: the teacher line must be measured on the students' test records.
    if data_lib.load_manifest(info["data_dir"])["files"] != data_lib.load_manifest(data_dir)["files"]:
        raise ValueError(f"teacher {teacher} was trained on {info['data_dir']}, other shards than {data_dir}")
    return teacher


def run_lead_sweep(*, workdir: str | pathlib.Path, lead_sets: Sequence[str], seeds: Sequence[int],
                   epochs: int, arch: str = "resnet1d_wang", width_mult: float = 1.0,
                   batch_size: int = 0, clt_variant: str = "memory_bank", n_resamples: int = 1000,
                   data_dir: str | pathlib.Path | None = None, ptbxl_dir: str | pathlib.Path = study.SAMPLE_PTBXL,
                   task: str = "superdiagnostic", teacher_dir: str | None = None,
                   overrides: dict[str, Any] | None = None, progress: bool = True,
                   command: str = "") -> pathlib.Path:
    """Trains/evaluates what is missing and writes the report; returns ``lead_sweep.md``.

    ``overrides`` (``{"clt.num_negatives": 256}``) apply to every run, the teacher included;
    ``teacher_dir`` is a folder pattern with ``{seed}`` (and optionally a glob) of finished
    teachers to reuse instead of training them.
    """
    study_dir = pathlib.Path(workdir).absolute()
    if distributed.is_chief():
        study_dir.mkdir(parents=True, exist_ok=True)
    lead_sets = list(lead_sets)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given")
    if data_dir is None:
        data_dir = study.prepare_ptbxl(ptbxl_dir, study_dir / "data", task=task)
    data_dir = pathlib.Path(data_dir).absolute()
    batch_size = study.auto_batch_size(data_dir, batch_size)

    teachers: list[pathlib.Path] = []
    bce: dict[str, list[pathlib.Path]] = {s: [] for s in lead_sets}
    mvkt: dict[str, list[pathlib.Path]] = {s: [] for s in lead_sets}
    for seed in seeds:
        base = study.base_config(data_dir=data_dir, arch=arch, epochs=epochs, batch_size=batch_size,
                                 seed=seed, width_mult=width_mult)
        base = hyper.apply_overrides(base, overrides or {}, source="--override")
        if teacher_dir:
            teacher = _existing_teacher(teacher_dir, seed, data_dir)
            study.evaluate_run(teacher, n_resamples=n_resamples)
        else:
            teacher = _train(_keyed(study.teacher_run(base)), study_dir, n_resamples=n_resamples,
                             progress=progress)
        teachers.append(teacher)
        for leads in lead_sets:
            for method, groups in (("bce", bce), ("mvkt", mvkt)):
                run = study.student_run(base, method=method, leads=leads, teacher_dir=teacher,
                                        clt_variant=clt_variant)
                groups[leads].append(_train(_keyed(run), study_dir, n_resamples=n_resamples,
                                            progress=progress))
    return distributed.on_chief(write_report, study_dir, teachers=teachers, bce=bce, mvkt=mvkt,
                                n_resamples=n_resamples, clt_variant=clt_variant,
                                command=command or "experiments.lead_sweep.run_lead_sweep")


def _cis_contain_points(summaries: list[dict]) -> bool:
    return all(s["ci"][0] <= s["macro_auc"] <= s["ci"][1] for s in summaries)


def write_report(study_dir: pathlib.Path, *, teachers: list[pathlib.Path],
                 bce: dict[str, list[pathlib.Path]], mvkt: dict[str, list[pathlib.Path]],
                 n_resamples: int, clt_variant: str, command: str) -> pathlib.Path:
    """``lead_sweep.md`` + ``lead_sweep.json`` + ``plots/lead_sweep.png`` from evaluated runs."""
    teacher = study.method_summary(teachers, n_resamples=n_resamples)
    rows = []
    for leads in bce:
        b = study.method_summary(bce[leads], n_resamples=n_resamples)
        m = study.method_summary(mvkt[leads], n_resamples=n_resamples)
        gain = evaluate_lib.compare_runs(bce[leads], mvkt[leads], n_resamples=n_resamples)
        gap = teacher["macro_auc"] - b["macro_auc"]
        rows.append({"leads": leads, "bce": b, "mvkt": m, "gain": gain,
                     "teacher_gap_closed": gain["difference"] / gap if gap > 0 else None,
                     "runs": {"bce": [str(d) for d in bce[leads]], "mvkt": [str(d) for d in mvkt[leads]]}})

    method_name = f"MVKT ({clt_variant})"
    with_ci = _cis_contain_points([r["bce"] for r in rows] + [r["mvkt"] for r in rows])
    png = plots.plot_lead_sweep(
        study_dir / "plots" / "lead_sweep.png", leads=[r["leads"] for r in rows],
        auc_baseline=[r["bce"]["macro_auc"] for r in rows], auc_method=[r["mvkt"]["macro_auc"] for r in rows],
        ci_baseline=[r["bce"]["ci"] for r in rows] if with_ci else None,
        ci_method=[r["mvkt"]["ci"] for r in rows] if with_ci else None,
        teacher_auc=teacher["macro_auc"], name_baseline="BCE student", name_method=f"{method_name} student",
        title=f"Students per input lead set: test macro-AUC ({len(teachers)} seed(s))")

    above = [r["leads"] for r in rows if r["gain"]["ci"][0] > 0]
    below = [r["leads"] for r in rows if r["gain"]["ci"][1] < 0]
    verdict = (f"{method_name} beats BCE with a paired 95% CI above 0 on {len(above)} of {len(rows)} lead "
               f"sets{' (' + ', '.join(above) + ')' if above else ''}, is worse with a CI below 0 on "
               f"{len(below)}{' (' + ', '.join(below) + ')' if below else ''}, and the CI contains 0 on the "
               f"other {len(rows) - len(above) - len(below)}. Each lead set is its own test (no "
               "multiple-comparison correction).")
    data_text, _ = report_lib.data_section(teachers[0])
    t_lo, t_hi = teacher["ci"]
    lines = [
        "# Lead sweep: BCE vs MVKT students per input lead set", "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by:", "",
        f"```\n{command}\n```", "",
        "## Data", data_text, "",
        "## Result", "", verdict, "",
        f"12-lead teacher: test macro-AUC {teacher['macro_auc']:.4f} [{t_lo:.4f}, {t_hi:.4f}] "
        f"({len(teachers)} seed(s)).", "",
        "| leads | BCE test macro-AUC [95% CI] | MVKT test macro-AUC [95% CI] | "
        "gain MVKT - BCE [paired 95% CI] | P(gain <= 0) | share of teacher gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, m, g = r["bce"], r["mvkt"], r["gain"]
        share = "" if r["teacher_gap_closed"] is None else f"{r['teacher_gap_closed']:.0%}"
        lines.append(
            f"| {r['leads']} | {b['macro_auc']:.4f} [{b['ci'][0]:.4f}, {b['ci'][1]:.4f}] | "
            f"{m['macro_auc']:.4f} [{m['ci'][0]:.4f}, {m['ci'][1]:.4f}] | "
            f"{g['difference']:+.4f} [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}] | {g['p_value']:.3f} | {share} |")
    lines += [
        "",
        f"AUCs are averaged over seeds; CIs are bootstraps over the test records ({n_resamples} "
        "resamples, the same resamples for every seed), the gain's CI is the paired bootstrap. Every "
        "run's checkpoint was chosen on validation, and its thresholds come from validation only. "
        "Share of the teacher gap closed = gain / (teacher - BCE).", "",
        "## Plot", "", f"![lead sweep]({study.relative(pathlib.Path(png), study_dir)})", "",
    ]
    if not with_ci:
        lines += ["CI whiskers are left out of the plot: some percentile bootstrap CI does not contain "
                  "its point estimate (too few test records for a stable bootstrap).", ""]
    lines += ["## Runs", "", "| leads | method | seed runs |", "|---|---|---|",
              "| all 12 | teacher | " + ", ".join(f"`{study.relative(d, study_dir)}`" for d in teachers) + " |"]
    for r in rows:
        for method in ("bce", "mvkt"):
            lines.append(f"| {r['leads']} | {method} | " + ", ".join(
                f"`{study.relative(pathlib.Path(d), study_dir)}`" for d in r["runs"][method]) + " |")
    path = study_dir / "lead_sweep.md"
    path.write_text("\n".join(lines) + "\n")
    study.write_json(study_dir / "lead_sweep.json", {
        "teacher": {**teacher, "runs": [str(d) for d in teachers]}, "rows": rows,
        "n_resamples": n_resamples, "clt_variant": clt_variant, "plot": str(png), "command": command})
    return path


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program: importing this module (tests,
    other runners) then never clashes with another entry point's flags of the same name."""
    flags.DEFINE_string("workdir", "runs/lead_sweep", "study folder (data, runs, lead_sweep.md)")
    flags.DEFINE_string("ptbxl_dir", str(study.SAMPLE_PTBXL),
                        "PTB-XL release folder (default: the embedded 100-record sample)")
    flags.DEFINE_string("data_dir", None, "existing shards (skips data preparation)")
    flags.DEFINE_enum("task", "superdiagnostic",
                      ["superdiagnostic", "subdiagnostic", "diagnostic", "form", "rhythm", "all"],
                      "PTB-XL benchmark task (with --ptbxl_dir)")
    flags.DEFINE_string("leads", ALL_SINGLE, "single-lead students: all12, or e.g. I,II,V2 (one student each)")
    flags.DEFINE_string("subsets", "", "multi-lead students, ';'-separated, e.g. 'I,II;I,II,V2'")
    flags.DEFINE_string("seeds", "0", "comma-separated seeds (each: a teacher + 2 students per lead set)")
    flags.DEFINE_integer("epochs", 10, "epochs for every run")
    flags.DEFINE_string("arch", "resnet1d_wang", "net for teacher and students")
    flags.DEFINE_float("width_mult", 1.0, "channel width multiplier")
    flags.DEFINE_integer("batch_size", 0, "0 = 128, or 32 for tiny train splits")
    flags.DEFINE_enum("clt_variant", "memory_bank", ["memory_bank", "in_batch"], "CLT variant")
    flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")
    flags.DEFINE_string("teacher_dir", None,
                        "reuse finished teachers: a folder pattern with {seed}, globs allowed, "
                        "e.g. runs/pipeline/runs/teacher_seed{seed} or runs/lead_sweep/runs/teacher_seed{seed}-*")
    flags.DEFINE_multi_string("override", [], "config field=value for every run, "
                              "e.g. --override=clt.num_negatives=256 (repeatable)")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_known_errors():
        cli.start()
        reference = study.base_config(data_dir="", arch=f.arch, epochs=1, batch_size=1, seed=0)
        overrides = dict(hyper.parse_override(reference, text) for text in f.override)
        path = run_lead_sweep(
            workdir=f.workdir, lead_sets=lead_sets(f.leads, f.subsets), seeds=study.seeds_from(f.seeds),
            epochs=f.epochs, arch=f.arch, width_mult=f.width_mult, batch_size=f.batch_size,
            clt_variant=f.clt_variant, n_resamples=f.bootstrap_resamples, data_dir=f.data_dir,
            ptbxl_dir=f.ptbxl_dir, task=f.task, teacher_dir=f.teacher_dir, overrides=overrides,
            command=" ".join(["python -m experiments.lead_sweep", *map(shlex.quote, sys.argv[1:])]))
        cli.print_report(path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
