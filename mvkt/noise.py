"""Real wearable noise: the MIT-BIH Noise Stress Test Database (NSTDB) noise records.

``bw`` (baseline wander), ``em`` (electrode motion) and ``ma`` (muscle artefact) are
30-minute, 2-channel, 360 Hz recordings of noise alone (Moody, Muldrow, Mark 1984). Every
record is cut into two disjoint parts: evaluation (``experiments.robustness``) draws its
segments from the first half, training (``config.augment.nstdb_noise``) from the second, so
no noise a model is scored under is ever seen in training. The parts are fractions of
whatever record is read, the full one (``../shared/datasets/nstdb``) or the 60-s excerpt
embedded in ``data_prep/samples/nstdb``.

SNR (dB), per lead: ``10 log10(P_signal / P_noise)`` with ``P_signal`` the variance of the
lead over the record (its mean removed: a DC offset is not signal) and ``P_noise`` the
mean square of the scaled noise over the same samples, as added (before any filter of the
run). ``scale_to_snr`` returns the factor that makes it exact.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from mvkt import errors

NSTDB_KINDS = ("bw", "em", "ma")
NSTDB_RATE = 360
SAMPLE_NSTDB = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "nstdb"
# Disjoint parts of every noise record, as fractions of its length.
PARTS = {"eval": (0.0, 0.5), "train": (0.5, 1.0)}


@dataclasses.dataclass(frozen=True)
class NoiseBank:
    """One part of the NSTDB records at a run's rate: ``signals[k, c]`` is channel c of
    ``kinds[k]``, in mV."""

    kinds: tuple[str, ...]
    signals: np.ndarray  # (len(kinds), 2, T) float32
    sampling_rate: int
    part: str
    source: str
    source_samples: tuple[int, int]  # [lo, hi) of the 360 Hz record

    def kind_index(self, kind: str) -> int:
        return self.kinds.index(kind)

    def segment(self, kind: str, length: int, rng: np.random.Generator, *, num_leads: int = 12) -> np.ndarray:
        """(length, num_leads) noise of ``kind`` from one random offset: leads alternate
        between the two channels from a random first one (both channels are used). A record
        longer than the part wraps around it."""
        k = self.kind_index(kind)
        total = self.signals.shape[-1]
        offset = int(rng.integers(0, max(total - length, 0) + 1))
        first = int(rng.integers(0, 2))
        t = np.arange(offset, offset + length) % total
        channels = [(first + lead) % 2 for lead in range(num_leads)]
        return self.signals[k][channels][:, t].T.astype(np.float32)


def load_nstdb(
    directory: str | pathlib.Path = SAMPLE_NSTDB,
    *,
    part: str,
    sampling_rate: int,
    band_pass: tuple[float, float] | None = None,
    kinds: tuple[str, ...] = NSTDB_KINDS,
) -> NoiseBank:
    """``part`` ("eval" or "train") of the NSTDB noise records in ``directory``, band-passed
    as the run's records were (at 360 Hz) and resampled to ``sampling_rate`` as data_prep does."""
    import wfdb

    from data_prep import common as prep_lib

    if part not in PARTS:
        raise ValueError(f"noise part must be one of {sorted(PARTS)}, got {part!r}")
    directory = pathlib.Path(directory)
    unknown = sorted(set(kinds) - set(NSTDB_KINDS))
    if unknown or not kinds:
        raise ValueError(f"noise kinds must come from {list(NSTDB_KINDS)}, got {list(kinds)}")
    signals, spans = [], set()
    for kind in kinds:
        header = directory / f"{kind}.hea"
        if not header.is_file():
            raise errors.RecordError(f"{header} not found: {directory} must hold the NSTDB noise records "
                                     f"{', '.join(NSTDB_KINDS)} (.hea + .dat), e.g. ../shared/datasets/nstdb")
        try:
            record = wfdb.rdrecord(str(directory / kind))
        except Exception as e:  # wfdb raises many kinds on damaged files
            raise errors.RecordError(f"{header}: cannot be read as a WFDB record: {e}") from None
        if record.fs != NSTDB_RATE or record.p_signal is None or record.p_signal.shape[1] != 2:
            raise errors.RecordError(f"{header}: expected 2 signals at {NSTDB_RATE} Hz (an NSTDB noise record), "
                                     f"got {record.n_sig} at {record.fs} Hz")
        samples = record.p_signal.astype(np.float64)
        if not np.isfinite(samples).all():
            raise errors.RecordError(f"{header}: NaN samples")
        lo, hi = (int(round(f * len(samples))) for f in PARTS[part])
        spans.add((lo, hi))
        piece = samples[lo:hi]
        if band_pass is not None:
            piece = prep_lib.band_pass_filter(piece, NSTDB_RATE, tuple(band_pass))
        piece = prep_lib.resample(piece, NSTDB_RATE, int(sampling_rate))
        signals.append(piece.T)
    if len(spans) != 1:
        raise errors.RecordError(f"{directory}: the noise records differ in length")
    length = min(s.shape[1] for s in signals)
    return NoiseBank(kinds=tuple(kinds), signals=np.stack([s[:, :length] for s in signals]).astype(np.float32),
                     sampling_rate=int(sampling_rate), part=part, source=str(directory.absolute()),
                     source_samples=spans.pop())


def signal_power(signal: np.ndarray) -> np.ndarray:
    """Per lead: variance over time (mean removed), float64. ``signal``: (..., T, L)."""
    x = np.asarray(signal, np.float64)
    return np.mean((x - x.mean(axis=-2, keepdims=True)) ** 2, axis=-2)


def scale_to_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Per lead (L,) factor a such that ``signal + a * noise`` has exactly ``snr_db`` (module
    docstring); 0 where the signal or the noise is flat (nothing to measure against)."""
    p_signal = signal_power(signal)
    p_noise = np.mean(np.asarray(noise, np.float64) ** 2, axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return np.where((p_signal > 0) & (p_noise > 0), scale, 0.0)


def measured_snr(signal: np.ndarray, added: np.ndarray) -> np.ndarray:
    """Per lead SNR (dB) of ``added`` (the scaled noise) against ``signal``."""
    return 10.0 * np.log10(signal_power(signal) / np.mean(np.asarray(added, np.float64) ** 2, axis=-2))
