"""PhysioNet/CinC Challenge 2020/2021 WFDB records -> ragged shards, multi-hot over SNOMED CT codes.

Owns: finding `*.hea` under --src (any depth, as in the Challenge's per-source folders),
the `#Dx:` labels, and the optional `--mapping=CSV` onto the Challenge's scored classes
(`dx_mapping_scored.csv`: columns `SNOMEDCTCode` and, if present, `Abbreviation`; codes
sharing an abbreviation are merged, codes not in the file are ignored as unscored).
Without a mapping the label names are the codes themselves; a code in neither of the
Challenge's tables (data_prep/mappings) rejects its record unless --allow_unknown_codes.
Records must be at --expected_fs (500 Hz; 0 accepts the Challenge's mixed 257 / 500 /
1000 Hz sources) and are resampled to --sampling_rate and stored uncropped. Records whose
codes are all outside --mapping are listed in rejected.csv (not counted as failures). Folds: iterative stratification, seeded. Writing is data_prep.common's.

    python -m data_prep.cinc --src=DIR --out=DIR [--mapping=dx_mapping_scored.csv]
"""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Sequence

from data_prep.common import (DataPrepError, SignalConfig, Source, build_shards, source_folder,
                              multi_hot, parse_band_pass, read_wfdb_source)
from data_prep.wfdb_io import scan_cinc_folder

MAPPINGS_DIR = pathlib.Path(__file__).resolve().parent / "mappings"
CHALLENGE_TABLES = (MAPPINGS_DIR / "cinc2021_dx_mapping_scored.csv",
                    MAPPINGS_DIR / "cinc2021_dx_mapping_unscored.csv")
# The Challenge's sources are 500 Hz except St Petersburg (257 Hz) and PTB (1000 Hz).
DEFAULT_EXPECTED_FS = 500.0


def read_mapping(path: str | os.PathLike) -> dict[str, str]:
    """SNOMED code -> label name from a Challenge-style mapping CSV."""
    import pandas as pd

    path = pathlib.Path(path)
    if not path.is_file():
        raise DataPrepError(f"missing mapping file {path}")
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception as e:
        raise DataPrepError(f"cannot parse {path}: {e}") from None
    if "SNOMEDCTCode" not in df.columns:
        raise DataPrepError(f"{path}: missing required column 'SNOMEDCTCode' "
                            "(expected the Challenge's dx_mapping_scored.csv layout)")
    names = df["Abbreviation"] if "Abbreviation" in df.columns else df["SNOMEDCTCode"]
    mapping = {}
    for code, name in zip(df["SNOMEDCTCode"], names):
        code = str(code).strip()
        if not code.isdigit():
            raise DataPrepError(f"{path}: invalid SNOMED code {code!r}")
        mapping[code] = str(name).strip() if isinstance(name, str) and name.strip() else code
    return mapping


def known_codes() -> set[str]:
    """Every SNOMED CT code of the Challenge's scored and unscored tables (data_prep/mappings)."""
    codes = set()
    for table in CHALLENGE_TABLES:
        with open(table, newline="") as f:
            codes.update(row["SNOMEDCTCode"].strip() for row in csv.DictReader(f))
    return codes


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, mapping: str | os.PathLike | None = None,
            sampling_rate: int = 100, split_folds: dict[str, Sequence[int]] | None = None,
            num_folds: int = 10, seed: int = 0, band_pass: Sequence[float] | None = None,
            dtype: str = "float32", max_rejected_fraction: float = 0.05, overwrite: bool = False,
            expected_fs: float | None = DEFAULT_EXPECTED_FS, allow_unknown_codes: bool = False,
            num_workers: int | None = None, progress: bool = False) -> dict:
    """Prepare a folder of CinC-format records into ragged shards at `out`; returns the manifest.

    ``expected_fs``: records at another rate are rejected (None: accept any rate and
    resample, for folders mixing the Challenge's 257 / 500 / 1000 Hz sources).
    ``allow_unknown_codes``: keep codes found in neither Challenge table as labels
    instead of rejecting their records.
    """
    src = source_folder(src, out, overwrite)
    code_map = read_mapping(mapping) if mapping else None
    scanned, rejected, stray = scan_cinc_folder(src)
    if not scanned and not rejected:
        raise DataPrepError(f"no WFDB headers (*.hea) under {src}")
    known = known_codes()
    sources, label_sets, unlabelled = [], [], []
    for record in scanned:
        rid, codes = record.record_id, record.codes
        unknown = [c for c in codes if c not in known]
        if unknown and not allow_unknown_codes:
            rejected.append((rid, f"{rid}: unknown SNOMED code(s) {unknown} in {record.header_path.name}: in neither "
                                  "Challenge table (data_prep/mappings); --allow_unknown_codes keeps them as labels"))
            continue
        if code_map is not None:
            labels = {code_map[c] for c in codes if c in code_map}
            if not labels:
                unlabelled.append((rid, f"{rid}: none of its codes {codes} is in {pathlib.Path(mapping).name}"))
                continue
        else:
            labels = set(codes)
        sources.append(Source(rid, str(record.header_path.with_suffix("")), read_wfdb_source))
        label_sets.append(labels)
    names = sorted({lab for s in label_sets for lab in s})
    cfg = SignalConfig(target_fs=sampling_rate, expected_fs=expected_fs, fixed_seconds=None,
                       band_pass=parse_band_pass(band_pass, sampling_rate, expected_fs))
    split_folds = split_folds or {"train": list(range(1, 9)), "val": [9], "test": [10]}
    return build_shards(
        out_dir=out, sources=sources, labels=multi_hot(label_sets, names), label_names=names,
        signal_config=cfg, dataset="cinc", source_desc=str(src),
        task="snomed" if code_map is None else f"mapping:{pathlib.Path(mapping).name}",
        split_folds=split_folds, folds=None, num_folds=num_folds, seed=seed, dtype=dtype,
        max_rejected_fraction=max_rejected_fraction, pre_rejected=rejected,
        uncounted_rejected=unlabelled + stray, dropped_no_label=len(unlabelled),
        overwrite=overwrite, num_workers=num_workers, progress=progress,
        extra={"mapping": None if mapping is None else str(pathlib.Path(mapping).absolute()),
               "expected_fs": expected_fs, "allow_unknown_codes": allow_unknown_codes,
               "leads_reordered": sum(r.leads_reordered for r in scanned)},
    )


def define_flags(fv) -> None:
    from absl import flags

    from data_prep import cli

    cli.define_common_flags(fv)
    cli.define_fold_flags(fv)
    flags.DEFINE_string("mapping", None, "Optional CSV (Challenge dx_mapping_scored.csv layout) mapping SNOMED "
                        "codes to the scored classes; without it every code is a label.", flag_values=fv)
    flags.DEFINE_float("expected_fs", DEFAULT_EXPECTED_FS, "Sampling rate the records must have (Hz); records "
                       "at another rate are rejected. 0: accept any rate and resample (mixed-source folders).",
                       flag_values=fv)
    flags.DEFINE_bool("allow_unknown_codes", False, "Keep SNOMED codes found in neither Challenge table "
                      "(data_prep/mappings) as labels instead of rejecting their records.", flag_values=fv)


def run(fv) -> dict:
    from data_prep import cli

    return cli.prepare_and_summarize(fv, prepare, mapping=fv["mapping"].value, num_folds=fv["num_folds"].value,
                                     seed=fv["seed"].value, expected_fs=fv["expected_fs"].value or None,
                                     allow_unknown_codes=fv["allow_unknown_codes"].value)


def main(argv: list[str] | None = None):
    """CLI entry point; `argv` (with the program name first) runs it in-process."""
    from data_prep import cli

    return cli.main("data_prep.cinc", define_flags, run, argv)


if __name__ == "__main__":
    main()
