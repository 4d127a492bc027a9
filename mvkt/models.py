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
* `fcn_wang`: `basic_conv1d.py` (Wang et al. 2017 FCN): conv 8-5-3 with 128-256-128
  filters, stride 1, no pooling.
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

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvkt import cpu_conv

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
        conv_general_dilated=cpu_conv.conv_general_dilated,
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


def _pooled_head(x: jax.Array, num_classes: int, width_mult: float, dtype: Dtype, train: bool):
    """The nets' common ending, inside their compact call: concat pooling, then the head
    (parameters under ``head``). Returns (logits, pooled features)."""
    features = concat_pool(x)
    head = ClassifierHead(num_classes, hidden=scaled_width(HEAD_HIDDEN, width_mult), dtype=dtype, name="head")
    return head(features, train=train), features


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

        return _pooled_head(x, self.num_classes, self.width_mult, d, train)


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
        return _pooled_head(x, self.num_classes, self.width_mult, d, train)


# --------------------------------------------------------------------------- fcn_wang


class FCNWang(nn.Module):
    """fcn_wang of the PTB-XL benchmark (basic_conv1d.py; Wang et al. 2017's fully
    convolutional baseline): three conv+BN+ReLU layers, 128-256-128 filters, kernels 8-5-3,
    stride 1, no pooling between them, then the common head. The smallest net here (three
    convolutions): quick to compile, which is why the test suite trains it where a test is
    not about the architecture."""

    num_classes: int
    width_mult: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        d = self.dtype
        x = x.astype(d)
        for filters, kernel_size in ((128, 8), (256, 5), (128, 3)):
            x = _conv(scaled_width(filters, self.width_mult), kernel_size, dtype=d)(x)
            x = nn.relu(_batch_norm(train, dtype=d)(x))
        return _pooled_head(x, self.num_classes, self.width_mult, d, train)


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
        return _pooled_head(x, self.num_classes, self.width_mult, d, train)


# --------------------------------------------------------------------------- factory

_XRESNET_CONFIGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "xresnet1d18": (1, (2, 2, 2, 2)),
    "xresnet1d34": (1, (3, 4, 6, 3)),
    "xresnet1d50": (4, (3, 4, 6, 3)),
    "xresnet1d101": (4, (3, 4, 23, 3)),
}

@dataclasses.dataclass(frozen=True)
class Architecture:
    """A registered net: ``build(num_classes, width_mult, dtype) -> nn.Module`` whose
    ``apply(variables, x, train=...)`` gives (logits, pooled features), and the length of
    those features, ``feature_dim(width_mult)``."""

    build: Callable[[int, float, Dtype], nn.Module]
    feature_dim: Callable[[float], int]


REGISTRY: dict[str, Architecture] = {}
ARCHITECTURES: tuple[str, ...] = ()


def register(name: str, architecture: Architecture) -> None:
    """Adds a net under ``name`` (``config.student.arch`` / ``config.teacher.arch``)."""
    global ARCHITECTURES
    if name in REGISTRY:
        raise ValueError(f"an architecture {name!r} exists already")
    REGISTRY[name] = architecture
    ARCHITECTURES = tuple(REGISTRY)


for _name, (_expansion, _layers) in _XRESNET_CONFIGS.items():
    register(_name, Architecture(
        functools.partial(lambda c, w, d, e, l: XResNet1d(e, l, c, width_mult=w, dtype=d), e=_expansion, l=_layers),
        functools.partial(lambda w, e: 2 * scaled_width(64, w) * e, e=_expansion)))
register("resnet1d_wang", Architecture(lambda c, w, d: ResNet1dWang(c, width_mult=w, dtype=d),
                                       lambda w: 2 * scaled_width(128, w)))
register("fcn_wang", Architecture(lambda c, w, d: FCNWang(c, width_mult=w, dtype=d),
                                  lambda w: 2 * scaled_width(128, w)))
register("inception1d", Architecture(lambda c, w, d: Inception1d(c, width_mult=w, dtype=d),
                                     lambda w: 2 * 4 * scaled_width(32, w)))


def _architecture(arch: str) -> Architecture:
    if arch not in REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return REGISTRY[arch]


def feature_dim(arch: str, *, width_mult: float = 1.0) -> int:
    """Length of the pooled feature vector (concat of max and avg pooling) of `arch`."""
    return _architecture(arch).feature_dim(width_mult)


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
    return _architecture(arch).build(num_classes, width_mult, dtype)


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


def from_config(net_config, num_classes: int) -> nn.Module:
    """The net a run config's net group describes (``run_config.net_config``: arch, width, dtype)."""
    return create_model(
        net_config.arch,
        num_classes=num_classes,
        width_mult=float(net_config.width_mult),
        dtype=jnp.dtype(net_config.dtype),
    )


__all__: Sequence[str] = (
    "ARCHITECTURES",
    "Architecture",
    "ClassifierHead",
    "Inception1d",
    "ProjectionHead",
    "REGISTRY",
    "ResNet1dWang",
    "XResNet1d",
    "concat_pool",
    "create_model",
    "feature_dim",
    "from_config",
    "l2_normalize",
    "register",
    "scaled_width",
)
