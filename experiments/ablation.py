"""Ablation of the transfer methods with the same seeds and budget.

    python -m experiments.ablation --data_dir=SHARDS --workdir=runs/ablation --seeds=0,1,2 --epochs=20

For every seed: a 12-lead teacher (or the one given by --teacher_dir), then one
student per method on the same leads, seed and budget: BCE, KD (Hinton-style,
tempered), MKD, CLT (memory bank and in-batch), MVKT (MKD + CLT, memory bank and
in-batch). Each run is evaluated once on the test split; ``report.md`` holds one
table with the seed-averaged macro-AUC, its CI and the paired difference against
the BCE student (pooled over seeds), plus plots. Re-running continues where it stopped.
"""

import pathlib
import sys

from absl import app, flags

from experiments import report as report_lib
from experiments import study
from experiments import cli
from mvkt import distributed
from mvkt import plots
from mvkt import train as train_lib

# Every transfer method once (study.TRANSFER_METHODS without its short aliases).
METHODS = ["bce", "kd", "mkd", "clt_memory_bank", "clt_in_batch", "mvkt_memory_bank", "mvkt_in_batch"]

_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "study folder")
_PTBXL_DIR = flags.DEFINE_string("ptbxl_dir", str(study.SAMPLE_PTBXL), "PTB-XL folder to prepare")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "existing shards (skips data preparation)")
_TASK = flags.DEFINE_string("task", "superdiagnostic", "PTB-XL task when preparing data")
_LEADS = flags.DEFINE_string("leads", "I", "student leads")
_METHODS = flags.DEFINE_list("methods", METHODS, f"subset of {list(study.TRANSFER_METHODS)}")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds")
_EPOCHS = flags.DEFINE_integer("epochs", 20, "epochs for every run")
_ARCH = flags.DEFINE_string("arch", "resnet1d_wang", "net for teacher and students")
_WIDTH = flags.DEFINE_float("width_mult", 1.0, "channel width multiplier")
_BATCH = flags.DEFINE_integer("batch_size", 0, "0 = 128, or 32 for tiny train splits")
_TEACHER_DIR = flags.DEFINE_string(
    "teacher_dir", None, "an existing teacher run used for every seed (default: one per seed)"
)
_RESAMPLES = flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")


def run_ablation(
    *,
    workdir: pathlib.Path,
    data_dir: str,
    leads: str,
    methods: list[str],
    seeds: list[int],
    epochs: int,
    arch: str,
    width_mult: float,
    batch_size: int,
    teacher_dir: str | None,
    n_resamples: int,
    command: str,
    progress: bool = True,
) -> pathlib.Path:
    study.check_methods(methods)
    workdir = pathlib.Path(workdir).absolute()
    batch_size = study.auto_batch_size(data_dir, batch_size)
    groups: dict[str, list[pathlib.Path]] = {"teacher (12-lead)": []}
    groups.update({name: [] for name in methods})
    for seed in seeds:
        base = study.base_config(
            data_dir=data_dir,
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            width_mult=width_mult,
        )
        dirs = study.train_group(
            base,
            workdir,
            leads=leads,
            methods=methods,
            n_resamples=n_resamples,
            teacher_dir=pathlib.Path(teacher_dir).absolute() if teacher_dir else None,
            progress=progress,
        )
        groups["teacher (12-lead)"].append(dirs["teacher"])
        for name in methods:
            groups[name].append(dirs[name])
    if teacher_dir:
        groups["teacher (12-lead)"] = groups["teacher (12-lead)"][:1]

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
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    with cli.exit_on_known_errors():
        cli.start()
        data_dir = _DATA_DIR.value or study.prepare_ptbxl(
            _PTBXL_DIR.value, workdir / "data", task=_TASK.value
        )
        path = run_ablation(
            workdir=workdir,
            data_dir=str(data_dir),
            leads=",".join(train_lib.parse_leads(_LEADS.value)),
            methods=_METHODS.value,
            seeds=study.seeds_from(_SEEDS.value),
            epochs=_EPOCHS.value,
            arch=_ARCH.value,
            width_mult=_WIDTH.value,
            batch_size=_BATCH.value,
            teacher_dir=_TEACHER_DIR.value,
            n_resamples=_RESAMPLES.value,
            command=" ".join(["python -m experiments.ablation", *sys.argv[1:]]),
        )
        cli.print_report(path)


if __name__ == "__main__":
    app.run(main)
