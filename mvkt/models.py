"""Flax Linen ECG classifiers (teacher and student) and the CLT projection head.

This module owns the networks of MVKT-ECG: the 12-lead teacher and the single-lead
(or lead-subset) student are built by the same factory, `create_model`; only the
number of input leads differs, and Flax infers it from the input at `init`.

The architectures follow the PTB-XL benchmark of Strodthoff et al. (2020),
repository helme/ecg_ptbxl_benchmarking, `code/models/`:

* `xresnet1d18/34/50/101`: `xresnet1d.py` (fastai XResNet, 1-d): stem 32-32-64 with
  kernel 5, block widths 64 in all four stages, bottleneck expansion 4 for 50/101,
  shortcut = AvgPool(2, ceil_mode) then 1x1 conv+BN when the width changes.
* `resnet1d_wang`: `resnet1d.py` (Wang et al. 2017 ResNet as configured there): stem
  conv 7, 128 filters everywhere, three BasicBlocks with kernels (5, 3), strides 1-2-2.
* `inception1d`: `inception1d.py` (InceptionTime): depth 6, kernels 39/19/9,
  bottleneck 32, 32 filters per branch, residual shortcut every 3 blocks.

All heads are the benchmark's `create_head1d(nf, nc, lin_ftrs=[128], ps=0.5)`
(the `fastai_model` default): AdaptiveConcatPool1d (max, avg) -> BN -> Dropout(0.25)
-> Linear(2nf, 128) -> ReLU -> BN -> Dropout(0.5) -> Linear(128, nc).

Initialisation follows what the benchmark actually trains with: `fastai_model.fit`
re-initialises every model with `weight_init` (Kaiming-normal conv/linear weights,
zero biases, BN scale 1 and bias 0), which overrides fastai's zero-initialised
residual BN; we do the same.

Layout: inputs are channels-last `(B, T, L)`. Convolutions use PyTorch's symmetric
padding `(k - 1) // 2` (not "SAME", which pads asymmetrically for stride 2), so the
time alignment matches the reference.

Precision: `dtype` is the compute dtype (e.g. bfloat16 on accelerators); parameters
are always float32, pooling is reduced in float32 and logits/features are returned
as float32.

BatchNorm has no `axis_name`: under `jax.jit` with a globally sharded batch the
batch statistics are already global (see docs/DESIGN.md).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torch.nn.init.kaiming_normal_ (fan_in, gain sqrt(2), untruncated normal), which the
# benchmark's `weight_init` applies to every Conv1d and Linear.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# PyTorch BatchNorm1d defaults: momentum 0.1 (Flax counts the complement), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

HEAD_HIDDEN = 128  # fastai_model default lin_ftrs_head=[128]
HEAD_DROPOUT = 0.5  # fastai_model default ps_head; the hidden layer gets half of it


def scaled_width(channels: int, width_mult: float) -> int:
    """Channel count scaled by `width_mult` (at least one channel)."""
    return max(1, int(round(channels * width_mult)))


def _cpu_float32(x: jax.Array) -> bool:
    """Where the custom convolution gradients below were measured faster: float32 on XLA:CPU."""
    return x.dtype == jnp.float32 and jax.default_backend() == "cpu"


_NWC = ("NWC", "WIO", "NWC")


def _xla_conv(x: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (stride,), (padding,), dimension_numbers=_NWC)


_ROWS = (((0,), (0,)), ((), ()))  # dot_general: contract the rows of two (rows, channels) matrices


@jax.custom_vjp
def _pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
    """Kernel-1 convolution of ``x`` (B, T, C) by ``w`` (1, C, F), stride 1: XLA's own."""
    return _xla_conv(x, w, 1, (0, 0))


def _pointwise_fwd(x, w):
    return _pointwise(x, w), (x, w)


def _pointwise_bwd(residuals, dy):
    # XLA:CPU turns a weight-gradient convolution into a convolution over [channels, time,
    # batch] copies of both operands; for kernel 1 the weight gradient is the matmul
    # x_rows^T @ dy_rows, which reads them where they are (docs/BENCHMARKS.md: xresnet1d50's
    # train step 27% faster on CPU). Same float32 sums in another order.
    x, w = residuals
    rows = x.shape[0] * x.shape[1]
    dw = jax.lax.dot_general(x.reshape(rows, x.shape[2]), dy.reshape(rows, dy.shape[2]), _ROWS,
                             preferred_element_type=jnp.float32)
    dx = jax.lax.dot_general(dy, w[0], (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw[None].astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided(x: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
    """Strided convolution of ``x`` (B, T, C) by ``w`` (k, C, F): XLA's own forward."""
    return _xla_conv(x, w, stride, padding)


def _strided_fwd(x, w, stride, padding):
    return _xla_conv(x, w, stride, padding), (x, w)


def _strided_input_gradient(dy: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int],
                            length: int) -> jax.Array:
    """Input gradient of a stride-s convolution as one stride-1 convolution (polyphase).

    XLA:CPU computes it as a convolution over dy dilated with s - 1 zeros, which ran at a
    third of the speed of the other convolutions (docs/BENCHMARKS.md). Padded-input sample
    s*u + p receives sum_m w[s*m + p] dy[u - m]: for each phase p that is a stride-1
    convolution of dy by the taps p, p + s, ...; stacking the s phases as s*C output
    channels makes it one convolution, whose output reshapes (row-major, free) to
    consecutive samples. Taps past k are zero, so it does ceil(k/s)*s/k times the
    multiply-adds (6/5 for kernel 5, stride 2); the sums are the same, in another order.
    """
    k, channels, features = w.shape
    s, (lo, _) = stride, padding
    taps = -(-k // s)  # ceil(k / s)
    w = jnp.pad(w, ((0, taps * s - k), (0, 0), (0, 0))).reshape(taps, s, channels, features)
    w = jnp.transpose(w[::-1], (0, 3, 1, 2)).reshape(taps, features, s * channels)
    phases = _xla_conv(dy, w, 1, (taps - 1, taps - 1))  # (B, To + taps - 1, s * C)
    dx = phases.reshape(dy.shape[0], -1, channels)[:, lo:lo + length]
    return jnp.pad(dx, ((0, 0), (0, length - dx.shape[1]), (0, 0)))  # samples no output reads: zero


def _strided_bwd(stride, padding, residuals, dy):
    x, w = residuals
    _, weight_vjp = jax.vjp(lambda w_: _xla_conv(x, w_, stride, padding), w)
    (dw,) = weight_vjp(dy)
    return _strided_input_gradient(dy, w, stride, padding, x.shape[1]).astype(x.dtype), dw


_strided.defvjp(_strided_fwd, _strided_bwd)


@jax.custom_jvp
def _materialized(x: jax.Array) -> jax.Array:
    """``x`` itself; where it is differentiated, stored once by XLA:CPU (see the JVP below)."""
    return x


@_materialized.defjvp
def _materialized_jvp(primals, tangents):
    # A convolution's weight gradient on XLA:CPU reads its input through a transposed copy,
    # and XLA fuses the elementwise ops that produce the input (BatchNorm, ReLU, the residual
    # add) into that copy, recomputing them with strided reads at several times the cost of a
    # plain transpose (docs/BENCHMARKS.md). lax.optimization_barrier does not stop it: XLA:CPU
    # expands barriers before fusion. Its fusion does not duplicate a divide into a second
    # consumer, so dividing by a 1.0 it cannot fold ends the producer: the convolution and the
    # transpose read one stored input. x / 1.0 is exact. The 1.0 comes from x, so convolutions
    # that share an input share the copy; the tangent's divide keeps XLA from rewriting x / one
    # as x * (1 / one). Only the differentiated program has it: inference and export trace the
    # primal, the identity. tests/test_models.py checks that no transpose recomputes a ReLU.
    # (A NaN or inf at x[0, 0, 0] makes all of x NaN, as the next BatchNorm would anyway.)
    (x,), (t,) = primals, tangents
    one = jax.lax.stop_gradient(x[(0,) * x.ndim] * 0 + 1)
    return x / one, t / one


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``nn.Conv``'s convolution for the nets' 1-d convolutions (channels-last, one group, no
    dilation). In float32 on XLA:CPU, where each was measured faster (docs/BENCHMARKS.md):

    * kernel 1, stride 1: ``_pointwise`` (gradients as matmuls, which read the input in place);
    * every other: the input ``_materialized``, and for kernels above 1 with a stride,
      ``_strided`` (input gradient as one stride-1 convolution).

    Elsewhere XLA's own: bfloat16, where the pointwise gradient measured slower on CPU, and
    GPUs, which were not measured with these.
    """
    if (feature_group_count != 1 or len(window_strides) != 1
            or any(d not in (None, 1, (1,)) for d in (lhs_dilation, rhs_dilation))):
        raise ValueError("the nets' convolution takes a 1-d window without dilation or groups")
    stride, kernel = int(window_strides[0]), rhs.shape[0]
    if not _cpu_float32(lhs):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    if kernel == 1 and stride == 1:
        if tuple(map(tuple, padding)) != ((0, 0),):
            raise ValueError("the pointwise convolution takes kernel 1 without padding")
        return _pointwise(lhs, rhs)
    lhs = _materialized(lhs)
    if kernel > 1 and stride > 1:
        return _strided(lhs, rhs, stride, tuple(int(p) for p in padding[0]))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)


def _conv(
    features: int, kernel_size: int, *, stride: int = 1, dtype: Dtype, name: str | None = None
) -> nn.Conv:
    """Bias-free 1-d convolution with PyTorch's symmetric padding (k - 1) // 2."""
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        features,
        kernel_size=(kernel_size,),
        strides=(stride,),
        padding=((pad, pad),),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kaiming_normal,
        name=name,
        conv_general_dilated=_conv_general_dilated,
    )


def _batch_norm(train: bool, *, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _avg_pool_ceil(x: jax.Array) -> jax.Array:
    """AvgPool1d(2, ceil_mode=True): an odd trailing sample is averaged on its own."""
    tail = x.shape[1] % 2  # static shape, not a traced value
    return nn.avg_pool(x, (2,), strides=(2,), padding=((0, tail),), count_include_pad=False)


def concat_pool(x: jax.Array) -> jax.Array:
    """AdaptiveConcatPool1d: concat(max over time, mean over time), in float32."""
    x = x.astype(jnp.float32)
    return jnp.concatenate([jnp.max(x, axis=1), jnp.mean(x, axis=1)], axis=-1)


class ClassifierHead(nn.Module):
    """create_head1d(nf, nc, lin_ftrs=[128], ps=0.5) after the concat pooling."""

    num_classes: int
    hidden: int = HEAD_HIDDEN
    dropout: float = HEAD_DROPOUT
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array, *, train: bool) -> jax.Array:
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=kaiming_normal, name=name
        )
        x = pooled.astype(self.dtype)
        x = _batch_norm(train, dtype=self.dtype, name="bn_in")(x)
        x = nn.Dropout(self.dropout / 2, deterministic=not train)(x)
        x = nn.relu(dense(self.hidden, "hidden")(x))
        x = _batch_norm(train, dtype=self.dtype, name="bn_hidden")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, "logits")(x).astype(jnp.float32)


# --------------------------------------------------------------------------- XResNet1d


class XResBlock(nn.Module):
    """fastai ResBlock (1-d): conv path + (AvgPool -> 1x1 conv+BN) identity path, ReLU."""

    expansion: int
    hidden: int
    out_features: int
    stride: int
    kernel_size: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = self.dtype
        k = self.kernel_size
        if self.expansion == 1:
            y = _conv(self.hidden, k, stride=self.stride, dtype=d)(x)
            y = nn.relu(_batch_norm(train, dtype=d)(y))
            y = _conv(self.out_features, k, dtype=d)(y)
            y = _batch_norm(train, dtype=d)(y)
        else:
            y = _conv(self.hidden, 1, dtype=d)(x)
            y = nn.relu(_batch_norm(train, dtype=d)(y))
            y = _conv(self.hidden, k, stride=self.stride, dtype=d)(y)
            y = nn.relu(_batch_norm(train, dtype=d)(y))
            y = _conv(self.out_features, 1, dtype=d)(y)
            y = _batch_norm(train, dtype=d)(y)

        identity = x
        if self.stride != 1:  # pool_first=True in the reference
            identity = _avg_pool_ceil(identity)
        if x.shape[-1] != self.out_features:
            identity = _conv(self.out_features, 1, dtype=d, name="id_conv")(identity)
            identity = _batch_norm(train, dtype=d, name="id_bn")(identity)
        return nn.relu(y + identity)


class XResNet1d(nn.Module):
    """XResNet1d of the PTB-XL benchmark (helme/ecg_ptbxl_benchmarking, xresnet1d.py)."""

    expansion: int
    layers: Sequence[int]
    num_classes: int
    width_mult: float = 1.0
    kernel_size: int = 5
    stem_widths: Sequence[int] = (32, 32, 64)
    block_width: int = 64  # block_szs = [64, 64, 64, 64] in the reference
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        d = self.dtype
        x = x.astype(d)
        for i, width in enumerate(self.stem_widths):
            x = _conv(scaled_width(width, self.width_mult), self.kernel_size, stride=2 if i == 0 else 1, dtype=d)(x)
            x = nn.relu(_batch_norm(train, dtype=d)(x))
        x = nn.max_pool(x, (3,), strides=(2,), padding=((1, 1),))

        hidden = scaled_width(self.block_width, self.width_mult)
        out_features = hidden * self.expansion
        for stage, num_blocks in enumerate(self.layers):
            for b in range(num_blocks):
                x = XResBlock(
                    expansion=self.expansion,
                    hidden=hidden,
                    out_features=out_features,
                    stride=2 if (stage > 0 and b == 0) else 1,
                    kernel_size=self.kernel_size,
                    dtype=d,
                    name=f"stage{stage}_block{b}",
                )(x, train=train)

        features = concat_pool(x)
        logits = ClassifierHead(self.num_classes, hidden=scaled_width(HEAD_HIDDEN, self.width_mult), dtype=d, name="head")(
            features, train=train
        )
        return logits, features


# --------------------------------------------------------------------- resnet1d_wang


class BasicBlock1d(nn.Module):
    """torchvision-style BasicBlock (1-d) with kernels (k1, k2) and a 1x1 conv+BN downsample."""

    features: int
    stride: int
    kernel_sizes: tuple[int, int]
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = self.dtype
        y = _conv(self.features, self.kernel_sizes[0], stride=self.stride, dtype=d)(x)
        y = nn.relu(_batch_norm(train, dtype=d)(y))
        y = _conv(self.features, self.kernel_sizes[1], dtype=d)(y)
        y = _batch_norm(train, dtype=d)(y)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = _conv(self.features, 1, stride=self.stride, dtype=d, name="downsample_conv")(x)
            residual = _batch_norm(train, dtype=d, name="downsample_bn")(residual)
        return nn.relu(y + residual)


class ResNet1dWang(nn.Module):
    """resnet1d_wang of the PTB-XL benchmark (helme/ecg_ptbxl_benchmarking, resnet1d.py).

    Stem conv 7 (stride 1, no pooling), 128 filters, BasicBlocks [1, 1, 1] with kernels
    (5, 3) and strides 1, 2, 2 (fix_feature_dim=True keeps 128 filters).
    """

    num_classes: int
    width_mult: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        d = self.dtype
        width = scaled_width(128, self.width_mult)
        x = x.astype(d)
        x = _conv(width, 7, dtype=d)(x)
        x = nn.relu(_batch_norm(train, dtype=d)(x))
        for stage, stride in enumerate((1, 2, 2)):
            x = BasicBlock1d(width, stride, (5, 3), dtype=d, name=f"stage{stage}")(x, train=train)
        features = concat_pool(x)
        logits = ClassifierHead(self.num_classes, hidden=scaled_width(HEAD_HIDDEN, self.width_mult), dtype=d, name="head")(
            features, train=train
        )
        return logits, features


# ------------------------------------------------------------------------ inception1d


class InceptionBlock1d(nn.Module):
    """Bottleneck 1x1 -> parallel convs (39/19/9) + (MaxPool3 -> 1x1), concat, BN, ReLU."""

    filters: int
    bottleneck: int
    kernel_sizes: tuple[int, ...]
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = self.dtype
        bottled = _conv(self.bottleneck, 1, dtype=d, name="bottleneck")(x)
        branches = [_conv(self.filters, k, dtype=d, name=f"conv{k}")(bottled) for k in self.kernel_sizes]
        pooled = nn.max_pool(x, (3,), strides=(1,), padding=((1, 1),))
        branches.append(_conv(self.filters, 1, dtype=d, name="pool_conv")(pooled))
        y = jnp.concatenate(branches, axis=-1)
        return nn.relu(_batch_norm(train, dtype=d)(y))


class Inception1d(nn.Module):
    """inception1d of the PTB-XL benchmark (helme/ecg_ptbxl_benchmarking, inception1d.py).

    As configured by fastai_model (kernel_size=8*5=40): kernels 39/19/9, depth 6,
    bottleneck 32, 32 filters per branch (128 channels), residual every 3 blocks.
    """

    num_classes: int
    width_mult: float = 1.0
    depth: int = 6
    kernel_sizes: tuple[int, ...] = (39, 19, 9)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        d = self.dtype
        filters = scaled_width(32, self.width_mult)
        bottleneck = scaled_width(32, self.width_mult)
        channels = filters * (len(self.kernel_sizes) + 1)
        x = x.astype(d)
        residual_input = x
        for i in range(self.depth):
            x = InceptionBlock1d(filters, bottleneck, self.kernel_sizes, dtype=d, name=f"block{i}")(x, train=train)
            if i % 3 == 2:  # Shortcut1d: ReLU(out + BN(conv1x1(block input 3 blocks ago)))
                shortcut = _conv(channels, 1, dtype=d, name=f"shortcut{i // 3}_conv")(residual_input)
                shortcut = _batch_norm(train, dtype=d, name=f"shortcut{i // 3}_bn")(shortcut)
                x = nn.relu(x + shortcut)
                residual_input = x
        features = concat_pool(x)
        logits = ClassifierHead(self.num_classes, hidden=scaled_width(HEAD_HIDDEN, self.width_mult), dtype=d, name="head")(
            features, train=train
        )
        return logits, features


# --------------------------------------------------------------------------- factory

_XRESNET_CONFIGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "xresnet1d18": (1, (2, 2, 2, 2)),
    "xresnet1d34": (1, (3, 4, 6, 3)),
    "xresnet1d50": (4, (3, 4, 6, 3)),
    "xresnet1d101": (4, (3, 4, 23, 3)),
}

ARCHITECTURES: tuple[str, ...] = (*_XRESNET_CONFIGS, "resnet1d_wang", "inception1d")


def feature_dim(arch: str, *, width_mult: float = 1.0) -> int:
    """Length of the pooled feature vector (concat of max and avg pooling) of `arch`."""
    if arch in _XRESNET_CONFIGS:
        expansion, _ = _XRESNET_CONFIGS[arch]
        return 2 * scaled_width(64, width_mult) * expansion
    if arch == "resnet1d_wang":
        return 2 * scaled_width(128, width_mult)
    if arch == "inception1d":
        return 2 * 4 * scaled_width(32, width_mult)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def create_model(arch: str, *, num_classes: int, width_mult: float = 1.0, dtype: Dtype = jnp.float32) -> nn.Module:
    """Builds `arch` (see ARCHITECTURES); `apply(variables, x, train=...)` -> (logits, features).

    x is `(B, T, L)` channels-last; L (number of leads) is inferred at `init`, so the
    same call builds the 12-lead teacher and the single-lead student. logits `(B,
    num_classes)` and features `(B, feature_dim(arch))` are float32.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if arch in _XRESNET_CONFIGS:
        expansion, layers = _XRESNET_CONFIGS[arch]
        return XResNet1d(expansion, layers, num_classes, width_mult=width_mult, dtype=dtype)
    if arch == "resnet1d_wang":
        return ResNet1dWang(num_classes, width_mult=width_mult, dtype=dtype)
    if arch == "inception1d":
        return Inception1d(num_classes, width_mult=width_mult, dtype=dtype)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# ------------------------------------------------------------------ projection head


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) (torch.nn.functional.normalize): finite for x == 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class ProjectionHead(nn.Module):
    """CLT embedding (CRD `Embed`): Dense(dim) then L2 normalisation, float32 output.

    One head per view (student, teacher). Both are trainable; the teacher *net* is
    frozen by the caller (its features enter under stop_gradient), not this head.
    """

    dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        z = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear")(features.astype(self.dtype))
        return l2_normalize(z.astype(jnp.float32))


__all__: Sequence[str] = (
    "ARCHITECTURES",
    "ClassifierHead",
    "Inception1d",
    "ProjectionHead",
    "ResNet1dWang",
    "XResNet1d",
    "concat_pool",
    "create_model",
    "feature_dim",
    "l2_normalize",
    "scaled_width",
)


def from_config(student_config, num_classes: int) -> nn.Module:
    """The net a run config's ``student`` section describes (arch, width, dtype)."""
    return create_model(
        student_config.arch,
        num_classes=num_classes,
        width_mult=float(student_config.width_mult),
        dtype=jnp.dtype(student_config.dtype),
    )


class Ensemble(nn.Module):
    """Several trained nets as one teacher: the mean of their logits, and the features of the
    first (feature spaces differ between nets, so they are not averaged). Variables are
    ``ensemble_variables([...])``."""

    members: Sequence[nn.Module]

    def __call__(self, x, train: bool = False):
        outputs = [member(x, train=train) for member in self.members]
        return jnp.mean(jnp.stack([logits for logits, _ in outputs]), axis=0), outputs[0][1]


def ensemble_variables(variables: Sequence[dict]) -> dict:
    """The variables of an ``Ensemble`` from its members' variables, in member order."""
    return {
        collection: {f"members_{i}": v[collection] for i, v in enumerate(variables) if collection in v}
        for collection in ("params", "batch_stats")
    }
