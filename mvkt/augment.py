"""Input transforms inside the train step, on the 12-lead crop before teacher and student."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvkt import data as data_lib
from mvkt import run_config


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Input transforms inside the step, on the 12-lead crop, so that teacher and student see
    exactly the same input (function matching, Beyer et al. 2022); and lead dropout, for a
    teacher whose decisions should rest on the leads a student has.

    ``mixup_alpha``: mix records with weight ~ Beta(a, a) (labels mixed too; CLT masks use
    the dominant record's labels); ``amplitude_scale_std``: per record and lead gain
    exp(N(0, s)); ``noise_std``: Gaussian noise (standardised units); ``baseline_wander``:
    amplitude of a random 0.05-0.5 Hz sinusoid per record and lead; ``lead_dropout``:
    probability of zeroing each lead not in ``keep_leads`` (12-lead positions), per record.
    """

    mixup_alpha: float = 0.0
    amplitude_scale_std: float = 0.0
    noise_std: float = 0.0
    baseline_wander: float = 0.0
    lead_dropout: float = 0.0
    keep_leads: tuple[int, ...] = ()
    sampling_rate: int = 100

    @property
    def active(self) -> bool:
        return any((self.mixup_alpha, self.amplitude_scale_std, self.noise_std, self.baseline_wander,
                    self.lead_dropout))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, sampling_rate: int) -> "Augmentation":
        aug = config.get("augment") or {}
        keep = str(aug.get("lead_dropout_keep", "") or "")
        return cls(
            mixup_alpha=float(aug.get("mixup_alpha", 0.0)),
            amplitude_scale_std=float(aug.get("amplitude_scale_std", 0.0)),
            noise_std=float(aug.get("noise_std", 0.0)),
            baseline_wander=float(aug.get("baseline_wander", 0.0)),
            lead_dropout=float(aug.get("lead_dropout", 0.0)),
            keep_leads=tuple(data_lib.lead_indices(run_config.parse_leads(keep))) if keep else (),
            sampling_rate=int(sampling_rate),
        )

    def __call__(self, rng: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x, labels for the losses, labels for CLT's negative masks)."""
        b, t, leads = x.shape
        k_mix, k_lam, k_amp, k_noise, k_f, k_phase, k_wander, k_drop = jax.random.split(rng, 8)
        mask_labels = y
        if self.mixup_alpha:
            partner = jax.random.permutation(k_mix, b)
            lam = jax.random.beta(k_lam, self.mixup_alpha, self.mixup_alpha, (b,))
            x = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
            mask_labels = jnp.where((lam >= 0.5)[:, None], y, y[partner])
            y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
        if self.amplitude_scale_std:
            x = x * jnp.exp(self.amplitude_scale_std * jax.random.normal(k_amp, (b, 1, leads)))
        if self.baseline_wander:
            freq = jax.random.uniform(k_f, (b, 1, leads), minval=0.05, maxval=0.5)
            phase = jax.random.uniform(k_phase, (b, 1, leads), maxval=2 * jnp.pi)
            amplitude = self.baseline_wander * jax.random.uniform(k_wander, (b, 1, leads))
            seconds = jnp.arange(t)[None, :, None] / self.sampling_rate
            x = x + amplitude * jnp.sin(2 * jnp.pi * freq * seconds + phase)
        if self.noise_std:
            x = x + self.noise_std * jax.random.normal(k_noise, x.shape)
        if self.lead_dropout:
            kept = jax.random.bernoulli(k_drop, 1.0 - self.lead_dropout, (b, 1, leads))
            always = np.zeros(leads, bool)
            always[list(self.keep_leads)] = True
            x = x * (kept | always).astype(x.dtype)
        return x, y, mask_labels


@dataclasses.dataclass(frozen=True, eq=False)
class Corruption:
    """Wearable corruptions of the trained net's input only, after its leads are picked: a
    frozen teacher keeps the clean 12-lead crop, so a distilled student learns the clean
    answer from a corrupted trace (and a teacher cache stays valid).

    ``nstdb_noise``: probability per record of adding real NSTDB noise (``mvkt.noise``,
    training part only) of a random kind, offset and first channel, at an SNR uniform in
    ``snr_db`` (the SNR of ``mvkt.noise``, measured on the crop); ``polarity_flip``:
    probability per record of inverting the trace (reversed electrodes); ``contact_loss``:
    probability per record of a flat stretch (0 = the training mean) of 0.5-2 s.
    """

    nstdb_noise: float = 0.0
    snr_db: tuple[float, float] = (0.0, 24.0)
    polarity_flip: float = 0.0
    contact_loss: float = 0.0
    bank: np.ndarray | None = None  # (kinds * 2 channels, T) float32, the training part
    sampling_rate: int = 100

    @property
    def active(self) -> bool:
        return any((self.nstdb_noise, self.polarity_flip, self.contact_loss))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, sampling_rate: int,
                    band_pass: tuple[float, float] | None = None) -> "Corruption":
        from mvkt import noise as noise_lib

        aug = config.get("augment") or {}
        probabilities = {k: float(aug.get(k, 0.0)) for k in ("nstdb_noise", "polarity_flip", "contact_loss")}
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"config.augment.{name} is a probability in [0, 1], got {p}")
        snr = (float(aug.get("nstdb_snr_min_db", 0.0)), float(aug.get("nstdb_snr_max_db", 24.0)))
        if snr[0] > snr[1]:
            raise ValueError(f"config.augment.nstdb_snr_min_db ({snr[0]}) is above nstdb_snr_max_db ({snr[1]})")
        bank = None
        if probabilities["nstdb_noise"]:
            noise = noise_lib.load_nstdb(aug.get("nstdb_dir") or noise_lib.SAMPLE_NSTDB, part="train",
                                         sampling_rate=sampling_rate, band_pass=band_pass)
            bank = noise.signals.reshape(-1, noise.signals.shape[-1])
        return cls(snr_db=snr, bank=bank, sampling_rate=int(sampling_rate), **probabilities)

    def __call__(self, rng: jax.Array, x: jax.Array) -> jax.Array:
        b, t, leads = x.shape
        k_apply, k_kind, k_first, k_offset, k_snr, k_flip, k_flat, k_where = jax.random.split(rng, 8)
        if self.nstdb_noise:
            bank = jnp.asarray(self.bank)
            kind = jax.random.randint(k_kind, (b,), 0, bank.shape[0] // 2)
            first = jax.random.randint(k_first, (b,), 0, 2)
            offset = jax.random.randint(k_offset, (b,), 0, max(bank.shape[1] - t, 0) + 1)
            channel = 2 * kind[:, None] + (first[:, None] + jnp.arange(leads)[None]) % 2  # (b, leads)
            time = (offset[:, None] + jnp.arange(t)[None]) % bank.shape[1]  # (b, t); wraps past the part
            noise = bank[channel[:, None, :], time[:, :, None]]  # (b, t, leads)
            snr = jax.random.uniform(k_snr, (b, 1, 1), minval=self.snr_db[0], maxval=self.snr_db[1])
            p_signal = jnp.var(x, axis=1, keepdims=True)
            p_noise = jnp.mean(noise ** 2, axis=1, keepdims=True)
            scale = jnp.sqrt(p_signal / jnp.maximum(p_noise, 1e-12) / 10.0 ** (snr / 10.0))
            scale = jnp.where((p_signal > 0) & (p_noise > 0), scale, 0.0)
            apply = jax.random.bernoulli(k_apply, self.nstdb_noise, (b, 1, 1))
            x = x + jnp.where(apply, scale, 0.0) * noise
        if self.polarity_flip:
            x = jnp.where(jax.random.bernoulli(k_flip, self.polarity_flip, (b, 1, 1)), -x, x)
        if self.contact_loss:
            k_len, k_start = jax.random.split(k_where)
            length = jax.random.uniform(k_len, (b, 1), minval=0.5, maxval=2.0) * self.sampling_rate
            start = jax.random.uniform(k_start, (b, 1)) * jnp.maximum(t - length, 0.0)
            position = jnp.arange(t)[None]
            flat = (position >= start) & (position < start + length)
            flat &= jax.random.bernoulli(k_flat, self.contact_loss, (b, 1))
            x = jnp.where(flat[:, :, None], 0.0, x)
        return x
