"""Class probabilities of raw ECG records from an exported mvkt model, with numpy and onnxruntime only.

    python examples/onnx_predict.py student.onnx trace.csv --fs=250 --lead=I
    python examples/onnx_predict.py student.onnx A1980.mat            # CPSC 2018 .mat (needs scipy.io)

Everything comes from the .onnx file's metadata (``preprocessing_rules`` says it in words):
the model's leads and rate, the resampling (scipy's ``resample_poly``, re-implemented here in
numpy), the windows (stride, plus one window aligned to the record's end), the aggregation over
windows and the decision thresholds. Reproduces ``python -m experiments.predict`` to 1e-5
(tested in tests/test_deploy.py). Not implemented here: the band-pass of runs trained on
band-passed shards (refused), WFDB and EDF files (convert them to CSV in mV), the signal-quality
gate (``mvkt.quality``; its thresholds are in the metadata).

Input: samples in **millivolts**; ``.csv`` (one column per lead, optional header row) or
``.npy`` with ``--fs`` and ``--lead``, or an original CPSC 2018 ``.mat`` (12 leads, 500 Hz, mV).
Copy this file anywhere; it imports nothing from mvkt.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from fractions import Fraction

import numpy as np
import onnxruntime as ort

LEADS_12 = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


# ----------------------------------------------------------------- scipy.signal.resample_poly in numpy


def _firwin_lowpass(numtaps: int, cutoff: float, beta: float = 5.0) -> np.ndarray:
    """scipy.signal.firwin(numtaps, cutoff, window=("kaiser", beta)): windowed sinc, unit DC gain."""
    m = np.arange(numtaps) - (numtaps - 1) / 2.0
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(numtaps, beta)
    return h / h.sum()


def _upfirdn(h: np.ndarray, x: np.ndarray, up: int, down: int) -> np.ndarray:
    """scipy.signal.upfirdn along axis 0: zero-stuff by ``up``, filter with ``h``, keep every ``down``-th."""
    stuffed = np.zeros(((len(x) - 1) * up + 1,) + x.shape[1:], dtype=np.float64)
    stuffed[::up] = x
    full = np.stack([np.convolve(stuffed[:, k], h) for k in range(x.shape[1])], axis=1)
    return full[::down]


def resample_poly(x: np.ndarray, up: int, down: int) -> np.ndarray:
    """scipy.signal.resample_poly(x, up, down, axis=0) with its defaults (Kaiser beta 5, zero padding)."""
    g = math.gcd(up, down)
    up, down = up // g, down // g
    if up == down == 1:
        return x.astype(np.float64)
    n_in = len(x)
    n_out = n_in * up // down + bool(n_in * up % down)
    max_rate = max(up, down)
    half_len = 10 * max_rate
    h = _firwin_lowpass(2 * half_len + 1, 1.0 / max_rate) * up
    n_pre_pad = down - half_len % down
    n_post_pad = 0
    n_pre_remove = (half_len + n_pre_pad) // down
    while ((n_in - 1) * up + len(h) + n_pre_pad + n_post_pad - 1) // down + 1 < n_out + n_pre_remove:
        n_post_pad += 1
    h = np.concatenate([np.zeros(n_pre_pad), h, np.zeros(n_post_pad)])
    return _upfirdn(h, x.astype(np.float64), up, down)[n_pre_remove:n_pre_remove + n_out]


def resample(x: np.ndarray, fs: float, target_fs: int) -> np.ndarray:
    """As data_prep.common.resample: the rate ratio as a fraction, source rate limited to denominators <= 1000."""
    ratio = Fraction(target_fs) / Fraction(str(fs)).limit_denominator(1000)
    return resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)


# ----------------------------------------------------------------- the rest of predict


def window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def read_record(path: pathlib.Path, fs: float | None, leads: list[str] | None) -> tuple[np.ndarray, float, list[str]]:
    if path.suffix == ".mat":
        from scipy.io import loadmat  # only for CPSC 2018's MATLAB files

        ecg = loadmat(str(path), squeeze_me=False)["ECG"][0, 0]
        return np.asarray(ecg["data"], np.float32).T, fs or 500.0, list(LEADS_12)
    if not fs or not leads:
        sys.exit(f"error: {path}: a {path.suffix} trace needs --fs and --lead")
    if path.suffix == ".npy":
        signal = np.load(path)
    else:
        try:
            signal = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:
            signal = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
    signal = np.asarray(signal, np.float32).reshape(len(signal), -1)
    if signal.shape[1] != len(leads):
        sys.exit(f"error: {path}: {signal.shape[1]} columns for leads {leads}")
    return signal, float(fs), list(leads)


class OnnxPredictor:
    def __init__(self, model_path: str):
        self.session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.label_names = json.loads(meta["label_names"])
        self.leads = json.loads(meta["leads"])
        self.rate = int(meta["sampling_rate_hz"])
        self.window = int(meta["window_samples"])
        self.stride = int(meta["stride_samples"])
        self.aggregate = meta["aggregate"]
        self.thresholds = json.loads(meta["thresholds"])
        self.input = self.session.get_inputs()[0].name
        if json.loads(meta["band_pass_hz"]) is not None:
            sys.exit(f"error: {model_path} was trained on band-passed records ({meta['band_pass_hz']} Hz); this "
                     "example does not implement the band-pass (see preprocessing_rules in the metadata)")

    def predict(self, signal: np.ndarray, fs: float, leads: list[str]) -> np.ndarray:
        missing = [name for name in self.leads if name not in leads]
        if missing:
            raise ValueError(f"the model needs leads {missing}")
        x = signal[:, [leads.index(name) for name in self.leads]]
        if abs(fs - self.rate) > 1e-6:
            x = resample(x, fs, self.rate)
        if len(x) < self.window:
            raise ValueError(f"{len(x) / self.rate:g} s is shorter than one window ({self.window / self.rate:g} s)")
        windows = np.stack([x[s:s + self.window] for s in window_starts(len(x), self.window, self.stride)])
        probabilities = self.session.run(None, {self.input: windows.astype(np.float32)})[0].astype(np.float64)
        return probabilities.max(axis=0) if self.aggregate == "max" else probabilities.mean(axis=0)

    def decisions(self, probabilities: np.ndarray) -> dict[str, bool | None]:
        return {name: None if (self.thresholds or {}).get(name) is None else bool(p >= self.thresholds[name])
                for name, p in zip(self.label_names, probabilities)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .onnx file written by python -m experiments.export")
    parser.add_argument("records", nargs="+", help=".csv/.npy traces (with --fs, --lead) or CPSC .mat files")
    parser.add_argument("--fs", type=float, help="sampling rate of .csv/.npy traces (Hz)")
    parser.add_argument("--lead", help="comma-separated lead name of each column, e.g. I")
    parser.add_argument("--out", help="write {record: {probabilities, decisions}} to this JSON file")
    args = parser.parse_args()
    predictor = OnnxPredictor(args.model)
    results = {}
    for name in args.records:
        signal, fs, leads = read_record(pathlib.Path(name), args.fs, args.lead.split(",") if args.lead else None)
        probabilities = predictor.predict(signal, fs, leads)
        decisions = predictor.decisions(probabilities)
        results[name] = {"probabilities": dict(zip(predictor.label_names, map(float, probabilities))),
                         "decisions": decisions}
        print(name)
        for label, p in zip(predictor.label_names, probabilities):
            print(f"  {label:>10s}  {p:.6f}  {decisions[label]}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
