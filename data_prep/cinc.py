"""PhysioNet/CinC Challenge 2020/2021 WFDB records -> ragged shards, multi-hot over SNOMED CT codes.

Owns: finding `*.hea` under --src (any depth, as in the Challenge's per-source folders),
the `#Dx:` labels, and the optional `--mapping=CSV` onto the Challenge's scored classes
(`dx_mapping_scored.csv`: columns `SNOMEDCTCode` and, if present, `Abbreviation`; codes
sharing an abbreviation are merged, codes not in the file are ignored as unscored).
Without a mapping the label names are the codes themselves. Records come at various
rates (257, 500, 1000 Hz) and lengths: all are resampled to --sampling_rate and stored
uncropped. Folds: iterative stratification, seeded. Writing is data_prep.common's.

    python -m data_prep.cinc --src=DIR --out=DIR [--mapping=dx_mapping_scored.csv]
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from data_prep.common import (DataPrepError, SignalConfig, Source, build_shards, check_output_dir,
                              multi_hot, parse_band_pass, read_wfdb_source)
from data_prep.wfdb_io import RecordError, dx_codes


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


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, mapping: str | os.PathLike | None = None,
            sampling_rate: int = 100, split_folds: dict[str, Sequence[int]] | None = None,
            num_folds: int = 10, seed: int = 0, band_pass: Sequence[float] | None = None,
            dtype: str = "float32", max_rejected_fraction: float = 0.05, overwrite: bool = False,
            num_workers: int | None = None, progress: bool = False) -> dict:
    """Prepare a folder of CinC-format records into ragged shards at `out`; returns the manifest."""
    check_output_dir(out, overwrite)
    src = pathlib.Path(src).absolute()
    if not src.is_dir():
        raise DataPrepError(f"--src {src} is not a folder")
    code_map = read_mapping(mapping) if mapping else None
    headers = sorted(src.rglob("*.hea"))
    if not headers:
        raise DataPrepError(f"no WFDB headers (*.hea) under {src}")
    rejected, sources, label_sets = [], [], []
    seen: dict[str, pathlib.Path] = {}
    dropped = 0
    for hea in headers:
        rid = hea.stem
        if rid in seen:
            rejected.append((rid, f"{rid}: duplicate record name: {seen[rid]} and {hea}"))
            continue
        seen[rid] = hea
        try:
            codes = dx_codes(hea)
        except RecordError as e:
            rejected.append((rid, str(e)))
            continue
        labels = {code_map[c] for c in codes if c in code_map} if code_map is not None else set(codes)
        if not labels:
            dropped += 1
            continue
        sources.append(Source(rid, str(hea.with_suffix("")), read_wfdb_source))
        label_sets.append(labels)
    names = sorted({lab for s in label_sets for lab in s})
    # No expected rate: the Challenge mixes 257 / 500 / 1000 Hz sources; all are resampled.
    cfg = SignalConfig(target_fs=sampling_rate, expected_fs=None, fixed_seconds=None,
                       band_pass=parse_band_pass(band_pass, sampling_rate, None))
    split_folds = split_folds or {"train": list(range(1, 9)), "val": [9], "test": [10]}
    return build_shards(
        out_dir=out, sources=sources, labels=multi_hot(label_sets, names), label_names=names,
        signal_config=cfg, dataset="cinc", source_desc=str(src),
        task="snomed" if code_map is None else f"mapping:{pathlib.Path(mapping).name}",
        split_folds=split_folds, folds=None, num_folds=num_folds, seed=seed, dtype=dtype,
        max_rejected_fraction=max_rejected_fraction, pre_rejected=rejected, dropped_no_label=dropped,
        overwrite=overwrite, num_workers=num_workers, progress=progress,
        extra={"mapping": None if mapping is None else str(pathlib.Path(mapping).absolute())},
    )


def define_flags(fv) -> None:
    from absl import flags

    from data_prep import cli

    cli.define_common_flags(fv)
    cli.define_fold_flags(fv)
    flags.DEFINE_string("mapping", None, "Optional CSV (Challenge dx_mapping_scored.csv layout) mapping SNOMED "
                        "codes to the scored classes; without it every code is a label.", flag_values=fv)


def run(fv) -> dict:
    from data_prep import cli
    from data_prep.common import summarize

    kwargs = cli.common_kwargs(fv)
    manifest = prepare(mapping=fv["mapping"].value, num_folds=fv["num_folds"].value, seed=fv["seed"].value,
                       **kwargs)
    print(summarize(manifest, kwargs["out"]))
    return manifest


def main(argv: list[str] | None = None):
    """CLI entry point; `argv` (with the program name first) runs it in-process."""
    from data_prep import cli

    return cli.main("data_prep.cinc", define_flags, run, argv)


if __name__ == "__main__":
    main()
