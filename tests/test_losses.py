"""Tests for mvkt.losses against NumPy references on small hand-made inputs: BCE, MKD,
disease-aware negative masks, in-batch CLT, memory-bank CLT (same sampled negatives,
Z initialisation, memory update) and the gradient flow of the combined objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvkt import losses, models


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _unit(rng: np.random.Generator, shape) -> np.ndarray:
    v = rng.normal(size=shape)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _reduce_np(per_example, reduction):
    return {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction](per_example)


# ----------------------------------------------------------------------------- BCE


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_matches_numpy(reduction):
    logits = np.array([[2.0, -1.0, 0.0], [0.5, 3.0, -4.0]], np.float32)
    labels = np.array([[1, 0, 1], [0, 1, 1]], np.uint8)
    p = _sigmoid(logits.astype(np.float64))
    per_example = np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)), axis=1)
    got = losses.bce_with_logits(logits=jnp.asarray(logits), labels=jnp.asarray(labels), reduction=reduction)
    np.testing.assert_allclose(got, _reduce_np(per_example, reduction), rtol=1e-5)


def test_bce_stable_for_huge_logits():
    got = losses.bce_with_logits(logits=jnp.array([[1e4, -1e4]]), labels=jnp.array([[0, 1]]), reduction="none")
    np.testing.assert_allclose(got, [1e4], rtol=1e-6)


def test_bad_reduction_raises():
    with pytest.raises(ValueError, match="reduction"):
        losses.bce_with_logits(logits=jnp.zeros((1, 1)), labels=jnp.zeros((1, 1)), reduction="avg")


# ----------------------------------------------------------------------------- MKD


def _mkd_np(student, teacher, temperature, class_weights=None):
    p_s, p_t = _sigmoid(student / temperature), _sigmoid(teacher / temperature)
    kl = p_t * np.log(p_t / p_s) + (1 - p_t) * np.log((1 - p_t) / (1 - p_s))
    if class_weights is not None:
        kl = kl * np.asarray(class_weights)
    return temperature**2 * kl.sum(axis=1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mkd_class_weights_match_numpy(reduction):
    student = np.array([[1.5, -0.5, 2.0, 0.0], [-3.0, 0.2, 0.7, 1.0]])
    teacher = np.array([[0.5, 1.5, -2.0, 0.3], [-1.0, -0.2, 2.5, 1.0]])
    weights = [1.0, 0.0, 0.5, 2.0]
    got = losses.mkd_loss(student_logits=jnp.asarray(student, jnp.float32), teacher_logits=jnp.asarray(teacher, jnp.float32),
                          temperature=2.0, class_weights=jnp.asarray(weights), reduction=reduction)
    np.testing.assert_allclose(got, _reduce_np(_mkd_np(student, teacher, 2.0, weights), reduction), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mkd_matches_numpy(temperature, reduction):
    student = np.array([[1.5, -0.5, 2.0, 0.0], [-3.0, 0.2, 0.7, 1.0], [0.0, 0.0, -1.0, 4.0]])
    teacher = np.array([[0.5, 1.5, -2.0, 0.3], [-1.0, -0.2, 2.5, 1.0], [3.0, -3.0, 0.0, 0.0]])
    got = losses.mkd_loss(
        student_logits=jnp.asarray(student, jnp.float32),
        teacher_logits=jnp.asarray(teacher, jnp.float32),
        temperature=temperature,
        reduction=reduction,
    )
    np.testing.assert_allclose(got, _reduce_np(_mkd_np(student, teacher, temperature), reduction), rtol=1e-5, atol=1e-7)


def test_mkd_zero_when_equal_and_positive_otherwise():
    z = jnp.array([[1.0, -2.0, 0.0], [5.0, 0.3, -0.3]])
    np.testing.assert_allclose(losses.mkd_loss(student_logits=z, teacher_logits=z, reduction="none"), 0.0, atol=1e-7)
    assert losses.mkd_loss(student_logits=z, teacher_logits=z + 0.1) > 0


def test_mkd_gradient_stops_at_teacher():
    student = jnp.array([[0.3, -1.0], [2.0, 0.5]])
    teacher = jnp.array([[1.0, 1.0], [-1.0, 0.0]])
    grad_s, grad_t = jax.grad(
        lambda s, t: losses.mkd_loss(student_logits=s, teacher_logits=t, temperature=2.0), argnums=(0, 1)
    )(student, teacher)
    np.testing.assert_array_equal(grad_t, 0.0)
    # d/ds T^2 KL = T (sigmoid(s/T) - sigmoid(t/T)) per class, / B for the mean.
    expected = 2.0 * (_sigmoid(np.asarray(student) / 2) - _sigmoid(np.asarray(teacher) / 2)) / 2
    np.testing.assert_allclose(grad_s, expected, rtol=1e-5)


def test_mkd_stable_for_huge_logits():
    student = jnp.array([[1e4, -1e4, 1e4, 0.0]])
    teacher = jnp.array([[-1e4, 1e4, 1e4, -1e4]])
    value = losses.mkd_loss(student_logits=student, teacher_logits=teacher, reduction="none")
    grad = jax.grad(lambda s: losses.mkd_loss(student_logits=s, teacher_logits=teacher))(student)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    # A certain teacher costs -log(student's probability of the teacher's outcome):
    # classes 0 and 1: softplus(1e4) = 1e4 each; class 2: 0; class 3 (student at 1/2): log 2.
    np.testing.assert_allclose(value, [1e4 + 1e4 + 0.0 + np.log(2.0)], rtol=1e-6)


# ------------------------------------------------------------------ negative masks


def test_negative_mask_compares_whole_label_sets():
    anchors = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], np.uint8)
    candidates = np.array(
        [
            [1, 0, 1, 0],  # same set as anchor 0
            [1, 1, 0, 0],  # first bit agrees with anchor 0, set differs, shares class 0
            [0, 1, 0, 1],  # first bit differs, disjoint from anchor 0
            [1, 0, 1, 1],  # superset of anchor 0
            [0, 0, 0, 0],  # empty set (same as anchor 1)
        ],
        np.uint8,
    )
    differs = losses.negative_mask(anchor_labels=anchors, candidate_labels=candidates, mode="differs")
    disjoint = losses.negative_mask(anchor_labels=anchors, candidate_labels=candidates, mode="disjoint")
    assert differs.dtype == jnp.bool_ and differs.shape == (2, 5)
    np.testing.assert_array_equal(differs, [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(disjoint, [[0, 0, 1, 0, 1], [1, 1, 1, 1, 0]])
    # The authors' first-bit rule gets candidates 1 and 3 of anchor 0 wrong.
    first_bit_rule = anchors[:, None, 0] != candidates[None, :, 0]
    assert first_bit_rule[0, 1] == 0 and differs[0, 1]
    assert first_bit_rule[0, 3] == 0 and differs[0, 3]


def test_negative_mask_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        losses.negative_mask(anchor_labels=jnp.zeros((1, 2)), candidate_labels=jnp.zeros((1, 2)), mode="any")


# -------------------------------------------------------------------- in-batch CLT


def _in_batch_np(student, teacher, labels, temperature, mode):
    b = len(labels)
    sets = [tuple(row) for row in labels.astype(int)]

    def allowed(i, j):
        if sets[i] == sets[j]:
            return False
        return mode == "differs" or not np.any(labels[i].astype(bool) & labels[j].astype(bool))

    def direction(anchor, other):
        out = np.zeros(b)
        for i in range(b):
            logits = [anchor[i] @ other[i] / temperature]
            logits += [anchor[i] @ other[j] / temperature for j in range(b) if j != i and allowed(i, j)]
            logits = np.asarray(logits, np.float64)
            out[i] = -(logits[0] - np.log(np.sum(np.exp(logits))))
        return out

    return 0.5 * (direction(student, teacher) + direction(teacher, student))


@pytest.mark.parametrize("mode", ["differs", "disjoint"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_in_batch_clt_matches_numpy(mode, reduction):
    rng = np.random.default_rng(0)
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], np.uint8)
    student, teacher = _unit(rng, (6, 8)), _unit(rng, (6, 8))
    got = losses.in_batch_clt_loss(
        student_embed=jnp.asarray(student), teacher_embed=jnp.asarray(teacher), labels=jnp.asarray(labels),
        temperature=0.2, mask_mode=mode, reduction=reduction,
    )
    expected = _reduce_np(_in_batch_np(student, teacher, labels, 0.2, mode), reduction)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_in_batch_clt_rows_without_negatives_are_zero():
    rng = np.random.default_rng(1)
    labels = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.uint8)
    student, teacher = _unit(rng, (4, 5)), _unit(rng, (4, 5))
    args = dict(student_embed=jnp.asarray(student), teacher_embed=jnp.asarray(teacher), temperature=0.07)
    # All records share one label set: no negatives anywhere, finite zero loss and gradient.
    same = jnp.ones((4, 2), jnp.uint8)
    np.testing.assert_array_equal(losses.in_batch_clt_loss(**args, labels=same, reduction="none"), 0.0)
    grad = jax.grad(lambda s: losses.in_batch_clt_loss(student_embed=s, teacher_embed=args["teacher_embed"],
                                                       labels=same))(args["student_embed"])
    assert np.all(np.isfinite(grad))
    # Mixed: the last record is the only negative of the first three and vice versa.
    got = losses.in_batch_clt_loss(**args, labels=jnp.asarray(labels), reduction="none")
    np.testing.assert_allclose(got, _in_batch_np(student, teacher, labels, 0.07, "differs"), rtol=1e-5)
    assert np.all(np.asarray(got) > 0)
    grad_s, grad_t = jax.grad(
        lambda s, t: losses.in_batch_clt_loss(student_embed=s, teacher_embed=t, labels=jnp.asarray(labels)),
        argnums=(0, 1),
    )(args["student_embed"], args["teacher_embed"])
    assert np.any(np.asarray(grad_s) != 0) and np.any(np.asarray(grad_t) != 0)  # both views learn


# -------------------------------------------------------------------- memory bank


def _memory_bank_np(student, teacher, indices, negatives, has_negatives, bank, temperature, momentum):
    """Literal transcription of RepDistiller ContrastMemory.forward + 2 x ContrastLoss."""
    mem_s, mem_t = np.asarray(bank.student, np.float64), np.asarray(bank.teacher, np.float64)
    n, k = mem_s.shape[0], negatives.shape[1]
    idx = np.concatenate([indices[:, None], negatives], axis=1)
    out_student = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], student) / temperature)  # out_v1
    out_teacher = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], teacher) / temperature)  # out_v2
    z_s, z_t = float(bank.z_student), float(bank.z_teacher)
    if z_s < 0:
        z_s = out_student.mean() * n
    if z_t < 0:
        z_t = out_teacher.mean() * n

    def contrast_loss(x):  # per-example ContrastLoss (CRD averages it over the batch)
        eps, pn = 1e-7, 1.0 / n
        log_d1 = np.log(x[:, 0] / (x[:, 0] + k * pn + eps))
        log_d0 = np.log((k * pn) / (x[:, 1:] + k * pn + eps))
        return -(log_d1 + has_negatives * log_d0.sum(axis=1))

    per_example = contrast_loss(out_student / z_s) + contrast_loss(out_teacher / z_t)

    def update(memory, embed):
        rows = memory[indices] * momentum + embed * (1 - momentum)
        memory = memory.copy()
        memory[indices] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return memory

    return per_example, update(mem_s, student), update(mem_t, teacher), z_s, z_t


def _bank_problem(seed=0, n=24, c=3, d=8, b=5):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < 0.4).astype(np.uint8)
    labels[:4] = [1, 0, 0]  # make sure some records share a label set
    bank = losses.init_memory_bank(jax.random.key(seed), labels=jnp.asarray(labels), dim=d)
    indices = rng.choice(n, size=b, replace=False).astype(np.int32)
    indices[0] = 0
    return labels, bank, indices, _unit(rng, (b, d)), _unit(rng, (b, d))


def test_init_memory_bank_like_crd():
    labels = np.zeros((500, 4), np.uint8)
    bank = losses.init_memory_bank(jax.random.key(0), labels=labels, dim=12)
    stdv = 1.0 / np.sqrt(12 / 3)
    for memory in (bank.student, bank.teacher):
        assert memory.shape == (500, 12) and memory.dtype == jnp.float32
        assert float(jnp.min(memory)) >= -stdv and float(jnp.max(memory)) <= stdv
        assert abs(float(jnp.std(memory)) - stdv / np.sqrt(3)) < 0.02  # uniform(-a, a) has std a/sqrt(3)
    assert not np.allclose(bank.student, bank.teacher)
    assert bank.labels.shape == (500, 4) and float(bank.z_student) < 0 and float(bank.z_teacher) < 0
    # Distinct buffers: a donated train state may not hold one buffer twice.
    assert bank.z_student.unsafe_buffer_pointer() != bank.z_teacher.unsafe_buffer_pointer()


def test_sample_negatives_respects_disease_aware_mask():
    labels = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], np.uint8)
    anchors = labels[[0, 2]]
    negatives, has = losses.sample_negatives(
        jax.random.key(0), anchor_labels=jnp.asarray(anchors), bank_labels=jnp.asarray(labels), num_negatives=400
    )
    assert negatives.shape == (2, 400) and negatives.dtype == jnp.int32 and np.all(has)
    negatives = np.asarray(negatives)
    for row, anchor in zip(negatives, anchors):
        allowed = {j for j in range(len(labels)) if not np.array_equal(labels[j], anchor)}
        assert set(row.tolist()) == allowed  # never the same label set, every allowed record drawn
        counts = np.bincount(row, minlength=len(labels))[sorted(allowed)]
        assert counts.min() > 400 / len(allowed) / 2  # roughly uniform
    disjoint, _ = losses.sample_negatives(
        jax.random.key(1), anchor_labels=jnp.asarray(anchors), bank_labels=jnp.asarray(labels), num_negatives=200,
        mode="disjoint",
    )
    assert set(np.asarray(disjoint)[0].tolist()) == {2, 4}


def test_sample_negatives_degenerate_falls_back_to_uniform():
    labels = np.ones((7, 2), np.uint8)
    negatives, has = losses.sample_negatives(
        jax.random.key(0), anchor_labels=jnp.ones((2, 2)), bank_labels=jnp.asarray(labels), num_negatives=300
    )
    assert not np.any(has)
    assert set(np.asarray(negatives).ravel().tolist()) == set(range(7))


def test_memory_bank_clt_matches_crd_reference():
    reduction = "none"  # the shared `_reduce` is covered by the other losses' tests
    labels, bank, indices, student, teacher = _bank_problem()
    temperature, momentum, k = 0.5, 0.5, 6
    call = jax.jit(
        lambda s, t, bank, rng: losses.memory_bank_clt_loss(
            student_embed=s, teacher_embed=t, indices=jnp.asarray(indices), labels=jnp.asarray(labels[indices]),
            bank=bank, rng=rng, num_negatives=k, temperature=temperature, momentum=momentum, reduction=reduction,
        )
    )
    state = bank
    for step in range(2):  # first call sets Z, second keeps it
        rng = jax.random.key(10 + step)
        negatives, has = losses.sample_negatives(
            rng, anchor_labels=jnp.asarray(labels[indices]), bank_labels=state.labels, num_negatives=k
        )
        expected, mem_s, mem_t, z_s, z_t = _memory_bank_np(
            student, teacher, indices, np.asarray(negatives), np.asarray(has), state, temperature, momentum
        )
        loss, new_state = call(jnp.asarray(student), jnp.asarray(teacher), state, rng)
        np.testing.assert_allclose(loss, _reduce_np(expected, reduction), rtol=1e-4)
        np.testing.assert_allclose(new_state.z_student, z_s, rtol=1e-5)
        np.testing.assert_allclose(new_state.z_teacher, z_t, rtol=1e-5)
        np.testing.assert_allclose(new_state.student, mem_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_state.teacher, mem_t, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new_state.labels, state.labels)
        if step == 1:
            np.testing.assert_array_equal(new_state.z_student, state.z_student)
            np.testing.assert_array_equal(new_state.z_teacher, state.z_teacher)
        state = new_state
    untouched = np.setdiff1d(np.arange(len(labels)), indices)
    np.testing.assert_array_equal(state.student[untouched], bank.student[untouched])
    np.testing.assert_allclose(np.linalg.norm(state.teacher[indices], axis=1), 1.0, rtol=1e-5)


def test_memory_bank_clt_drops_negatives_of_degenerate_anchors():
    labels, bank, indices, student, teacher = _bank_problem(seed=3)
    bank = bank.replace(labels=jnp.ones_like(bank.labels))  # nobody can be a negative
    anchor_labels = jnp.ones((len(indices), labels.shape[1]), jnp.uint8)
    rng = jax.random.key(4)
    loss, _ = losses.memory_bank_clt_loss(
        student_embed=jnp.asarray(student), teacher_embed=jnp.asarray(teacher), indices=jnp.asarray(indices),
        labels=anchor_labels, bank=bank, rng=rng, num_negatives=5, temperature=0.5, reduction="none",
    )
    negatives, has = losses.sample_negatives(rng, anchor_labels=anchor_labels, bank_labels=bank.labels, num_negatives=5)
    assert not np.any(has)
    expected = _memory_bank_np(student, teacher, indices, np.asarray(negatives), np.zeros(len(indices)), bank, 0.5, 0.5)
    np.testing.assert_allclose(loss, expected[0], rtol=1e-4)
    assert np.all(np.isfinite(loss))


def test_memory_bank_gradients_reach_both_embeddings_not_the_bank():
    labels, bank, indices, student, teacher = _bank_problem(seed=5)

    def total(s, t, memory_student, memory_teacher):
        return losses.memory_bank_clt_loss(
            student_embed=s, teacher_embed=t, indices=jnp.asarray(indices), labels=jnp.asarray(labels[indices]),
            bank=bank.replace(student=memory_student, teacher=memory_teacher), rng=jax.random.key(0), num_negatives=4,
        )[0]

    grad_s, grad_t, grad_mem_s, grad_mem_t = jax.grad(total, argnums=(0, 1, 2, 3))(
        jnp.asarray(student), jnp.asarray(teacher), bank.student, bank.teacher
    )
    assert np.all(np.isfinite(grad_s)) and np.any(grad_s != 0)
    assert np.all(np.isfinite(grad_t)) and np.any(grad_t != 0)
    np.testing.assert_array_equal(grad_mem_s, 0.0)  # the memory is state, not a parameter
    np.testing.assert_array_equal(grad_mem_t, 0.0)


# ------------------------------------------------------------- combined gradients


def test_total_loss_gradients_flow_where_intended():
    """bce + alpha*mkd + beta*(in-batch CLT) + gamma*(memory-bank CLT): the student net
    and both projection heads learn; the teacher net's outputs get no gradient through
    MKD (stop_gradient in mkd_loss), and CLT reaches the teacher side only up to the
    teacher head, because the train step stops the teacher features
    (jax.lax.stop_gradient before the teacher head, as mvkt/train.py does). Each CLT
    variant alone also reaches both embeddings (see the memory-bank test above and
    test_in_batch_clt_rows_without_negatives_are_zero).
    """
    # Same tiny config and init call as tests/test_models.py, so eager op compilations are shared.
    net = models.create_model("resnet1d_wang", num_classes=3, width_mult=0.25)
    head = models.ProjectionHead(dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 250, 12))
    x_student = x[..., 0:1]  # lead I
    labels = jnp.array([[1, 0, 0], [0, 1, 1]], jnp.uint8)
    s_vars = net.init(jax.random.key(0), jnp.zeros((2, 250, 1)), train=False)
    # The teacher is a different net (own parameters); it sees lead II here only to reuse
    # the same compiled shapes: the losses do not care where its outputs come from.
    t_vars = net.init(jax.random.key(2), jnp.zeros((2, 250, 1)), train=False)
    teacher_logits, teacher_features = net.apply(t_vars, x[..., 1:2], train=False)
    feature_dim = teacher_features.shape[1]
    params = {
        "student": s_vars["params"],
        "student_head": head.init(jax.random.key(3), jnp.zeros((1, feature_dim)))["params"],
        "teacher_head": head.init(jax.random.key(4), jnp.zeros((1, feature_dim)))["params"],
    }
    bank = losses.init_memory_bank(jax.random.key(5), labels=jnp.tile(labels, (3, 1)), dim=8)

    def total(params, teacher_logits, teacher_features):
        (logits, features), _ = net.apply(
            {"params": params["student"], "batch_stats": s_vars["batch_stats"]}, x_student, train=True,
            rngs={"dropout": jax.random.key(6)}, mutable=["batch_stats"],
        )
        student_embed = head.apply({"params": params["student_head"]}, features)
        teacher_embed = head.apply({"params": params["teacher_head"]}, jax.lax.stop_gradient(teacher_features))
        in_batch = losses.in_batch_clt_loss(student_embed=student_embed, teacher_embed=teacher_embed, labels=labels)
        memory_bank, _ = losses.memory_bank_clt_loss(
            student_embed=student_embed, teacher_embed=teacher_embed, indices=jnp.arange(2), labels=labels,
            bank=bank, rng=jax.random.key(7), num_negatives=6,
        )
        return (
            losses.bce_with_logits(logits=logits, labels=labels)
            + 0.5 * losses.mkd_loss(student_logits=logits, teacher_logits=teacher_logits, temperature=2.0)
            + 0.1 * in_batch
            + 0.1 * memory_bank
        )

    # jit: on CPU one compilation is much cheaper than eager op-by-op differentiation.
    grads, grad_teacher_logits, grad_teacher_features = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(
        params, teacher_logits, teacher_features
    )
    for name in ("student", "student_head", "teacher_head"):
        leaves = jax.tree.leaves(grads[name])
        assert all(np.all(np.isfinite(g)) for g in leaves), name
        assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0, name
    np.testing.assert_array_equal(grad_teacher_logits, 0.0)
    np.testing.assert_array_equal(grad_teacher_features, 0.0)
