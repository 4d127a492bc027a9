"""Tests for mvkt.models: shapes for every architecture and lead count, parameter counts
against the PyTorch reference (PTB-XL benchmark), BatchNorm train/eval behaviour,
dropout, determinism, dtype policy and the projection head.

Forward passes use tiny widths (width_mult=0.25) and short inputs (T=250) to stay fast on
CPU; full-size parameter counts use `jax.eval_shape`, which traces without computing.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvkt import cpu_conv, models

NUM_CLASSES = 5
TINY = 0.25
T_SHORT = 250


def _param_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_params(arch: str, leads: int, num_classes: int = NUM_CLASSES):
    model = models.create_model(arch, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((2, 1000, leads), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))["params"]


# ----------------------------------------------------------- PyTorch reference counts
# Hand transcription of the trainable-parameter counts of helme/ecg_ptbxl_benchmarking
# code/models/{xresnet1d,resnet1d,inception1d,basic_conv1d}.py as built by fastai_model
# (kernel_size=5, lin_ftrs_head=[128], ps_head=0.5). Convs there have no bias; BatchNorm1d
# has 2*C trainable parameters (running stats are buffers); Linear has a bias.


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k


def _bn(c: int) -> int:
    return 2 * c


def _linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def _head(nf: int, nc: int) -> int:
    # create_head1d(nf, nc, lin_ftrs=[128]): concat pool -> bn_drop_lin(2nf, 128) -> bn_drop_lin(128, nc)
    return _bn(2 * nf) + _linear(2 * nf, 128) + _bn(128) + _linear(128, nc)


def _torch_xresnet1d(expansion: int, layers: list[int], cin: int, nc: int, k: int = 5) -> int:
    n = _conv(cin, 32, k) + _bn(32) + _conv(32, 32, k) + _bn(32) + _conv(32, 64, k) + _bn(64)
    block_szs = [64 // expansion, 64, 64, 64, 64]
    for i, num_blocks in enumerate(layers):
        for b in range(num_blocks):
            ni, nf = (block_szs[i] if b == 0 else block_szs[i + 1]), block_szs[i + 1]
            ni_e, nf_e = ni * expansion, nf * expansion  # ResBlock: nh1 = nh2 = nf
            if expansion == 1:
                n += _conv(ni_e, nf, k) + _bn(nf) + _conv(nf, nf_e, k) + _bn(nf_e)
            else:
                n += _conv(ni_e, nf, 1) + _bn(nf) + _conv(nf, nf, k) + _bn(nf) + _conv(nf, nf_e, 1) + _bn(nf_e)
            if ni_e != nf_e:  # idpath ConvLayer(ni, nf, 1, act_cls=None)
                n += _conv(ni_e, nf_e, 1) + _bn(nf_e)
    return n + _head(block_szs[-1] * expansion, nc)


def _torch_resnet1d_wang(cin: int, nc: int) -> int:
    n = _conv(cin, 128, 7) + _bn(128)
    for stride in (1, 2, 2):  # BasicBlock1d(128, 128, kernel_size=[5, 3])
        n += _conv(128, 128, 5) + _bn(128) + _conv(128, 128, 3) + _bn(128)
        if stride != 1:
            n += _conv(128, 128, 1) + _bn(128)
    return n + _head(128, nc)


def _torch_fcn_wang(cin: int, nc: int) -> int:
    # basic_conv1d(filters=[128, 256, 128], kernel_size=[8, 5, 3]): bias-free convs with BN
    return (_conv(cin, 128, 8) + _bn(128) + _conv(128, 256, 5) + _bn(256) + _conv(256, 128, 3) + _bn(128)
            + _head(128, nc))


def _torch_inception1d(cin: int, nc: int) -> int:
    n = 0
    for d in range(6):  # InceptionBlock1d(ni, 32, [39, 19, 9], bottleneck_size=32)
        ni = cin if d == 0 else 128
        n += _conv(ni, 32, 1) + sum(_conv(32, 32, k) for k in (39, 19, 9)) + _conv(ni, 32, 1) + _bn(128)
    for d in range(2):  # Shortcut1d(ni, 128)
        n += _conv(cin if d == 0 else 128, 128, 1) + _bn(128)
    return n + _head(128, nc)


TORCH_REFERENCE = {
    "xresnet1d18": lambda cin, nc: _torch_xresnet1d(1, [2, 2, 2, 2], cin, nc),
    "xresnet1d34": lambda cin, nc: _torch_xresnet1d(1, [3, 4, 6, 3], cin, nc),
    "xresnet1d50": lambda cin, nc: _torch_xresnet1d(4, [3, 4, 6, 3], cin, nc),
    "xresnet1d101": lambda cin, nc: _torch_xresnet1d(4, [3, 4, 23, 3], cin, nc),
    "resnet1d_wang": _torch_resnet1d_wang,
    "fcn_wang": _torch_fcn_wang,
    "inception1d": _torch_inception1d,
}


def test_reference_counts_spelled_out():
    # resnet1d_wang, 12 leads -> 5 classes, by hand:
    # stem 12*128*7 + 256 = 10_752 + 256; block1 128*128*(5+3) + 2*256 = 131_584;
    # blocks 2, 3 add the 1x1 downsample: 131_584 + 16_384 + 256 = 148_224 each;
    # head 512 + (256*128 + 128) + 256 + (128*5 + 5) = 34_309.
    assert _torch_resnet1d_wang(12, 5) == 10_752 + 256 + 131_584 + 2 * 148_224 + 34_309 == 473_349
    assert _torch_xresnet1d(4, [3, 4, 6, 3], 12, 5) == 953_989


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_param_count_matches_pytorch_reference(arch):
    # Same architecture, so the counts must agree exactly (tolerance 0), for the
    # 12-lead teacher and the 1-lead student.
    for leads in (12, 1):
        assert _param_count(_abstract_params(arch, leads)) == TORCH_REFERENCE[arch](leads, NUM_CLASSES)


def test_full_size_feature_dims():
    expected = {"xresnet1d18": 128, "xresnet1d34": 128, "xresnet1d50": 512, "xresnet1d101": 512,
                "resnet1d_wang": 256, "fcn_wang": 256, "inception1d": 256}
    for arch, dim in expected.items():
        assert models.feature_dim(arch) == dim
    model = models.create_model("xresnet1d101", num_classes=NUM_CLASSES)
    x = jnp.zeros((3, 1000, 12))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    logits, features = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.shape == (3, NUM_CLASSES) and features.shape == (3, 512)


# ------------------------------------------------------------------------- forwards


@pytest.fixture(scope="module")
def tiny_variables():
    """Initialised tiny models, cached per (arch, leads) for the module.

    Eager (not jitted): on CPU, compiling whole nets costs far more than running them.
    """
    cache = {}

    def get(arch: str, leads: int):
        if (arch, leads) not in cache:
            model = models.create_model(arch, num_classes=NUM_CLASSES, width_mult=TINY)
            cache[arch, leads] = model, model.init(jax.random.key(0), jnp.zeros((2, T_SHORT, leads)), train=False)
        return cache[arch, leads]

    return get


@pytest.mark.parametrize("leads", [1, 12])
@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_output_shapes_every_arch(arch, leads):
    # Shapes via eval_shape (traces init + apply, computes nothing) so that every
    # architecture, the deep ones included, is checked quickly; numerics are run below.
    model = models.create_model(arch, num_classes=NUM_CLASSES, width_mult=TINY)
    x = jnp.zeros((3, T_SHORT, leads))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    logits, features = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == jnp.float32
    assert features.shape == (3, models.feature_dim(arch, width_mult=TINY)) and features.dtype == jnp.float32
    (logits_t, features_t), updates = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]),
        variables,
    )
    assert logits_t.shape == logits.shape and features_t.shape == features.shape
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
    # The number of leads is inferred at init: some conv kernel (k, L, out) reads L channels.
    assert any(leaf.ndim == 3 and leaf.shape[1] == leads for leaf in jax.tree.leaves(variables["params"]))


# Numerics for the cheap nets (the 12-lead xresnet1d18 runs in test_deterministic_given_params).
@pytest.mark.parametrize(("arch", "leads"), [("xresnet1d18", 1), ("resnet1d_wang", 1), ("fcn_wang", 1), ("inception1d", 1)])
def test_forward_is_finite(arch, leads, tiny_variables):
    model, variables = tiny_variables(arch, leads)
    x = jax.random.normal(jax.random.key(1), (2, T_SHORT, leads))  # batch 2 everywhere: shared op compilations
    logits, features = model.apply(variables, x, train=False)
    assert logits.shape == (2, NUM_CLASSES) and features.shape == (2, models.feature_dim(arch, width_mult=TINY))
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(features))
    assert np.std(np.asarray(logits)) > 0


@pytest.mark.parametrize("arch", ["xresnet1d18", "xresnet1d50", "resnet1d_wang"])
def test_odd_length_input(arch):
    # The shortcut (AvgPool(2, ceil_mode=True) / strided 1x1 conv) must have the same
    # length as the strided conv path, ceil(T / 2), for odd T as in PyTorch.
    model = models.create_model(arch, num_classes=NUM_CLASSES, width_mult=TINY)
    x = jnp.zeros((2, 251, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    logits, _ = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.shape == (2, NUM_CLASSES)


def test_avg_pool_ceil_mode_matches_torch():
    x = jnp.arange(5.0).reshape(1, 5, 1)  # AvgPool1d(2, ceil_mode=True) -> [0.5, 2.5, 4.0]
    np.testing.assert_allclose(models._avg_pool_ceil(x)[0, :, 0], [0.5, 2.5, 4.0])


def test_concat_pool_is_max_then_mean():
    x = jnp.array([[[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]]])  # (B=1, T=3, C=2)
    np.testing.assert_allclose(models.concat_pool(x), [[3.0, 5.0, 1.0, 1.0]])


def test_batchnorm_train_vs_eval(tiny_variables):
    model, variables = tiny_variables("resnet1d_wang", 1)
    x = jax.random.normal(jax.random.key(3), (2, T_SHORT, 1)) * 3.0 + 1.0
    other = x.at[1:].set(jax.random.normal(jax.random.key(4), (1, T_SHORT, 1)))

    def train_apply(inputs, dropout_key=jax.random.key(5)):
        return model.apply(variables, inputs, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])

    (logits_a, features_a), updates = train_apply(x)
    (_, features_b), _ = train_apply(other)
    # Train mode normalises with batch statistics: example 0's features depend on the rest.
    assert not np.allclose(features_a[0], features_b[0], atol=1e-5)
    # ... and the running statistics move towards the batch statistics (momentum 0.9).
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) and all(o.shape == n.shape for o, n in zip(old, new))
    assert any(not np.allclose(o, n) for o, n in zip(old, new))
    stem_mean = updates["batch_stats"]["BatchNorm_0"]["mean"]
    assert np.all(np.isfinite(stem_mean)) and np.any(stem_mean != 0)

    # Eval mode uses the running averages: per-example outputs ignore the batch.
    eval_a = model.apply(variables, x, train=False)[1]
    eval_b = model.apply(variables, other, train=False)[1]
    np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-5)
    # Eval mode does not need a dropout rng and is not mutable.
    assert logits_a.shape == (2, NUM_CLASSES)


def test_dropout_only_in_train_mode(tiny_variables):
    model, variables = tiny_variables("xresnet1d18", 1)
    x = jax.random.normal(jax.random.key(6), (2, T_SHORT, 1))
    apply_train = lambda key: model.apply(  # noqa: E731
        variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )[0]
    (logits_1, features_1), (logits_2, features_2) = apply_train(jax.random.key(7)), apply_train(jax.random.key(8))
    np.testing.assert_allclose(features_1, features_2, rtol=1e-6)  # dropout lives in the head only
    assert not np.allclose(logits_1, logits_2)
    (logits_1b, _) = apply_train(jax.random.key(7))
    np.testing.assert_array_equal(logits_1, logits_1b)


def test_deterministic_given_params(tiny_variables):
    model, variables = tiny_variables("xresnet1d18", 12)
    x = jax.random.normal(jax.random.key(9), (2, T_SHORT, 12))
    first = model.apply(variables, x, train=False)
    second = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert np.all(np.isfinite(first[0])) and np.all(np.isfinite(first[1]))
    # Same init key -> same parameters.
    again = model.init(jax.random.key(0), jnp.zeros((2, T_SHORT, 12)), train=False)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny_variables):
    model = models.create_model("resnet1d_wang", num_classes=NUM_CLASSES, width_mult=TINY, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(10), (2, T_SHORT, 1))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    reference, variables = tiny_variables("resnet1d_wang", 1)  # same parameter tree
    logits, features = model.apply(variables, x, train=False)
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    logits_f32, _ = reference.apply(variables, x, train=False)
    np.testing.assert_allclose(logits, logits_f32, rtol=0.1, atol=0.1)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="unknown architecture"):
        models.create_model("resnet9000", num_classes=2)


def test_projection_head_unit_norm_and_zero_safe():
    head = models.ProjectionHead(dim=16)
    features = jax.random.normal(jax.random.key(11), (5, 40))
    params = head.init(jax.random.key(0), features)
    embed = head.apply(params, features)
    assert embed.shape == (5, 16) and embed.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(embed, axis=1), 1.0, rtol=1e-5)
    zeros = head.apply(params, jnp.zeros((2, 40)))  # Dense bias starts at 0 -> a zero vector
    assert np.all(np.isfinite(zeros))
    grads = jax.grad(lambda p: jnp.sum(head.apply(p, features)[:, 0]))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def _assert_same_value_and_gradients(ours, xla, x, w):
    """``ours(x, w)`` and ``xla(x, w)`` agree in value and in both gradients (dtype, shape and
    numbers; bfloat16 to its precision)."""
    (value, grads), (ref_value, ref_grads) = (jax.value_and_grad(f, argnums=(0, 1))(x, w) for f in (ours, xla))
    tol = 1e-5 if x.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(value, ref_value, rtol=tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(r.astype(jnp.float32)))))


def _train_loss(model, x):
    """(loss of the params, initial params): mean squared logits of a train-mode pass over ``x``."""
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def loss(params):
        (logits, _), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jnp.square(logits))

    return loss, variables["params"]


def _assert_net_matches_xlas_convolutions(monkeypatch, loss, params, uses_ours):
    """The net's loss and gradients equal those with every convolution XLA's own; ``uses_ours``
    (a predicate on the gradient's jaxpr) holds for mvkt's and not for the reference."""
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert uses_ours(jax.make_jaxpr(jax.grad(loss))(params))
    monkeypatch.setenv(cpu_conv.ENV_SWITCH, "0")  # the public switch: XLA's own convolutions
    assert not uses_ours(jax.make_jaxpr(jax.grad(loss))(params))  # really the reference
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(r))) + 1e-7)


@pytest.mark.parametrize("stride,length", [(1, 250), (2, 250), (2, 63)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pointwise_convolution_has_xlas_outputs_and_gradients(stride, length, dtype):
    """Kernel-1 convolutions compute their gradients as matmuls (a custom VJP, for speed on
    XLA:CPU in float32; strided and bfloat16 ones are XLA's): same forward, input and weight
    gradients as lax.conv_general_dilated."""
    rng = np.random.default_rng(stride + length)
    x = jnp.asarray(rng.standard_normal((4, length, 8)), dtype)
    w = jnp.asarray(rng.standard_normal((1, 8, 6)) * 0.3, dtype)
    dn = ("NWC", "WIO", "NWC")

    def loss(conv):
        return lambda x_, w_: jnp.sum(jnp.tanh(conv(x_, w_, (stride,), ((0, 0),), dimension_numbers=dn)
                                               .astype(jnp.float32)))

    ours, xla = loss(cpu_conv.conv_general_dilated), loss(jax.lax.conv_general_dilated)
    matmuls = "dot_general" in str(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, w))
    assert matmuls == (stride == 1 and dtype == jnp.float32)  # XLA's for strided and bfloat16 convolutions
    _assert_same_value_and_gradients(ours, xla, x, w)


def test_the_nets_convolution_rejects_what_it_does_not_implement():
    x, dn = jnp.ones((2, 20, 8)), ("NWC", "WIO", "NWC")
    with pytest.raises(ValueError, match="kernel 1 without padding"):
        cpu_conv.conv_general_dilated(x, jnp.ones((1, 8, 6)), (1,), ((1, 1),), dimension_numbers=dn)
    with pytest.raises(ValueError, match="without dilation or groups"):
        cpu_conv.conv_general_dilated(x, jnp.ones((3, 8, 6)), (1,), ((1, 1),), rhs_dilation=(2,), dimension_numbers=dn)
    with pytest.raises(ValueError, match="without dilation or groups"):
        cpu_conv.conv_general_dilated(x, jnp.ones((3, 4, 6)), (1,), ((1, 1),), feature_group_count=2,
                                     dimension_numbers=dn)


def test_every_convolution_of_the_nets_goes_through_one_dispatcher():
    for kernel, stride in ((1, 1), (1, 2), (3, 1), (5, 2)):
        assert models._conv(4, kernel, stride=stride, dtype=jnp.float32).conv_general_dilated \
            is cpu_conv.conv_general_dilated


def _relus_recomputed_in_transposes(model, x) -> list[str]:
    """The fused computations of a compiled train-mode gradient that transpose a tensor and
    compute a ReLU (max): XLA recomputing a BatchNorm + ReLU output inside the transposed
    copy it makes for a weight-gradient convolution."""
    loss, params = _train_loss(model, x)
    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    computations = re.findall(r"\n(%[\w.\-]+ [^\n]*\{\n.*?\n\})", text, flags=re.S)
    return [c.split()[0] for c in computations if " transpose(" in c and " maximum(" in c]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the materialised inputs are an XLA:CPU measure")
def test_weight_gradient_transposes_read_stored_activations(monkeypatch):
    """With the inputs materialised (cpu_conv.materialized), no transposed copy for a weight
    gradient recomputes a BatchNorm + ReLU; without, XLA:CPU fuses them into it (which the
    check must see, or it checks nothing). If a jaxlib upgrade changes XLA's fusion, this test
    says so, and docs/BENCHMARKS.md's train-step rows need retaking."""
    model = models.create_model("resnet1d_wang", num_classes=5, width_mult=0.25)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 100, 12)), jnp.float32)
    assert _relus_recomputed_in_transposes(model, x) == []
    monkeypatch.setattr(cpu_conv, "materialized", lambda v: v)
    assert len(_relus_recomputed_in_transposes(model, x)) >= 4


def test_materialized_is_the_identity_with_the_identitys_gradient():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 7, 5)), jnp.float32)
    x = x.at[0, 1, 2].set(-0.0)
    np.testing.assert_array_equal(cpu_conv.materialized(x), x)
    out, vjp = jax.vjp(cpu_conv.materialized, x)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(vjp(x * 3)[0], x * 3)
    assert "div" not in str(jax.make_jaxpr(cpu_conv.materialized)(x))  # inference and export: no op at all


def _dilated_input_gradient(jaxpr) -> bool:
    """Whether a gradient's jaxpr holds XLA's input gradient of a strided convolution with a
    kernel above 1: a convolution over the output gradient dilated with zeros (lhs_dilation
    above 1). Strided kernel-1 convolutions keep XLA's gradient, so they are not counted."""
    def window(eqn):
        return eqn.invars[1].aval.shape[eqn.params["dimension_numbers"].rhs_spec[2]]

    return any(eqn.primitive.name == "conv_general_dilated" and max(eqn.params["lhs_dilation"]) > 1
               and window(eqn) > 1 for eqn in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize("length,kernel,stride", [(250, 5, 2), (125, 5, 2), (125, 3, 2), (64, 7, 3), (9, 5, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strided_convolution_has_xlas_outputs_and_gradients(length, kernel, stride, dtype):
    """Strided convolutions take their input gradient as one stride-1 convolution over the
    output gradient (polyphase; float32 on CPU): same forward, input and weight gradients as
    lax.conv_general_dilated, for even and odd lengths and a stride that does not divide the
    kernel. bfloat16 keeps XLA's gradient."""
    rng = np.random.default_rng(length + kernel)
    x = jnp.asarray(rng.standard_normal((4, length, 8)), dtype)
    w = jnp.asarray(rng.standard_normal((kernel, 8, 6)) * 0.3, dtype)
    dn, pad = ("NWC", "WIO", "NWC"), ((kernel - 1) // 2,) * 2

    def loss(conv):
        return lambda x_, w_: jnp.sum(jnp.tanh(conv(x_, w_, (stride,), (pad,), dimension_numbers=dn)
                                               .astype(jnp.float32)))

    ours, xla = loss(cpu_conv.conv_general_dilated), loss(jax.lax.conv_general_dilated)
    assert _dilated_input_gradient(jax.make_jaxpr(jax.grad(xla))(x, w))  # what XLA's gradient would be
    assert _dilated_input_gradient(jax.make_jaxpr(jax.grad(ours))(x, w)) == (dtype == jnp.bfloat16)
    _assert_same_value_and_gradients(ours, xla, x, w)


def test_resnet1d_wangs_gradients_equal_those_with_xlas_convolutions(monkeypatch):
    """resnet1d_wang (two kernel-5 stride-2 convolutions, materialised inputs): the whole net's
    loss and gradients are those of the same net on XLA's convolutions."""
    model = models.create_model("resnet1d_wang", num_classes=5, width_mult=0.25)
    # 16 records: with 4, BatchNorm over so few makes this net's gradient sensitive to float32
    # rounding alone (XLA's jitted and op-by-op gradients differ by up to 100%).
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 100, 12)), jnp.float32)
    loss, params = _train_loss(model, x)
    _assert_net_matches_xlas_convolutions(monkeypatch, loss, params,
                                          lambda jaxpr: not _dilated_input_gradient(jaxpr))


def test_a_bottleneck_nets_gradients_equal_those_with_xlas_convolutions(monkeypatch):
    """A bottleneck XResNet1d (expansion 4 as in xresnet1d50/101, one block per stage instead
    of 3-4-6-3: pointwise convolutions in every block, three strided stages, a quarter of the
    compilation): the whole net's loss and gradients are those of the same net on XLA's
    convolutions."""
    model = models.XResNet1d(4, (1, 1, 1, 1), num_classes=5, width_mult=0.25)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 100, 12)), jnp.float32)
    loss, params = _train_loss(model, x)
    _assert_net_matches_xlas_convolutions(monkeypatch, loss, params, lambda jaxpr: "custom_vjp" in str(jaxpr))
