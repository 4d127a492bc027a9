"""The dataset-independent half of data preparation: records in, validated shards out.

Owns: `DataPrepError` (run-level failures), signal loading with per-record validation,
band-pass and resampling, the parallel read loop, train-only standardisation, the
temporary-folder-then-rename writer, `rejected.csv`, `manifest.json` and its sha256s.
The shard format itself is fixed by docs/DESIGN.md; `mvkt.data` reads it.

Dataset modules (`ptbxl`, `cpsc2018`, `cinc`) only turn their sources into a list of
`Source`s plus a multi-hot label matrix and call `build_shards`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import errno
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import socket
import sys
import threading
from fractions import Fraction
from typing import Callable, Iterable, Sequence

import numpy as np

from data_prep.wfdb_io import LEADS, RecordError, read_record
from mvkt import process
from mvkt import quality

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DTYPES = ("float32", "float16")
BAND_PASS_ORDER = 2
# Below this many records a worker pool costs more than it saves (and the in-project
# samples, used by the tests, stay in-process).
_MIN_RECORDS_FOR_POOL = 200


class DataPrepError(Exception):
    """Failure of the whole run (missing file/column, too many rejections, ...).

    The CLIs print its message and exit 1; the output folder is left untouched.
    """


@dataclasses.dataclass(frozen=True)
class Source:
    """One candidate record. `reader(path) -> (signal (T, 12) float32 in LEADS order, fs)`."""

    record_id: str
    path: str
    reader: Callable[[str], tuple[np.ndarray, float]]


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    target_fs: int
    expected_fs: float | None = None  # reject records recorded at another rate
    fixed_seconds: float | None = None  # fixed-length dataset (PTB-XL: 10 s); None = ragged
    band_pass: tuple[float, float] | None = None


# A record is flat when the peak-to-peak range of every lead is below this (mV, the unit of the
# shards); the same bound as predict's quality gate. A record with only some flat leads is
# kept (a lead off for a while is a real-world condition).
FLAT_SPAN_MV = quality.FLAT_SPAN_MV


def read_wfdb_source(path: str) -> tuple[np.ndarray, float]:
    return read_record(path)


# ---------------------------------------------------------------------------------------
# Per-record processing (runs in worker processes)


def band_pass_filter(sig: np.ndarray, fs: float, band: tuple[float, float]) -> np.ndarray:
    from scipy import signal as sps

    lo, hi = band
    sos = sps.butter(BAND_PASS_ORDER, [lo, hi], btype="bandpass", fs=fs, output="sos")
    return sps.sosfiltfilt(sos, sig, axis=0).astype(np.float32)


def resample(sig: np.ndarray, fs: float, target_fs: int) -> np.ndarray:
    from scipy import signal as sps

    ratio = Fraction(target_fs) / Fraction(str(fs)).limit_denominator(1000)
    return sps.resample_poly(sig, ratio.numerator, ratio.denominator, axis=0).astype(np.float32)


def load_signal(source: Source, cfg: SignalConfig) -> tuple[np.ndarray, float]:
    """Read, validate, filter and resample one record -> (float32 (T, 12) at target_fs, source fs)."""
    sig, fs = source.reader(source.path)
    rid = source.record_id
    if not fs or fs <= 0:
        raise RecordError(f"{rid}: invalid sampling rate {fs}")
    if cfg.expected_fs is not None and abs(fs - cfg.expected_fs) > 1e-6:
        raise RecordError(f"{rid}: wrong sampling rate {fs:g} Hz (expected {cfg.expected_fs:g} Hz)")
    if sig.ndim != 2 or sig.shape[1] != len(LEADS):
        raise RecordError(f"{rid}: signal has shape {sig.shape}, expected (T, 12)")
    if sig.shape[0] == 0:
        raise RecordError(f"{rid}: zero-length record")
    if cfg.fixed_seconds is not None:
        want = round(cfg.fixed_seconds * fs)
        if sig.shape[0] != want:
            raise RecordError(f"{rid}: length {sig.shape[0]} samples, expected {want} "
                              f"({cfg.fixed_seconds:g} s at {fs:g} Hz)")
    finite = np.isfinite(sig)
    if not finite.all():
        lead = LEADS[int(np.nonzero(~finite.all(axis=0))[0][0])]
        raise RecordError(f"{rid}: NaN/inf samples in lead {lead}")
    span = sig.max(axis=0) - sig.min(axis=0)
    if (span < FLAT_SPAN_MV).all():  # contact loss or an all-zero export: nothing to learn or score
        what = "all samples are 0" if not sig.any() else f"every lead's peak-to-peak range is below {FLAT_SPAN_MV:g} mV"
        raise RecordError(f"{rid}: flat on all {sig.shape[1]} leads ({what})")
    if cfg.band_pass is not None:
        try:
            sig = band_pass_filter(sig, fs, cfg.band_pass)
        except ValueError as e:  # record shorter than the filter's padding
            raise RecordError(f"{rid}: band-pass failed: {e}") from None
    if abs(fs - cfg.target_fs) > 1e-6:
        sig = resample(sig, fs, cfg.target_fs)
    return np.ascontiguousarray(sig, dtype=np.float32), fs


def _load_one(item: tuple[int, Source], cfg: SignalConfig):
    i, source = item
    try:
        sig, fs = load_signal(source, cfg)
    except RecordError as e:
        return i, None, str(e), None
    except Exception as e:  # one damaged file must not abort a 20k-record run
        return i, None, f"{source.record_id}: unexpected {type(e).__name__}: {e}", None
    sig64 = sig.astype(np.float64)
    mean = sig64.mean(axis=0)
    m2 = ((sig64 - mean) ** 2).sum(axis=0)
    return i, sig, None, (sig.shape[0], mean, m2, fs)


def _pool_context():
    # fork is fastest, but forking a process that already runs threads (e.g. JAX in the
    # test session) can deadlock; fall back to forkserver then.
    if "jax" in sys.modules or threading.active_count() > 1:
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("fork")


def _load_chunk(job: tuple[int, list[tuple[int, Source]]], cfg: SignalConfig, scratch_dir: str):
    """Read a run of records and append the accepted ones to one scratch file of its own.

    Writing in the worker keeps the samples out of the inter-process pipe: only lengths,
    moments and reasons go back to the parent, which would otherwise be the bottleneck.
    """
    part, items = job
    path = os.path.join(scratch_dir, f"part-{part:06d}.f32")
    results = []
    with open(path, "wb") as f:
        for item in items:
            i, sig, reason, st = _load_one(item, cfg)
            if sig is None:
                results.append((i, 0, reason, None))
            else:
                f.write(sig.tobytes())
                results.append((i, sig.shape[0], None, st))
    return path, results


def iter_loaded(sources: Sequence[Source], cfg: SignalConfig, *, scratch_dir: str | os.PathLike,
                num_workers: int | None, progress: bool) -> Iterable[tuple[str, list]]:
    """Yield (scratch part file, [(index, length, reason, moments), ...]) in input order.

    Shows a tqdm bar with records/s. Accepted records of a part lie back to back in its file.
    """
    from tqdm import tqdm

    items = list(enumerate(sources))
    workers = num_workers or os.cpu_count() or 1
    serial = workers <= 1 or len(items) < _MIN_RECORDS_FOR_POOL
    chunk = 64 if serial else max(1, min(64, len(items) // (workers * 4)))
    jobs = [(k, items[lo:lo + chunk]) for k, lo in enumerate(range(0, len(items), chunk))]
    fn = functools.partial(_load_chunk, cfg=cfg, scratch_dir=os.fspath(scratch_dir))
    bar = tqdm(total=len(items), unit="rec", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    try:
        if serial:
            for job in jobs:
                yield fn(job)
                bar.update(len(job[1]))
        else:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context()) as ex:
                for job, result in zip(jobs, ex.map(fn, jobs)):
                    yield result
                    bar.update(len(job[1]))
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------
# Output folder handling


def source_folder(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> pathlib.Path:
    """The absolute ``--src`` folder, after checking it and the ``--out`` folder (nothing is read yet)."""
    check_output_dir(out, overwrite)
    folder = pathlib.Path(src).absolute()
    if not folder.is_dir():
        raise DataPrepError(f"--src {folder} is not a folder")
    return folder


def remove_stale_work_folders(out: pathlib.Path) -> list[pathlib.Path]:
    """Deletes ``.OUT.tmp-HOST-PID`` / ``.OUT.old-PID`` folders that a killed run of this
    host left beside ``out`` (they can hold the whole dataset); returns what was removed.
    Folders of live processes and of other hosts are left alone."""
    removed = []
    candidates = sorted(out.parent.glob(f".{out.name}.tmp-*"))
    if out.exists():  # else an .old-* folder is the last good output (killed while publishing): keep it
        candidates += sorted(out.parent.glob(f".{out.name}.old-*"))
    for path in candidates:
        tag = path.name.rsplit(".", 1)[1].split("-", 1)[1]  # "HOST-PID" or "PID"
        host, _, pid = tag.rpartition("-")
        if not pid.isdigit() or (host and host != socket.gethostname()) or process.alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}, left by an interrupted run (process {pid} no longer runs)", file=sys.stderr)
        removed.append(path)
    return removed


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> pathlib.Path:
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise DataPrepError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"output path {out} exists and is not a folder")
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_rejected(path: pathlib.Path, rows: Sequence[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["record", "reason"])
        w.writerows(rows)


def _combine_stats(stats: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Chan et al. parallel merge of per-record (n, mean, M2): exact, order-deterministic."""
    n_tot, mean, m2 = 0, np.zeros(len(LEADS)), np.zeros(len(LEADS))
    for n, mu, q in stats:
        delta = mu - mean
        new_n = n_tot + n
        mean = mean + delta * (n / new_n)
        m2 = m2 + q + delta ** 2 * (n_tot * n / new_n)
        n_tot = new_n
    return mean, np.sqrt(m2 / n_tot), n_tot


def _as_json_rate(rate: float) -> int | float:
    return int(rate) if float(rate).is_integer() else float(rate)


def _read_records(sources: Sequence[Source], signal_config: SignalConfig, scratch: pathlib.Path, *,
                  num_workers: int | None, progress: bool):
    """Every record read once into scratch part files (raw float32; train statistics later):
    (accepted source indices, their lengths, per-record statistics, source rates, rejected
    (id, reason), the part memmaps, where[j] = (part, first sample) of accepted record j)."""
    accepted, lengths, stats, rates, rejected, parts, where = [], [], [], [], [], [], []
    for path, results in iter_loaded(sources, signal_config, scratch_dir=scratch, num_workers=num_workers,
                                     progress=progress):
        pos = 0
        for i, n, reason, st in results:
            if reason is not None:
                rejected.append((sources[i].record_id, reason))
                continue
            accepted.append(i)
            lengths.append(n)
            stats.append(st[:3])
            rates.append(st[3])
            where.append((len(parts), pos))
            pos += n
        parts.append(_ScratchPart(path) if pos else None)
    return accepted, lengths, stats, rates, rejected, parts, where


class _ScratchPart:
    """One scratch part file, read record by record with plain reads: mapped pages would count
    as the process's resident memory and grow with the number of records prepared."""

    def __init__(self, path: str):
        self.path = path

    def read(self, first: int, count: int) -> np.ndarray:
        row = len(LEADS) * 4
        return np.fromfile(self.path, dtype=np.float32, count=count * len(LEADS),
                           offset=first * row).reshape(count, len(LEADS))


def _check_rejected_fraction(counted: list, listed: list, *, total: int, accepted: int, limit: float,
                             out: pathlib.Path, source_desc: str) -> None:
    """Refuses (writing the reasons beside ``out``) when more than ``limit`` of the records were
    rejected, and when none is left."""
    if total == 0:
        raise DataPrepError(f"no records found in {source_desc}")
    frac = len(counted) / total
    if frac > limit:
        keep = out.parent / f"{out.name}.rejected.csv"
        write_rejected(keep, listed)
        first = "; ".join(reason for _, reason in counted[:3])
        raise DataPrepError(
            f"{len(counted)} of {total} records ({frac:.1%}) rejected, more than "
            f"--max_rejected_fraction={limit:g}; nothing written to {out}. "
            f"Reasons are listed in {keep}; first: {first}")
    if not accepted:
        raise DataPrepError(f"no usable records in {source_desc}")


def _preprocessing(signal_config: SignalConfig, rates: Sequence[float], mean: np.ndarray, std: np.ndarray,
                   n_fit: int) -> dict:
    """The manifest's ``preprocessing``: source rates, resampling, band-pass, standardisation."""
    src_rates = sorted({_as_json_rate(r) for r in rates})
    resampled = [r for r in src_rates if abs(r - signal_config.target_fs) > 1e-6]
    return {
        "resampled_from": (None if not resampled else resampled[0] if len(src_rates) == 1 else src_rates),
        "source_sampling_rates": src_rates,
        "resampling": "scipy.signal.resample_poly" if resampled else None,
        "band_pass": list(signal_config.band_pass) if signal_config.band_pass else None,
        "band_pass_filter": (f"butterworth order {BAND_PASS_ORDER}, zero-phase (sosfiltfilt), "
                             "at the source rate" if signal_config.band_pass else None),
        "standardization": {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "fitted_on": "train",
            "num_samples": int(n_fit),
        },
    }


def _assign_splits(labels: np.ndarray, folds: np.ndarray | None, split_folds: dict[str, Sequence[int]], *,
                   num_folds: int, seed: int, record_ids: Sequence[str]):
    """(fold of each accepted record, how folds were made, split -> record positions, rejected
    (id, reason) of records whose fold is in no split). ``folds``: the official ones, or None
    for ``num_folds`` iteratively stratified folds (seeded)."""
    from data_prep.folds import iterative_stratification

    if folds is None:
        folds = iterative_stratification(labels, num_folds=num_folds, seed=seed)
        fold_desc = {"source": "iterative_stratification", "num_folds": num_folds, "seed": seed}
    else:
        fold_desc = {"source": "strat_fold"}
    members = {s: np.flatnonzero(np.isin(folds, list(split_folds[s]))) for s in SPLITS}
    in_no_split = np.flatnonzero(~np.isin(folds, [f for s in SPLITS for f in split_folds[s]]))
    folds_text = ", ".join(f"{s} {list(split_folds[s])}" for s in SPLITS)
    rejected = [(record_ids[j], f"{record_ids[j]}: fold {int(folds[j])} is in no split ({folds_text})")
                for j in in_no_split]
    return folds, fold_desc, members, rejected


def _write_split_arrays(tmp: pathlib.Path, split: str, *, labels: np.ndarray, folds: np.ndarray,
                        record_ids: list[str], label_names: Sequence[str], split_folds: Sequence[int]) -> dict:
    """A split's labels, record ids and folds files; returns its manifest entry."""
    np.save(tmp / f"{split}_labels.npy", labels.astype(np.uint8))
    np.save(tmp / f"{split}_record_ids.npy",
            np.asarray(record_ids, dtype=np.str_) if record_ids else np.zeros(0, "<U1"))
    np.save(tmp / f"{split}_folds.npy", folds.astype(np.int16))
    counts = labels.sum(axis=0) if len(labels) else np.zeros(len(label_names), np.int64)
    return {"num_records": int(len(labels)),
            "label_counts": {name: int(c) for name, c in zip(label_names, counts)},
            "folds": [int(f) for f in split_folds]}


def _check_arguments(*, dtype: str, labels: np.ndarray, num_sources: int, label_names: Sequence[str],
                     split_folds: dict[str, Sequence[int]]) -> np.ndarray:
    """The labels as uint8, after checking the arguments of ``build_shards`` that a caller gives."""
    if dtype not in DTYPES:
        raise DataPrepError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.shape != (num_sources, len(label_names)):
        raise ValueError(f"labels shape {labels.shape} != ({num_sources}, {len(label_names)})")
    _check_split_folds(split_folds)
    return labels


def _work_folder(out: pathlib.Path) -> pathlib.Path:
    """A fresh ``.OUT.tmp-HOST-PID`` beside ``out`` (stale ones of dead runs removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_folders(out)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _train_statistics(stats: list, source_desc: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, std, samples) per lead over the train records; a constant lead cannot be standardised."""
    mean, std, n_fit = _combine_stats(stats)
    if (std < 1e-8).any():
        lead = LEADS[int(np.argmin(std))]
        raise DataPrepError(f"lead {lead} is constant over the train split of {source_desc}; "
                            "cannot standardise")
    return mean, std, n_fit


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Moves the finished folder into place: the output folder only ever appears complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


# A write that fails for one of these is the output's fault (full or read-only disk, quota,
# file size limit): one line naming --out, not a traceback from a worker process.
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def build_shards(**kwargs) -> dict:
    """``_build_shards`` (below), with a disk that cannot take the shards as a DataPrepError."""
    try:
        return _build_shards(**kwargs)
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise DataPrepError(f"{kwargs['out_dir']}: cannot write the shards: {e.strerror.lower()}{where}; free space "
                            "or choose another --out (nothing was written to it)") from None


def _build_shards(*, out_dir: str | os.PathLike, sources: Sequence[Source], labels: np.ndarray,
                 label_names: Sequence[str], signal_config: SignalConfig, dataset: str, source_desc: str,
                 task: str, split_folds: dict[str, Sequence[int]], folds: np.ndarray | None = None,
                 num_folds: int = 10, seed: int = 0, dtype: str = "float32",
                 max_rejected_fraction: float = 0.05, pre_rejected: Sequence[tuple[str, str]] = (),
                 uncounted_rejected: Sequence[tuple[str, str]] = (), dropped_no_label: int = 0,
                 overwrite: bool = False, num_workers: int | None = None, progress: bool = False,
                 extra: dict | None = None) -> dict:
    """Read `sources`, validate, standardise with train statistics and write the shards.

    labels: (N, C) multi-hot aligned with `sources`. folds: (N,) official folds, or None
    to assign `num_folds` iteratively stratified folds (seeded) to the accepted records.
    pre_rejected: problems found before reading (count towards --max_rejected_fraction);
    uncounted_rejected: listed in rejected.csv but not counted (e.g. REFERENCE rows of
    records absent from a partial copy). Returns the manifest.
    """
    labels = _check_arguments(dtype=dtype, labels=labels, num_sources=len(sources), label_names=label_names,
                              split_folds=split_folds)
    out = check_output_dir(out_dir, overwrite)
    ragged = signal_config.fixed_seconds is None

    tmp = _work_folder(out)
    try:
        # 1. Read every record once into scratch part files (raw float32, train stats later).
        scratch = tmp / "_scratch"
        scratch.mkdir()
        accepted, lengths, stats, rates, rejected_read, parts, where = _read_records(
            sources, signal_config, scratch, num_workers=num_workers, progress=progress)
        rejected_counted = list(pre_rejected) + rejected_read
        all_rejected = rejected_counted + list(uncounted_rejected)
        _check_rejected_fraction(rejected_counted, all_rejected, total=len(sources) + len(pre_rejected),
                                 accepted=len(accepted), limit=max_rejected_fraction, out=out,
                                 source_desc=source_desc)

        # 2. Folds and splits of the accepted records.
        accepted = np.asarray(accepted, dtype=np.int64)
        acc_labels = labels[accepted]
        acc_folds, fold_desc, members, no_split = _assign_splits(
            acc_labels, None if folds is None else np.asarray(folds, dtype=np.int16)[accepted],
            split_folds, num_folds=num_folds, seed=seed, record_ids=[sources[i].record_id for i in accepted])
        all_rejected += no_split
        unassigned = len(no_split)
        if len(members["train"]) == 0:
            raise DataPrepError(f"train split (folds {list(split_folds['train'])}) is empty after "
                                f"rejections in {source_desc}; cannot fit the standardisation")

        # 3. Standardisation statistics from the train split only.
        mean, std, n_fit = _train_statistics([stats[j] for j in members["train"]], source_desc)

        # 4. Standardised per-split files.
        def record_raw(j: int) -> np.ndarray:
            p, pos = where[j]
            return parts[p].read(pos, lengths[j])

        mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
        split_info = {}
        for s in SPLITS:
            idx = members[s]
            _write_split(tmp, s, idx, record_raw, np.asarray(lengths, np.int64), mean32, std32, dtype, ragged,
                         fixed_len=None if ragged else _fixed_len(lengths))
            split_info[s] = _write_split_arrays(tmp, s, labels=acc_labels[idx], folds=acc_folds[idx],
                                                record_ids=[sources[accepted[j]].record_id for j in idx],
                                                label_names=label_names, split_folds=split_folds[s])
        del parts, record_raw
        shutil.rmtree(scratch)
        write_rejected(tmp / "rejected.csv", all_rejected)

        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "source": source_desc,
            "task": task,
            "label_names": list(label_names),
            "leads": list(LEADS),
            "sampling_rate": int(signal_config.target_fs),
            "ragged": ragged,
            "dtype": dtype,
            "num_samples": None if ragged else _fixed_len(lengths),
            "preprocessing": _preprocessing(signal_config, rates, mean, std, n_fit),
            "folds": fold_desc,
            "splits": split_info,
            "rejected": {"count": len(all_rejected), "file": "rejected.csv",
                         "counted": len(rejected_counted), "not_counted": len(uncounted_rejected),
                         "max_rejected_fraction": max_rejected_fraction},
            "dropped_no_label": int(dropped_no_label),
            "unassigned_records": int(unassigned),
            **(extra or {}),
        }
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")

        _publish(tmp, out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fixed_len(lengths: Sequence[int]) -> int:
    if not lengths:
        return 0
    if len(set(lengths)) != 1:  # load_signal enforces fixed_seconds, so this is a bug
        raise AssertionError(f"fixed-length dataset with lengths {sorted(set(lengths))}")
    return int(lengths[0])


def _check_split_folds(split_folds: dict[str, Sequence[int]]) -> None:
    missing = [s for s in SPLITS if s not in split_folds]
    if missing:
        raise DataPrepError(f"no folds given for split(s) {missing}")
    seen = {}
    for s in SPLITS:
        for f in split_folds[s]:
            if f in seen:
                raise DataPrepError(f"fold {f} is assigned to both {seen[f]} and {s}")
            seen[f] = s


def _write_split(tmp: pathlib.Path, split: str, idx: np.ndarray, record_raw: Callable[[int], np.ndarray],
                 lengths: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype: str, ragged: bool,
                 fixed_len: int | None, chunk_records: int = 512) -> None:
    from numpy.lib.format import open_memmap

    lens = lengths[idx] if len(idx) else np.zeros(0, np.int64)
    total = int(lens.sum())
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    shape = (total, len(LEADS)) if ragged else (len(idx), fixed_len, len(LEADS))
    path = tmp / f"{split}_signals.npy"
    if total == 0:
        np.save(path, np.zeros(shape, dtype=dtype))
    else:
        # The .npy header and the file's full size, then plain writes: a writable mapping of the
        # whole split would keep every written page in this process's resident memory.
        header = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        data_start = header.offset
        del header
        row_bytes = len(LEADS) * np.dtype(dtype).itemsize
        with open(path, "r+b") as f:
            for c in range(0, len(idx), chunk_records):
                sel = idx[c:c + chunk_records]
                block = np.concatenate([record_raw(j) for j in sel])
                block = (block - mean) / std
                f.seek(data_start + int(offsets[c]) * row_bytes)
                f.write(block.astype(dtype).tobytes())
    if ragged:
        np.save(tmp / f"{split}_offsets.npy", offsets)


# ---------------------------------------------------------------------------------------
# Small helpers shared by the dataset modules


def parse_band_pass(values: Sequence[str] | Sequence[float] | None, target_fs: int,
                    source_fs: float | None = None) -> tuple[float, float] | None:
    if not values:
        return None
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise DataPrepError(f"--band_pass must be two numbers LO,HI in Hz, got {values!r}") from None
    nyq = (source_fs or target_fs) / 2
    if not 0 < lo < hi < nyq:
        raise DataPrepError(f"--band_pass={lo:g},{hi:g} must satisfy 0 < LO < HI < {nyq:g} Hz "
                            "(Nyquist of the source rate)")
    return lo, hi


def summarize(manifest: dict, out_dir: str | os.PathLike) -> str:
    lines = [f"wrote {out_dir}: {manifest['dataset']} task={manifest['task']} "
             f"{len(manifest['label_names'])} labels, {manifest['sampling_rate']} Hz, "
             f"{'ragged' if manifest['ragged'] else 'fixed length'}, {manifest['dtype']}"]
    for s in SPLITS:
        info = manifest["splits"][s]
        lines.append(f"  {s:5s}: {info['num_records']:6d} records (folds {info['folds']})")
    rej = manifest["rejected"]
    lines.append(f"  rejected: {rej['counted']} (counted towards --max_rejected_fraction; "
                 f"+{rej['not_counted']} listed only: rows without a record, records without a mapped "
                 f"label), see {rej['file']}")
    lines.append(f"  dropped without label for the task: {manifest['dropped_no_label']}")
    if manifest.get("unassigned_records"):
        lines.append(f"  in no split (fold outside --train/val/test_folds): {manifest['unassigned_records']}, "
                     f"see {rej['file']}")
    if manifest.get("leads_reordered"):
        lines.append(f"  leads listed in another order in the header, reordered by name: {manifest['leads_reordered']}")
    if manifest.get("records_without_row"):
        lines.append(f"  WARNING: {manifest['records_without_row']} record(s) on disk have no row in the label table")
    return "\n".join(lines)


def multi_hot(label_sets: Sequence[Iterable[str]], label_names: Sequence[str]) -> np.ndarray:
    pos = {n: k for k, n in enumerate(label_names)}
    y = np.zeros((len(label_sets), len(label_names)), dtype=np.uint8)
    for i, labs in enumerate(label_sets):
        for lab in labs:
            y[i, pos[lab]] = 1
    return y
