"""Trains a teacher or a student: the absl entry point around ``mvkt.train``.

    python -m experiments.train --config=experiments/configs/teacher.py --workdir=T \
            --config.data.dir=SHARDS
    python -m experiments.train --config=experiments/configs/student.py --workdir=S \
            --config.data.dir=SHARDS --config.teacher.runs=T --config.student.leads=I \
            --config.method=mvkt --config.clt.variant=memory_bank

Running the same command again resumes (or does nothing if the run finished).
Multi-host (TPU pods, several GPU hosts): the same command on every host with
--distributed (see experiments/cli.py and the README), e.g. two local processes:

    for i in 0 1; do JAX_NUM_CPU_DEVICES=1 python -m experiments.train ... --distributed \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=$i & done; wait
"""


from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from experiments.configs import default as default_config
from mvkt import distributed, train


def define_flags() -> None:
    """This entry point's flags; defined by its ``__main__`` only, so that the entry points can be
    imported together (their flags share names such as --workdir)."""
    config_flags.DEFINE_config_file(
        "config", "experiments/configs/teacher.py", "training config file", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl); required to train")
    flags.DEFINE_bool("config_help", False, "list every config field with its value and what it means, then exit")


def summary_line(summary: dict) -> str:
    """The last line of a training: where, how far, how good, what next."""
    best = summary.get("best_val_macro_auc")
    auc = "undefined" if best is None else f"{best:.4f}"
    state = ("already finished, nothing trained" if summary.get("resumed_finished") else
             "finished" if summary.get("finished") else "stopped early (rerun the same command to continue)")
    return (f"{summary['workdir']}: {state}; step {summary['step']} of {summary['total_steps']}; best validation "
            f"macro-AUC {auc}; next: python -m experiments.evaluate --workdir={summary['workdir']}")


def main(argv):
    del argv
    if flags.FLAGS.config_help:
        print(cli.config_help(flags.FLAGS["config"].config_filename, flags.FLAGS.config))
        return
    with cli.exit_on_known_errors():
        if not flags.FLAGS.workdir:
            raise ValueError("--workdir=RUN is required: the run folder to train into (or resume)")
        cli.start()
        cli.echo_config(flags.FLAGS.config, default_config.get_config())
        summary = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
        if distributed.is_chief():
            print(summary_line(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
