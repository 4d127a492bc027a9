"""Reading WFDB records (header text + signal file) into physical units, fast.

Owns: parsing `.hea` headers ourselves, the fast reader for format 16 (PTB-XL `.dat`,
PhysioNet/CinC `.mat` with a 24-byte MATLAB v4 prefix, which is format `16+24`),
the fallback to `wfdb.rdrecord` for every other format, and the mapping of lead
names onto the standard 12-lead order.

Every problem with a single record raises `RecordError(reason)`; callers turn it into
a line of `rejected.csv` instead of aborting the whole run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from mvkt import errors

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_CANONICAL = {name.lower(): name for name in LEADS}

# WFDB marks a missing sample of a 16-bit signal with the most negative value.
_INVALID_16 = -32768


RecordError = errors.RecordError  # one class for data_prep and predict


@dataclasses.dataclass
class SignalSpec:
    file_name: str
    fmt: str
    byte_offset: int
    gain: float
    baseline: int
    units: str
    adc_zero: int
    init_value: int | None
    checksum: int | None
    description: str


@dataclasses.dataclass
class Header:
    record_name: str
    n_sig: int
    fs: float
    n_samples: int | None
    signals: list[SignalSpec]
    comments: list[str]

    def comment_value(self, key: str) -> str | None:
        """Value of a `#Key: value` comment line (CinC `#Dx:`), or None."""
        prefix = key.lower() + ":"
        for line in self.comments:
            if line.lower().startswith(prefix):
                return line[len(prefix):].strip()
        return None


def _int_or_none(tokens: list[str], i: int) -> int | None:
    return int(tokens[i]) if len(tokens) > i else None


def parse_header(path: str | os.PathLike) -> Header:
    """Parse a WFDB `.hea` file (single-segment records only)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="latin-1") as f:
            text = f.read()
    except FileNotFoundError:
        raise RecordError(f"missing header {os.path.basename(path)}") from None
    lines, comments = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line.lstrip("#").strip())
        else:
            lines.append(line)
    if not lines:
        raise RecordError(f"empty header {os.path.basename(path)}")
    try:
        rec = lines[0].split()
        if "/" in rec[0]:
            raise RecordError(f"multi-segment record in {os.path.basename(path)} is not supported")
        n_sig = int(rec[1])
        # fs may carry a counter frequency: "500/1000(0)".
        fs = float(rec[2].split("/")[0]) if len(rec) > 2 else 250.0
        n_samples = int(rec[3]) if len(rec) > 3 else None
        signals = []
        for line in lines[1:1 + n_sig]:
            tok = line.split()
            fmt_field = tok[1]
            byte_offset = 0
            if "+" in fmt_field:
                fmt_field, off = fmt_field.split("+", 1)
                byte_offset = int(off)
            gain, baseline, units = 200.0, None, "mV"
            if len(tok) > 2:
                g = tok[2]
                if "/" in g:
                    g, units = g.split("/", 1)
                if "(" in g:
                    g, b = g.split("(", 1)
                    baseline = int(b.rstrip(")"))
                gain = float(g) or 200.0  # WFDB: gain 0 means "default", 200/unit
            adc_zero = _int_or_none(tok, 4) or 0
            signals.append(SignalSpec(
                file_name=tok[0], fmt=fmt_field, byte_offset=byte_offset, gain=gain,
                baseline=adc_zero if baseline is None else baseline, units=units,
                adc_zero=adc_zero, init_value=_int_or_none(tok, 5),
                checksum=_int_or_none(tok, 6),
                description=" ".join(tok[8:]) if len(tok) > 8 else "",
            ))
    except (IndexError, ValueError) as e:
        raise RecordError(f"malformed header {os.path.basename(path)}: {e}") from None
    if len(signals) != n_sig:
        raise RecordError(
            f"header {os.path.basename(path)} declares {n_sig} signals but has {len(signals)} signal lines")
    return Header(rec[0], n_sig, fs, n_samples, signals, comments)


def lead_order(names: list[str], where: str) -> list[int]:
    """Column indices that put `names` into the standard 12-lead order."""
    canon = [_CANONICAL.get(n.strip().lower()) for n in names]
    if len(names) != len(LEADS):
        raise RecordError(f"{where}: wrong lead count {len(names)} (expected 12: {', '.join(LEADS)})")
    if None in canon or len(set(canon)) != len(LEADS):
        raise RecordError(f"{where}: lead names {names} are not the 12 standard leads")
    return [canon.index(lead) for lead in LEADS]


def _fast_path_ok(h: Header) -> bool:
    first = h.signals[0]
    return (h.n_samples is not None
            and all(s.fmt == "16" and s.file_name == first.file_name
                    and s.byte_offset == first.byte_offset for s in h.signals))


def read_record(base: str | os.PathLike, header: Header | None = None) -> tuple[np.ndarray, float]:
    """Read a WFDB record as float32 physical units, shape (T, 12) in `LEADS` order.

    `base` is the record path without extension. Returns (signal, fs).
    """
    base = os.fspath(base)
    name = os.path.basename(base)
    h = header if header is not None else parse_header(base + ".hea")
    if h.n_sig == 0:
        raise RecordError(f"{name}: header declares no signals")
    order = lead_order([s.description for s in h.signals], name)
    if h.n_samples == 0:
        raise RecordError(f"{name}: zero-length record (header says 0 samples)")
    if _fast_path_ok(h):
        sig = _read_format16(base, h)
    else:
        sig = _read_with_wfdb(base, h)
    return sig[:, order], h.fs


def _read_format16(base: str, h: Header) -> np.ndarray:
    s0 = h.signals[0]
    path = os.path.join(os.path.dirname(base), s0.file_name)
    name = os.path.basename(base)
    try:
        size = os.path.getsize(path) - s0.byte_offset
    except FileNotFoundError:
        raise RecordError(f"{name}: missing signal file {s0.file_name}") from None
    need = h.n_samples * h.n_sig * 2
    if size < need:
        raise RecordError(f"{name}: truncated {s0.file_name}: {max(size, 0)} bytes of samples, "
                          f"header needs {need} ({h.n_samples} samples x {h.n_sig} signals)")
    if size > need:
        raise RecordError(f"{name}: header/signal mismatch: {s0.file_name} holds {size} bytes of samples, "
                          f"header says {need} ({h.n_samples} samples x {h.n_sig} signals)")
    digital = np.fromfile(path, dtype="<i2", count=h.n_samples * h.n_sig,
                          offset=s0.byte_offset).reshape(h.n_samples, h.n_sig)
    # The header checksum (16-bit sum of each signal) catches corrupted bytes that a size
    # check cannot; PTB-XL and the CinC files all carry it.
    sums = digital.sum(axis=0, dtype=np.int64)
    for i, s in enumerate(h.signals):
        if s.checksum is not None and (int(sums[i]) - s.checksum) % 65536 != 0:
            raise RecordError(f"{name}: checksum mismatch in lead {s.description} of {s0.file_name} "
                              "(corrupted samples)")
    invalid = digital == _INVALID_16
    if invalid.any():
        lead = h.signals[int(np.nonzero(invalid.any(axis=0))[0][0])].description
        raise RecordError(f"{name}: missing samples (NaN, digital -32768) in lead {lead}")
    gain = np.array([s.gain for s in h.signals], dtype=np.float32)
    baseline = np.array([s.baseline for s in h.signals], dtype=np.float32)
    return (digital.astype(np.float32) - baseline) / gain


def _read_with_wfdb(base: str, h: Header) -> np.ndarray:
    import wfdb  # imported lazily: only records in uncommon formats need it

    name = os.path.basename(base)
    try:
        rec = wfdb.rdrecord(base, physical=True)
    except FileNotFoundError as e:
        raise RecordError(f"{name}: missing signal file ({e.filename or e})") from None
    except Exception as e:  # wfdb raises bare ValueError/IndexError on damaged files
        raise RecordError(f"{name}: unreadable by wfdb.rdrecord: {type(e).__name__}: {e}") from None
    sig = rec.p_signal
    if sig is None or sig.ndim != 2 or sig.shape[1] != h.n_sig:
        raise RecordError(f"{name}: header/signal mismatch (wfdb returned {None if sig is None else sig.shape})")
    if h.n_samples is not None and sig.shape[0] != h.n_samples:
        raise RecordError(f"{name}: header/signal mismatch: {sig.shape[0]} samples read, header says {h.n_samples}")
    if sig.shape[0] == 0:
        raise RecordError(f"{name}: zero-length record")
    return sig.astype(np.float32)


def dx_codes(hea: pathlib.Path, header: Header | None = None) -> list[str]:
    """SNOMED CT codes of the `#Dx:` comment of a CinC header (RecordError if absent/invalid)."""
    h = header or parse_header(hea)
    dx = h.comment_value("Dx")
    if dx is None:
        raise RecordError(f"{hea.stem}: no #Dx line in {hea.name}")
    codes = [c.strip() for c in dx.split(",") if c.strip()]
    bad = [c for c in codes if not c.isdigit()]
    if bad or not codes:
        raise RecordError(f"{hea.stem}: invalid SNOMED code(s) {bad or [dx]} on the #Dx line of {hea.name}")
    return codes


@dataclasses.dataclass(frozen=True)
class ScannedRecord:
    """One CinC-format record found by ``scan_cinc_folder``."""

    record_id: str
    header_path: pathlib.Path
    codes: list[str]  # SNOMED CT codes of the #Dx line
    leads_reordered: bool  # header lists the 12 leads in another order (reading reorders by name)


def scan_cinc_folder(src: pathlib.Path, pattern: str = "*") -> tuple[list[ScannedRecord], list[tuple[str, str]],
                                                                      list[tuple[str, str]]]:
    """Every ``<pattern>.hea`` under ``src`` (any depth) with its #Dx codes and lead order.

    Returns (records, rejected (record, reason), stray (file, reason)): rejected are duplicate
    record names, unreadable headers, missing or invalid #Dx lines and non-standard lead names;
    stray are signal files (``.mat``) with no header beside them. Without a header a file is
    not a record (a stray ``junk.mat`` counted as a rejected record blocked an 11-record
    folder under the 5% limit), so importers list them without counting them.
    """
    records, rejected, stray = [], [], []
    seen: dict[str, pathlib.Path] = {}
    for hea in sorted(src.rglob(f"{pattern}.hea")):
        rid = hea.stem
        if rid in seen:
            rejected.append((rid, f"{rid}: duplicate record name: {seen[rid]} and {hea}"))
            continue
        seen[rid] = hea
        try:
            header = parse_header(hea)
            codes = dx_codes(hea, header)
            order = lead_order([sig.description for sig in header.signals], rid)
        except RecordError as e:
            rejected.append((rid, str(e)))
            continue
        records.append(ScannedRecord(rid, hea, codes, order != list(range(len(LEADS)))))
    for mat in sorted(src.rglob(f"{pattern}.mat")):
        if not mat.with_suffix(".hea").exists():
            stray.append((mat.stem, f"{mat.stem}: {mat} has no header {mat.stem}.hea beside it (not a record; "
                                    "listed, not counted)"))
    return records, rejected, stray
