"""CPSC 2018 (= ICBEB 2018) -> ragged shards with 9 multi-label classes and stratified folds.

Owns reading both distributions of the dataset:
- original: `A*.mat` (MATLAB struct `ECG` with `data` 12 x N in mV, 500 Hz, leads in the
  standard order) + `REFERENCE.csv` (Recording, First_label, Second_label, Third_label;
  classes 1..9; rows not sorted, so they are joined on the record id);
- CinC 2020/2021: `A*.hea` + `A*.mat` with SNOMED CT codes on the `#Dx:` line, mapped
  to the same 9 classes.
Records (6-60 s) are stored uncropped (ragged); folds are assigned by iterative
stratification (data_prep.folds). Writing is data_prep.common's.

    python -m data_prep.cpsc2018 --src=DIR --out=DIR [--format=auto|original|cinc]
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from data_prep.common import (DataPrepError, SignalConfig, Source, build_shards, source_folder,
                              multi_hot, parse_band_pass, read_wfdb_source)
from data_prep.wfdb_io import RecordError, scan_cinc_folder

SOURCE_FS = 500
# REFERENCE.csv class numbers (Liu et al. 2018, Table 1).
CLASSES = {1: "Normal", 2: "AF", 3: "I-AVB", 4: "LBBB", 5: "RBBB", 6: "PAC", 7: "PVC", 8: "STD", 9: "STE"}
LABEL_NAMES = sorted(CLASSES.values())
# SNOMED CT codes used for the CPSC records in the PhysioNet/CinC 2020/2021 data
# (dx_mapping_scored.csv / dx_mapping_unscored.csv, column CPSC), plus the codes the
# Challenge scores as equivalent (LBBB/CLBBB, RBBB/CRBBB, PAC/SVPB, PVC/VEB/VPB).
SNOMED = {
    "426783006": "Normal",  # sinus rhythm
    "164889003": "AF",
    "270492004": "I-AVB",
    "164909002": "LBBB", "733534002": "LBBB",
    "59118001": "RBBB", "713427006": "RBBB",
    "284470004": "PAC", "63593006": "PAC",
    "164884008": "PVC", "427172004": "PVC", "17338001": "PVC",
    "429622005": "STD",
    "164931005": "STE",
}
REFERENCE_COLUMNS = ("Recording", "First_label", "Second_label", "Third_label")


def read_cpsc_mat(path: str) -> tuple[np.ndarray, float]:
    """Original CPSC 2018 `.mat`: struct `ECG` with field `data` (12, N) -> ((N, 12) float32, 500)."""
    import scipy.io

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise RecordError(f"{name}: missing file")
    try:
        mat = scipy.io.loadmat(path, variable_names=["ECG"])
    except Exception as e:  # scipy raises several types on truncated / non-MATLAB files
        raise RecordError(f"{name}: unreadable .mat ({type(e).__name__}: {e})") from None
    try:
        data = np.asarray(mat["ECG"]["data"][0, 0])
    except (KeyError, IndexError, ValueError, TypeError):
        raise RecordError(f"{name}: no struct ECG with field data (not a CPSC 2018 .mat)") from None
    if data.ndim != 2 or data.shape[0] != 12:
        raise RecordError(f"{name}: wrong lead count: ECG.data has shape {data.shape}, expected (12, N)")
    if not np.issubdtype(data.dtype, np.number):
        raise RecordError(f"{name}: ECG.data is not numeric ({data.dtype})")
    return np.ascontiguousarray(data.T, dtype=np.float32), float(SOURCE_FS)


def read_reference(path: pathlib.Path) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """REFERENCE.csv -> ({record: label names}, rejected rows). Fails on missing columns."""
    import pandas as pd

    try:
        ref = pd.read_csv(path, dtype=str)
    except Exception as e:
        raise DataPrepError(f"cannot parse {path}: {e}") from None
    missing = [c for c in REFERENCE_COLUMNS[:2] if c not in ref.columns]
    if missing:
        raise DataPrepError(f"{path}: missing required column(s) {missing} "
                            f"(expected {', '.join(REFERENCE_COLUMNS)})")
    labels: dict[str, set[str]] = {}
    rejected = []
    dup = set()
    label_cols = [c for c in REFERENCE_COLUMNS[1:] if c in ref.columns]
    for row in ref.itertuples(index=False):
        rid = str(getattr(row, "Recording")).strip()
        names, bad = set(), []
        for col in label_cols:
            v = getattr(row, col)
            if not isinstance(v, str) or not v.strip():
                continue
            code = v.strip()
            if code.isdigit() and int(code) in CLASSES:  # "2.5" is no class, not class 2
                names.add(CLASSES[int(code)])
            else:
                bad.append(v)
        if bad:
            rejected.append((rid, f"{rid}: unknown class code(s) {bad} in {path.name} (expected 1..9)"))
            continue
        if not names:
            rejected.append((rid, f"{rid}: no label in {path.name}"))
            continue
        if rid in labels:
            dup.add(rid)
        labels[rid] = names
    for rid in sorted(dup):
        del labels[rid]
        rejected.append((rid, f"{rid}: duplicate rows in {path.name}"))
    return labels, rejected


def _find_reference(src: pathlib.Path) -> pathlib.Path:
    direct = src / "REFERENCE.csv"
    if direct.is_file():
        return direct
    found = sorted(src.rglob("REFERENCE.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataPrepError(f"missing required file {direct} (original CPSC 2018 format needs REFERENCE.csv)")
    raise DataPrepError(f"several REFERENCE.csv under {src}: {[str(p) for p in found]}; point --src at one")


def detect_format(src: pathlib.Path) -> str:
    if any(src.rglob("A*.hea")):
        return "cinc"
    if any(src.rglob("A*.mat")):
        return "original"
    raise DataPrepError(f"no CPSC 2018 records in {src}: expected A*.mat (+ REFERENCE.csv) or "
                        "CinC-format A*.hea/A*.mat")


def _collect_original(src: pathlib.Path):
    reference = _find_reference(src)
    ref_labels, ref_rejected = read_reference(reference)
    rejected = []
    files: dict[str, pathlib.Path] = {}
    for p in sorted(src.rglob("A*.mat")):
        if p.stem in files:
            rejected.append((p.stem, f"{p.stem}: duplicate record files {files[p.stem]} and {p}"))
            continue
        files[p.stem] = p
    # Rows without a record are expected when --src holds part of the release (the
    # in-project sample keeps the full REFERENCE.csv): rows outside the id range of the
    # present records are listed in rejected.csv but not counted towards
    # --max_rejected_fraction. A record missing inside that range (A1983 between A1982 and
    # A1984) was lost from this copy, and counts.
    rows = set(ref_labels) | {rid for rid, _ in ref_rejected}
    present = sorted((rid for rid in files if rid in rows), key=_record_number)
    lo, hi = (_record_number(present[0]), _record_number(present[-1])) if present else (0, -1)
    missing = []
    for rid in sorted(set(ref_labels) - set(files)):
        reason = (rid, f"{rid}: row in {reference.name} but no {rid}.mat under {src}")
        (rejected if lo <= _record_number(rid) <= hi else missing).append(reason)
    bad_rows = set()
    for rid, reason in ref_rejected:
        bad_rows.add(rid)
        (rejected if rid in files or lo <= _record_number(rid) <= hi else missing).append((rid, reason))
    sources, label_sets = [], []
    for rid, path in sorted(files.items()):
        if rid in bad_rows:
            continue
        if rid not in ref_labels:
            rejected.append((rid, f"{rid}: {path.name} has no row in {reference.name}"))
            continue
        sources.append(Source(rid, str(path), read_cpsc_mat))
        label_sets.append(ref_labels[rid])
    return sources, label_sets, rejected, missing, 0  # the MATLAB struct has no lead names


def _record_number(rid: str) -> int:
    digits = "".join(ch for ch in rid if ch.isdigit())
    return int(digits) if digits else -1


def _collect_cinc(src: pathlib.Path):
    scanned, rejected, stray = scan_cinc_folder(src, "A*")
    sources, label_sets = [], []
    for record in scanned:
        rid = record.record_id
        unknown = [c for c in record.codes if c not in SNOMED]
        if unknown:
            rejected.append((rid, f"{rid}: unknown SNOMED code(s) {unknown} in {record.header_path.name} "
                                  "(not one of the 9 CPSC 2018 classes)"))
            continue
        sources.append(Source(rid, str(record.header_path.with_suffix("")), read_wfdb_source))
        label_sets.append({SNOMED[c] for c in record.codes})
    return sources, label_sets, rejected, stray, sum(r.leads_reordered for r in scanned)


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "auto", sampling_rate: int = 100,
            split_folds: dict[str, Sequence[int]] | None = None, num_folds: int = 10, seed: int = 0,
            band_pass: Sequence[float] | None = None, dtype: str = "float32",
            max_rejected_fraction: float = 0.05, overwrite: bool = False, num_workers: int | None = None,
            progress: bool = False) -> dict:
    """Prepare CPSC 2018 (original or CinC format) into ragged shards at `out`; returns the manifest."""
    src = source_folder(src, out, overwrite)
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt == "original":
        sources, label_sets, rejected, missing, reordered = _collect_original(src)
    elif fmt == "cinc":
        sources, label_sets, rejected, missing, reordered = _collect_cinc(src)
    else:
        raise DataPrepError(f"unknown --format {fmt!r} (auto, original, cinc)")
    cfg = SignalConfig(target_fs=sampling_rate, expected_fs=SOURCE_FS, fixed_seconds=None,
                       band_pass=parse_band_pass(band_pass, sampling_rate, SOURCE_FS))
    split_folds = split_folds or {"train": list(range(1, 9)), "val": [9], "test": [10]}
    return build_shards(
        out_dir=out, sources=sources, labels=multi_hot(label_sets, LABEL_NAMES), label_names=LABEL_NAMES,
        signal_config=cfg, dataset="cpsc2018", source_desc=f"{src} ({fmt} format)", task="cpsc2018",
        split_folds=split_folds, folds=None, num_folds=num_folds, seed=seed, dtype=dtype,
        max_rejected_fraction=max_rejected_fraction, pre_rejected=rejected, uncounted_rejected=missing,
        dropped_no_label=0, overwrite=overwrite, num_workers=num_workers, progress=progress,
        extra={"source_format": fmt, "leads_reordered": reordered},
    )


def define_flags(fv) -> None:
    from absl import flags

    from data_prep import cli

    cli.define_common_flags(fv)
    cli.define_fold_flags(fv)
    flags.DEFINE_enum("format", "auto", ["auto", "original", "cinc"],
                      "Source format: original (A*.mat + REFERENCE.csv) or cinc (A*.hea/.mat with #Dx); "
                      "auto picks cinc when A*.hea files exist.", flag_values=fv)


def run(fv) -> dict:
    from data_prep import cli

    return cli.prepare_and_summarize(fv, prepare, fmt=fv["format"].value, num_folds=fv["num_folds"].value,
                                     seed=fv["seed"].value)


def main(argv: list[str] | None = None):
    """CLI entry point; `argv` (with the program name first) runs it in-process."""
    from data_prep import cli

    return cli.main("data_prep.cpsc2018", define_flags, run, argv)


if __name__ == "__main__":
    main()
