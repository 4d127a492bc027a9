"""The main job: data -> 12-lead teacher -> BCE lead-I student -> MVKT lead-I student -> report.

    python -m experiments.pipeline                       # embedded 100-record PTB-XL sample
    python -m experiments.pipeline --ptbxl_dir=/data/ptb-xl --epochs=50 --seeds=0,1,2 \
        --workdir=runs/ptbxl_full

Stages: prepare shards (``<workdir>/data``), train the teacher, the BCE student and
the MVKT student for every seed (``<workdir>/runs/...``), evaluate each once on
the test split with thresholds from validation, then write ``<workdir>/report.md``
with the comparison table (macro-AUC with 95% CI, paired difference MVKT - BCE
with CI, share of the teacher-student gap closed) and plots. Re-running skips
finished stages and resumes an interrupted one.
"""

import pathlib
import sys

from absl import app, flags

from experiments import report as report_lib
from experiments import study
from experiments import cli
from mvkt import distributed
from mvkt import train as train_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/pipeline", "study folder (data, runs, report)")
_PTBXL_DIR = flags.DEFINE_string(
    "ptbxl_dir", str(study.SAMPLE_PTBXL), "PTB-XL release folder (default: the embedded 100-record sample)"
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "existing shards (skips data preparation)")
_TASK = flags.DEFINE_enum(
    "task",
    "superdiagnostic",
    ["superdiagnostic", "subdiagnostic", "diagnostic", "form", "rhythm", "all"],
    "PTB-XL benchmark task",
)
_LEADS = flags.DEFINE_string("leads", "I", "student leads, e.g. I or I,II,V2")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "epochs for every run")
_ARCH = flags.DEFINE_string("arch", "resnet1d_wang", "net for teacher and students")
_WIDTH = flags.DEFINE_float("width_mult", 1.0, "channel width multiplier")
_SEEDS = flags.DEFINE_string("seeds", "0", "comma-separated seeds (each seed: teacher + 2 students)")
_BATCH = flags.DEFINE_integer("batch_size", 0, "0 = 128, or 32 for tiny train splits")
_CLT = flags.DEFINE_enum("clt_variant", "memory_bank", ["memory_bank", "in_batch"], "CLT variant")
_RESAMPLES = flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")


def run_pipeline(
    *,
    workdir: pathlib.Path,
    ptbxl_dir: str,
    data_dir: str | None,
    task: str,
    leads: str,
    epochs: int,
    arch: str,
    width_mult: float,
    seeds: list[int],
    batch_size: int,
    clt_variant: str,
    n_resamples: int,
    progress: bool = True,
) -> pathlib.Path:
    """Runs (or continues) every stage; returns the report path."""
    workdir = pathlib.Path(workdir).absolute()
    if distributed.is_chief():
        workdir.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        data_dir = study.prepare_ptbxl(ptbxl_dir, workdir / "data", task=task)
    batch_size = study.auto_batch_size(data_dir, batch_size)
    groups: dict[str, list[pathlib.Path]] = {
        "teacher (12-lead)": [],
        f"BCE student ({leads})": [],
        f"MVKT student ({leads})": [],
    }
    for seed in seeds:
        base = study.base_config(
            data_dir=data_dir,
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            width_mult=width_mult,
        )
        mvkt = f"mvkt_{clt_variant}"
        dirs = study.train_group(
            base, workdir, leads=leads, methods=["bce", mvkt], n_resamples=n_resamples, progress=progress
        )
        for group, key in zip(groups, ["teacher", "bce", mvkt]):
            groups[group].append(dirs[key])
    return distributed.on_chief(
        report_lib.write_comparison_report,
        workdir,
        groups=groups,
        teacher_group="teacher (12-lead)",
        baseline_group=f"BCE student ({leads})",
        method_group=f"MVKT student ({leads})",
        n_resamples=n_resamples,
        title="MVKT pipeline",
        command=" ".join(["python -m experiments.pipeline", *sys.argv[1:]]),
    )


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        path = run_pipeline(
            workdir=pathlib.Path(_WORKDIR.value),
            ptbxl_dir=_PTBXL_DIR.value,
            data_dir=_DATA_DIR.value,
            task=_TASK.value,
            leads=",".join(train_lib.parse_leads(_LEADS.value)),
            epochs=_EPOCHS.value,
            arch=_ARCH.value,
            width_mult=_WIDTH.value,
            seeds=study.seeds_from(_SEEDS.value),
            batch_size=_BATCH.value,
            clt_variant=_CLT.value,
            n_resamples=_RESAMPLES.value,
        )
        cli.print_report(path)


if __name__ == "__main__":
    app.run(main)
