"""Lead sweep: a BCE student and a transfer student (default MVKT) per input lead set.

    python -m experiments.lead_sweep --ptbxl_dir=/data/ptb-xl --workdir=runs/lead_sweep \
        --seeds=0,1,2 --epochs=50                       # 12 single leads
    python -m experiments.lead_sweep --data_dir=SHARDS --workdir=runs/lead_sweep \
        --leads="I;II;I,II;I,II,V2" --teacher_dir='runs/pipeline/runs/teacher_seed{seed}'

The flags are the ones every study runner shares (``experiments.study.define_flags``);
here ``--leads`` lists lead sets (``;`` between students, ``,`` inside one). Per seed:
one 12-lead teacher (trained here, or reused with ``--teacher_dir``), then for every lead
set a BCE student and a ``--methods`` student (``study.train_group``), each evaluated
once on the test split (thresholds from validation). Writes ``<workdir>/lead_sweep.md``
(lead | BCE AUC [CI] | method AUC [CI] | gain [paired CI] | P), ``lead_sweep.json`` and
``plots/lead_sweep.png`` (both AUCs and the gain per lead, with the teacher line). Run
folders are named like every study's (``runs/<method>_leads<L>_seed<s>``); re-running
skips finished runs and cached evaluations, and a changed setting in an existing study
folder is refused (use another ``--workdir``).
"""

from __future__ import annotations

import datetime
import pathlib
from typing import Any, Sequence

from absl import app, flags

from experiments import report as report_lib
from experiments import study
from experiments import cli
from mvkt import data as data_lib
from mvkt import distributed
from mvkt import evaluate as evaluate_lib
from mvkt import plots
from mvkt import run_config

ALL_SINGLE = "all12"


def lead_sets(text: str) -> list[str]:
    """``--leads``: ``all12`` (one student per single lead) or ';'-separated lead sets, each
    one student (``"I;II;I,II,V2"``) -> canonical lead strings, in order."""
    sets = list(data_lib.LEADS) if text.strip() == ALL_SINGLE else [s for s in text.split(";") if s.strip()]
    sets = list(dict.fromkeys(",".join(run_config.parse_leads(s)) for s in sets))
    if not sets:
        raise ValueError("no lead sets: give --leads=all12 or ';'-separated sets, e.g. 'I;II;I,II,V2'")
    return sets


def run_lead_sweep(*, workdir: str | pathlib.Path, data_dir: str | pathlib.Path, lead_sets: Sequence[str],
                   seeds: Sequence[int] = (0,), methods: Sequence[str] = ("bce", "mvkt"), epochs: int = 20,
                   arch: str = "resnet1d_wang", width_mult: float = 1.0, batch_size: int = 0,
                   n_resamples: int = 1000, teacher_dir: str | None = None,
                   overrides: dict[str, Any] | None = None, progress: bool = True,
                   command: str = "experiments.lead_sweep.run_lead_sweep") -> pathlib.Path:
    """Trains/evaluates what is missing and writes the report; returns ``lead_sweep.md``.

    Per seed one ``study.train_group`` per lead set, all sharing the seed's teacher (trained
    with the first lead set, or the finished one ``teacher_dir`` names). ``methods``: bce and
    the one method it is compared with. ``overrides`` apply to every run, the teacher included.
    """
    method = study.compared_method(methods, runner="lead sweep")
    study_dir = pathlib.Path(workdir).absolute()
    if distributed.is_chief():
        study_dir.mkdir(parents=True, exist_ok=True)
    lead_sets = list(lead_sets)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given")
    data_dir = pathlib.Path(data_dir).absolute()
    batch_size = study.auto_batch_size(data_dir, batch_size)

    teachers: list[pathlib.Path] = []
    bce: dict[str, list[pathlib.Path]] = {s: [] for s in lead_sets}
    transfer: dict[str, list[pathlib.Path]] = {s: [] for s in lead_sets}
    for seed in seeds:
        base = study.base_config(data_dir=data_dir, arch=arch, epochs=epochs, batch_size=batch_size,
                                 seed=seed, width_mult=width_mult, overrides=overrides)
        teacher = study.existing_teacher(teacher_dir, seed, data_dir) if teacher_dir else None
        for leads in lead_sets:
            dirs = study.train_group(base, study_dir, leads=leads, methods=["bce", method],
                                     n_resamples=n_resamples, teacher_dir=teacher, progress=progress)
            teacher = dirs["teacher"]
            bce[leads].append(dirs["bce"])
            transfer[leads].append(dirs[method])
        teachers.append(teacher)
    return distributed.on_chief(write_report, study_dir, teachers=teachers, bce=bce, transfer=transfer,
                                n_resamples=n_resamples, method=method, command=command)


def _cis_contain_points(summaries: list[dict]) -> bool:
    return all(s["ci"][0] <= s["macro_auc"] <= s["ci"][1] for s in summaries)


def write_report(study_dir: pathlib.Path, *, teachers: list[pathlib.Path],
                 bce: dict[str, list[pathlib.Path]], transfer: dict[str, list[pathlib.Path]],
                 n_resamples: int, method: str, command: str) -> pathlib.Path:
    """``lead_sweep.md`` + ``lead_sweep.json`` + ``plots/lead_sweep.png`` from evaluated runs."""
    teacher = study.method_summary(teachers, n_resamples=n_resamples)
    rows = []
    for leads in bce:
        b = study.method_summary(bce[leads], n_resamples=n_resamples)
        m = study.method_summary(transfer[leads], n_resamples=n_resamples)
        gain = evaluate_lib.compare_runs(bce[leads], transfer[leads], n_resamples=n_resamples)
        teacher_vs_bce = evaluate_lib.compare_runs(bce[leads], teachers, n_resamples=n_resamples)
        closed = study.teacher_gap_share(difference=gain["difference"], gap=teacher["macro_auc"] - b["macro_auc"],
                                         teacher_ci=teacher_vs_bce["ci"])
        rows.append({"leads": leads, "bce": b, "method": m, "gain": gain, "teacher_vs_bce": teacher_vs_bce,
                     "teacher_gap_closed": closed,
                     "runs": {"bce": [str(d) for d in bce[leads]], method: [str(d) for d in transfer[leads]]}})

    method_name = {"mvkt": "MVKT", "mvkt_memory_bank": "MVKT"}.get(method, method)
    with_ci = _cis_contain_points([r["bce"] for r in rows] + [r["method"] for r in rows])
    png = plots.plot_lead_sweep(
        study_dir / "plots" / "lead_sweep.png", leads=[r["leads"] for r in rows],
        auc_baseline=[r["bce"]["macro_auc"] for r in rows], auc_method=[r["method"]["macro_auc"] for r in rows],
        ci_baseline=[r["bce"]["ci"] for r in rows] if with_ci else None,
        ci_method=[r["method"]["ci"] for r in rows] if with_ci else None,
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
        f"# Lead sweep: BCE vs {method_name} students per input lead set", "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by:", "",
        f"```\n{command}\n```", "",
        "## Data", data_text, "",
        "## Result", "", verdict, "",
        f"12-lead teacher: test macro-AUC {teacher['macro_auc']:.4f} [{t_lo:.4f}, {t_hi:.4f}] "
        f"({len(teachers)} seed(s)).", "",
        f"| leads | BCE test macro-AUC [95% CI] | {method_name} test macro-AUC [95% CI] | "
        f"gain {method_name} - BCE [paired 95% CI] | P(gain <= 0) | share of teacher gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, m, g = r["bce"], r["method"], r["gain"]
        share = study.format_gap_share(r["teacher_gap_closed"])
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
        for name, dirs in r["runs"].items():
            lines.append(f"| {r['leads']} | {name} | " + ", ".join(
                f"`{study.relative(pathlib.Path(d), study_dir)}`" for d in dirs) + " |")
    path = study_dir / "lead_sweep.md"
    path.write_text("\n".join(lines) + "\n")
    study.write_json(study_dir / "lead_sweep.json", {
        "teacher": {**teacher, "runs": [str(d) for d in teachers]}, "rows": rows,
        "n_resamples": n_resamples, "method": method, "plot": str(png), "command": command})
    return path


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        kwargs = study.flag_values("experiments.lead_sweep")
        path = run_lead_sweep(lead_sets=lead_sets(flags.FLAGS.leads), **kwargs)
        cli.print_report(path)


if __name__ == "__main__":
    study.define_flags(workdir="runs/lead_sweep", leads=ALL_SINGLE,
                       leads_help="students' lead sets: all12 (one per single lead) or ';'-separated sets, "
                                  "e.g. 'I;II;I,II,V2'")
    flags.adopt_module_key_flags(study)  # --help lists them, not only --helpfull
    app.run(main, flags_parser=cli.parse_flags)
