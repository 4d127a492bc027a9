"""Exported student: file size, CPU latency per 10-s record, and what int8 costs in accuracy.

    python -m benchmarks.export [--data_dir=SHARDS] [--workdir=runs/bench_export]

Trains (or resumes, or reuses) a resnet1d_wang lead-I BCE student on the PTB-XL subset
shards (prepared from ../shared/datasets/ptbxl-subset-1819 when --data_dir is not given),
exports it to ONNX float32 and int8 (static QDQ calibrated on training windows), and
measures, on this machine's CPU:
- file size of each model;
- latency per 10-s record (7 windows of 2.5 s at stride 1.25 s) for onnxruntime and for
  the jitted JAX forward, one record per call ("batch 1") and 64 records per call
  ("batch 64", per-record time = call time / 64); median of --repeats calls (batch 64:
  --repeats / 20) after warm-up;
- validation macro-AUC of each (sliding windows, max over windows) and the int8 change.

Each latency row waits for a 1-minute load average below 1.0 first (the training before
it loads the machine).

    python -m benchmarks.export --size_table [--archs=...] [--widths=0.25,0.5,1]

measures instead, for every net and width multiplier (lead I, 5 classes, 2.5-s windows at
100 Hz; freshly initialised weights, since size and speed do not depend on their values):
the ONNX float32 and int8 file sizes and the onnxruntime latency per 10-s record (7 windows,
one record per call) of both, int8 calibrated on windows of the embedded real PTB-XL sample.
Writes benchmarks/results/export_sizes.json. Prints the table with the load average before and after each row and writes
benchmarks/results/export.json. Targets: int8 loses at most 0.005 macro-AUC;
onnxruntime at batch 1 under 2 ms per record.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


TARGET_AUC_LOSS = 0.005
TARGET_ORT_MS = 2.0


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "PTB-XL superdiagnostic shards (default: prepared from --ptbxl_dir)")
    flags.DEFINE_string("ptbxl_dir", "../shared/datasets/ptbxl-subset-1819", "PTB-XL folder to prepare")
    flags.DEFINE_string("workdir", "runs/bench_export", "where the student is trained (resumable) and exported")
    flags.DEFINE_integer("epochs", 20, "training epochs of the student")
    flags.DEFINE_integer("repeats", 200, "timed calls per latency row (median reported)")
    flags.DEFINE_string("out_json", None, "results file (default: benchmarks/results/export.json, or "
                        "export_sizes.json with --size_table)")
    flags.DEFINE_bool("size_table", False, "size and latency of every arch x width instead of the trained student")
    flags.DEFINE_list("archs", ["fcn_wang", "resnet1d_wang", "inception1d", "xresnet1d18", "xresnet1d50",
                                "xresnet1d101"], "nets of --size_table")
    flags.DEFINE_list("widths", ["0.25", "0.5", "1.0"], "width multipliers of --size_table")


def _latency_rows(sessions: dict, jitted, record_windows, repeats: int) -> list[dict]:
    """ms per record of each onnxruntime session and of the jitted JAX net, one record and 64
    records per call, each row after the load has settled."""
    import numpy as np

    from mvkt import export

    rows = []
    many = np.concatenate([record_windows] * 64)
    for batch, count in ((record_windows, 1), (many, 64)):
        # A 64-record call takes ~64x longer: fewer calls keep each row short, so that the
        # load average it is published with is not raised by the row itself.
        calls = repeats if count == 1 else max(repeats // 20, 5)
        runners = {f"onnxruntime {name}": (lambda s=session: s.run(None, {export.INPUT_NAME: batch}))
                   for name, session in sessions.items()}
        jitted(batch).block_until_ready()
        runners["jax jit float32"] = lambda: jitted(batch).block_until_ready()
        for runtime, call in runners.items():
            harness.wait_for_quiet(240.0, max_load=1.0)  # training just before raises the load
            before = os.getloadavg()[0]
            ms = _median_ms(call, calls, warmup=3)
            rows.append({"runtime": runtime, "records_per_call": count, "ms_per_record": ms / count,
                         "load_before": before, "load_after": os.getloadavg()[0]})
    return rows


def _print_tables(results: dict, auc_change: float, rows: list[dict]) -> None:
    print("| model | file KiB | val macro-AUC |")
    print("|---|---:|---:|")
    for name in ("float32", "int8"):
        print(f"| ONNX {name} | {results[name]['bytes'] / 1024:.1f} | {results[name]['val_macro_auc']:.4f} |")
    print(f"| JAX (jit) | | {results['jax']['val_macro_auc']:.4f} |")
    print(f"\nint8 - float32 macro-AUC: {auc_change:+.4f} (target >= {-TARGET_AUC_LOSS})\n")
    print("| runtime | records per call | ms per record | load before | load after |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        flag = "" if max(r["load_before"], r["load_after"]) <= 1.5 else " (loaded: not publishable)"
        print(f"| {r['runtime']} | {r['records_per_call']} | {r['ms_per_record']:.3f} | {r['load_before']:.2f} | "
              f"{r['load_after']:.2f}{flag} |")


def _sample_windows(window: int, count: int = 64):
    """Raw lead-I windows (mV) of the embedded PTB-XL sample records: int8 calibration input."""
    import glob

    import numpy as np

    from data_prep.records import read_any

    out = []
    for path in sorted(glob.glob(str(ROOT / "data_prep" / "samples" / "ptbxl" / "records100" / "*" / "*.hea"))):
        signal, _, _ = read_any(path[:-4])
        out += [signal[s:s + window, :1] for s in range(0, len(signal) - window + 1, window)]
    return np.stack(out[:count]).astype(np.float32)


def size_table(args) -> None:
    import tempfile

    import jax
    import numpy as np
    import onnxruntime as ort

    from mvkt import export, metrics, models

    window, per_record = 250, len(metrics.window_starts(length=1000, window=250, stride=125))
    calibration = _sample_windows(window)
    record = calibration[:per_record]
    rows = []
    for arch in args.archs:
        for width in map(float, args.widths):
            model = models.create_model(arch, num_classes=5, width_mult=width)
            variables = model.init(jax.random.PRNGKey(0), np.zeros((1, window, 1), np.float32), train=False)
            net = export.ExportedNet(fn=lambda x, m=model, v=variables: jax.nn.sigmoid(m.apply(v, x, train=False)[0]),
                                     window=window, leads=["I"], metadata={})
            params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
            with tempfile.TemporaryDirectory() as tmp:
                fp32, int8 = pathlib.Path(tmp) / "m.fp32.onnx", pathlib.Path(tmp) / "m.onnx"
                export.to_onnx(net, fp32)
                row = {"arch": arch, "width_mult": width, "params": params, "float32_kib": fp32.stat().st_size / 1024}
                models_here = [("float32", fp32)]
                try:
                    export.quantize_int8(fp32, int8, calibration=calibration)
                    row["int8_kib"] = int8.stat().st_size / 1024
                    models_here.append(("int8", int8))
                except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises its own types
                    row["int8_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    row["int8_ms"], row["int8_load"], row["int8_kib"] = float("nan"), [float("nan")] * 2, float("nan")
                for name, path in models_here:
                    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    harness.wait_for_quiet(120.0, max_load=1.0)
                    before = os.getloadavg()[0]
                    row[f"{name}_ms"] = _median_ms(lambda: session.run(None, {export.INPUT_NAME: record}),
                                                   args.repeats, warmup=5)
                    row[f"{name}_load"] = [before, os.getloadavg()[0]]
            rows.append(row)
            loads = [v for v in row["float32_load"] + row["int8_load"] if v == v]
            flag = "" if max(loads) <= 1.5 else " (loaded)"
            print(f"| {arch} | {width:g} | {params:,} | {row['float32_kib']:.0f} | {row['int8_kib']:.0f} | "
                  f"{row['float32_ms']:.2f} | {row['int8_ms']:.2f} | {row['int8_ms'] / row['float32_ms']:.2f} | "
                  f"{row['float32_load'][0]:.2f}-{max(loads):.2f}{flag} |", flush=True)
    out = {"command": "python -m benchmarks.export --size_table", "rows": rows, "windows_per_record": per_record,
           "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__, "jax": jax.__version__}
    path = pathlib.Path(args.out_json or "benchmarks/results/export_sizes.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")


def main(argv):
    del argv
    args = harness.flag_values()
    if args.size_table:
        print("| arch | width | params | float32 KiB | int8 KiB | float32 ms/record | int8 ms/record | int8/float32 "
              "| load |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        return size_table(args)
    import jax
    import numpy as np
    import onnxruntime as ort

    from experiments import study
    from experiments.configs import student as student_config
    from mvkt import export, inference, metrics, run_dir, train

    workdir = pathlib.Path(args.workdir).absolute()
    data_dir = args.data_dir or study.prepare_ptbxl(args.ptbxl_dir, workdir / "data", task="superdiagnostic")
    config = student_config.get_config()
    config.method = "bce"
    config.data.dir = str(pathlib.Path(data_dir).absolute())
    config.train.epochs = args.epochs
    config.train.batch_size = 128
    run = workdir / "student"
    if not run_dir.is_finished(run):
        train.train_and_evaluate(config, run)

    models = {"float32": workdir / "student.fp32.onnx", "int8": workdir / "student.onnx"}
    summary = export.export_run(run, models["int8"], fmt="onnx", quantize="int8")
    net = export.exported_net(run)
    prep = inference.Preprocessing.of_run(run)

    raw, records, val_y = export.validation_windows(run)  # the run's own validation split, raw units
    per_record = int(np.sum(records == 0))  # windows of one 10-s record

    jitted = jax.jit(net.fn)

    def auc(window_probs) -> float:
        scores = metrics.aggregate_windows(scores=window_probs, record_index=records,
                                           num_records=len(val_y), how=prep.aggregate)
        return float(metrics.macro_auc(y_true=val_y, y_score=scores))

    options = ort.SessionOptions()
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in models.items()}
    results = {"jax": {"val_macro_auc": auc(np.concatenate([np.asarray(jitted(raw[i:i + 512]))
                                                            for i in range(0, len(raw), 512)]))}}
    for name, session in sessions.items():
        probs = np.concatenate([session.run(None, {export.INPUT_NAME: raw[i:i + 512]})[0]
                                for i in range(0, len(raw), 512)])
        results[name] = {"val_macro_auc": auc(probs), "bytes": models[name].stat().st_size}

    rows = _latency_rows(sessions, jitted, raw[:per_record], args.repeats)

    auc_change = results["int8"]["val_macro_auc"] - results["float32"]["val_macro_auc"]
    print(f"\nresnet1d_wang lead-I student ({run}), {len(val_y)} validation records, {per_record} windows "
          f"per 10-s record, {os.cpu_count()} CPU cores\n")
    _print_tables(results, auc_change, rows)
    ort_ms = next(r["ms_per_record"] for r in rows if r["runtime"] == "onnxruntime float32" and r["records_per_call"] == 1)
    out = {
        "command": "python -m benchmarks.export" + (f" --data_dir={args.data_dir}" if args.data_dir else ""),
        "run": str(run),
        "export": summary,
        "models": results,
        "int8_auc_change": auc_change,
        "targets": {"int8_auc_loss_max": TARGET_AUC_LOSS, "met_auc": auc_change >= -TARGET_AUC_LOSS,
                    "ort_batch1_ms_max": TARGET_ORT_MS, "met_latency": ort_ms < TARGET_ORT_MS},
        "latency": rows,
        "windows_per_record": per_record,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "jax": jax.__version__,
    }
    path = pathlib.Path(args.out_json or "benchmarks/results/export.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    harness.define_flags(define_flags)
    app.run(main)
