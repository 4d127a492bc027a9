"""Signal-quality indices of a raw ECG trace and the gate that withholds decisions on bad ones.

Per lead, on the trace as given (mV, its own rate, before the run's preprocessing):

| index | what it measures | unusable when |
|---|---|---|
| ``flat_fraction`` | share of samples inside 0.2-s stretches whose range is below 0.01 mV (contact loss, a dead lead) | > ``max_flat_fraction`` |
| ``clipped_fraction`` | share of samples within 0.5% of the range from the trace's maximum or minimum (a saturated amplifier) | > ``max_clipped_fraction`` |
| ``baseline_power`` | share of the power (mean removed) below 1 Hz: baseline wander (basSQI of Li, Clark, Clifford 2008 is 1 minus it) | > ``max_baseline_power`` |
| ``hf_power`` | share of the power at 0.5 Hz and above that lies above 25 Hz: muscle and electrode noise (QRS energy is mostly 5-15 Hz) | > ``max_hf_power`` |
| ``kurtosis`` | Pearson kurtosis (kSQI, Li et al. 2008): a trace with QRS spikes is peaked (>> 3); Gaussian-like noise is 3 | < ``min_kurtosis`` |

A lead fails when any index is outside its threshold; a record is unusable when at least
``failing_lead_share`` of the leads the model reads fail (its one lead, for a single-lead model). The thresholds are
``Thresholds``' defaults, measured on real records (docs/RESULTS.md, "Signal-quality gate"): all
121 embedded sample records (PTB-XL, CPSC 2018, CinC; lead I and all 12 leads) and all 194
subset test records (lead I) pass; flat and clipped traces fail; of 10-s segments of pure
NSTDB noise (lead I, evaluation part) it withholds every bw, 97.5% of ma and 55% of em
segments: electrode motion resembles ECG, as the NSTDB authors warn, and gets through half
the time.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FLAT_WINDOW_SECONDS = 0.2
# The range below which a trace is flat (mV): a tenth of a small box on ECG paper, far below any
# recorded QRS complex. data_prep rejects a record whose every lead is this flat.
FLAT_SPAN_MV = 0.01


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_flat_fraction: float = 0.25
    max_clipped_fraction: float = 0.02
    max_baseline_power: float = 0.85
    max_hf_power: float = 0.2
    min_kurtosis: float = 3.0
    # Share of the model's leads that must fail for the record to be unusable: one lead of a
    # single-lead model, six of a 12-lead one (raw PTB-XL limb leads often carry wander).
    failing_lead_share: float = 0.5

    def failures(self, index: dict[str, float]) -> list[str]:
        """Names of the indices of one lead outside their thresholds."""
        bad = []
        if index["flat_fraction"] > self.max_flat_fraction:
            bad.append("flat_fraction")
        if index["clipped_fraction"] > self.max_clipped_fraction:
            bad.append("clipped_fraction")
        if index["baseline_power"] > self.max_baseline_power:
            bad.append("baseline_power")
        if index["hf_power"] > self.max_hf_power:
            bad.append("hf_power")
        if index["kurtosis"] < self.min_kurtosis:
            bad.append("kurtosis")
        return bad

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


DEFAULT_THRESHOLDS = Thresholds()

# A surface ECG lead spans about 0.5-5 mV peak to peak; these bounds catch a trace in uV (x1000)
# or in V (x0.001) before the net turns it into confident nonsense.
MAX_PLAUSIBLE_SPAN_MV = 20.0
MIN_PLAUSIBLE_SPAN_MV = 0.02


def robust_span(signal: np.ndarray) -> np.ndarray:
    """Per lead: the 99th minus the 1st percentile (a peak-to-peak range that one spike cannot set)."""
    x = np.asarray(signal, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    low, high = np.percentile(x, [1, 99], axis=0)
    return high - low


def unit_problem(signal: np.ndarray, leads: Sequence[str]) -> tuple[str, str] | None:
    """``("uV" | "V", message)`` when a trace meant to be in mV looks like microvolts or volts;
    None when it is plausible, or flat (left to the gate's flat-line index)."""
    span = robust_span(signal)
    k = int(np.argmax(span))
    if span[k] > MAX_PLAUSIBLE_SPAN_MV:
        return "uV", (f"lead {leads[k]} spans {span[k]:.4g} mV (1st-99th percentile) read as millivolts, far above an ECG's 0.5-5 mV: "
                      "the samples look like microvolts; give millivolts (predict: --units=uV)")
    if 0 < span[k] < MIN_PLAUSIBLE_SPAN_MV:
        return "V", (f"the largest lead spans {span[k]:.3g} (1st-99th percentile), far below an ECG's 0.5-5 mV: "
                     "the samples look like volts (predict: --units=V), or the electrodes had no contact")
    return None
INDEX_NAMES = ("flat_fraction", "clipped_fraction", "baseline_power", "hf_power", "kurtosis")


def lead_indices(trace: np.ndarray, fs: float) -> dict[str, float]:
    """The indices of one lead: ``trace`` (T,) in mV at ``fs`` Hz."""
    x = np.asarray(trace, np.float64)
    n = len(x)
    window = max(int(round(FLAT_WINDOW_SECONDS * fs)), 2)
    if n >= window:
        views = np.lib.stride_tricks.sliding_window_view(x, window)
        flat_start = np.flatnonzero(views.max(axis=1) - views.min(axis=1) < FLAT_SPAN_MV)
        covered = np.zeros(n + 1, np.int64)
        np.add.at(covered, flat_start, 1)
        np.add.at(covered, flat_start + window, -1)
        flat_fraction = float(np.mean(np.cumsum(covered)[:n] > 0))
    else:
        flat_fraction = float(np.ptp(x) < FLAT_SPAN_MV) if n else 1.0
    span = float(np.ptp(x)) if n else 0.0
    if span < FLAT_SPAN_MV:
        return {"flat_fraction": 1.0, "clipped_fraction": 0.0, "baseline_power": 0.0, "hf_power": 0.0,
                "kurtosis": 0.0}
    tolerance = 0.005 * span
    clipped_fraction = float(np.mean((x >= x.max() - tolerance) | (x <= x.min() + tolerance)))
    centred = x - x.mean()
    power = np.abs(np.fft.rfft(centred, n=2 * n)) ** 2
    freqs = np.fft.rfftfreq(2 * n, 1.0 / fs)
    total = power.sum()
    above_half = power[freqs >= 0.5].sum()
    variance = np.mean(centred ** 2)
    return {
        "flat_fraction": flat_fraction,
        "clipped_fraction": clipped_fraction,
        "baseline_power": float(power[freqs < 1.0].sum() / total) if total > 0 else 0.0,
        "hf_power": float(power[freqs > 25.0].sum() / above_half) if above_half > 0 else 0.0,
        "kurtosis": float(np.mean(centred ** 4) / variance ** 2) if variance > 0 else 0.0,
    }


def assess(signal: np.ndarray, fs: float, leads: Sequence[str], *,
           thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict:
    """Quality of one record: ``signal`` (T, L) in mV at ``fs`` Hz, ``leads`` its L lead names
    (only the leads the model reads: the caller picks them).

    Returns ``{"usable": bool, "failing_leads": int, "reasons": ["I: kurtosis 2.9 < 3", ...],
    "leads": {name: indices}}`` (``reasons`` lists every failed index, also of a usable record).
    """
    signal = np.asarray(signal, np.float64)
    if signal.ndim == 1:
        signal = signal[:, None]
    per_lead, reasons, failing = {}, [], 0
    for k, name in enumerate(leads):
        index = lead_indices(signal[:, k], fs)
        per_lead[str(name)] = index
        failed = thresholds.failures(index)
        failing += bool(failed)
        reasons += [_reason(str(name), f, index[f], thresholds) for f in failed]
    usable = failing < thresholds.failing_lead_share * len(leads)
    return {"usable": bool(usable), "failing_leads": failing, "reasons": reasons, "leads": per_lead}


def _reason(lead: str, name: str, value: float, t: Thresholds) -> str:
    limit = {"flat_fraction": ("> ", t.max_flat_fraction), "clipped_fraction": ("> ", t.max_clipped_fraction),
             "baseline_power": ("> ", t.max_baseline_power), "hf_power": ("> ", t.max_hf_power),
             "kurtosis": ("< ", t.min_kurtosis)}[name]
    return f"{lead}: {name} {value:.3g} {limit[0]}{limit[1]:g}"
