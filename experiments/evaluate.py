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

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished training run", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["val", "test"], "split to evaluate")
_RESAMPLES = flags.DEFINE_integer("bootstrap_resamples", 1000, "bootstrap resamples for CIs")
_SEED = flags.DEFINE_integer("seed", 0, "bootstrap seed")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "best", ["best", "latest"], "best = selected on validation macro-AUC"
)
_AGGREGATE = flags.DEFINE_enum(
    "aggregate", None, ["max", "mean"], "window aggregation (default: the run's config)"
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "other shards for external validation (default: the run's own)")
_LABEL_MAP = flags.DEFINE_string("label_map", None, "CSV source_label,target_label mapping --data_dir's labels onto the run's")
_NAME = flags.DEFINE_string("name", None, "name of the external evaluation (eval_external_<name>.json)")


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        cli.echo_run(_WORKDIR.value)
        result = evaluate.evaluate_run(
            _WORKDIR.value,
            split=_SPLIT.value,
            n_resamples=_RESAMPLES.value,
            seed=_SEED.value,
            which=_CHECKPOINT.value,
            aggregate=_AGGREGATE.value,
            data_dir=_DATA_DIR.value,
            label_map=_LABEL_MAP.value,
            name=_NAME.value,
        )
        if distributed.is_chief():
            print(evaluate.format_table(result))


if __name__ == "__main__":
    app.run(main)
