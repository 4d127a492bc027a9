"""Class probabilities of raw records from a trained run.

    python -m experiments.predict --workdir=RUN RECORD [RECORD ...] [--out=p.json|p.csv]
    python -m experiments.predict --workdir=RUN trace.csv --fs=250 --lead=I
    python -m experiments.predict --workdir=RUN a.csv@250 b.csv@512 rec.hea --lead=I --per_window

RECORD: a WFDB record (``NAME`` with ``NAME.hea`` + ``.dat``/``.mat``), an original
CPSC 2018 ``.mat``, an EDF/EDF+/BDF file (``.edf``/``.bdf``: its ECG signals), or a
``.csv``/``.npy`` trace (one column per lead) with ``--fs`` and ``--lead``. The net expects
**millivolts**: WFDB and EDF files are converted from the units their headers name, CPSC
``.mat`` files are mV, traces are read in ``--units`` (default mV). A trace whose amplitude
looks like microvolts (a lead spanning more than 20 mV) is refused with one line naming it. Each record gets the run's training preprocessing (its leads, band-pass,
resampling to its rate, its standardisation) and the evaluation's sliding windows and
aggregation; everything comes from the run folder, the shards are not needed. Decisions
use the per-class thresholds chosen on the run's validation split (``thresholds.json``,
written by ``experiments.evaluate``). A record that cannot be scored gets one error line;
the others are still scored, and the exit status is 1. Records of different rates mix in one
call: WFDB, EDF and CPSC files carry theirs, a headerless trace takes ``--fs`` or its own
``trace.csv@250``. Each record's output names its input rate, duration and the windows scored;
``--per_window`` adds every window's probabilities.

Every record first gets its signal-quality indices (``mvkt.quality``: flat line, clipping,
baseline-wander and high-frequency power, kurtosis, on the model's leads as given). A record
that fails them is reported ``unusable`` and not classified (its decision withheld), unless
``--no_quality_gate``; the indices are printed and written to ``--out`` either way.
"""

import csv
import json
import pathlib
import sys

import numpy as np
from absl import app, flags

from experiments import cli
from mvkt import inference
from mvkt import metrics as metrics_lib


def define_flags() -> None:
    """This entry point's flags; defined by its ``__main__`` only, so that the entry points can be
    imported together (their flags share names such as --workdir)."""
    flags.DEFINE_string("workdir", None, "a trained run folder", required=True)
    flags.DEFINE_string("out", None, "also write the predictions to FILE.json or FILE.csv")
    flags.DEFINE_float("fs", None, "sampling rate (Hz) of .csv/.npy traces; one file's own: trace.csv@250")
    flags.DEFINE_bool("per_window", False, "also print and write every window's probabilities (long traces)")
    flags.DEFINE_enum("units", "mV", ["mV", "uV", "V"], "units of .csv/.npy traces (converted to mV; WFDB and "
                      "EDF files carry their own). A trace that looks like microvolts is refused")
    flags.DEFINE_list("lead", None, "lead name of each column of a .csv/.npy trace, e.g. I")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "best = selected on validation")
    flags.DEFINE_float("sensitivity", None, "decide at the thresholds that keep this share of each class's "
                       "validation positives (e.g. 0.9) instead of the F1-optimal ones (needs scores_val.npz)")
    flags.DEFINE_bool("quality_gate", True, "withhold the decision on records whose signal-quality indices fail "
                      "(mvkt/quality.py); --no_quality_gate classifies them anyway (still reported)")
    flags.DEFINE_bool("allow_unfinished", False, "use a run that stopped before its last step (warned, and marked "
                      "run_finished false in the output)")


def format_quality(assessment: dict) -> str:
    verdict = "usable" if assessment["usable"] else "UNUSABLE"
    indices = "; ".join(f"{lead}: " + " ".join(f"{k} {v:.3g}" for k, v in values.items())
                        for lead, values in assessment["leads"].items())
    failed = f" (failed: {', '.join(assessment['reasons'])})" if assessment["reasons"] else ""
    return f"  quality: {verdict}{failed}\n    {indices}"


def format_unusable(path: str, assessment: dict) -> str:
    return f"{path}\n  unusable: decision withheld (signal quality; --no_quality_gate classifies anyway)\n" \
           f"{format_quality(assessment)}"


def format_record(path: str, predictor: inference.Predictor, probabilities, assessment: dict | None = None) -> str:
    lines = [f"{path}", f"  {'class':>10s}  probability  decision (threshold: {predictor.operating_point}; "
                        "! = see caution)"]
    thresholds = predictor.thresholds or {}
    for name, prob, decision in zip(predictor.label_names, probabilities, predictor.decisions(probabilities)):
        if decision is None:
            why = "n/a (run not evaluated)" if predictor.thresholds is None else "n/a (no validation positives)"
        else:
            why = f"{'yes' if decision else 'no ':3s} ({thresholds[name]:.3f})"
            if name in predictor.threshold_caveats:
                why += " !"
        lines.append(f"  {name:>10s}  {prob:11.4f}  {why}")
    for name, caveat in predictor.threshold_caveats.items():
        lines.append(f"  caution, {name}: {caveat}")
    if assessment is not None:
        lines.append(format_quality(assessment))
    return "\n".join(lines)


def write_out(path: pathlib.Path, rows: list[dict], predictor: inference.Predictor) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({
            "run": str(predictor.workdir.absolute()),
            "checkpoint_step": predictor.meta.get("step"),
            **predictor.training,
            "label_names": predictor.label_names,
            "thresholds": predictor.thresholds,
            "operating_point": predictor.operating_point,
            "threshold_caveats": predictor.threshold_caveats,
            "quality_thresholds": predictor.quality_thresholds.as_dict(),
            "records": rows,
        }, indent=2))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["record", "status", "class", "probability", "threshold", "decision",
                             "quality_failures"])
            for row in rows:
                failures = "; ".join(row["quality"]["reasons"])
                for name in predictor.label_names:
                    threshold = (predictor.thresholds or {}).get(name)
                    probability = (row["probabilities"] or {}).get(name)
                    decision = (row["decisions"] or {}).get(name)
                    writer.writerow([row["record"], row["status"], name,
                                     "" if probability is None else f"{probability:.6f}",
                                     "" if threshold is None else f"{threshold:.6f}",
                                     "" if decision is None else int(decision), failures])
    else:
        raise ValueError(f"--out={path}: write .json or .csv")


def split_rate(spec: str) -> tuple[str, float | None]:
    """``trace.csv@250`` -> ("trace.csv", 250.0): a per-file rate for headerless traces."""
    path, sep, rate = spec.rpartition("@")
    if sep and path:
        try:
            return path, float(rate)
        except ValueError:
            pass
    return spec, None


def predict_record(predictor: inference.Predictor, spec: str, read_any) -> tuple[dict, str]:
    """One record: (its output row, its printed text); RecordError for one that cannot be scored."""
    path, rate = split_rate(spec)
    signal, fs, leads = read_any(path, fs=rate or flags.FLAGS.fs, leads=flags.FLAGS.lead, units=flags.FLAGS.units)
    assessment = predictor.assess_quality(signal, fs=fs, leads=leads, record=path)
    prep = predictor.preprocessing
    info = {"sampling_rate_hz": float(fs), "duration_s": round(len(signal) / fs, 4), "leads": list(leads),
            "model_rate_hz": prep.sampling_rate, "window_s": prep.window / prep.sampling_rate}
    header = f"{path}  ({fs:g} Hz, {len(signal) / fs:.1f} s"
    if flags.FLAGS.quality_gate and not assessment["usable"]:
        row = {"record": path, "status": "unusable", "input": info, "probabilities": None, "decisions": None,
               "quality": assessment}
        return row, format_unusable(header + ")", assessment)
    starts, window_probs = predictor.predict_windows(signal, fs=fs, leads=leads, record=path)
    probabilities = metrics_lib.aggregate_windows(scores=window_probs, record_index=np.zeros(len(starts), np.int64),
                                                  num_records=1, how=prep.aggregate)[0]
    info["windows"] = int(len(starts))
    row = {
        "record": path,
        "status": "classified",
        "input": info,
        "probabilities": dict(zip(predictor.label_names, map(float, probabilities))),
        "decisions": dict(zip(predictor.label_names, predictor.decisions(probabilities))),
        "quality": assessment,
    }
    text = format_record(f"{header}, {len(starts)} window(s) of {info['window_s']:g} s, {prep.aggregate} over them)",
                         predictor, probabilities, assessment)
    if flags.FLAGS.per_window:
        row["windows"] = [{"start_s": float(t), "probabilities": dict(zip(predictor.label_names, map(float, p)))}
                          for t, p in zip(starts, window_probs)]
        text += "\n" + format_windows(predictor.label_names, starts, window_probs)
    return row, text


def format_windows(label_names, starts, probabilities) -> str:
    lines = ["  per window (start s: " + " ".join(f"{n:>6s}" for n in label_names) + ")"]
    for t, p in zip(starts, probabilities):
        lines.append(f"    {t:8.2f}: " + " ".join(f"{v:6.3f}" for v in p))
    return "\n".join(lines)


def main(argv):
    records = argv[1:]
    with cli.exit_on_known_errors():
        cli.start()
        cli.echo_run(flags.FLAGS.workdir)
        cli.check_finished(flags.FLAGS.workdir, allow_unfinished=flags.FLAGS.allow_unfinished)
        if not records:
            raise ValueError("give one or more records after the flags: python -m experiments.predict "
                             "--workdir=RUN RECORD [RECORD ...]")
        out = pathlib.Path(flags.FLAGS.out) if flags.FLAGS.out else None
        if out is not None and out.suffix not in (".json", ".csv"):
            raise ValueError(f"--out={out}: write .json or .csv")
        from data_prep.records import read_any

        predictor = inference.Predictor(flags.FLAGS.workdir, which=flags.FLAGS.checkpoint)
        if flags.FLAGS.sensitivity is not None:
            predictor.use_sensitivity(flags.FLAGS.sensitivity)
        rows, failed = [], 0
        for spec in records:
            try:
                row, text = predict_record(predictor, spec, read_any)
            except inference.RecordError as e:  # unreadable files too (data_prep raises the same class)
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            print(text)
            rows.append(row)
        if out is not None:
            write_out(out, rows, predictor)
            print(f"wrote {out} ({len(rows)} record(s))")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
