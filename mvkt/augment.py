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
