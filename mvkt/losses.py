"""Losses of MVKT-ECG: supervised BCE, multi-label KD (MKD) and contrastive lead-information
transferring (CLT), in-batch and with a CRD-style memory bank, plus the disease-aware
negative masks they share.

Everything here is a pure, jit-able function of arrays (no Python branching on traced
values, fixed shapes). Losses are keyword-only and take `reduction` in
{"mean", "sum", "none"}: "none" returns the per-example loss (B,), the others reduce it
over the batch.

Where the gradient stops (the teacher *net* is frozen, its projection head is not):

* `mkd_loss` puts `stop_gradient` on `teacher_logits` itself: the teacher's logits are a
  fixed target.
* The CLT losses stop no gradient on their inputs: `teacher_embed` is the output of the
  *trainable* teacher projection head, which must learn. The caller freezes the teacher
  net by passing its pooled features through `jax.lax.stop_gradient` before the teacher
  head (and by not differentiating the teacher variables). Memory-bank entries are state,
  gathered under `stop_gradient`, and updated from stop_gradient embeddings.

References: Qin et al. 2023, "MVKT-ECG" (arXiv 2301.12178), authors' code QINYZz/MVKT-ECG;
Tian et al. 2020, "Contrastive Representation Distillation" (CRD), HobbitLong/RepDistiller
(`crd/memory.py` ContrastMemory, `crd/criterion.py` ContrastLoss).
"""

from __future__ import annotations

import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

Reduction = Literal["mean", "sum", "none"]
MaskMode = Literal["differs", "disjoint"]

# Logit given to masked-out similarities. Finite (not -inf) so that a row whose every
# negative is masked still has a finite log-sum-exp: exp(-1e9 - x) underflows to exactly
# 0, so masked entries contribute nothing, and no inf - inf = nan appears in gradients.
MASKED_LOGIT = -1e9


def _reduce(per_example: jax.Array, reduction: Reduction) -> jax.Array:
    if reduction == "mean":
        return jnp.mean(per_example)
    if reduction == "sum":
        return jnp.sum(per_example)
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- BCE


def bce_with_logits(*, logits: jax.Array, labels: jax.Array, reduction: Reduction = "mean") -> jax.Array:
    """Multi-label binary cross-entropy from logits (stable log-sigmoid form).

    Per example: mean over classes; then `reduction` over the batch ("mean" = mean over
    batch and classes, like torch's F.binary_cross_entropy_with_logits).
    """
    logits = logits.astype(jnp.float32)
    per_class = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    return _reduce(jnp.mean(per_class, axis=-1), reduction)


# ----------------------------------------------------------------------------- MKD


def mkd_loss(
    *,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    class_weights: jax.Array | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Multi-label knowledge distillation: T^2 * sum_c w_c KL(teacher_c || student_c).

    ``class_weights`` (C,) (default all 1): distil only where the teacher's knowledge helps,
    e.g. weight 0 for classes the teacher is not better at on validation.

    Every class c defines a binary distribution per network, (sigmoid(z_c / T),
    1 - sigmoid(z_c / T)); the per-example loss is T^2 times the sum over classes of
    KL(teacher || student), then `reduction` over the batch. Computed from logits with
    log_sigmoid (log(1 - sigmoid(z)) = log_sigmoid(-z)), so |z| = 1e4 stays finite.
    The teacher logits are a target: they enter under `jax.lax.stop_gradient`.

    Deviation from the authors' code (QINYZz/MVKT-ECG, loss/multi_label_kl.py): there
    the *probabilities* are divided by T (sigmoid(z) / T, not a distribution for T != 1)
    and T != 1 is never used; `nn.KLDivLoss()` with its default elementwise "mean" also
    averages over the 2 outcomes and the batch, i.e. half our per-class value at T = 1
    (up to their 1e-8 offsets). We implement the correct tempered form (Hinton et al.
    2015 temperature on logits, T^2 gradient scaling).
    """
    t = float(temperature)
    s = student_logits.astype(jnp.float32) / t
    z = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / t
    log_p_t, log_q_t = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)  # log p, log (1 - p)
    log_p_s, log_q_s = jax.nn.log_sigmoid(s), jax.nn.log_sigmoid(-s)
    # p * (log p - log p_s) with p = exp(log p): a zero-probability outcome gives 0 * finite.
    kl = jnp.exp(log_p_t) * (log_p_t - log_p_s) + jnp.exp(log_q_t) * (log_q_t - log_q_s)
    if class_weights is not None:
        kl = kl * jnp.asarray(class_weights, jnp.float32)
    return _reduce(t * t * jnp.sum(kl, axis=-1), reduction)


# ------------------------------------------------------------- disease-aware masks


def negative_mask(*, anchor_labels: jax.Array, candidate_labels: jax.Array, mode: MaskMode = "differs") -> jax.Array:
    """(B, M) bool: may candidate m serve as a negative for anchor b?

    Disease-aware CLT never contrasts two records with the same diagnosis:
    * "differs": the multi-hot label vectors are not identical;
    * "disjoint": additionally no positive class is shared.
    Records with identical label sets (including two all-zero vectors) are never
    negatives in either mode. (The authors' code compares only the first bit of the
    multi-hot vector on PTB-XL; we compare whole label sets.)
    """
    a = anchor_labels.astype(bool)[:, None, :]
    c = candidate_labels.astype(bool)[None, :, :]
    differs = jnp.any(a != c, axis=-1)
    if mode == "differs":
        return differs
    if mode == "disjoint":
        return differs & ~jnp.any(a & c, axis=-1)
    raise ValueError(f"mode must be 'differs' or 'disjoint', got {mode!r}")


# ------------------------------------------------------------------- in-batch CLT


def in_batch_clt_loss(
    *,
    student_embed: jax.Array,
    teacher_embed: jax.Array,
    labels: jax.Array,
    temperature: float = 0.07,
    mask_mode: MaskMode = "differs",
    reduction: Reduction = "mean",
) -> jax.Array:
    """Symmetric cross-view InfoNCE with disease-aware in-batch negatives.

    Student anchor i: positive teacher_embed[i], negatives teacher_embed[j] for j with
    negative_mask(labels[i], labels[j]); and the same with the views swapped. Per-example
    loss = mean of the two directions' -log(exp(s_ii/T) / (exp(s_ii/T) + sum_neg exp(s_ij/T))).
    An anchor without valid negatives contributes 0 (log-sum-exp over the positive only).

    Inputs are L2-normalised embeddings (B, D) of the GLOBAL batch (the train step
    gathers them across devices). No stop_gradient here: see the module docstring.
    """
    s = student_embed.astype(jnp.float32)
    t = teacher_embed.astype(jnp.float32)
    sim = (s @ t.T) / temperature  # sim[i, j] = <student_i, teacher_j> / T
    batch = sim.shape[0]
    keep = negative_mask(anchor_labels=labels, candidate_labels=labels, mode=mask_mode) | jnp.eye(batch, dtype=bool)
    positive = jnp.diagonal(sim)

    def direction(logits: jax.Array) -> jax.Array:  # rows = anchors
        masked = jnp.where(keep, logits, MASKED_LOGIT)
        return jax.nn.logsumexp(masked, axis=1) - positive

    # The negative mask is symmetric, so the same `keep` serves teacher anchors (sim.T).
    per_example = 0.5 * (direction(sim) + direction(sim.T))
    return _reduce(per_example, reduction)


# ---------------------------------------------------------------- memory-bank CLT


@flax.struct.dataclass
class MemoryBank:
    """CRD momentum memory of both views' embeddings for every training record.

    student, teacher: (N, D) float32 memories; labels: (N, C) multi-hot (uint8 / bool) of
    every training record, for disease-aware sampling; z_student / z_teacher: float32
    scalar NCE normalisation constants of the student-anchor / teacher-anchor scores
    (negative = not yet set; set on the first call, then constant). All fields are
    pytree leaves, so the bank can be traced, donated and sharded.
    """

    student: jax.Array
    teacher: jax.Array
    labels: jax.Array
    z_student: jax.Array
    z_teacher: jax.Array

    @property
    def num_records(self) -> int:
        return self.student.shape[0]


def init_memory_bank(rng: jax.Array, *, labels: jax.Array, dim: int) -> MemoryBank:
    """CRD ContrastMemory initialisation: memories uniform in [-stdv, stdv], stdv = 1/sqrt(dim/3)."""
    labels = jnp.asarray(labels)
    num_records = labels.shape[0]
    stdv = 1.0 / math.sqrt(dim / 3)
    k_student, k_teacher = jax.random.split(rng)
    uniform = lambda k: jax.random.uniform(k, (num_records, dim), jnp.float32, -stdv, stdv)  # noqa: E731
    # Two separate buffers: a donated train state may not hold one buffer twice.
    unset = lambda: jnp.full((), -1.0, jnp.float32)  # noqa: E731
    return MemoryBank(
        student=uniform(k_student),
        teacher=uniform(k_teacher),
        labels=labels.astype(jnp.uint8),
        z_student=unset(),
        z_teacher=unset(),
    )


def sample_negatives(
    rng: jax.Array,
    *,
    anchor_labels: jax.Array,
    bank_labels: jax.Array,
    num_negatives: int,
    mode: MaskMode = "differs",
) -> tuple[jax.Array, jax.Array]:
    """Draws `num_negatives` bank indices per anchor, uniformly among allowed records.

    Returns (indices (B, K) int32, has_negatives (B,) bool). Allowed = negative_mask of
    the anchor's labels against every bank record. Sampling is with replacement, by
    inverse CDF: a uniform rank r in [0, n_allowed) is mapped to the (r+1)-th allowed
    record via searchsorted on the row's cumulative count, which costs O(B N + B K log N)
    (a Gumbel/categorical draw would cost O(B K N) random numbers).

    Degenerate case: an anchor with no allowed record (every record shares its label set)
    falls back to uniform sampling over the whole bank and gets has_negatives=False; the
    losses then drop its negative terms (only its positive term remains).
    """
    allowed = negative_mask(anchor_labels=anchor_labels, candidate_labels=bank_labels, mode=mode)
    has_negatives = jnp.any(allowed, axis=1)
    allowed = allowed | ~has_negatives[:, None]
    cumulative = jnp.cumsum(allowed.astype(jnp.int32), axis=1)  # (B, N)
    n_allowed = cumulative[:, -1]
    batch = anchor_labels.shape[0]
    ranks = jax.random.randint(rng, (batch, num_negatives), 0, n_allowed[:, None])
    # First position whose cumulative count reaches rank + 1 = the (rank+1)-th allowed record.
    indices = jax.vmap(lambda cum, r: jnp.searchsorted(cum, r + 1, side="left"))(cumulative, ranks)
    return indices.astype(jnp.int32), has_negatives


def _nce_per_example(log_scores: jax.Array, log_z: jax.Array, *, num_records: int, weight_negatives: jax.Array) -> jax.Array:
    """CRD ContrastLoss per anchor from log(exp(s/T)) (B, 1+K), column 0 the positive.

    P = exp(s/T) / Z, noise K*Pn with Pn = 1/N:
    -[log(P_pos / (P_pos + K Pn)) + sum_k log(K Pn / (P_k + K Pn))], in log space:
    log(P / (P + c)) = -softplus(log c - log P) and log(c / (P + c)) = -softplus(log P - log c).
    (CRD adds eps = 1e-7 inside its divisions; the log-space form needs none.)
    """
    num_negatives = log_scores.shape[1] - 1
    log_noise = math.log(num_negatives / num_records)
    log_p = log_scores - log_z
    positive = jax.nn.softplus(log_noise - log_p[:, 0])
    negatives = jnp.sum(jax.nn.softplus(log_p[:, 1:] - log_noise), axis=1)
    return positive + weight_negatives * negatives


def _candidate_scores(embed: jax.Array, memory: jax.Array, candidates: jax.Array) -> jax.Array:
    """``<embed[b], memory[candidates[b, k]]>``, (B, 1+K), with no gradient into ``memory``.

    Scored against every memory row, then picked: gathering the candidates' rows first keeps a
    (B, 1+K, D) array per direction for the backward pass (64 MB at B=128, K=1024, D=128), the
    (B, N) scores are N / ((1+K) D) of that. On CPU the matmul was as fast at N=17,400 (full
    PTB-XL) and faster at N=1,442 (docs/BENCHMARKS.md, memory); same sums up to rounding.
    """
    scores = embed @ jax.lax.stop_gradient(memory).T
    return jnp.take_along_axis(scores, candidates, axis=1)


def memory_bank_clt_loss(
    *,
    student_embed: jax.Array,
    teacher_embed: jax.Array,
    indices: jax.Array,
    labels: jax.Array,
    bank: MemoryBank,
    rng: jax.Array,
    num_negatives: int = 1024,
    temperature: float = 0.07,
    momentum: float = 0.5,
    mask_mode: MaskMode = "differs",
    reduction: Reduction = "mean",
) -> tuple[jax.Array, MemoryBank]:
    """CRD contrastive loss with a momentum memory and disease-aware negatives.

    For anchor i (bank row indices[i], labels[i]) K = num_negatives negatives are drawn
    by `sample_negatives(rng, ...)` (the same draw serves both directions, as in CRD).
    Student anchor: scores exp(<student_embed_i, teacher_memory[j]> / T) / Z_student for
    j = indices[i] (positive: the memory entry of the same record in the other view, as in
    CRD) and the K negatives; teacher anchor: the same against the student memory with
    Z_teacher. Z is set on the first call (bank z < 0) to mean(exp(s/T)) * N over the
    (B, 1+K) scores of that call, under stop_gradient, and kept afterwards. The
    per-example loss is the sum of both directions' CRD NCE losses (Pn = 1/N).

    Returns (loss, new_bank). new_bank has both memories' rows at `indices` replaced by
    normalize(momentum * old + (1 - momentum) * stop_gradient(embed)) and the Z values.
    Indices are assumed unique within the (global) batch; with duplicates `.at[].set`
    keeps one of the writes.
    """
    s = student_embed.astype(jnp.float32)
    t = teacher_embed.astype(jnp.float32)
    num_records = bank.num_records
    negatives, has_negatives = sample_negatives(
        rng, anchor_labels=labels, bank_labels=bank.labels, num_negatives=num_negatives, mode=mask_mode
    )
    candidates = jnp.concatenate([indices[:, None].astype(jnp.int32), negatives], axis=1)  # (B, 1+K)
    log_scores_student = _candidate_scores(s, bank.teacher, candidates) / temperature
    log_scores_teacher = _candidate_scores(t, bank.student, candidates) / temperature

    def normaliser(current_z: jax.Array, log_scores: jax.Array) -> jax.Array:
        first_z = jnp.mean(jnp.exp(jax.lax.stop_gradient(log_scores))) * num_records
        return jnp.where(current_z < 0, first_z, current_z).astype(jnp.float32)

    z_student = normaliser(bank.z_student, log_scores_student)
    z_teacher = normaliser(bank.z_teacher, log_scores_teacher)
    weight = has_negatives.astype(jnp.float32)
    per_example = _nce_per_example(
        log_scores_student, jnp.log(z_student), num_records=num_records, weight_negatives=weight
    ) + _nce_per_example(log_scores_teacher, jnp.log(z_teacher), num_records=num_records, weight_negatives=weight)

    def updated(memory: jax.Array, embed: jax.Array) -> jax.Array:
        rows = momentum * memory[indices] + (1.0 - momentum) * jax.lax.stop_gradient(embed)
        rows = rows * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(rows), axis=1, keepdims=True), 1e-24))
        return memory.at[indices].set(rows.astype(memory.dtype))

    new_bank = bank.replace(
        student=updated(bank.student, s),
        teacher=updated(bank.teacher, t),
        z_student=z_student,
        z_teacher=z_teacher,
    )
    return _reduce(per_example, reduction), new_bank


__all__ = (
    "MASKED_LOGIT",
    "MemoryBank",
    "bce_with_logits",
    "in_batch_clt_loss",
    "init_memory_bank",
    "memory_bank_clt_loss",
    "mkd_loss",
    "negative_mask",
    "sample_negatives",
)
