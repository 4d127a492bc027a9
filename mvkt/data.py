"""Reading the shards written by `data_prep` (format: docs/DESIGN.md, "Shard format").

Owns `open_split` / `Split` (memory-mapped signals, labels, ids, folds), lead selection,
crops with zero padding, ragged (variable-length) storage, and `verify_shards` (sha256
of every file listed in `manifest.json`). Pure NumPy: nothing here touches JAX, so the
input pipeline can run on the host while the device trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Sequence

import numpy as np

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class ShardError(ValueError):
    """A shard folder that is missing files, inconsistent with its manifest, or corrupted."""


def canonical_lead(name: str) -> str:
    """'avr', ' AVR', 'aVR' -> 'aVR' (headers differ in case); ValueError for other names."""
    canon = {lead.lower(): lead for lead in LEADS}.get(str(name).strip().lower())
    if canon is None:
        raise ValueError(f"unknown lead {name!r}; leads are {', '.join(LEADS)}")
    return canon


def lead_indices(names: Sequence[str]) -> list[int]:
    """Positions of `names` in the standard 12-lead order (exact names, e.g. "aVR", "V1")."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in LEADS]
    if unknown:
        raise ValueError(f"unknown lead name(s) {unknown}; valid: {', '.join(LEADS)}")
    if not names:
        raise ValueError("select at least one lead")
    return [LEADS.index(n) for n in names]


def load_manifest(out_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(out_dir) / "manifest.json"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{path} not found: not a data_prep output folder") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    for key in ("label_names", "leads", "sampling_rate", "ragged", "splits", "files"):
        if key not in manifest:
            raise ShardError(f"{path}: missing key {key!r}")
    if list(manifest["leads"]) != list(LEADS):
        raise ShardError(f"{path}: leads {manifest['leads']} are not the standard 12-lead order")
    return manifest


def default_cache_dir() -> pathlib.Path:
    """Where hashes of verified files are remembered: ``$MVKT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mvkt``."""
    if os.environ.get("MVKT_CACHE_DIR"):
        return pathlib.Path(os.environ["MVKT_CACHE_DIR"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "mvkt"


def _file_key(path: pathlib.Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_non_finite_record(out_dir: pathlib.Path, name: str) -> str | None:
    """The record id of the first record of ``{split}_signals.npy`` holding a NaN or inf
    sample, anywhere in it (random crops can miss a few bad samples for a whole run), or None."""
    split = name[: -len("_signals.npy")]
    signals = np.load(out_dir / name, mmap_mode="r")
    rows = signals.reshape(len(signals), -1) if signals.ndim == 3 else signals  # fixed (N, T, 12) / ragged (sum T, 12)
    step = max(1, (1 << 24) // max(1, rows[0].size * rows.itemsize)) if len(rows) else 1
    for lo in range(0, len(rows), step):
        bad = np.flatnonzero(~np.isfinite(rows[lo:lo + step]).all(axis=1))
        if len(bad):
            row = lo + int(bad[0])
            if signals.ndim == 2:  # ragged: the record whose samples hold this row
                row = int(np.searchsorted(np.load(out_dir / f"{split}_offsets.npy"), row, side="right")) - 1
            return str(np.load(out_dir / f"{split}_record_ids.npy")[row])
    return None


def verify_shards(out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> int:
    """Check the sha256 of every file in the manifest, and that every signal sample is finite;
    returns the number of files checked.

    With ``cache_dir`` a file whose size, modification time and inode are unchanged since
    it last matched is not hashed again (a dataset is hashed once per change; any write
    to a file changes its modification time). An unwritable cache only costs the speed-up.
    """
    out_dir = pathlib.Path(out_dir).absolute()
    manifest = load_manifest(out_dir)
    cache_path = pathlib.Path(cache_dir) / "verified_files.json" if cache_dir is not None else None
    try:
        cache = json.loads(cache_path.read_text()) if cache_path is not None else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    bad = []
    for name, digest in manifest["files"].items():
        path = out_dir / name
        if not path.is_file():
            bad.append(f"{name}: missing")
            continue
        key = _file_key(path)
        known = cache.get(str(path))
        if known and known["key"] == key and known["sha256"] == digest:
            continue
        actual = _sha256(path)
        # Scanned only when the hash matches: a mismatched file is reported as such already.
        non_finite = (_first_non_finite_record(out_dir, name)
                      if actual == digest and name.endswith("_signals.npy") else None)
        if actual != digest:
            bad.append(f"{name}: sha256 {actual[:12]}... != manifest {digest[:12]}...")
            cache.pop(str(path), None)
        elif non_finite is not None:  # data_prep rejects such records: these shards were written otherwise
            bad.append(f"{name}: NaN/inf samples in record {non_finite}")
            cache.pop(str(path), None)
        else:
            cache[str(path)] = {"key": key, "sha256": actual}
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:
            pass
    if bad:
        raise ShardError(
            f"{out_dir}: {len(bad)} file(s) fail verification against manifest.json (damaged or changed since "
            f"data_prep wrote them): " + "; ".join(bad) + ". Prepare the shards again"
        )
    return len(manifest["files"])


class RaggedSignals:
    """Variable-length records stored back to back: `data` (sum T_i, 12), `offsets` (N+1,)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data = data
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        i %= n
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def shape(self) -> tuple:
        return (len(self), None, self.data.shape[1])


class Split:
    """One split of a shard folder. Use `open_split`; `select_leads` returns a view."""

    def __init__(self, *, out_dir: pathlib.Path, name: str, manifest: dict, x, y: np.ndarray,
                 record_ids: np.ndarray, folds: np.ndarray, lead_idx: Sequence[int] = tuple(range(12))):
        self.out_dir = out_dir
        self.name = name
        self.manifest = manifest
        self.x = x  # storage, always all 12 leads; reads (record/crop) apply the lead selection
        self.y = y
        self.record_ids = record_ids
        self.folds = folds
        self.label_names = list(manifest["label_names"])
        self.sampling_rate = int(manifest["sampling_rate"])
        self.ragged = bool(manifest["ragged"])
        self._lead_idx = list(lead_idx)
        self.leads = [LEADS[i] for i in self._lead_idx]
        if self.ragged:
            self.lengths = x.lengths
        else:
            self.lengths = np.full(len(y), x.shape[1], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (f"Split({self.name!r}, n={len(self)}, classes={len(self.label_names)}, leads={self.leads}, "
                f"{self.sampling_rate} Hz, {'ragged' if self.ragged else 'fixed'}, dir={str(self.out_dir)!r})")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def lead_idx(self) -> list[int]:
        return list(self._lead_idx)

    def select_leads(self, names: Sequence[str]) -> "Split":
        """View with the same records whose reads return only `names` (in the given order)."""
        return Split(out_dir=self.out_dir, name=self.name, manifest=self.manifest, x=self.x, y=self.y,
                     record_ids=self.record_ids, folds=self.folds, lead_idx=lead_indices(names))

    def record(self, i: int) -> np.ndarray:
        """Whole record i: float32 (T_i, L)."""
        sig = self.x[i]
        return np.asarray(sig[:, self._lead_idx], dtype=np.float32)

    def crop(self, indices, starts, length: int) -> np.ndarray:
        """float32 (B, length, L): record indices[b] from starts[b]; zero-padded past its end."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts = np.broadcast_to(np.asarray(starts, dtype=np.int64), indices.shape)
        if length <= 0:
            raise ValueError(f"crop length must be positive, got {length}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"record index out of range [0, {len(self)}) in {self.name}")
        if (starts < 0).any():
            raise ValueError("crop starts must be >= 0")
        out = np.zeros((len(indices), length, len(self._lead_idx)), dtype=np.float32)
        lead_idx = self._lead_idx
        all_leads = lead_idx == list(range(len(LEADS)))
        for b, (i, s) in enumerate(zip(indices, starts)):
            sig = self.x[i]
            piece = sig[s:s + length]
            if not all_leads:
                piece = piece[:, lead_idx]
            out[b, :len(piece)] = piece
        return out


def _load(path: pathlib.Path, mmap: bool = True) -> np.ndarray:
    if not path.is_file():
        raise ShardError(f"{path} is missing")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ShardError(f"{path} cannot be read as .npy: {e}") from None


class _FoldSignals:
    """Records of several splits' storage as one array-like, re-standardised on read:
    a cross-validation round's split without a copy of the signals."""

    def __init__(self, parts: list, index: list[tuple[int, int]], *, shift: np.ndarray, scale: np.ndarray,
                 ragged: bool):
        self.parts, self.index, self.ragged = parts, index, ragged
        self.shift, self.scale = shift.astype(np.float32), scale.astype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        part, local = self.index[i]
        return (np.asarray(self.parts[part][local], dtype=np.float32) - self.shift) / self.scale

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(self.parts[p][k]) for p, k in self.index], dtype=np.int64)

    @property
    def shape(self) -> tuple:
        first = self.parts[self.index[0][0]] if self.index else None
        return (len(self), None if self.ragged or first is None else first.shape[1], len(LEADS))


_FOLD_STATS: dict = {}


def _fold_statistics(out_dir: pathlib.Path, train_folds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-lead mean and (population) std of the stored values of the records in ``train_folds``
    (float64 sums, one pass; cached per folder and folds)."""
    key = (str(out_dir.absolute()), train_folds, load_manifest(out_dir)["files"].get("train_signals.npy"))
    if key not in _FOLD_STATS:
        total, squares, count = np.zeros(len(LEADS)), np.zeros(len(LEADS)), 0
        for name in SPLITS:
            part = open_split(out_dir, name)
            chosen = np.flatnonzero(np.isin(part.folds, train_folds))
            for lo in range(0, len(chosen), 256):
                block = np.concatenate([np.asarray(part.x[i], np.float64) for i in chosen[lo:lo + 256]])
                total += block.sum(axis=0)
                squares += (block ** 2).sum(axis=0)
                count += len(block)
        if count == 0:
            raise ShardError(f"{out_dir}: no record in the training folds {list(train_folds)}")
        mean = total / count
        _FOLD_STATS[key] = (mean, np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12)), count)
    return _FOLD_STATS[key]


def open_fold_split(out_dir: str | os.PathLike, split: str, folds: dict[str, Sequence[int]]) -> Split:
    """The records of ``folds[split]`` from all of the shards' splits, standardised with the
    statistics of ``folds["train"]`` (a cross-validation round; nothing is written).

    The returned split's manifest carries the round's standardisation in source units
    (``preprocessing.standardization``, ``fitted_on`` naming the folds), so a run trained
    on it records what predictions on raw records need.
    """
    out_dir = pathlib.Path(out_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    missing = [name for name in SPLITS if name not in folds]
    if missing:
        raise ValueError(f"folds must name the folds of {list(SPLITS)}; missing {missing}")
    wanted = [int(f) for f in folds[split]]
    parts = [open_split(out_dir, name) for name in SPLITS]
    index = [(p, int(k)) for p, part in enumerate(parts) for k in np.flatnonzero(np.isin(part.folds, wanted))]
    present = sorted({int(f) for part in parts for f in part.folds})
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise ShardError(f"{out_dir}: no records in fold(s) {unknown} (the shards hold folds {present})")
    mean_x, std_x, count = _fold_statistics(out_dir, tuple(sorted(int(f) for f in folds["train"])))
    manifest = json.loads(json.dumps(load_manifest(out_dir)))
    stats = manifest["preprocessing"]["standardization"]
    stored_mean, stored_std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    manifest["preprocessing"]["standardization"] = {
        "mean": [float(v) for v in stored_mean + mean_x * stored_std],
        "std": [float(v) for v in std_x * stored_std],
        "fitted_on": f"folds {sorted(int(f) for f in folds['train'])}",
        "num_samples": int(count),
    }
    manifest["fold_splits"] = {name: [int(f) for f in folds[name]] for name in SPLITS}
    take = lambda attr: (np.concatenate([getattr(parts[p], attr)[k:k + 1] for p, k in index])  # noqa: E731
                         if index else getattr(parts[0], attr)[:0])
    x = _FoldSignals([part.x for part in parts], index, shift=mean_x, scale=std_x, ragged=bool(manifest["ragged"]))
    return Split(out_dir=out_dir, name=split, manifest=manifest, x=x, y=take("y"), record_ids=take("record_ids"),
                 folds=take("folds"))


class Restandardized:
    """A split seen through another standardisation (a run's, a teacher's): its own scaler
    undone (x * std_own + mean_own), the other applied ((x - mean) / std)."""

    def __init__(self, split: Split, stats: dict):
        own = split.manifest["preprocessing"]["standardization"]
        mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        self.split = split
        self.scale = (np.asarray(own["std"]) / std).astype(np.float32)
        self.shift = ((np.asarray(own["mean"]) - mean) / std).astype(np.float32)

    def __len__(self) -> int:
        return len(self.split)

    def __getattr__(self, name):
        return getattr(self.split, name)

    def crop(self, indices, starts, length):
        index = self.split.lead_idx
        return self.split.crop(indices, starts, length) * self.scale[index] + self.shift[index]


def as_standardized(split: Split, stats: dict | None):
    """``split`` standardised with ``stats`` (``preprocessing.standardization`` of a manifest or
    run: mean and std in source units); the split itself when they are its own or None."""
    own = split.manifest["preprocessing"]["standardization"]
    if stats is None or (own["mean"] == stats["mean"] and own["std"] == stats["std"]):
        return split
    return Restandardized(split, stats)


def as_run_data(split: Split, info: dict):
    """``split`` standardised as the run whose ``run_info.json`` is ``info`` saw its training data."""
    return as_standardized(split, (info.get("preprocessing") or {}).get("standardization"))


def open_split(out_dir: str | os.PathLike, split: str, folds: dict[str, Sequence[int]] | None = None) -> Split:
    """Memory-map one split; validates the manifest and file shapes (not hashes: see verify_shards).

    With ``folds`` ({"train": [...], "val": [...], "test": [...]}), the split is made of
    those folds instead of the shards' own split (``open_fold_split``).
    """
    if folds:
        return open_fold_split(out_dir, split, folds)
    out_dir = pathlib.Path(out_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = load_manifest(out_dir)
    info = manifest["splits"].get(split)
    if info is None:
        raise ShardError(f"{out_dir}/manifest.json has no split {split!r}")
    n, c = int(info["num_records"]), len(manifest["label_names"])
    sig = _load(out_dir / f"{split}_signals.npy")
    y = _load(out_dir / f"{split}_labels.npy", mmap=False)
    ids = _load(out_dir / f"{split}_record_ids.npy", mmap=False)
    folds = _load(out_dir / f"{split}_folds.npy", mmap=False)
    where = f"{out_dir}/{split}_*"
    if y.shape != (n, c) or y.dtype != np.uint8:
        raise ShardError(f"{where}: labels {y.shape} {y.dtype}, manifest says ({n}, {c}) uint8")
    if ids.shape != (n,) or folds.shape != (n,):
        raise ShardError(f"{where}: record_ids {ids.shape} / folds {folds.shape}, manifest says {n} records")
    if str(sig.dtype) != manifest.get("dtype", str(sig.dtype)):
        raise ShardError(f"{where}: signals are {sig.dtype}, manifest says {manifest['dtype']}")
    if manifest["ragged"]:
        offsets = _load(out_dir / f"{split}_offsets.npy", mmap=False)
        if (sig.ndim != 2 or sig.shape[1] != 12 or offsets.shape != (n + 1,) or offsets[0] != 0
                or offsets[-1] != sig.shape[0] or (np.diff(offsets) < 0).any()):
            raise ShardError(f"{where}: ragged signals {sig.shape} / offsets {offsets.shape} inconsistent "
                             f"with {n} records")
        x = RaggedSignals(sig, offsets.astype(np.int64))
    else:
        if sig.ndim != 3 or sig.shape[0] != n or sig.shape[2] != 12:
            raise ShardError(f"{where}: signals {sig.shape}, expected ({n}, T, 12)")
        x = sig
    return Split(out_dir=out_dir, name=split, manifest=manifest, x=x, y=y, record_ids=ids, folds=folds)
