"""Your own ECG recordings -> the same shards and manifest as the other datasets.

    python -m data_prep.folder --src=DIR --labels=labels.csv --out=SHARDS [--fs=HZ] [--leads=...]

Records: every file under ``--src`` (searched recursively) in one of these formats; other files
are ignored. A record's name is its path under ``--src`` without the suffix (``site1/p07``), or
its bare file name where that is unique.

| format | files | sampling rate | lead names |
|---|---|---|---|
| WFDB | ``NAME.hea`` + ``.dat``/``.mat`` | the header | the header's signal descriptions |
| EDF, EDF+ (continuous), BDF | ``.edf``, ``.bdf`` | each signal's own (the ECG signals must agree) | signal labels |
| CSV | ``.csv``, one column per lead, header row of lead names | ``--fs`` | the header |
| NumPy | ``.npy``, (T, L) | ``--fs`` | ``--leads`` |

EDF is read with ``edfio`` (pure Python and numpy, maintained, reads and writes EDF, EDF+C and
BDF; pyedflib needs a compiled extension for the same). EDF/BDF values are converted to mV from
their physical dimension (uV, mV, V); WFDB records are in the header's units (mV for ECG); CSV
and NumPy traces must be in mV. Lead names are matched case-insensitively after dropping an
``ECG``/``EKG``/``Lead`` prefix, spaces, dashes and underscores: ``I``, ``II``, ``III``, ``aVR``,
``aVL``, ``aVF``, ``V1``..``V6``; aliases: ``MLII``/``ML2`` -> II, ``MLI`` -> I, ``MLIII`` -> III.
Every record needs the 12 standard leads (other signals, e.g. respiration, are ignored); a
record without one of them is rejected, naming the missing leads.

Label table (``--labels``, CSV, one row per record): a ``record`` column; then either a
``labels`` column with ``;``-separated class names, or one 0/1 column per class (every other
column); optional ``patient`` (folds are then patient-wise: all records of a patient in one
fold) and ``fold`` (integers 1..K, used as given; else iteratively stratified folds, as for
CPSC 2018). Records are resampled to ``--sampling_rate`` as the other importers do.

Rejected, each named in ``rejected.csv`` and counted towards ``--max_rejected_fraction``: a row
without a record file, a record file without a row, a record name found twice (two files, or
two rows), a record without the 12 leads, unreadable files, and the other importers' checks
(NaN samples, ...).
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Sequence

import numpy as np

from data_prep.common import (DataPrepError, SignalConfig, Source, build_shards, source_folder,
                              multi_hot, parse_band_pass, read_wfdb_source)
from data_prep.wfdb_io import LEADS, RecordError

SUFFIXES = {".hea": "wfdb", ".edf": "edf", ".bdf": "edf", ".csv": "csv", ".npy": "npy"}
RESERVED_COLUMNS = ("record", "labels", "patient", "fold")
LEAD_ALIASES = {"mlii": "II", "ml2": "II", "mli": "I", "ml1": "I", "mliii": "III", "ml3": "III"}
_PREFIX = re.compile(r"^(ecg|ekg|lead)")
_UNITS_TO_MV = {"uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "mv": 1.0, "v": 1e3}


def canonical_lead(name: str) -> str | None:
    """'ECG I', 'EKG-II', 'avr', 'Lead V1', 'MLII' -> the standard name; None for other signals."""
    key = re.sub(r"[\s\-_]", "", str(name)).lower()
    key = _PREFIX.sub("", key) or key
    if key in LEAD_ALIASES:
        return LEAD_ALIASES[key]
    return {lead.lower(): lead for lead in LEADS}.get(key)


def standard_leads(signal: np.ndarray, names: Sequence[str], where: str) -> np.ndarray:
    """(T, L) columns named ``names`` -> (T, 12) in the standard order; RecordError naming the
    missing (or doubled) leads."""
    found: dict[str, int] = {}
    for column, name in enumerate(names):
        lead = canonical_lead(name)
        if lead is None:
            continue
        if lead in found:
            raise RecordError(f"{where}: lead {lead} appears twice ({names[found[lead]]!r} and {name!r})")
        found[lead] = column
    missing = [lead for lead in LEADS if lead not in found]
    if missing:
        raise RecordError(f"{where}: no signal for lead(s) {', '.join(missing)} among {list(names)} "
                          "(every record needs the 12 standard leads)")
    return np.ascontiguousarray(signal[:, [found[lead] for lead in LEADS]], dtype=np.float32)


def read_edf(path: str) -> tuple[np.ndarray, float, list[str]]:
    """(samples (T, L) in mV, sampling rate, labels) of the ECG signals of an EDF/EDF+/BDF file."""
    import edfio

    name = os.path.basename(path)
    try:
        edf = edfio.read_bdf(path) if path.lower().endswith(".bdf") else edfio.read_edf(path)
    except Exception as e:  # edfio raises several types for damaged or discontinuous (EDF+D) files
        raise RecordError(f"{name}: unreadable EDF/BDF file ({type(e).__name__}: {e})") from None
    ecg = [s for s in edf.signals if canonical_lead(s.label) is not None]
    if not ecg:
        raise RecordError(f"{name}: no ECG lead among the signals {[s.label for s in edf.signals]}")
    rates = sorted({float(s.sampling_frequency) for s in ecg})
    if len(rates) > 1:
        raise RecordError(f"{name}: the ECG signals have different sampling rates {rates}")
    lengths = {len(s.data) for s in ecg}
    if len(lengths) > 1:
        raise RecordError(f"{name}: the ECG signals have different lengths {sorted(lengths)}")
    columns = []
    for s in ecg:
        unit = s.physical_dimension.strip().lower()
        if unit not in _UNITS_TO_MV:
            raise RecordError(f"{name}: signal {s.label!r} has physical dimension {s.physical_dimension!r}; "
                              "expected uV, mV or V")
        columns.append(np.asarray(s.data, np.float64) * _UNITS_TO_MV[unit])
    return np.stack(columns, axis=1).astype(np.float32), rates[0], [s.label for s in ecg]


def read_csv_trace(path: str) -> tuple[np.ndarray, list[str]]:
    """(samples (T, L), the header's column names) of a CSV trace."""
    name = os.path.basename(path)
    try:
        with open(path) as f:
            header = [c.strip().strip('"') for c in f.readline().strip().split(",")]
        signal = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1)
    except (OSError, ValueError) as e:
        raise RecordError(f"{name}: unreadable CSV trace ({e})") from None
    if signal.shape[1] != len(header):
        raise RecordError(f"{name}: {signal.shape[1]} columns but {len(header)} names in the header row")
    return signal.astype(np.float32), header


def _read_wfdb_source(path: str) -> tuple[np.ndarray, float]:
    """The 12 standard leads of a WFDB record: data_prep's reader when the header names exactly
    them, else wfdb's (other names such as MLII, extra signals) matched by name."""
    try:
        return read_wfdb_source(path)
    except RecordError as e:
        if "lead" not in str(e):  # a damaged file, not another set of signal names
            raise
    import wfdb

    try:
        record = wfdb.rdrecord(path)
    except Exception as e:  # wfdb raises many types for damaged files
        raise RecordError(f"{os.path.basename(path)}: unreadable WFDB record ({type(e).__name__}: {e})") from None
    return standard_leads(np.asarray(record.p_signal, np.float32), record.sig_name, os.path.basename(path)), \
        float(record.fs)


def _read_edf_source(path: str) -> tuple[np.ndarray, float]:
    signal, rate, labels = read_edf(path)
    return standard_leads(signal, labels, os.path.basename(path)), rate


def _read_csv_source(path: str, *, fs: float) -> tuple[np.ndarray, float]:
    signal, header = read_csv_trace(path)
    return standard_leads(signal, header, os.path.basename(path)), fs


def _read_npy_source(path: str, *, fs: float, leads: tuple[str, ...]) -> tuple[np.ndarray, float]:
    name = os.path.basename(path)
    try:
        signal = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RecordError(f"{name}: unreadable .npy trace ({e})") from None
    if signal.ndim != 2 or signal.shape[1] != len(leads):
        raise RecordError(f"{name}: shape {signal.shape}, expected (T, {len(leads)}) for --leads={','.join(leads)}")
    return standard_leads(np.asarray(signal, np.float32), leads, name), fs


def find_records(src: pathlib.Path, *, label_table: pathlib.Path | None = None
                 ) -> tuple[dict[str, tuple[str, pathlib.Path]], list[tuple[str, str]]]:
    """{record name: (format, path)} of every record file under ``src`` (the label table, if it
    is there, excluded), and the names found twice (rejected, both files named)."""
    found: dict[str, list[tuple[str, pathlib.Path]]] = {}
    table = label_table.resolve() if label_table is not None else None
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
        if path.resolve() == table:
            continue
        name = path.relative_to(src).with_suffix("").as_posix()
        found.setdefault(name, []).append((SUFFIXES[path.suffix.lower()], path))
    records, duplicates = {}, []
    for name, entries in found.items():
        if len(entries) > 1:
            duplicates.append((name, f"{name}: found twice ({', '.join(str(p) for _, p in entries)})"))
        else:
            records[name] = entries[0]
    return records, duplicates


def read_label_table(path: pathlib.Path) -> tuple[dict[str, dict], list[str], list[tuple[str, str]]]:
    """({record: {"labels": set, "patient": str | None, "fold": int | None}}, class names, rejected rows)."""
    import pandas as pd

    if not path.is_file():
        raise DataPrepError(f"--labels={path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataPrepError(f"cannot parse {path}: {e}") from None
    table.columns = [c.strip() for c in table.columns]
    if "record" not in table.columns:
        raise DataPrepError(f"{path}: no 'record' column (columns: {list(table.columns)})")
    class_columns = [c for c in table.columns if c not in RESERVED_COLUMNS]
    if "labels" in table.columns:
        if class_columns:
            raise DataPrepError(f"{path}: both a 'labels' column and other columns {class_columns}: use one "
                                "form (';'-separated names in 'labels', or one 0/1 column per class)")
        label_sets = [{n.strip() for n in str(v).split(";") if n.strip()} for v in table["labels"]]
        names = sorted(set().union(*label_sets)) if label_sets else []
    else:
        bad = [c for c in class_columns if not set(table[c].str.strip()) <= {"0", "1"}]
        if bad or not class_columns:
            raise DataPrepError(f"{path}: label column(s) {bad or '(none)'} are not 0/1: give one 0/1 column per "
                                "class, or a 'labels' column with ';'-separated class names")
        label_sets = [{c for c in class_columns if row[c].strip() == "1"} for _, row in table.iterrows()]
        names = class_columns
    rows, rejected, counts = {}, [], table["record"].str.strip().value_counts()
    named_twice: set[str] = set()
    for i, record in enumerate(table["record"].str.strip()):
        if counts[record] > 1:
            if record not in named_twice:  # one rejection per record, not per row
                named_twice.add(record)
                rejected.append((record, f"{record}: {counts[record]} rows in {path.name}"))
            continue
        fold = table["fold"].iloc[i].strip() if "fold" in table.columns else ""
        if fold and not fold.isdigit():
            rejected.append((record, f"{record}: fold {fold!r} in {path.name} is not a positive integer"))
            continue
        if not label_sets[i]:
            rejected.append((record, f"{record}: no label in {path.name}"))
            continue
        rows[record] = {"labels": label_sets[i], "fold": int(fold) if fold else None,
                        "patient": table["patient"].iloc[i].strip() or None if "patient" in table.columns else None}
    return rows, list(names), rejected


def _patient_folds(rows: list[dict], labels: np.ndarray, *, num_folds: int, seed: int) -> np.ndarray:
    """Iteratively stratified folds of the patients (their records' labels OR-ed), given to every
    record of each patient; records without a patient count as patients of their own."""
    from data_prep.folds import iterative_stratification

    keys = [r["patient"] if r["patient"] is not None else f"record:{i}" for i, r in enumerate(rows)]
    patients = sorted(set(keys))
    index = {p: k for k, p in enumerate(patients)}
    per_patient = np.zeros((len(patients), labels.shape[1]), np.uint8)
    for key, y in zip(keys, labels):
        per_patient[index[key]] |= y
    patient_fold = iterative_stratification(per_patient, num_folds=num_folds, seed=seed)
    return np.asarray([patient_fold[index[k]] for k in keys], np.int16)


def _source(name: str, fmt: str, path: pathlib.Path, *, fs: float | None, leads: tuple[str, ...]) -> Source:
    if fmt == "wfdb":
        return Source(name, str(path.with_suffix("")), _read_wfdb_source)
    if fmt == "edf":
        return Source(name, str(path), _read_edf_source)
    if fs is None:
        raise DataPrepError(f"{path}: {path.suffix} traces carry no sampling rate: give --fs=HZ")
    if fmt == "csv":
        return Source(name, str(path), functools.partial(_read_csv_source, fs=fs))
    if not leads:
        raise DataPrepError(f"{path}: .npy traces carry no lead names: give --leads=I,II,...")
    return Source(name, str(path), functools.partial(_read_npy_source, fs=fs, leads=leads))


def _match_rows(rows: dict[str, dict], files: dict, duplicated: set[str], rejected: list, *, src: pathlib.Path,
                table_name: str, fs: float | None, leads: tuple[str, ...]):
    """(a Source and its row per matched record, every record name a row of the table claims).
    A row names a record by its path under ``src`` or by its bare name where that is unique;
    rows that match no file or several are appended to ``rejected``; rows of a name found
    twice were named already."""
    by_stem: dict[str, list[str]] = {}
    for name in [*files, *duplicated]:
        by_stem.setdefault(name.rsplit("/", 1)[-1], []).append(name)

    def resolve(record: str) -> list[str]:
        return [record] if record in files or record in duplicated else by_stem.get(record, [])

    claimed = {name for record, _ in rejected for name in resolve(record)}  # rows rejected by the table reader
    sources, picked = [], []
    for record, row in rows.items():
        candidates = resolve(record)
        claimed.update(candidates)
        if any(c in duplicated for c in candidates):
            continue
        if len(candidates) != 1:
            rejected.append((record, f"{record}: row in {table_name} but " + (
                f"no record file under {src}" if not candidates else
                f"{len(candidates)} record files match it ({', '.join(candidates)}): name them by path")))
            continue
        sources.append(_source(record, *files[candidates[0]], fs=fs, leads=leads))
        picked.append(row)
    return sources, picked, claimed


def prepare(src: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike, *, fs: float | None = None,
            leads: Sequence[str] = (), sampling_rate: int = 100, split_folds: dict[str, Sequence[int]] | None = None,
            num_folds: int = 10, seed: int = 0, band_pass: Sequence[float] | None = None, dtype: str = "float32",
            max_rejected_fraction: float = 0.05, overwrite: bool = False, num_workers: int | None = None,
            progress: bool = False) -> dict:
    """Prepare the records under ``src`` with the label table ``labels`` into ragged shards at ``out``."""
    src = source_folder(src, out, overwrite)
    table_path = pathlib.Path(labels).absolute()
    rows, label_names, rejected = read_label_table(table_path)
    files, duplicates = find_records(src, label_table=table_path)
    rejected += duplicates
    sources, picked, claimed = _match_rows(rows, files, {n for n, _ in duplicates}, rejected, src=src,
                                           table_name=table_path.name, fs=fs, leads=tuple(leads))
    rejected += [(name, f"{name}: {path.name} has no row in {table_path.name}")
                 for name, (_, path) in files.items() if name not in claimed]
    if not sources:
        raise DataPrepError(f"no record of {table_path} found under {src} ({len(files)} record files there)")
    y = multi_hot([r["labels"] for r in picked], label_names)
    given = [r["fold"] for r in picked]
    if any(f is not None for f in given) and any(f is None for f in given):
        raise DataPrepError(f"{table_path}: the 'fold' column is empty for some records: give every record a fold")
    if given[0] is not None:
        folds = np.asarray(given, np.int16)
    elif any(r["patient"] is not None for r in picked):
        folds = _patient_folds(picked, y, num_folds=num_folds, seed=seed)
    else:
        folds = None
    cfg = SignalConfig(target_fs=sampling_rate, expected_fs=None, fixed_seconds=None,
                       band_pass=parse_band_pass(band_pass, sampling_rate, None))
    split_folds = split_folds or {"train": list(range(1, 9)), "val": [9], "test": [10]}
    return build_shards(
        out_dir=out, sources=sources, labels=y, label_names=label_names, signal_config=cfg, dataset="folder",
        source_desc=f"{src} (labels {table_path})", task="folder", split_folds=split_folds, folds=folds,
        num_folds=num_folds, seed=seed, dtype=dtype, max_rejected_fraction=max_rejected_fraction,
        pre_rejected=rejected, dropped_no_label=0, overwrite=overwrite, num_workers=num_workers, progress=progress,
        extra={"source_formats": sorted({fmt for fmt, _ in files.values()}),
               "folds_from": "table" if given[0] is not None else "patients" if folds is not None else "records"},
    )


def define_flags(fv) -> None:
    from absl import flags

    from data_prep import cli

    cli.define_common_flags(fv)
    cli.define_fold_flags(fv)
    flags.DEFINE_string("labels", None, "label table (CSV): record, then labels or one 0/1 column per class; "
                        "optional patient, fold", flag_values=fv)
    flags.DEFINE_float("fs", None, "sampling rate in Hz of .csv/.npy traces (WFDB and EDF carry their own)",
                       flag_values=fv)
    flags.DEFINE_list("leads", [], "lead names of the columns of .npy traces, e.g. I,II,III,aVR,...",
                      flag_values=fv)


def run(fv) -> dict:
    from data_prep import cli

    if not fv["labels"].value:
        raise DataPrepError("--labels is required (the label table)")
    return cli.prepare_and_summarize(fv, prepare, labels=fv["labels"].value, fs=fv["fs"].value,
                                     leads=fv["leads"].value, num_folds=fv["num_folds"].value, seed=fv["seed"].value)


def main(argv: list[str] | None = None):
    """CLI entry point; ``argv`` (with the program name first) runs it in-process."""
    from data_prep import cli

    return cli.main("data_prep.folder", define_flags, run, argv)


if __name__ == "__main__":
    main()
