"""Exports a trained run's net for deployment.

    python -m experiments.export --workdir=RUN --format=onnx --out=student.onnx
    python -m experiments.export --workdir=RUN --format=onnx --quantize=int8 --out=student.int8.onnx
    python -m experiments.export --workdir=RUN --format=stablehlo --out=student.stablehlo

ONNX: input ``ecg`` float32 (batch, window, leads) raw samples at the run's sampling rate
(standardisation inside the graph), output ``probabilities`` (batch, classes), dynamic
batch, BatchNorm folded, the run's labels/leads/rate/window/thresholds in the metadata.
int8 also writes the float32 model beside it (``NAME.fp32.onnx``) and reports, for this run,
how far int8 is from float32 (max and mean probability difference per validation window,
validation macro-AUC of both) and their latency on this machine, with a warning when int8
is slower (``int8_vs_float32`` in the printed JSON). Details: mvkt/export.py.
Requires the optional extra ``pip install -e .[export]`` (onnx, onnxruntime) for ONNX.
"""

import json

from absl import app, flags, logging

from experiments import cli
from mvkt import distributed


def define_flags() -> None:
    """This entry point's flags; defined by its ``__main__`` only, so that the entry points can be
    imported together (their flags share names such as --workdir)."""
    flags.DEFINE_string("workdir", None, "a trained run folder", required=True)
    flags.DEFINE_enum("format", "onnx", ["onnx", "stablehlo"], "what to write")
    flags.DEFINE_string("out", None, "output file", required=True)
    flags.DEFINE_enum("quantize", None, ["int8"], "ONNX only: int8 quantization")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "best = selected on validation")
    flags.DEFINE_bool("allow_unfinished", False, "use a run that stopped before its last step (warned, and marked "
                      "run_finished false in the output)")


def main(argv):
    del argv
    with cli.exit_on_known_errors():
        cli.start()
        cli.echo_run(flags.FLAGS.workdir)
        cli.check_finished(flags.FLAGS.workdir, allow_unfinished=flags.FLAGS.allow_unfinished)
        import importlib.util

        from mvkt import export

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if flags.FLAGS.format == "onnx" and missing:
            raise ValueError(f"--format=onnx needs {', '.join(missing)}: install the export extra "
                             "(pip install -e \".[export]\")")
        summary = export.export_run(flags.FLAGS.workdir, flags.FLAGS.out, fmt=flags.FLAGS.format, quantize=flags.FLAGS.quantize,
                                    which=flags.FLAGS.checkpoint)
        if distributed.is_chief():
            print(json.dumps(summary, indent=2))
            comparison = summary.get("int8_vs_float32", {}) if isinstance(summary, dict) else {}
            if "max_probability_difference" in comparison:
                change = comparison.get("val_macro_auc_change")
                logging.info("int8 vs float32 on %d validation windows: probability difference max %.4f, mean "
                                "%.4f; validation macro-AUC change %s", comparison["validation_windows"],
                                comparison["max_probability_difference"], comparison["mean_probability_difference"],
                                "undefined" if change is None else f"{change:+.4f}")
            if comparison.get("warning"):
                logging.warning("%s", comparison["warning"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
