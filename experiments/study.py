"""Building blocks shared by the pipeline, ablation, lead-sweep and sweep runners.

A study is a folder of runs, each ``<study>/runs/<name>`` a normal training run
directory. Every stage is idempotent: training resumes or does nothing when
finished, data preparation and evaluation are skipped when their outputs exist,
so re-running a study command continues where it stopped.

Tables pool seeds honestly: a method's CI is the bootstrap CI of its
seed-averaged test macro-AUC, and differences between methods are paired
bootstraps over the same test records with the same resamples for every seed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import pathlib
import shlex
import sys
import warnings
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import flags, logging

from experiments import hyper
from experiments.configs import default as default_config
from mvkt import bootstrap
from mvkt import distributed
from mvkt import evaluate as evaluate_lib
from mvkt import metrics as metrics_lib
from mvkt import data as data_lib
from mvkt import errors
from mvkt import run_config
from mvkt import run_dir
from mvkt import train as train_lib


UnfinishedRunError = errors.UnfinishedRunError


SAMPLE_PTBXL = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "ptbxl"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study: its folder name and full config."""

    name: str
    config: ml_collections.ConfigDict

    def workdir(self, study_dir: pathlib.Path) -> pathlib.Path:
        return pathlib.Path(study_dir) / "runs" / self.name


def prepare_ptbxl(
    src: str | pathlib.Path, out: pathlib.Path, *, task: str, sampling_rate: int = 100
) -> pathlib.Path:
    """PTB-XL shards in ``out`` (skipped when a complete manifest is already there)."""
    from data_prep import ptbxl

    if distributed.chief_decides((out / "manifest.json").exists()):
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest.get("task") != task:
            raise ValueError(
                f"{out} holds task {manifest.get('task')!r}, not {task!r}: use another --workdir or delete it"
            )
        return out
    distributed.on_chief(ptbxl.prepare, pathlib.Path(src), out, task=task, sampling_rate=sampling_rate)
    return out


def base_config(
    *,
    data_dir: str | pathlib.Path,
    arch: str,
    epochs: int,
    batch_size: int,
    seed: int,
    width_mult: float = 1.0,
    overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The default config with the study's settings; ``overrides`` (``--override``) last."""
    config = default_config.get_config()
    config.data.dir = str(data_dir)
    for net in (config.student, config.teacher):  # the study's teachers and students share the net
        net.arch = arch
        net.width_mult = width_mult
    config.train.epochs = epochs
    config.train.batch_size = batch_size
    config.seed = seed
    if overrides:
        config = ml_collections.ConfigDict(hyper.apply_overrides(config, overrides, source="--override").to_dict())
    return config


def existing_teacher(pattern: str, seed: int, data_dir: str | pathlib.Path) -> pathlib.Path:
    """The finished teacher run ``pattern`` names for ``seed`` (``{seed}`` and globs allowed;
    a plain folder is used for every seed), checked to be trained on the same shards."""
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


TASKS = ["superdiagnostic", "subdiagnostic", "diagnostic", "form", "rhythm", "all"]


def define_flags(*, workdir: str, leads: str = "I", leads_help: str = "student leads, e.g. I or I,II,V2",
                 methods: Sequence[str] = ("bce", "mvkt")) -> None:
    """The flags every study runner (pipeline, ablation, lead_sweep, crossval) shares, with
    one meaning and one default each. Defined only when a runner runs as a program, so that
    importing several runners (tests) never clashes."""
    flags.DEFINE_string("workdir", workdir, "study folder (data, runs, report)")
    flags.DEFINE_string("ptbxl_dir", str(SAMPLE_PTBXL),
                        "PTB-XL release folder to prepare (default: the embedded 100-record sample)")
    flags.DEFINE_string("data_dir", None, "existing shards (skips data preparation)")
    flags.DEFINE_enum("task", "superdiagnostic", TASKS, "PTB-XL benchmark task (with --ptbxl_dir)")
    flags.DEFINE_string("leads", leads, leads_help)
    flags.DEFINE_list("methods", list(methods), f"students (bce required), from {list(TRANSFER_METHODS)}")
    flags.DEFINE_string("seeds", "0", "comma-separated seeds: each trains its own teacher and students")
    flags.DEFINE_integer("epochs", 20, "epochs for every run")
    flags.DEFINE_string("arch", "resnet1d_wang", "net for teacher and students")
    flags.DEFINE_float("width_mult", 1.0, "channel width multiplier")
    flags.DEFINE_integer("batch_size", 0, "0 = 128, or 32 for tiny train splits")
    flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")
    flags.DEFINE_string("teacher_dir", None,
                        "reuse finished 12-lead teachers instead of training them: a run folder, or a "
                        "pattern with {seed} and globs, e.g. runs/pipeline/runs/teacher_seed{seed}")
    flags.DEFINE_multi_string("override", [], "config field=value for every run, teachers included, "
                              "e.g. --override=clt.num_negatives=256 (repeatable)")


def flag_values(program: str) -> dict[str, Any]:
    """The shared flags as keyword arguments of the runners (data prepared if needed)."""
    f = flags.FLAGS
    workdir = pathlib.Path(f.workdir).absolute()
    data_dir = f.data_dir or prepare_ptbxl(f.ptbxl_dir, workdir / "data", task=f.task)
    splits = data_lib.load_manifest(data_dir)["splits"]
    logging.info("study folder %s; data %s (%s records); seeds %s; methods %s; %d epochs of %s%s", workdir,
                 pathlib.Path(data_dir).absolute(),
                 ", ".join(f"{name} {splits[name]['num_records']}" for name in data_lib.SPLITS), f.seeds,
                 ",".join(f.methods), f.epochs, f.arch,
                 f"; overrides {', '.join(f.override)}" if f.override else "")
    return dict(
        workdir=workdir, data_dir=pathlib.Path(data_dir).absolute(), methods=list(f.methods),
        seeds=seeds_from(f.seeds), epochs=f.epochs, arch=f.arch, width_mult=f.width_mult,
        batch_size=f.batch_size, n_resamples=f.bootstrap_resamples, teacher_dir=f.teacher_dir,
        overrides=dict(hyper.parse_override(default_config.get_config(), text) for text in f.override),
        command=" ".join([f"python -m {program}", *map(shlex.quote, sys.argv[1:])]),
    )


def teacher_run(base: ml_collections.ConfigDict, *, overrides: Mapping[str, Any] | None = None,
                name: str = "teacher") -> Run:
    """The 12-lead BCE teacher of ``base``; ``overrides`` (e.g. lead dropout) make a variant
    that must be given its own ``name``."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.method = "bce"
    config.trains = "teacher"
    config.teacher.leads = "all"
    if overrides:
        config = hyper.apply_overrides(config, overrides, source=f"teacher {name!r}")
    return Run(f"{name}_seed{config.seed}", config)


def student_run(
    base: ml_collections.ConfigDict,
    *,
    method: str,
    leads: str,
    teacher_dir: pathlib.Path | str,
    clt_variant: str = "memory_bank",
    name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Run:
    """``teacher_dir``: a finished teacher run, or several joined by commas (an ensemble)."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.method = method
    config.student.leads = leads
    config.clt.variant = clt_variant
    config.teacher.runs = tuple(run_config.path_list(teacher_dir)) if method != "bce" else ()
    name = name or f"{method}{'_' + clt_variant if method in ('clt', 'mvkt') else ''}"
    if overrides:
        config = hyper.apply_overrides(config, overrides, source=f"recipe {name!r}")
    return Run(f"{name}_leads{leads.replace(',', '-')}_seed{config.seed}", config)


LEADS = "{leads}"  # in a recipe's overrides: replaced by the student's leads


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named way to train a student: its method, config overrides for the student and,
    when the recipe needs its own teacher, overrides of the 12-lead teacher (trained once
    per seed and round under ``teacher_name``). Values may contain ``LEADS``. ``ensemble``:
    how many of that teacher's seeds (the student's seed and the next ones) form a teacher
    ensemble (mean logits); the other seeds' teachers are the ones those seeds train anyway."""

    method: str
    clt_variant: str = "memory_bank"
    student: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    teacher: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    teacher_name: str = "teacher"
    ensemble: int = 1
    cross_fit: int = 0
    about: str = ""

    def __post_init__(self):
        if bool(self.teacher) != (self.teacher_name != "teacher"):
            raise ValueError("a recipe with teacher overrides names its teacher (teacher_name), and only then")
        if self.ensemble < 1:
            raise ValueError(f"a recipe's ensemble is a number of teachers, at least 1; got {self.ensemble}")
        if self.cross_fit == 1 or self.cross_fit < 0:
            raise ValueError(f"a recipe's cross_fit is a number of disjoint parts, at least 2 (0: off); "
                             f"got {self.cross_fit}")

    def teacher_runs(self, base: ml_collections.ConfigDict, leads: str) -> list[tuple[str, Run]]:
        """(group name, run) of every teacher the student learns from: the recipe's teacher
        of the student's seed and of the next ``ensemble - 1`` seeds; with ``cross_fit=K``,
        K teachers per seed, each trained on every K-th of the training folds."""
        overrides = _with_leads(self.teacher, leads)
        parts: list[tuple[str, dict]] = [(self.teacher_name, overrides)]
        if self.cross_fit:
            folds = run_config.fold_splits(base.data)["train"] if base.data.train_folds else []
            if len(folds) < self.cross_fit:
                raise ValueError(f"cross-fitted teachers need explicit training folds, at least {self.cross_fit} "
                                 f"(data.train_folds={base.data.train_folds!r}): run them in experiments.crossval")
            parts = [(f"{self.teacher_name}_part{k + 1}of{self.cross_fit}",
                      {**overrides, "data.train_folds": ",".join(map(str, folds[k::self.cross_fit]))})
                     for k in range(self.cross_fit)]
        runs = []
        for seed in range(base.seed, base.seed + self.ensemble):
            member = ml_collections.ConfigDict(base.to_dict())
            member.seed = seed
            runs += [(name, teacher_run(member, overrides=o, name=name)) for name, o in parts]
        return runs


def _with_leads(overrides: Mapping[str, Any], leads: str) -> dict[str, Any]:
    return {k: v.replace(LEADS, leads) if isinstance(v, str) else v for k, v in overrides.items()}


# Students by name. The first block is the paper's methods; the rest are the transfer
# recipes of docs/EXPERIMENTS.md (each a config option with its own tests).
_FUNCTION_MATCHING = {"augment.mixup_alpha": 0.4, "augment.amplitude_scale_std": 0.1,
                      "augment.noise_std": 0.05, "augment.baseline_wander": 0.1}
_CROSS_FIT_STUDENT = {"teacher.cross_fit": True, "teacher.cache": True, "teacher.cache_stride_seconds": 0.25}
# Real NSTDB noise (training half of each record) on half of the student's training crops, at
# SNR 0-24 dB; the teacher sees the clean crop. The noise records: --override=augment.nstdb_dir=...
_NSTDB_NOISE = {"augment.nstdb_noise": 0.5}
_LEAD_DROPOUT_TEACHER = {"augment.lead_dropout": 0.5, "augment.lead_dropout_keep": LEADS}
TRANSFER_METHODS: dict[str, Recipe] = {
    "bce": Recipe("bce", about="the student alone (baseline)"),
    "kd": Recipe("kd", about="Hinton KD, softmax over classes at kd_temperature"),
    "mkd": Recipe("mkd", about="multi-label KD (per-class sigmoid targets)"),
    "clt": Recipe("clt", about="CLT, memory bank (CRD) as the paper"),
    "clt_memory_bank": Recipe("clt"),
    "clt_in_batch": Recipe("clt", "in_batch"),
    "mvkt": Recipe("mvkt", about="MKD + CLT as the paper"),
    "mvkt_memory_bank": Recipe("mvkt"),
    "mvkt_in_batch": Recipe("mvkt", "in_batch"),
    "mkd_function_matching": Recipe(
        "mkd", student=_FUNCTION_MATCHING,
        about="MKD with mixup, gain, noise and baseline wander applied alike to teacher and student input"),
    "mvkt_function_matching": Recipe("mvkt", student=_FUNCTION_MATCHING, about="MVKT with the same transforms"),
    "bce_nstdb_noise": Recipe(
        "bce", student=_NSTDB_NOISE,
        about="the BCE student trained on crops half of which carry NSTDB noise (bw, em, ma) at 0-24 dB"),
    "mvkt_nstdb_noise": Recipe(
        "mvkt", student=_NSTDB_NOISE,
        about="MVKT with the same noise on the student's input; the teacher sees the clean crop"),
    "mkd_lead_dropout_teacher": Recipe(
        "mkd", teacher=_LEAD_DROPOUT_TEACHER, teacher_name="teacher_lead_dropout",
        about="MKD from a teacher trained with the student's missing leads zeroed at p=0.5"),
    "mvkt_lead_dropout_teacher": Recipe(
        "mvkt", teacher=_LEAD_DROPOUT_TEACHER, teacher_name="teacher_lead_dropout",
        about="MVKT from the lead-dropout teacher"),
    "kd_lead_dropout_teacher": Recipe(
        "kd", teacher=_LEAD_DROPOUT_TEACHER, teacher_name="teacher_lead_dropout",
        about="KD from the lead-dropout teacher"),
    # A teacher assistant (Mirzadeh et al. 2020) on the leads between 12 and lead I. Here it is
    # trained by BCE, not itself distilled, so that it costs one teacher run per round.
    "kd_teacher_assistant": Recipe(
        "kd", teacher={"teacher.leads": "I,II,V2"}, teacher_name="teacher_assistant_I-II-V2",
        about="Hinton KD from a BCE teacher assistant on leads I, II, V2 (students on a subset of them)"),
    "kd_ensemble2": Recipe("kd", ensemble=2, about="Hinton KD from the mean logits of two teachers (two seeds)"),
    "mkd_ensemble2": Recipe("mkd", ensemble=2, about="MKD from the mean logits of two teachers (two seeds)"),
    # Distil only the classes where the teacher's validation AUC beats the lead-I BCE student's by
    # more than 0.05 in both pilot rounds (docs/RESULTS.md): CD, MI, NORM; not HYP (-0.006 and
    # +0.039) or STTC (+0.021, +0.035).
    "mkd_cd_mi_norm": Recipe(
        "mkd", student={"mkd_class_weights": "HYP:0,STTC:0"},
        about="MKD on CD, MI and NORM only (per-class distillation weights)"),
    # Cross-fitting (as in double machine learning): the teacher's soft targets on its own
    # training records are sharper than on unseen ones (macro-AUC 0.953 on its training
    # records, 0.937 on validation), so each record's targets here come from a teacher that
    # never saw it. Costs two half-data teachers per round and the grid cache.
    "kd_cross_fit2": Recipe(
        "kd", cross_fit=2, student=_CROSS_FIT_STUDENT,
        about="Hinton KD with cross-fitted targets: two teachers on alternate training folds, each "
              "record's targets from the one that never saw it"),
    "mkd_cross_fit2": Recipe(
        "mkd", cross_fit=2, student=_CROSS_FIT_STUDENT,
        about="MKD with the same cross-fitted targets"),
}


def check_methods(methods: Sequence[str]) -> None:
    unknown = sorted(set(methods) - set(TRANSFER_METHODS))
    if unknown or "bce" not in methods:
        raise ValueError(f"methods must include bce and come from {list(TRANSFER_METHODS)}; unknown: {unknown}")


def compared_method(methods: Sequence[str], *, runner: str) -> str:
    """The one method a two-student runner (pipeline, lead sweep) compares with bce."""
    check_methods(methods)
    if len(set(methods)) != 2:
        raise ValueError(f"the {runner} compares bce with one method; got --methods={','.join(methods)}"
                         + (" (use experiments.ablation for several)" if len(set(methods)) > 2 else ""))
    return next(m for m in methods if m != "bce")


def teacher_gap_share(*, difference: float, gap: float, teacher_ci: Sequence[float]) -> float | None:
    """Share of the teacher - baseline ``gap`` that a method's ``difference`` to the baseline
    closes; None unless the teacher beats the baseline with a paired CI above 0 (a share of
    a gap that is not there is noise: -470% was once printed)."""
    return difference / gap if gap > 0 and teacher_ci[0] > 0 else None


def format_gap_share(share: float | None) -> str:
    return "n/a (teacher not significantly better)" if share is None else f"{share:.0%}"


def train_group(
    base: ml_collections.ConfigDict,
    study_dir: pathlib.Path,
    *,
    leads: str,
    methods: Sequence[str],
    n_resamples: int,
    prefix: str = "",
    teacher_dir: pathlib.Path | None = None,
    progress: bool = True,
    metrics: bool = True,
    split: str = "test",
) -> dict[str, pathlib.Path]:
    """One study step: a 12-lead teacher (trained here unless ``teacher_dir``), the variant
    teachers the recipes need, and one student per method on ``base``, each trained or
    resumed and evaluated once on ``split``.

    Run folders: ``<study>/runs/<prefix><teacher name>_seed<s>`` and
    ``<study>/runs/<prefix><method>_leads<L>_seed<s>``. Returns {"teacher": dir, method: dir}
    (variant teachers as ``dirs[<teacher name>]``). ``metrics=False`` only scores ``split``
    (``scores_<split>.npz``), for studies that pool scores over splits too small for metrics
    of their own (cross-validation folds).
    """
    def evaluate(workdir):
        if metrics:
            evaluate_run(workdir, n_resamples=n_resamples, split=split)
        elif not distributed.chief_decides((workdir / evaluate_lib.SCORES_FILE.format(split=split)).exists()):
            evaluate_lib.score_only(workdir, split)

    teacher = teacher_dir or train_run(_prefixed(teacher_run(base), prefix), study_dir, progress=progress)
    evaluate(teacher)
    dirs = {"teacher": teacher}
    trained = {teacher_run(base).name: teacher}  # every teacher run of this step, by run name
    for name in methods:
        recipe = TRANSFER_METHODS[name]
        teachers = []
        for group, run in recipe.teacher_runs(base, leads):
            if run.name not in trained:
                trained[run.name] = train_run(_prefixed(run, prefix), study_dir, progress=progress)
                evaluate(trained[run.name])
            teachers.append(trained[run.name])
            # Only this seed's teachers are returned (ensemble members of later seeds are not), so
            # that every seed of a study reports the same groups.
            if run.config.seed == base.seed:
                dirs.setdefault(group, trained[run.name])
        run = student_run(base, method=recipe.method, leads=leads, teacher_dir=",".join(map(str, teachers)),
                          clt_variant=recipe.clt_variant, name=name,
                          overrides=_with_leads(recipe.student, leads))
        dirs[name] = train_run(_prefixed(run, prefix), study_dir, progress=progress)
        evaluate(dirs[name])
    return dirs


def _prefixed(run: Run, prefix: str) -> Run:
    return Run(f"{prefix}{run.name}", run.config)


def auto_batch_size(data_dir: str | pathlib.Path, requested: int) -> int:
    """``requested``, or for tiny train splits (the embedded sample) a batch that fits."""
    manifest = json.loads((pathlib.Path(data_dir) / "manifest.json").read_text())
    num_train = int(manifest["splits"]["train"]["num_records"])
    if requested:
        return requested
    return 128 if num_train >= 256 else 32


def train_run(run: Run, study_dir: pathlib.Path, *, progress: bool = True) -> pathlib.Path:
    """Trains ``run`` (or resumes it); a finished run is only checked against its config."""
    workdir = run.workdir(study_dir)
    # The chief decides: every process must take the same branch (training is collective).
    if distributed.chief_decides(run_dir.is_finished(workdir)):
        run_dir.check_resume_config(workdir, run.config)
        return workdir
    train_lib.train_and_evaluate(run.config, workdir, progress=progress)
    if not distributed.chief_decides(run_dir.is_finished(workdir)):
        # Never evaluate or build on a partly trained run (e.g. a planned stop).
        raise UnfinishedRunError(f"{workdir} stopped before its last step; rerun to finish it")
    return workdir


def evaluate_run(workdir: pathlib.Path, *, n_resamples: int, split: str = "test") -> dict:
    """The run's ``eval_<split>.json``, computed once (after training finished)."""
    path = workdir / evaluate_lib.EVAL_FILE.format(split=split)
    scores = workdir / evaluate_lib.SCORES_FILE.format(split=split)
    cached = path.exists() and scores.exists() and json.loads(path.read_text()).get("n_resamples") == n_resamples
    if distributed.chief_decides(cached):
        return json.loads(path.read_text())
    return evaluate_lib.evaluate_run(workdir, split=split, n_resamples=n_resamples)


def method_summary(workdirs: Sequence[pathlib.Path], *, n_resamples: int, split: str = "test") -> dict:
    """Seed-averaged macro-AUC of one method with the bootstrap CI of that average.

    Seeds are stacked along the class axis: the macro-AUC of the stacked columns is
    the mean over seeds of each seed's macro-AUC, and every resample draws the same
    records for all seeds.
    """
    loaded = [evaluate_lib.load_scores(w, split) for w in workdirs]
    y = loaded[0]["y"]
    names = [str(n) for n in loaded[0]["label_names"]]
    excluded = metrics_lib.per_class_auc(y_true=y, y_score=loaded[0]["scores"], label_names=names).excluded_classes
    if excluded:  # once, by name (the stacked columns below would repeat it per seed, by column number)
        logging.warning("%s macro-AUC excludes classes without positives or negatives: %s", split,
                        ", ".join(excluded))
    stacked_y = np.concatenate([y] * len(loaded), axis=1)
    stacked_scores = np.concatenate([s["scores"] for s in loaded], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ci = bootstrap.bootstrap_ci(
            y_true=stacked_y, y_score=stacked_scores, metric_fn=metrics_lib.macro_auc, n_resamples=n_resamples
        )
    per_seed = [metrics_lib.per_class_auc(y_true=y, y_score=s["scores"]).macro_auc for s in loaded]
    return {
        "macro_auc": ci.point,
        "ci": [ci.lower, ci.upper],
        "per_seed": per_seed,
        "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
        "num_seeds": len(per_seed),
    }


def comparison_rows(
    groups: dict[str, list[pathlib.Path]], *, baseline: str | None, n_resamples: int, split: str = "test"
) -> list[dict]:
    """One row per method: pooled macro-AUC + CI, and paired difference vs ``baseline``."""
    rows = []
    for name, workdirs in groups.items():
        row = {"method": name, **method_summary(workdirs, n_resamples=n_resamples, split=split)}
        if baseline and name != baseline:
            paired = workdirs
            if len(workdirs) == 1 < len(groups[baseline]):
                # One shared run (e.g. the teacher of every seed) pairs with each baseline seed.
                paired = workdirs * len(groups[baseline])
            row["vs_baseline"] = evaluate_lib.compare_runs(
                groups[baseline], paired, split=split, n_resamples=n_resamples
            )
        rows.append(row)
    return rows


def comparison_table(rows: list[dict], *, baseline: str | None, teacher: dict | None = None) -> str:
    """Markdown comparison table; the gap share is relative to the teacher, when given."""
    head = "| method | seeds | test macro-AUC (seed mean) | 95% CI | per-seed |"
    sep = "|---|---|---|---|---|"
    if baseline:
        head += f" difference vs {baseline} [95% CI] | P(diff <= 0) |"
        sep += "---|---|"
        if teacher:
            head += " share of teacher gap closed |"
            sep += "---|"
    lines = [head, sep]
    base_auc = next((r["macro_auc"] for r in rows if r["method"] == baseline), None)
    for r in rows:
        seeds = ", ".join(f"{a:.4f}" for a in r["per_seed"])
        line = (
            f"| {r['method']} | {r['num_seeds']} | {r['macro_auc']:.4f} | "
            f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {seeds} |"
        )
        if baseline:
            if "vs_baseline" in r:
                d = r["vs_baseline"]
                line += (
                    f" {d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | {d['p_value']:.3f} |"
                )
            else:
                line += " (baseline) | |"
            if teacher:
                if "vs_baseline" in r and r is not teacher:
                    share = teacher_gap_share(
                        difference=r["macro_auc"] - base_auc, gap=teacher["macro_auc"] - base_auc,
                        teacher_ci=teacher.get("vs_baseline", {}).get("ci", [0.0, 0.0]))
                    line += f" {format_gap_share(share)} |"
                else:
                    line += " |"
        lines.append(line)
    return "\n".join(lines)


def relative(path: pathlib.Path, start: pathlib.Path) -> str:
    try:
        return str(pathlib.Path(path).relative_to(start))
    except ValueError:
        return str(path)


def write_json(path: pathlib.Path, obj) -> None:
    """Atomic, and by the chief only (see ``mvkt.distributed``)."""
    distributed.write_text(path, json.dumps(obj, indent=2, default=float))


def seeds_from(text: str | Iterable[int]) -> list[int]:
    if isinstance(text, str):
        return [int(s) for s in text.split(",") if s.strip()]
    return [int(s) for s in text]
