"""One raw record from a file, in whichever format it comes, for predictions on new data.

    signal, fs, leads = read_any("rec")            # WFDB: rec.hea + rec.dat / rec.mat
    signal, fs, leads = read_any("A0001.mat")      # CPSC 2018 original (struct ECG) or CinC (.hea beside it)
    signal, fs, leads = read_any("trace.csv", fs=250, leads=["I"])   # one column per lead
    signal, fs, leads = read_any("trace.npy", fs=250, leads=["I"])   # (T,) or (T, L)
    signal, fs, leads = read_any("holter.edf")     # EDF/EDF+/BDF: its ECG signals, in mV, at their rate

12-lead WFDB records are read by the same reader as data_prep (so a prediction sees the
samples the shards hold); other WFDB records (fewer leads) through ``wfdb.rdrecord``.
Errors are ``RecordError`` naming the file.

Samples come back in **mV**: WFDB records from their header's units (uV, mV or V), EDF/BDF
from their physical dimension, CPSC 2018 ``.mat`` files are mV; ``.csv``/``.npy`` traces carry
no units, so they are read in ``units`` (default mV) and converted.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from data_prep.wfdb_io import LEADS, RecordError, parse_header, read_record

TRACE_SUFFIXES = (".csv", ".npy")
# Factor to mV of each accepted unit name (WFDB headers, --units); headers spell them freely
# ("mv", "MV"), so they are matched case-insensitively.
TO_MILLIVOLTS = {"mV": 1.0, "uV": 1e-3, "µV": 1e-3, "V": 1e3}
_SCALE = {k.lower(): v for k, v in TO_MILLIVOLTS.items()}
EDF_SUFFIXES = (".edf", ".bdf")


def read_any(path: str | os.PathLike, *, fs: float | None = None, leads: Sequence[str] | None = None,
             units: str = "mV") -> tuple[np.ndarray, float, list[str]]:
    """(samples (T, L) float32 in mV, sampling rate in Hz, lead names) of one record file;
    ``units``: what a ``.csv``/``.npy`` trace is in (other formats say so themselves)."""
    path = pathlib.Path(path)
    if path.suffix.lower() in EDF_SUFFIXES:
        from data_prep.folder import canonical_lead, read_edf

        if not path.is_file():
            raise RecordError(f"{path}: no such file")
        signal, rate, labels = read_edf(str(path))
        return signal, rate, [canonical_lead(label) for label in labels]
    if path.suffix in TRACE_SUFFIXES:
        if units not in TO_MILLIVOLTS:
            raise RecordError(f"{path}: unknown units {units!r}: one of {', '.join(TO_MILLIVOLTS)}")
        signal, rate, names = _read_trace(path, fs=fs, leads=leads)
        return (signal * np.float32(TO_MILLIVOLTS[units])).astype(np.float32), rate, names
    base = path.with_suffix("") if path.suffix in (".hea", ".dat", ".mat") else path
    if base.with_suffix(".hea").is_file():
        return _read_wfdb(base)
    if path.suffix == ".mat" and path.is_file():
        from data_prep.cpsc2018 import read_cpsc_mat

        signal, rate = read_cpsc_mat(str(path))
        return signal, rate, list(LEADS)
    raise RecordError(f"{path}: no such record (expected a WFDB record NAME with NAME.hea, a CPSC 2018 .mat, "
                      f"an .edf/.bdf file, or a {'/'.join(TRACE_SUFFIXES)} trace with --fs and --lead)")


def _read_wfdb(base: pathlib.Path) -> tuple[np.ndarray, float, list[str]]:
    header = parse_header(base.with_suffix(".hea"))
    names = [s.description for s in header.signals]
    unknown = sorted({s.units for s in header.signals if s.units.lower() not in _SCALE})
    if unknown:
        raise RecordError(f"{base.with_suffix('.hea')}: signal units {unknown} are not uV, mV or V")
    scales = [_SCALE[s.units.lower()] for s in header.signals]
    try:
        signal, rate = read_record(base, header)
        if len(set(scales)) > 1:
            raise RecordError(f"{base.with_suffix('.hea')}: its 12 leads are in different units "
                              f"({sorted({s.units for s in header.signals})}); convert them to mV")
        return (signal * np.float32(scales[0])).astype(np.float32), rate, list(LEADS)
    except RecordError as e:
        if "lead" not in str(e):  # damaged file, not a lead set other than the standard 12
            raise
    import wfdb

    try:
        record = wfdb.rdrecord(str(base))
    except Exception as e:  # wfdb raises many types for damaged files
        raise RecordError(f"{base}: unreadable WFDB record ({type(e).__name__}: {e})") from None
    return (np.asarray(record.p_signal, np.float64) * np.asarray(scales)).astype(np.float32), float(record.fs), names


def _read_trace(path: pathlib.Path, *, fs: float | None, leads: Sequence[str] | None):
    if not fs or not leads:
        raise RecordError(f"{path}: a {path.suffix} trace carries no sampling rate or lead names: "
                          "give --fs=HZ and --lead=NAME (one name per column, e.g. --lead=I)")
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            signal = np.load(path, allow_pickle=False)
        else:
            try:
                signal = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
            except ValueError:  # a header row
                signal = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1)
    except (ValueError, OSError) as e:
        raise RecordError(f"{path}: unreadable {path.suffix} trace ({e})") from None
    signal = np.asarray(signal, np.float32)
    if signal.ndim == 1:
        signal = signal[:, None]
    if signal.ndim != 2 or signal.shape[1] != len(leads):
        raise RecordError(f"{path}: {signal.shape[1] if signal.ndim == 2 else signal.ndim} column(s) for "
                          f"{len(leads)} lead name(s) {list(leads)}")
    return signal, float(fs), list(leads)
