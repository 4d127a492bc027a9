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


def verify_shards(out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> int:
    """Check the sha256 of every file in the manifest; returns the number of files checked.

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
        if actual != digest:
            bad.append(f"{name}: sha256 {actual[:12]}... != manifest {digest[:12]}...")
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
            f"{out_dir}: {len(bad)} file(s) do not match manifest.json (damaged or changed since "
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


def open_split(out_dir: str | os.PathLike, split: str) -> Split:
    """Memory-map one split; validates the manifest and file shapes (not hashes: see verify_shards)."""
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
