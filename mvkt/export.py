"""Export of a trained run's net for deployment: ONNX (float32, int8) and StableHLO.

ONNX graph: input ``ecg`` float32 ``(batch, window, leads)`` (raw samples in mV at the run's
sampling rate, after its band-pass if it had one; the run's standardisation is the graph's
first op), output ``probabilities`` float32 ``(batch, classes)`` (sigmoid), batch axis
dynamic, BatchNorm folded into the convolutions. The model's metadata (``metadata_props``)
describes everything around the graph: label names, leads, units, sampling rate, window,
stride, aggregation, the band-pass, resampler and window rules as text
(``preprocessing_rules``), validation thresholds, the quality gate's thresholds, and the run
it came from by content (``run``: folder name, config hash, git commit; no local path).
``examples/onnx_predict.py`` reproduces ``experiments.predict`` from the file alone.

Why a converter of its own: jax2onnx (the maintained JAX -> ONNX exporter) pins
``orbax-checkpoint<0.11.37`` in 0.16 and 0.17, which conflicts with the project's orbax,
and pulls in equinox, dm-pix, huggingface-hub and netron. The six nets of ``mvkt.models``
need only 16 primitives in eval mode, so this module converts the eval-mode jaxpr itself
with the ``onnx`` package: elementwise ops, ``conv_general_dilated``,
``reduce_window_{max,sum}``, ``reduce_{max,sum}``, ``concatenate``, ``dot_general``,
``reshape``, ``broadcast_in_dim`` (of constants), ``logistic``, ``rsqrt``. Anything else
raises ``UnsupportedError`` naming the primitive. Rank-3 activations are kept in ONNX's
``(N, C, W)`` layout (one transpose at the input) and every ``Conv`` followed by a
per-channel ``Mul``/``Add``/``Sub``/``Div`` constant (eval-mode BatchNorm, biases) absorbs it.

int8: ``onnxruntime.quantization`` static QDQ quantization (per-channel int8 weights, int8
activations) calibrated on windows of the run's training split; without the shards,
dynamic quantization (int8 weights only), said in the result.

StableHLO: ``jax.export`` with a symbolic batch axis, serialized (load with
``jax.export.deserialize(bytes).call(x)``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mvkt import data as data_lib
from mvkt import inference
from mvkt import onnx_graph
from mvkt import parallel as parallel_lib
from mvkt import quality as quality_lib
from mvkt import run_dir

INPUT_NAME = "ecg"
OUTPUT_NAME = "probabilities"
OPSET = 18
_TRACE_BATCH = onnx_graph.TRACE_BATCH
UnsupportedError = onnx_graph.UnsupportedError


# ----------------------------------------------------------------------------- the function exported


@dataclasses.dataclass(frozen=True)
class ExportedNet:
    """The eval-mode net of a run as one function of raw windows, with what describes it."""

    fn: Callable[[jax.Array], jax.Array]  # (B, window, leads) raw -> (B, C) probabilities
    window: int
    leads: list[str]
    metadata: dict[str, str]


def preprocessing_rules() -> dict[str, str]:
    """How a raw record becomes the model's windows and one answer: enough to reproduce
    experiments.predict from the .onnx file alone (examples/onnx_predict.py does)."""
    from data_prep import common as prep_lib

    return {
        "units": "mV (convert uV or V first; predict refuses a trace spanning more than "
                 f"{quality_lib.MAX_PLAUSIBLE_SPAN_MV:g} mV as microvolts)",
        "band_pass": f"if band_pass_hz is not null: scipy.signal.butter({prep_lib.BAND_PASS_ORDER}, band_pass_hz, "
                     "btype='bandpass', fs=source rate, output='sos') applied zero-phase with "
                     "scipy.signal.sosfiltfilt along time, at the source rate, before resampling",
        "resampler": "when the source rate differs from sampling_rate_hz: scipy.signal.resample_poly(x, up, down, "
                     "axis=0), up/down = Fraction(sampling_rate_hz) / Fraction(str(source rate))"
                     ".limit_denominator(1000) reduced (its default Kaiser-window FIR, beta 5)",
        "windows": "starts 0, stride, 2*stride, ... while start + window <= length; if the last window does not "
                   "end at the record's last sample, one more window ending there (start = length - window); a "
                   "record shorter than one window is refused",
        "aggregation": "per class, the max (aggregate=max) or the mean (aggregate=mean) over the windows' "
                       "probabilities",
        "decisions": "probability >= thresholds[class] (chosen on the run's validation split; null: never decided)",
    }


def model_metadata(workdir: pathlib.Path, *, which: str, step, mean, std, thresholds) -> dict[str, str]:
    """The exported model's ``metadata_props``: what the net is, how its input is made, and
    which run it came from (by content: config hash and commit, not a local path)."""
    info = run_dir.load_info(workdir)
    prep = inference.Preprocessing.of_run(workdir)
    provenance = info.get("provenance") or {}
    return {
        "label_names": json.dumps(list(info["label_names"])),
        "leads": json.dumps(prep.leads),
        "units": "mV",
        "sampling_rate_hz": str(prep.sampling_rate),
        "window_samples": str(prep.window),
        "stride_samples": str(prep.stride),
        "aggregate": prep.aggregate,
        "band_pass_hz": json.dumps(list(prep.band_pass) if prep.band_pass else None),
        "standardization": json.dumps({"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist(),
                                       "in_graph": True}),
        "preprocessing_rules": json.dumps(preprocessing_rules()),
        "thresholds": json.dumps(thresholds),
        "threshold_caveats": json.dumps(inference.load_threshold_caveats(workdir)),
        # Decisions are withheld on a record whose quality indices (mvkt/quality.py, on the raw
        # model leads in mV at their own rate) fail these thresholds.
        "quality_gate": json.dumps({"thresholds": quality_lib.DEFAULT_THRESHOLDS.as_dict(),
                                    "indices": list(quality_lib.INDEX_NAMES), "definitions": "mvkt/quality.py"}),
        "run": json.dumps({"name": pathlib.Path(workdir).absolute().name, "config_hash": info.get("config_hash"),
                           "git_commit": provenance.get("git_commit"), "git_dirty": provenance.get("git_dirty"),
                           "method": info.get("method"), "checkpoint": f"{which} (step {step})"}),
        # {"run_finished": false, ...} marks a net exported from a run that stopped early.
        "training": json.dumps(run_dir.training_status(workdir)),
        "input": f"{INPUT_NAME}: float32 (batch, {prep.window}, {len(prep.leads)}) raw samples in mV at "
        f"{prep.sampling_rate} Hz, leads {','.join(prep.leads)}",
        "output": f"{OUTPUT_NAME}: float32 (batch, {len(info['label_names'])}) sigmoid probabilities",
    }


def exported_net(workdir: str | pathlib.Path, *, which: str = "best") -> ExportedNet:
    workdir = pathlib.Path(workdir)
    parallel = parallel_lib.make_parallelism(jax.devices()[:1])
    model, variables, _, info, meta = run_dir.load_trained_model(workdir, which=which, parallel=parallel)
    prep = inference.Preprocessing.of_run(workdir)
    index = data_lib.lead_indices(prep.leads)
    mean, std = prep.mean[index], prep.std[index]
    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(variables))

    def fn(x):
        logits, _ = model.apply(variables, (x - mean) / std, train=False)
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    thresholds = inference.load_thresholds(workdir)
    metadata = model_metadata(workdir, which=which, step=meta.get("step"), mean=mean, std=std, thresholds=thresholds)
    return ExportedNet(fn=fn, window=prep.window, leads=prep.leads, metadata=metadata)


def to_onnx(net: ExportedNet, path: str | pathlib.Path) -> dict:
    """Writes the ONNX model of ``net`` to ``path``; returns a summary (ops, size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    closed = jax.make_jaxpr(net.fn)(jax.ShapeDtypeStruct((_TRACE_BATCH, net.window, len(net.leads)), jnp.float32))
    conv = onnx_graph.Converter()
    x = conv.stored(INPUT_NAME, (_TRACE_BATCH, net.window, len(net.leads)))
    (out,) = conv.run(closed.jaxpr, closed.consts, [x])
    if not isinstance(out, onnx_graph.Tensor) or len(out.shape) != 2:
        raise UnsupportedError(f"the net's output is not a (batch, classes) tensor: {out}")
    conv.nodes.append(helper.make_node("Identity", [conv.logical(out)], [OUTPUT_NAME]))
    nodes = onnx_graph.fold_affine_into_conv(conv.nodes, conv.initializers)
    graph = helper.make_graph(
        nodes,
        "mvkt_student",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", net.window, len(net.leads)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", int(out.shape[1])])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in conv.initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mvkt")
    model.ir_version = 9  # readable by onnxruntime releases of the last two years
    for key, value in net.metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path = pathlib.Path(path)
    onnx.save(model, path)
    ops: dict[str, int] = {}
    for node in nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "ops": ops}


def quantize_int8(fp32_path: str | pathlib.Path, out_path: str | pathlib.Path, *,
                  calibration: np.ndarray | None) -> dict:
    """int8 model: static QDQ calibrated on ``calibration`` windows (raw, (N, window, leads)),
    or dynamic (weights only) when there are none."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if calibration is None:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8)
        return {"path": str(out_path), "bytes": pathlib.Path(out_path).stat().st_size,
                "method": "dynamic (int8 weights; no training shards to calibrate activations)"}

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration.astype(np.float32), max(len(calibration) // 32, 1)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    import logging

    class NoPreProcessingAdvice(logging.Filter):
        # onnxruntime advises its quant_pre_process twice per call; on these graphs that step
        # breaks its own quantizer (ValueError in _adjust_weight_scale_for_int32_bias, onnxruntime
        # 1.32), so the advice is dropped instead of followed.
        def filter(self, record):
            return "pre-processing before quantization" not in record.getMessage()

    quiet = NoPreProcessingAdvice()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        quantize_static(str(fp32_path), str(out_path), Windows(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
    finally:
        root.removeFilter(quiet)
    return {"path": str(out_path), "bytes": pathlib.Path(out_path).stat().st_size,
            "method": f"static QDQ, per-channel int8 weights, int8 activations calibrated on {len(calibration)} "
            "training windows"}


def _run_split(workdir: str | pathlib.Path, name: str) -> data_lib.Split | None:
    """Split ``name`` of the run's own shards and folds, or None when the shards are gone."""
    info = run_dir.load_info(workdir)
    try:
        return data_lib.open_split(info["data_dir"], name, folds=info.get("folds"))
    except (data_lib.ShardError, FileNotFoundError):
        return None


def _raw_crops(split: data_lib.Split, prep: inference.Preprocessing, indices, starts) -> np.ndarray:
    """Crops of the model's leads in raw units (the split's standardisation undone): what the
    exported graph takes, since it standardises its input itself."""
    index = data_lib.lead_indices(prep.leads)
    x = split.select_leads(prep.leads).crop(indices, starts, prep.window)
    own = split.manifest["preprocessing"]["standardization"]
    return (x * np.asarray(own["std"], np.float32)[index] + np.asarray(own["mean"], np.float32)[index]).astype(np.float32)


def calibration_windows(workdir: str | pathlib.Path, *, count: int = 512, seed: int = 0) -> np.ndarray | None:
    """Raw windows (before standardisation) of the run's training split, or None without its shards."""
    split = _run_split(workdir, "train")
    if split is None:
        return None
    prep = inference.Preprocessing.of_run(workdir)
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(split), size=min(count, len(split)), replace=False)
    slack = np.maximum(split.lengths[indices] - prep.window, 0)
    starts = rng.integers(0, slack + 1)
    return _raw_crops(split, prep, indices, starts)


def to_stablehlo(net: ExportedNet, path: str | pathlib.Path) -> dict:
    """Serialized ``jax.export`` of ``net`` with a symbolic batch axis."""
    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(net.fn))(
        jax.ShapeDtypeStruct((batch, net.window, len(net.leads)), jnp.float32)
    )
    path = pathlib.Path(path)
    path.write_bytes(exported.serialize())
    path.with_name(path.name + ".json").write_text(json.dumps(net.metadata, indent=2))
    return {"path": str(path), "bytes": path.stat().st_size, "metadata": str(path.with_name(path.name + ".json"))}


def export_run(workdir: str | pathlib.Path, out: str | pathlib.Path, *, fmt: str = "onnx",
               quantize: str | None = None, which: str = "best") -> dict[str, Any]:
    """``fmt``: onnx | stablehlo; ``quantize``: None | int8 (ONNX only; the float32 model is
    written too, as ``<out>`` with ``.fp32`` before the suffix)."""
    if fmt not in ("onnx", "stablehlo"):
        raise ValueError(f"--format must be onnx or stablehlo, not {fmt!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8 (or absent), not {quantize!r}")
    if quantize and fmt != "onnx":
        raise ValueError("--quantize=int8 is for --format=onnx")
    net = exported_net(workdir, which=which)
    out = pathlib.Path(out)
    if fmt == "stablehlo":
        return to_stablehlo(net, out)
    if not quantize:
        return to_onnx(net, out)
    fp32 = out.with_name(f"{out.stem}.fp32{out.suffix}")
    summary = {"float32": to_onnx(net, fp32)}
    summary["int8"] = quantize_int8(fp32, out, calibration=calibration_windows(workdir))
    summary["int8_vs_float32"] = int8_report(workdir, fp32, out)
    return summary


def validation_windows(workdir: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(raw windows (W, window, leads) of every validation record as predict cuts them, their
    record index (W,), the records' labels (N, C)), or None without the run's shards."""
    split = _run_split(workdir, "val")
    if split is None:
        return None
    prep = inference.Preprocessing.of_run(workdir)
    from mvkt import input_pipeline, metrics as metrics_lib

    record_index, starts = input_pipeline.window_index(split.lengths, window=prep.window, stride=prep.stride,
                                                       window_starts=metrics_lib.window_starts)
    return _raw_crops(split, prep, record_index, starts), record_index, np.asarray(split.y)


def _latency_ms(session, windows: np.ndarray, repeats: int = 30) -> float:
    """Median ms of one call on ``windows`` (one 10-s record's windows), after a warm-up."""
    import time

    feed = {INPUT_NAME: windows}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def int8_report(workdir: str | pathlib.Path, fp32_path: str | pathlib.Path, int8_path: str | pathlib.Path) -> dict:
    """How the int8 model differs from the float32 one on this run's validation split: per-window
    probability differences (max, mean), the validation macro-AUC of both (windows aggregated as
    predict does), and the latency of both on one record's windows on this machine (a warning
    when int8 is slower)."""
    import onnxruntime as ort

    from mvkt import metrics as metrics_lib

    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in (("float32", fp32_path), ("int8", int8_path))}
    val = validation_windows(workdir)
    report: dict[str, Any] = {}
    if val is None:
        report["agreement"] = "not measured: the run's shards (validation split) are not available"
        one_record = None
    else:
        windows, record_index, y = val
        probs = {name: np.concatenate([s.run(None, {INPUT_NAME: windows[i:i + 256]})[0]
                                       for i in range(0, len(windows), 256)]).astype(np.float64)
                 for name, s in sessions.items()}
        difference = np.abs(probs["int8"] - probs["float32"])
        report.update({"validation_windows": int(len(windows)), "max_probability_difference": float(difference.max()),
                       "mean_probability_difference": float(difference.mean())})
        aggregate = inference.Preprocessing.of_run(workdir).aggregate
        aucs = {}
        for name, p in probs.items():
            per_record = metrics_lib.aggregate_windows(scores=p, record_index=record_index, num_records=len(y),
                                                       how=aggregate)
            defined = metrics_lib.valid_class_mask(y_true=y).any()
            aucs[name] = metrics_lib.per_class_auc(y_true=y, y_score=per_record).macro_auc if defined else None
        report["val_macro_auc"] = aucs
        if aucs["float32"] is not None:
            report["val_macro_auc_change"] = aucs["int8"] - aucs["float32"]
        first = record_index == 0
        one_record = windows[first]
    if one_record is None:
        prep = inference.Preprocessing.of_run(workdir)
        one_record = np.zeros((7, prep.window, len(prep.leads)), np.float32)
    latency = {name: _latency_ms(s, one_record) for name, s in sessions.items()}
    report["latency_ms_per_record"] = latency
    report["latency_windows_per_record"] = int(len(one_record))
    if latency["int8"] > latency["float32"]:
        report["warning"] = (f"int8 is slower than float32 on this machine ({latency['int8']:.2f} vs "
                             f"{latency['float32']:.2f} ms per record of {len(one_record)} windows): ship the "
                             "float32 model unless the target runtime has int8 kernels")
    return report
