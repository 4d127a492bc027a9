"""Corrupted copies of a split: the conditions of the noise-stress evaluation.

Each condition turns every record of a split (all 12 leads, in mV at the shards' rate)
into a corrupted one; runs then read their own leads, so a lead-I student and a 12-lead
teacher see the same noise on lead I. Every draw comes from
``np.random.default_rng([seed, crc32(condition name), record index])``: reproducible,
the same for every run, and unchanged when conditions are added.

Additive conditions (NSTDB and white noise) add the scaled noise to the stored values,
so a zero-noise condition reproduces the clean split bit for bit; the others transform
the record in mV and store it back.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from mvkt import data as data_lib
from mvkt import noise as noise_lib
from mvkt import quality

SNRS_DB = (24, 18, 12, 6, 0)
_LA_RA_REVERSAL = [0, 2, 1, 4, 3, 5, 6, 7, 8, 9, 10, 11]  # II <-> III, aVR <-> aVL; I is inverted


@dataclasses.dataclass(frozen=True)
class Condition:
    """``family``: clean | nstdb | white | la_ra_reversal | gain | dc_offset | contact_loss |
    clipping | resample. ``value``: the SNR (dB), gain, offset (mV), flat seconds, kept
    fraction of the range, or the intermediate rate (Hz)."""

    name: str
    family: str
    kind: str = ""  # NSTDB record for family nstdb
    value: float = 0.0
    about: str = ""

    @property
    def snr_db(self) -> float | None:
        return self.value if self.family in ("nstdb", "white") else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_conditions(snrs: Sequence[float] = SNRS_DB) -> list[Condition]:
    conditions = [Condition("clean", "clean", about="the split as stored")]
    for kind, about in (("bw", "baseline wander"), ("em", "electrode motion"), ("ma", "muscle artefact")):
        conditions += [Condition(f"nstdb_{kind}_{s:g}dB", "nstdb", kind, float(s), f"NSTDB {about} at {s:g} dB")
                       for s in snrs]
    conditions += [Condition(f"white_{s:g}dB", "white", value=float(s), about=f"white Gaussian noise at {s:g} dB")
                   for s in snrs]
    conditions += [
        Condition("la_ra_reversal", "la_ra_reversal", about="left/right arm electrodes swapped: lead I inverted, "
                  "II <-> III, aVR <-> aVL"),
        Condition("gain_x0.5", "gain", value=0.5, about="amplitude x0.5"),
        Condition("gain_x2", "gain", value=2.0, about="amplitude x2"),
        Condition("dc_offset_1mV", "dc_offset", value=1.0, about="+1 mV on every lead"),
        Condition("contact_loss_0.5s", "contact_loss", value=0.5, about="0.5 s flat (0 mV) at a random position"),
        Condition("contact_loss_2s", "contact_loss", value=2.0, about="2 s flat (0 mV) at a random position"),
        Condition("clipping_50pct", "clipping", value=0.5,
                  about="clipped to the middle 50% of each lead's range"),
        Condition("resample_250Hz", "resample", value=250.0, about="to 250 Hz and back (resample_poly)"),
        Condition("resample_512Hz", "resample", value=512.0, about="to 512 Hz and back (resample_poly)"),
    ]
    return conditions


def condition_rng(seed: int, condition: Condition, record: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(condition.name.encode()), int(record)])


def corrupt_record(stored: np.ndarray, condition: Condition, *, mean: np.ndarray, std: np.ndarray, fs: int,
                   rng: np.random.Generator, bank: noise_lib.NoiseBank | None) -> np.ndarray:
    """One record (T, 12) in stored (standardised) units -> the corrupted record, same units.
    ``mean``/``std``: the split's standardisation in mV (stored = (mV - mean) / std)."""
    stored = np.asarray(stored, np.float32)
    family = condition.family
    if family == "clean":
        return stored
    millivolts = stored.astype(np.float64) * std + mean
    if family in ("nstdb", "white"):
        if family == "nstdb":
            if bank is None:
                raise ValueError(f"condition {condition.name} needs the NSTDB noise records")
            noise = bank.segment(condition.kind, len(stored), rng, num_leads=stored.shape[1]).astype(np.float64)
        else:
            noise = rng.standard_normal(stored.shape)
        scale = noise_lib.scale_to_snr(millivolts, noise, condition.value)
        return (stored + (scale * noise / std)).astype(np.float32)
    if family == "la_ra_reversal":
        out = millivolts[:, _LA_RA_REVERSAL]
        out[:, 0] = -millivolts[:, 0]
    elif family == "gain":
        out = millivolts * condition.value
    elif family == "dc_offset":
        out = millivolts + condition.value
    elif family == "contact_loss":
        length = min(int(round(condition.value * fs)), len(stored))
        start = int(rng.integers(0, len(stored) - length + 1))
        out = millivolts.copy()
        out[start:start + length] = 0.0
    elif family == "clipping":
        top, bottom = millivolts.max(axis=0), millivolts.min(axis=0)
        centre, half = (top + bottom) / 2, condition.value * (top - bottom) / 2
        out = np.clip(millivolts, centre - half, centre + half)
    elif family == "resample":
        from data_prep import common as prep_lib

        there = prep_lib.resample(millivolts, fs, int(condition.value))
        back = prep_lib.resample(there, condition.value, fs).astype(np.float64)
        out = np.zeros_like(millivolts)
        out[:min(len(back), len(out))] = back[:len(out)]
    else:
        raise ValueError(f"unknown condition family {family!r}")
    return ((out - mean) / std).astype(np.float32)


@dataclasses.dataclass
class CorruptedSplit:
    """A split under one condition (a ``data_lib.Split`` reading the corrupted records) and
    the gate's verdict per record for the given leads."""

    split: data_lib.Split
    usable: np.ndarray  # (N,) bool


def corrupt_split(split: data_lib.Split, condition: Condition, *, seed: int, bank: noise_lib.NoiseBank | None,
                  gate_leads: Sequence[str] = (),
                  thresholds: quality.Thresholds = quality.DEFAULT_THRESHOLDS) -> CorruptedSplit:
    """``split`` under ``condition``; ``gate_leads``: the leads whose quality is assessed (a
    run's leads), on the corrupted record in mV at the split's rate."""
    stats = split.manifest["preprocessing"]["standardization"]
    mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    fs = split.sampling_rate
    records = [corrupt_record(split.x[i], condition, mean=mean, std=std, fs=fs,
                              rng=condition_rng(seed, condition, i), bank=bank) for i in range(len(split))]
    gate = data_lib.lead_indices(list(gate_leads)) if gate_leads else []
    usable = np.ones(len(records), bool)
    if gate:
        for i, record in enumerate(records):
            millivolts = record[:, gate].astype(np.float64) * std[gate] + mean[gate]
            usable[i] = quality.assess(millivolts, fs, list(gate_leads), thresholds=thresholds)["usable"]
    if split.ragged:
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in records])]).astype(np.int64)
        x = data_lib.RaggedSignals(np.concatenate(records), offsets)
    else:
        x = np.stack(records) if records else np.zeros((0,) + tuple(split.x.shape[1:]), np.float32)
    corrupted = data_lib.Split(out_dir=split.out_dir, name=split.name, manifest=split.manifest, x=x, y=split.y,
                               record_ids=split.record_ids, folds=split.folds)
    return CorruptedSplit(split=corrupted, usable=usable)
