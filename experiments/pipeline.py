"""The main job: data -> 12-lead teacher -> BCE lead-I student -> MVKT lead-I student -> report.

    python -m experiments.pipeline                       # embedded 100-record PTB-XL sample
    python -m experiments.pipeline --ptbxl_dir=/data/ptb-xl --epochs=50 --seeds=0,1,2 \
        --workdir=runs/ptbxl_full
    python -m experiments.pipeline ... --methods=bce,mvkt_in_batch   # another method vs BCE

The flags are the ones every study runner shares (``experiments.study.define_flags``).

Stages: prepare shards (``<workdir>/data``), train the teacher, the BCE student and
the MVKT student for every seed (``<workdir>/runs/...``), evaluate each once on
the test split with thresholds from validation, then write ``<workdir>/report.md``
with the comparison table (macro-AUC with 95% CI, paired difference MVKT - BCE
with CI, share of the teacher-student gap closed) and plots. Re-running skips
finished stages and resumes an interrupted one.
"""

import pathlib
from typing import Any, Sequence

from absl import app, flags

from experiments import report as report_lib
from experiments import study
from experiments import cli
from mvkt import distributed
from mvkt import run_config


_DISPLAY = {"mvkt": "MVKT", "mvkt_memory_bank": "MVKT", "mvkt_in_batch": "MVKT (in-batch)"}


def run_pipeline(
    *,
    workdir: pathlib.Path,
    data_dir: str | pathlib.Path,
    leads: str = "I",
    methods: Sequence[str] = ("bce", "mvkt"),
    seeds: Sequence[int] = (0,),
    epochs: int = 20,
    arch: str = "resnet1d_wang",
    width_mult: float = 1.0,
    batch_size: int = 0,
    n_resamples: int = 1000,
    teacher_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    command: str = "experiments.pipeline.run_pipeline",
    progress: bool = True,
) -> pathlib.Path:
    """Runs (or continues) every stage; returns the report path. ``methods``: the BCE
    student and the one method it is compared with (default MVKT)."""
    method = study.compared_method(methods, runner="pipeline")
    workdir = pathlib.Path(workdir).absolute()
    if distributed.is_chief():
        workdir.mkdir(parents=True, exist_ok=True)
    batch_size = study.auto_batch_size(data_dir, batch_size)
    labels = {"teacher": "teacher (12-lead)", "bce": f"BCE student ({leads})",
              method: f"{_DISPLAY.get(method, method)} student ({leads})"}
    groups: dict[str, list[pathlib.Path]] = {label: [] for label in labels.values()}
    for seed in seeds:
        base = study.base_config(data_dir=data_dir, arch=arch, epochs=epochs, batch_size=batch_size, seed=seed,
                                 width_mult=width_mult, overrides=overrides)
        teacher = study.existing_teacher(teacher_dir, seed, data_dir) if teacher_dir else None
        dirs = study.train_group(base, workdir, leads=leads, methods=["bce", method], n_resamples=n_resamples,
                                 teacher_dir=teacher, progress=progress)
        for key, label in labels.items():
            groups[label].append(dirs[key])
    return distributed.on_chief(
        report_lib.write_comparison_report,
        workdir,
        groups=groups,
        teacher_group=labels["teacher"],
        baseline_group=labels["bce"],
        method_group=labels[method],
        n_resamples=n_resamples,
        title="MVKT pipeline",
        command=command,
    )


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        kwargs = study.flag_values("experiments.pipeline")
        path = run_pipeline(leads=",".join(run_config.parse_leads(flags.FLAGS.leads)), **kwargs)
        cli.print_report(path)


if __name__ == "__main__":
    study.define_flags(workdir="runs/pipeline")
    flags.adopt_module_key_flags(study)  # --help lists them, not only --helpfull
    app.run(main, flags_parser=cli.parse_flags)
