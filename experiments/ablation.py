"""Ablation of the transfer methods with the same seeds and budget.

    python -m experiments.ablation --data_dir=SHARDS --workdir=runs/ablation --seeds=0,1,2 --epochs=20
    python -m experiments.ablation ... --methods=bce,mkd,mkd_lead_dropout_teacher   # recipes too

The flags are the ones every study runner shares (``experiments.study.define_flags``).

For every seed: a 12-lead teacher (or the one --teacher_dir names), then one
student per method on the same leads, seed and budget: BCE, KD (Hinton-style,
tempered), MKD, CLT (memory bank and in-batch), MVKT (MKD + CLT, memory bank and
in-batch). Each run is evaluated once on the test split; ``report.md`` holds one
table with the seed-averaged macro-AUC, its CI and the paired difference against
the BCE student (pooled over seeds), plus plots. Re-running continues where it stopped.
"""

import pathlib
from typing import Any, Sequence

from absl import app, flags

from experiments import report as report_lib
from experiments import study
from experiments import cli
from mvkt import distributed
from mvkt import plots
from mvkt import run_config

# Every paper method once (study.TRANSFER_METHODS without aliases and recipes).
METHODS = ["bce", "kd", "mkd", "clt_memory_bank", "clt_in_batch", "mvkt_memory_bank", "mvkt_in_batch"]


def run_ablation(
    *,
    workdir: pathlib.Path,
    data_dir: str | pathlib.Path,
    leads: str = "I",
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0,),
    epochs: int = 20,
    arch: str = "resnet1d_wang",
    width_mult: float = 1.0,
    batch_size: int = 0,
    teacher_dir: str | None = None,
    n_resamples: int = 1000,
    overrides: dict[str, Any] | None = None,
    command: str = "experiments.ablation.run_ablation",
    progress: bool = True,
) -> pathlib.Path:
    methods = list(methods)
    study.check_methods(methods)
    workdir = pathlib.Path(workdir).absolute()
    batch_size = study.auto_batch_size(data_dir, batch_size)
    groups: dict[str, list[pathlib.Path]] = {"teacher (12-lead)": []}
    groups.update({name: [] for name in methods})
    for seed in seeds:
        base = study.base_config(data_dir=data_dir, arch=arch, epochs=epochs, batch_size=batch_size, seed=seed,
                                 width_mult=width_mult, overrides=overrides)
        teacher = study.existing_teacher(teacher_dir, seed, data_dir) if teacher_dir else None
        dirs = study.train_group(base, workdir, leads=leads, methods=methods, n_resamples=n_resamples,
                                 teacher_dir=teacher, progress=progress)
        groups["teacher (12-lead)"].append(dirs["teacher"])
        for name in methods:
            groups[name].append(dirs[name])
    # One teacher reused for every seed is one run, paired with each seed's baseline.
    groups["teacher (12-lead)"] = list(dict.fromkeys(groups["teacher (12-lead)"]))

    return distributed.on_chief(
        _write_report,
        workdir,
        groups=groups,
        methods=methods,
        leads=leads,
        seeds=seeds,
        epochs=epochs,
        arch=arch,
        n_resamples=n_resamples,
        command=command,
    )


def _write_report(
    workdir: pathlib.Path,
    *,
    groups: dict[str, list[pathlib.Path]],
    methods: list[str],
    leads: str,
    seeds: list[int],
    epochs: int,
    arch: str,
    n_resamples: int,
    command: str,
) -> pathlib.Path:
    method_group = "mvkt_memory_bank" if "mvkt_memory_bank" in methods else methods[-1]
    rows = study.comparison_rows(groups, baseline="bce", n_resamples=n_resamples)
    png = plots.plot_ablation(
        workdir / "plots" / "ablation.png",
        methods=[r["method"] for r in rows],
        aucs=[r["macro_auc"] for r in rows],
        cis=[r["ci"] for r in rows],
        reference="bce",
        title=f"Ablation: lead {leads} students, {len(seeds)} seed(s), {epochs} epochs",
    )
    extra = [
        "## Ablation plot",
        "",
        f"![ablation]({study.relative(png, workdir)})",
        "",
        "Methods: `bce` BCE only; `kd` BCE + alpha * tempered KD on logits (T = kd_temperature); "
        "`mkd` BCE + alpha * MKD (T = 1); `clt_*` BCE + beta * CLT; `mvkt_*` BCE + alpha * MKD + "
        "beta * CLT; `memory_bank` = CRD-style NCE with a momentum memory and K negatives, "
        "`in_batch` = cross-view InfoNCE over the global batch. Negatives are disease-aware.",
        "",
    ]
    return report_lib.write_comparison_report(
        workdir,
        groups=groups,
        teacher_group="teacher (12-lead)",
        baseline_group="bce",
        method_group=method_group,
        n_resamples=n_resamples,
        title=f"MVKT ablation ({arch}, leads {leads})",
        command=command,
        extra_sections=extra,
    )


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        kwargs = study.flag_values("experiments.ablation")
        path = run_ablation(leads=",".join(run_config.parse_leads(flags.FLAGS.leads)), **kwargs)
        cli.print_report(path)


if __name__ == "__main__":
    study.define_flags(workdir="runs/ablation", methods=METHODS)
    flags.adopt_module_key_flags(study)  # --help lists them, not only --helpfull
    app.run(main, flags_parser=cli.parse_flags)
