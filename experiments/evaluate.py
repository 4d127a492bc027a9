"""Evaluates a trained run: ``python -m experiments.evaluate --workdir=RUN --split=test``.

Writes RUN/eval_<split>.json (macro-AUC with bootstrap CI, per-class AUC, F1,
Fmax, ICBEB challenge scores for CPSC), RUN/scores_<split>.npz and RUN/thresholds.json,
and prints a table. Thresholds come from the validation split only.

External validation on another dataset's shards (every record of them), labels mapped
onto the run's, thresholds and standardisation from the run itself; writes only
RUN/eval_external_<name>.json and RUN/scores_external_<name>.npz:

    python -m experiments.evaluate --workdir=RUN --data_dir=CPSC_SHARDS --name=cpsc \
        --label_map=data_prep/mappings/cpsc2018_to_ptbxl_superdiagnostic.csv

Multi-host: --distributed on every host (experiments/cli.py); process 0 writes the files.
"""


from absl import app, flags

from experiments import cli
from mvkt import distributed, evaluate


def define_flags() -> None:
    """This entry point's flags; defined by its ``__main__`` only, so that the entry points can be
    imported together (their flags share names such as --workdir)."""
    flags.DEFINE_string("workdir", None, "a finished training run", required=True)
    flags.DEFINE_enum("split", "test", ["val", "test"], "split to evaluate")
    flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")
    flags.DEFINE_integer("seed", 0, "bootstrap seed")
    flags.DEFINE_enum(
        "checkpoint", "best", ["best", "latest"], "best = selected on validation macro-AUC"
    )
    flags.DEFINE_enum(
        "aggregate", None, ["max", "mean"], "window aggregation (default: the run's config)"
    )
    flags.DEFINE_string("data_dir", None, "other shards for external validation (default: the run's own)")
    flags.DEFINE_string("label_map", None, "CSV source_label,target_label mapping --data_dir's labels onto the run's")
    flags.DEFINE_string("name", None, "name of the external evaluation (eval_external_<name>.json)")


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        cli.echo_run(flags.FLAGS.workdir)
        result = evaluate.evaluate_run(
            flags.FLAGS.workdir,
            split=flags.FLAGS.split,
            n_resamples=flags.FLAGS.bootstrap_resamples,
            seed=flags.FLAGS.seed,
            which=flags.FLAGS.checkpoint,
            aggregate=flags.FLAGS.aggregate,
            data_dir=flags.FLAGS.data_dir,
            label_map=flags.FLAGS.label_map,
            name=flags.FLAGS.name,
        )
        if distributed.is_chief():
            print(evaluate.format_table(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
