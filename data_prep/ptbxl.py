"""PTB-XL -> shards: label aggregation, official folds, patient-disjoint splits, download.

Owns the PTB-XL specifics: reading `ptbxl_database.csv` + `scp_statements.csv`, the
benchmark tasks of Strodthoff et al. 2020 (helme/ecg_ptbxl_benchmarking,
`compute_label_aggregations` / `select_data`), split by `strat_fold`, the
patient-disjointness check and `--download` from PhysioNet. Signal reading,
standardisation and writing are `data_prep.common`'s.

    python -m data_prep.ptbxl --src=DIR --out=DIR [--task=superdiagnostic] [--sampling_rate=100]
"""

from __future__ import annotations

import ast
import os
import pathlib
import socket
import sys
from typing import Sequence

import numpy as np

from data_prep.common import (DataPrepError, SignalConfig, Source, build_shards, check_output_dir,
                              multi_hot, parse_band_pass, read_wfdb_source)

TASKS = ("all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm")
DATABASE_COLUMNS = ("ecg_id", "patient_id", "scp_codes", "strat_fold")
PHYSIONET_URL = "https://physionet.org/content/ptb-xl/1.0.3/"
PHYSIONET_DB = "ptb-xl"
RECORD_SECONDS = 10.0
DEFAULT_SPLIT_FOLDS = {"train": list(range(1, 9)), "val": [9], "test": [10]}


def load_tables(src: str | os.PathLike, filename_column: str | None = None):
    """Read and check `ptbxl_database.csv` and `scp_statements.csv` of a PTB-XL folder."""
    import pandas as pd

    src = pathlib.Path(src)
    if not src.is_dir():
        raise DataPrepError(f"--src {src} is not a folder (expected a PTB-XL release: "
                            f"ptbxl_database.csv, scp_statements.csv, records100/, records500/)")
    db_path, st_path = src / "ptbxl_database.csv", src / "scp_statements.csv"
    for p in (db_path, st_path):
        if not p.is_file():
            raise DataPrepError(f"missing required file {p} (PTB-XL release layout expected)")
    check_complete_csv(db_path)
    try:
        db = pd.read_csv(db_path)
        statements = pd.read_csv(st_path, index_col=0)
    except Exception as e:
        raise DataPrepError(f"cannot parse {db_path} / {st_path}: {e}") from None
    need = list(DATABASE_COLUMNS) + ([filename_column] if filename_column else [])
    missing = [c for c in need if c not in db.columns]
    if missing:
        raise DataPrepError(f"{db_path}: missing required column(s) {missing}")
    duplicated = sorted({str(v) for v in db["ecg_id"][db["ecg_id"].duplicated()]})
    if duplicated:
        raise DataPrepError(f"{db_path}: ecg_id {', '.join(duplicated[:10])} occur(s) in more than one row; "
                            "each record must have exactly one row")
    missing = [c for c in ("diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass")
               if c not in statements.columns]
    if missing:
        raise DataPrepError(f"{st_path}: missing required column(s) {missing}")
    return db, statements


def check_complete_csv(path: pathlib.Path) -> None:
    """A table cut off mid-row (interrupted copy or download) parses as a shorter table with
    a damaged last row: refuse it."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(size - 4096, 0))
        tail = f.read()
    if tail and not tail.endswith(b"\n"):
        last = tail.splitlines()[-1].decode(errors="replace")
        raise DataPrepError(f"{path} ends in the middle of a row (last line {last[:80]!r}): the file is "
                            "truncated; copy or download it again")


def records_without_row(src: pathlib.Path, column_values: Sequence[str], folder: str) -> list[str]:
    """Records of ``folder`` (records100 or records500) listed by the release's RECORDS file,
    or found on disk, that have no row in ptbxl_database.csv (a truncated or edited table)."""
    listed_file = src / "RECORDS"
    if listed_file.is_file():
        listed = {line.strip() for line in listed_file.read_text().splitlines() if line.startswith(folder + "/")}
    else:
        listed = {str(p.relative_to(src).with_suffix("")) for p in (src / folder).rglob("*.hea")}
    return sorted(listed - {str(v) for v in column_values})


def parse_scp_codes(text) -> dict:
    """`"{'NORM': 100.0, 'SR': None}"` -> dict. Likelihoods may be None: only keys matter."""
    value = ast.literal_eval(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError(f"scp_codes is not a dictionary: {text!r}")
    return value


def task_statements(statements, task: str) -> dict[str, str]:
    """Statement key -> label name for `task` (key itself, subclass or superclass)."""
    if task not in TASKS:
        raise DataPrepError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "all":
        return {k: k for k in statements.index}
    if task in ("form", "rhythm"):
        sel = statements[statements[task] == 1.0]
        return {k: k for k in sel.index}
    diag = statements[statements["diagnostic"] == 1.0]
    if task == "diagnostic":
        return {k: k for k in diag.index}
    column = "diagnostic_subclass" if task == "subdiagnostic" else "diagnostic_class"
    return {k: v for k, v in diag[column].items() if isinstance(v, str) and v}


def aggregate(codes: dict, mapping: dict[str, str]) -> set[str]:
    return {mapping[k] for k in codes if k in mapping}


def compute_labels(scp_codes: Sequence[dict], statements, task: str, min_samples: int = 0):
    """Per-record label sets and the sorted label names (labels occurring in > min_samples records).

    Mirrors the benchmark: aggregation by statement key, then `select_data`'s count filter.
    """
    mapping = task_statements(statements, task)
    sets = [aggregate(c, mapping) for c in scp_codes]
    counts: dict[str, int] = {}
    for s in sets:
        for lab in s:
            counts[lab] = counts.get(lab, 0) + 1
    names = sorted(k for k, c in counts.items() if c > min_samples)
    keep = set(names)
    return [s & keep for s in sets], names


def download(src: str | os.PathLike, sampling_rate: int = 100, timeout: float = 5.0) -> None:
    """Fetch PTB-XL (tables + the records of one rate) from PhysioNet into `src`."""
    host = "physionet.org"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise DataPrepError(
            f"cannot reach {host} ({e}); no network? Download PTB-XL manually from {PHYSIONET_URL} "
            f"(zip or `wget -r -N -c -np {PHYSIONET_URL.replace('/content/', '/files/')}`), unpack it so that "
            f"{pathlib.Path(src).absolute()}/ptbxl_database.csv, scp_statements.csv and records100/ "
            "exist, then run again without --download") from None
    import pandas as pd
    import wfdb

    os.makedirs(src, exist_ok=True)
    wfdb.dl_files(PHYSIONET_DB, str(src), ["ptbxl_database.csv", "scp_statements.csv"])
    column = "filename_lr" if sampling_rate == 100 else "filename_hr"
    records = pd.read_csv(pathlib.Path(src) / "ptbxl_database.csv")[column].tolist()
    wfdb.dl_database(PHYSIONET_DB, str(src), records=records, annotators=None)


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, task: str = "superdiagnostic",
            sampling_rate: int = 100, split_folds: dict[str, Sequence[int]] | None = None,
            band_pass: Sequence[float] | None = None, dtype: str = "float32",
            max_rejected_fraction: float = 0.05, min_samples: int = 0, overwrite: bool = False,
            download_first: bool = False, num_workers: int | None = None, progress: bool = False) -> dict:
    """Prepare a PTB-XL folder into shards at `out`; returns the manifest (see docs/DATA.md)."""
    check_output_dir(out, overwrite)
    if task not in TASKS:
        raise DataPrepError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    split_folds = split_folds or DEFAULT_SPLIT_FOLDS
    if download_first:
        download(src, sampling_rate)
    # 100 Hz and 500 Hz exist in the release; any other rate is resampled from 500 Hz.
    source_fs = 100 if sampling_rate == 100 else 500
    column = "filename_lr" if source_fs == 100 else "filename_hr"
    db, statements = load_tables(src, column)
    src = pathlib.Path(src).absolute()
    unlisted = records_without_row(src, db[column].dropna().tolist(), f"records{source_fs}")
    if unlisted:
        print(f"warning: {len(unlisted)} record(s) under {src} have no row in ptbxl_database.csv "
              f"(e.g. {', '.join(unlisted[:3])}): is the table truncated or edited?", file=sys.stderr)
    band = parse_band_pass(band_pass, sampling_rate, source_fs)

    rejected: list[tuple[str, str]] = []
    rows, codes = [], []
    known = set(statements.index)
    for row in db.itertuples(index=False):
        rid = str(row.ecg_id)
        try:
            c = parse_scp_codes(row.scp_codes)
        except (ValueError, SyntaxError) as e:
            rejected.append((rid, f"{rid}: unparseable scp_codes in ptbxl_database.csv: {e}"))
            continue
        unknown = sorted(set(c) - known)
        if unknown:
            rejected.append((rid, f"{rid}: unknown SCP statement(s) {unknown} (not in scp_statements.csv)"))
            continue
        if not (row.strat_fold == row.strat_fold and row.patient_id == row.patient_id):  # NaN check
            rejected.append((rid, f"{rid}: missing strat_fold or patient_id in ptbxl_database.csv"))
            continue
        if not _is_whole_number(row.strat_fold):
            rejected.append((rid, f"{rid}: strat_fold {row.strat_fold!r} in ptbxl_database.csv is not an integer"))
            continue
        fname = getattr(row, column)
        if not isinstance(fname, str) or not fname:
            rejected.append((rid, f"{rid}: empty {column} in ptbxl_database.csv"))
            continue
        rows.append(row)
        codes.append(c)
    label_sets, names = compute_labels(codes, statements, task, min_samples)
    keep = [i for i, s in enumerate(label_sets) if s]
    dropped = len(rows) - len(keep)
    rows = [rows[i] for i in keep]
    label_sets = [label_sets[i] for i in keep]
    folds = np.array([int(r.strat_fold) for r in rows], dtype=np.int16)
    check_patient_disjoint([str(r.ecg_id) for r in rows], [r.patient_id for r in rows], folds, split_folds,
                           where=str(src / "ptbxl_database.csv"))
    sources = [Source(str(r.ecg_id), str(src / getattr(r, column)), read_wfdb_source) for r in rows]
    cfg = SignalConfig(target_fs=sampling_rate, expected_fs=source_fs, fixed_seconds=RECORD_SECONDS,
                       band_pass=band)
    return build_shards(
        out_dir=out, sources=sources, labels=multi_hot(label_sets, names), label_names=names,
        signal_config=cfg, dataset="ptbxl", source_desc=str(src), task=task, split_folds=split_folds,
        folds=folds, dtype=dtype, max_rejected_fraction=max_rejected_fraction, pre_rejected=rejected,
        dropped_no_label=dropped, overwrite=overwrite, num_workers=num_workers, progress=progress,
        extra={"label_source": {"min_samples": min_samples, "statements": "scp_statements.csv"},
               "records_without_row": len(unlisted)},
    )


def _is_whole_number(value) -> bool:
    """A fold as pandas reads it (int, a float like 3.0, or text when a cell is not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number.is_integer()


def check_patient_disjoint(record_ids: Sequence[str], patient_ids: Sequence, folds: np.ndarray,
                           split_folds: dict[str, Sequence[int]], where: str) -> None:
    """PTB-XL's folds keep each patient in one fold; fail loudly if the splits break that."""
    fold_split = {f: s for s, fs in split_folds.items() for f in fs}
    seen: dict = {}
    for rid, pid, fold in zip(record_ids, patient_ids, folds):
        split = fold_split.get(int(fold))
        if split is None:
            continue
        if pid in seen and seen[pid][0] != split:
            other_split, other_id = seen[pid]
            pid_text = f"{pid:g}" if isinstance(pid, float) else str(pid)
            raise DataPrepError(
                f"{where}: patient_id {pid_text} occurs in split {other_split} (ecg_id {other_id}) and in "
                f"split {split} (ecg_id {rid}); splits must be patient-disjoint")
        seen.setdefault(pid, (split, rid))


def define_flags(fv) -> None:
    from absl import flags

    from data_prep import cli

    cli.define_common_flags(fv)
    flags.DEFINE_enum("task", "superdiagnostic", list(TASKS), "PTB-XL benchmark task (label aggregation).",
                      flag_values=fv)
    flags.DEFINE_integer("min_samples", 0, "Keep labels occurring in more than this many records "
                         "(benchmark: 0).", flag_values=fv)
    flags.DEFINE_bool("download", False, f"Fetch the release from PhysioNet ({PHYSIONET_URL}) into --src "
                      "first.", flag_values=fv)


def run(fv) -> dict:
    from data_prep import cli

    return cli.prepare_and_summarize(fv, prepare, task=fv["task"].value, min_samples=fv["min_samples"].value,
                                     download_first=fv["download"].value)


def main(argv: list[str] | None = None):
    """CLI entry point; `argv` (with the program name first) runs it in-process."""
    from data_prep import cli

    return cli.main("data_prep.ptbxl", define_flags, run, argv)


if __name__ == "__main__":
    main()
