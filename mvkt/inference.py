"""Using a trained net: window inference over records, and predictions on raw ECGs.

Evaluation, training-time validation, the teacher cache and ``experiments.predict`` all
score records the same way: sliding windows of the training crop length (stride half a
window by default), sigmoid probabilities, aggregated per record by max (the PTB-XL
benchmark) or mean. ``Predictor`` adds what a raw record needs to look like the training
shards: the run's leads, sampling rate, band-pass and standardisation, all read from the
run folder (``run_info.json``), so a trained run works after its shards are deleted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from mvkt import data as data_lib
from mvkt import errors
from mvkt import input_pipeline
from mvkt import metrics as metrics_lib
from mvkt import parallel as parallel_lib
from mvkt import quality as quality_lib
from mvkt import run_dir

THRESHOLDS_FILE = "thresholds.json"


RecordError = errors.RecordError


def make_forward_fn(model: nn.Module, lead_index: list[int], parallel: parallel_lib.Parallelism) -> Callable:
    """Jitted ``forward(variables, x12) -> (logits, features)``: eval mode, chosen leads,
    outputs replicated so every host can read them."""
    lead_index = np.asarray(lead_index)

    def forward(variables, x12):
        return model.apply(variables, x12[..., lead_index], train=False)

    return jax.jit(forward, out_shardings=parallel.replicated)


def predict_windows(
    forward: Callable,
    variables: Any,
    split: data_lib.Split,
    *,
    record_index: np.ndarray,
    starts: np.ndarray,
    window: int,
    batch_size: int,
    parallel: parallel_lib.Parallelism,
    with_features: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and features) of every (record, start) window, in fixed-shape batches."""
    logits_out, features_out = [], []
    num = len(record_index)
    produce = _window_batch(split, record_index, starts, window=window, batch_size=batch_size, parallel=parallel)
    num_batches = math.ceil(num / batch_size)
    for _, x in input_pipeline.Prefetcher(produce, range(num_batches)):
        logits, features = forward(variables, x)
        logits_out.append(np.asarray(logits))
        if with_features:
            features_out.append(np.asarray(features))
    logits = np.concatenate(logits_out)[:num]
    features = np.concatenate(features_out)[:num] if with_features else None
    return logits, features


def _window_batch(split: data_lib.Split, record_index: np.ndarray, starts: np.ndarray, *, window: int,
                  batch_size: int, parallel: parallel_lib.Parallelism) -> Callable[[int], jax.Array]:
    """``produce(i)``: the i-th fixed-shape global batch of these windows (the last one padded
    by repeating its final window)."""
    rows = parallel.host_slice(batch_size)
    num = len(record_index)

    def produce(i):
        sl = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), num - 1)
        return parallel.to_global(split.crop(record_index[sl][rows], starts[sl][rows], window))

    return produce


@dataclasses.dataclass(frozen=True)
class PreparedWindows:
    """Every sliding window of a split, cut once and kept on the devices in fixed-shape batches:
    what the validation of a training run scores at every validation point."""

    batches: list  # global (batch_size, window, leads) arrays
    record_index: np.ndarray  # (windows,) the record of each window
    num_records: int

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.batches)


def window_bytes(split: data_lib.Split, *, window: int, stride: int, batch_size: int) -> int:
    """What ``prepare_windows`` keeps on each device."""
    record_index, _ = input_pipeline.window_index(split.lengths, window=window, stride=stride,
                                                  window_starts=metrics_lib.window_starts)
    return math.ceil(len(record_index) / batch_size) * batch_size * window * len(split.lead_idx) * 4


def prepare_windows(split: data_lib.Split, *, window: int, stride: int, batch_size: int,
                    parallel: parallel_lib.Parallelism) -> PreparedWindows:
    record_index, starts = input_pipeline.window_index(split.lengths, window=window, stride=stride,
                                                       window_starts=metrics_lib.window_starts)
    produce = _window_batch(split, record_index, starts, window=window, batch_size=batch_size, parallel=parallel)
    batches = [produce(i) for i in range(math.ceil(len(record_index) / batch_size))]
    return PreparedWindows(batches, record_index, len(split))


def predict_prepared(forward: Callable, variables: Any, prepared: PreparedWindows, *, aggregate: str = "max"
                     ) -> np.ndarray:
    """``predict_records`` of prepared windows: the same scores, bit for bit (the same forward
    executable on the same batches); every batch is dispatched before any result is read."""
    logits = [forward(variables, x)[0] for x in prepared.batches]
    logits = np.concatenate(jax.device_get(logits))[:len(prepared.record_index)]
    return _aggregate(logits, prepared.record_index, prepared.num_records, aggregate)


def _aggregate(logits: np.ndarray, record_index: np.ndarray, num_records: int, aggregate: str) -> np.ndarray:
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return metrics_lib.aggregate_windows(scores=probs, record_index=record_index, num_records=num_records,
                                         how=aggregate)


def predict_records(
    forward: Callable,
    variables: Any,
    split: data_lib.Split,
    *,
    window: int,
    stride: int,
    batch_size: int,
    parallel: parallel_lib.Parallelism,
    aggregate: str = "max",
) -> np.ndarray:
    """Per-record sigmoid scores (N, C): sliding windows aggregated by max (benchmark) or mean."""
    record_index, starts = input_pipeline.window_index(
        split.lengths, window=window, stride=stride, window_starts=metrics_lib.window_starts
    )
    logits, _ = predict_windows(
        forward,
        variables,
        split,
        record_index=record_index,
        starts=starts,
        window=window,
        batch_size=batch_size,
        parallel=parallel,
    )
    return _aggregate(logits, record_index, len(split), aggregate)


# ----------------------------------------------------------------------------- raw records


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a raw record into what the net was trained on (from ``run_info.json``)."""

    leads: list[str]  # the net's input leads, in order
    sampling_rate: int  # Hz of the training shards
    band_pass: tuple[float, float] | None  # applied at the source rate, before resampling
    mean: np.ndarray  # (12,) per standard lead, float32
    std: np.ndarray  # (12,)
    window: int  # samples
    stride: int  # samples
    aggregate: str  # max | mean

    @classmethod
    def of_run(cls, workdir: str | pathlib.Path) -> "Preprocessing":
        info = run_dir.load_info(workdir)
        prep = info.get("preprocessing")
        if prep is None:  # runs trained before run folders carried their preprocessing
            manifest = data_lib.load_manifest(info["data_dir"])
            prep = run_dir.preprocessing_of(manifest)
        window = int(info["crop_length"])
        infer = info.get("inference")
        if infer is None:  # likewise: the run config's evaluation settings
            config = run_dir.load_config(workdir)
            infer = {"stride": max(int(window * config.data.eval_stride_fraction), 1),
                     "aggregate": config.eval.aggregate}
        stats = prep["standardization"]
        return cls(
            leads=list(info["leads"]),
            sampling_rate=int(prep["sampling_rate"]),
            band_pass=tuple(prep["band_pass"]) if prep.get("band_pass") else None,
            mean=np.asarray(stats["mean"], np.float32),
            std=np.asarray(stats["std"], np.float32),
            window=window,
            stride=int(infer["stride"]),
            aggregate=str(infer["aggregate"]),
        )

    def model_leads(self, signal: np.ndarray, *, leads: Sequence[str], record: str) -> np.ndarray:
        """Raw (T, L) samples named ``leads`` -> (T, len(self.leads)) float32: the model's leads, in order."""
        signal = np.asarray(signal, dtype=np.float32)
        if signal.ndim == 1:
            signal = signal[:, None]
        if signal.ndim != 2 or signal.shape[1] != len(leads):
            raise RecordError(f"{record}: samples of shape {signal.shape} for {len(leads)} lead name(s) {list(leads)}")
        names = {data_lib.LEADS[i]: k for k, i in enumerate(_lead_positions(leads, record))}
        missing = [name for name in self.leads if name not in names]
        if missing:
            raise RecordError(f"{record}: has leads {list(leads)}, the model needs {missing} (trained on {self.leads})")
        return signal[:, [names[name] for name in self.leads]]

    def __call__(self, signal: np.ndarray, *, fs: float, leads: Sequence[str], record: str) -> np.ndarray:
        """Raw (T, L) samples named ``leads`` at ``fs`` Hz -> (T', len(self.leads)) float32 as
        in the shards: band-pass, resampling and standardisation exactly as data_prep."""
        from data_prep import common as prep_lib  # the same filters data_prep used

        signal = self.model_leads(signal, leads=leads, record=record)
        if not np.isfinite(signal).all():
            raise RecordError(f"{record}: NaN or infinite samples")
        if not fs or fs <= 0:
            raise RecordError(f"{record}: invalid sampling rate {fs}")
        if self.band_pass is not None:
            try:
                signal = prep_lib.band_pass_filter(signal, fs, self.band_pass)
            except ValueError as e:
                raise RecordError(f"{record}: band-pass failed: {e}") from None
        if abs(fs - self.sampling_rate) > 1e-6:
            signal = prep_lib.resample(signal, fs, self.sampling_rate)
        if signal.shape[0] < self.window:
            raise RecordError(
                f"{record}: {signal.shape[0] / self.sampling_rate:g} s long, shorter than one model window "
                f"({self.window / self.sampling_rate:g} s = {self.window} samples at {self.sampling_rate} Hz)"
            )
        index = data_lib.lead_indices(self.leads)
        return ((signal - self.mean[index]) / self.std[index]).astype(np.float32)


def _lead_positions(leads: Sequence[str], record: str) -> list[int]:
    try:
        return data_lib.lead_indices([data_lib.canonical_lead(name) for name in leads])
    except ValueError as e:
        raise RecordError(f"{record}: {e}") from None


def load_thresholds(workdir: str | pathlib.Path) -> dict[str, float | None] | None:
    """Per-class decision thresholds chosen on the run's validation split (None before evaluation)."""
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())["per_class"]


def load_threshold_caveats(workdir: str | pathlib.Path) -> dict[str, str]:
    """{class: why its threshold is not to be trusted} from thresholds.json (empty when none or
    for folders evaluated before caveats were written)."""
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    return json.loads(path.read_text()).get("caveats", {}) if path.exists() else {}


class Predictor:
    """A trained run, ready to score raw records: ``Predictor(run).predict(signal, fs=, leads=)``."""

    def __init__(self, workdir: str | pathlib.Path, *, which: str = "best", batch_size: int = 64,
                 quality_thresholds: quality_lib.Thresholds = quality_lib.DEFAULT_THRESHOLDS):
        self.workdir = pathlib.Path(workdir)
        self.parallel = parallel_lib.make_parallelism(jax.devices()[:1])
        self.model, self.variables, _, info, self.meta = run_dir.load_trained_model(
            workdir, which=which, parallel=self.parallel
        )
        self.label_names = list(info["label_names"])
        self.preprocessing = Preprocessing.of_run(workdir)
        self.thresholds = load_thresholds(workdir)
        self.threshold_caveats = load_threshold_caveats(workdir)
        self.operating_point = "F1-optimal per class on the validation split"
        self.training = run_dir.training_status(workdir)  # run_finished False: a run that stopped early
        self.batch_size = batch_size
        self.quality_thresholds = quality_thresholds
        model = self.model
        self._probabilities = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[0]))

    def window_probabilities(self, windows: np.ndarray) -> np.ndarray:
        """(W, window, leads) standardised windows -> (W, C) probabilities, in fixed-size batches."""
        out = []
        for lo in range(0, len(windows), self.batch_size):
            batch = windows[lo : lo + self.batch_size]
            padded = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - len(batch), 0)])
            out.append(np.asarray(self._probabilities(self.variables, padded))[: len(batch)])
        return np.concatenate(out).astype(np.float64)

    def _unit_problem(self, raw: np.ndarray, record: str) -> str | None:
        """Refuses a trace that looks like microvolts (RecordError); the message when it looks like volts."""
        problem = quality_lib.unit_problem(raw, self.preprocessing.leads)
        if problem and problem[0] == "uV":
            raise RecordError(f"{record}: {problem[1]}")
        return problem[1] if problem else None

    def predict(self, signal: np.ndarray, *, fs: float, leads: Sequence[str], record: str = "record") -> np.ndarray:
        """Class probabilities (C,) of one raw record: (T, L) samples of ``leads`` at ``fs`` Hz, in
        mV (a trace that looks like microvolts is refused with a RecordError)."""
        _, probs = self.predict_windows(signal, fs=fs, leads=leads, record=record)
        return metrics_lib.aggregate_windows(
            scores=probs, record_index=np.zeros(len(probs), np.int64), num_records=1,
            how=self.preprocessing.aggregate)[0]

    def predict_windows(self, signal: np.ndarray, *, fs: float, leads: Sequence[str],
                        record: str = "record") -> tuple[np.ndarray, np.ndarray]:
        """(start of every window in seconds (W,), its class probabilities (W, C)): what
        ``predict`` aggregates, for long traces read window by window."""
        raw = self.preprocessing.model_leads(signal, leads=leads, record=record)
        if np.isfinite(raw).all():
            self._unit_problem(raw, record)
        x = self.preprocessing(signal, fs=fs, leads=leads, record=record)
        p = self.preprocessing
        starts = metrics_lib.window_starts(length=len(x), window=p.window, stride=p.stride)
        windows = np.stack([x[s : s + p.window] for s in starts])
        return starts / p.sampling_rate, self.window_probabilities(windows)

    def assess_quality(self, signal: np.ndarray, *, fs: float, leads: Sequence[str], record: str = "record") -> dict:
        """Signal-quality indices of the model's leads of one raw record, in mV at ``fs``
        (``mvkt.quality.assess``): ``usable`` False means decisions should be withheld. A trace
        that looks like microvolts is refused (RecordError), one like volts is unusable."""
        raw = self.preprocessing.model_leads(signal, leads=leads, record=record)
        if not np.isfinite(raw).all():
            raise RecordError(f"{record}: NaN or infinite samples")
        if not fs or fs <= 0:
            raise RecordError(f"{record}: invalid sampling rate {fs}")
        volts = self._unit_problem(raw, record)
        result = quality_lib.assess(raw, fs, self.preprocessing.leads, thresholds=self.quality_thresholds)
        if volts:  # a trace 1000x too small reads as flat; say why
            result["usable"] = False
            result["reasons"].insert(0, f"units: {volts}")
        return result

    def use_sensitivity(self, sensitivity: float) -> None:
        """Decide at the highest thresholds that keep ``sensitivity`` of each class's validation
        positives (from the run's ``scores_val.npz``) instead of the F1-optimal ones."""
        path = self.workdir / "scores_val.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run python -m experiments.evaluate --workdir={self.workdir} "
                                    "first (operating points are chosen on the validation scores)")
        with np.load(path) as f:
            y, scores = f["y"], f["scores"]
        t = metrics_lib.sensitivity_thresholds(y_true_val=y, y_score_val=scores, sensitivity=sensitivity)
        self.thresholds = {n: None if not np.isfinite(v) else float(v) for n, v in zip(self.label_names, t)}
        self.threshold_caveats = metrics_lib.threshold_caveats(y_true_val=y, thresholds=t, label_names=self.label_names)
        self.operating_point = f"sensitivity >= {sensitivity:g} per class on the validation split"

    def decisions(self, probabilities: np.ndarray) -> list[bool | None]:
        """Per class: probability >= its validation threshold (None when the run is not evaluated)."""
        if self.thresholds is None:
            return [None] * len(self.label_names)
        return [
            None if self.thresholds.get(name) is None else bool(prob >= self.thresholds[name])
            for name, prob in zip(self.label_names, probabilities)
        ]


def predict(workdir: str | pathlib.Path, signal: np.ndarray, *, fs: float, leads: Sequence[str]) -> dict[str, float]:
    """``{class: probability}`` of one raw record (builds a ``Predictor``: reuse one for many records)."""
    predictor = Predictor(workdir)
    return dict(zip(predictor.label_names, map(float, predictor.predict(signal, fs=fs, leads=leads))))
