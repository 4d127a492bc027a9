"""The nets' convolution on XLA:CPU: custom gradients measured faster there in float32.

Every convolution of ``mvkt.models`` goes through ``conv_general_dilated``. In float32 on
the CPU backend (each measured faster there, docs/BENCHMARKS.md): kernel-1 stride-1
convolutions run XLA's forward with a custom VJP whose gradients are matmuls
(``pointwise``), because XLA:CPU builds a weight gradient from transposed copies of both
activations; every other convolution reads its input through ``materialized``, the
identity whose JVP divides by a 1.0 XLA cannot fold, so that XLA:CPU stores the
BatchNorm + ReLU output once instead of recomputing it inside that transposed copy; strided
kernels above 1 also take their input gradient as one stride-1 convolution by the
phase-regrouped taps (``strided``). Same sums in another order. Elsewhere (GPUs, bfloat16)
every convolution is XLA's own.

The switch: ``MVKT_CPU_CONV=0`` in the environment, or ``set_enabled(False)``, makes every
convolution XLA's own on CPU too (read when a program is traced).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

ENV_SWITCH = "MVKT_CPU_CONV"
_enabled: bool | None = None  # None: follow the environment


def set_enabled(value: bool | None) -> None:
    """On, off, or (None) back to ``$MVKT_CPU_CONV`` (default on)."""
    global _enabled
    _enabled = value


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cpu_float32(x: jax.Array) -> bool:
    """Where the custom convolution gradients below were measured faster: float32 on XLA:CPU."""
    return x.dtype == jnp.float32 and jax.default_backend() == "cpu"


_NWC = ("NWC", "WIO", "NWC")


def xla_conv(x: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (stride,), (padding,), dimension_numbers=_NWC)


_ROWS = (((0,), (0,)), ((), ()))  # dot_general: contract the rows of two (rows, channels) matrices


@jax.custom_vjp
def pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
    """Kernel-1 convolution of ``x`` (B, T, C) by ``w`` (1, C, F), stride 1: XLA's own."""
    return xla_conv(x, w, 1, (0, 0))


def _pointwise_fwd(x, w):
    return pointwise(x, w), (x, w)


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


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided(x: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
    """Strided convolution of ``x`` (B, T, C) by ``w`` (k, C, F): XLA's own forward."""
    return xla_conv(x, w, stride, padding)


def _strided_fwd(x, w, stride, padding):
    return xla_conv(x, w, stride, padding), (x, w)


def strided_input_gradient(dy: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int],
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
    phases = xla_conv(dy, w, 1, (taps - 1, taps - 1))  # (B, To + taps - 1, s * C)
    dx = phases.reshape(dy.shape[0], -1, channels)[:, lo:lo + length]
    return jnp.pad(dx, ((0, 0), (0, length - dx.shape[1]), (0, 0)))  # samples no output reads: zero


def _strided_bwd(stride, padding, residuals, dy):
    x, w = residuals
    _, weight_vjp = jax.vjp(lambda w_: xla_conv(x, w_, stride, padding), w)
    (dw,) = weight_vjp(dy)
    return strided_input_gradient(dy, w, stride, padding, x.shape[1]).astype(x.dtype), dw


strided.defvjp(_strided_fwd, _strided_bwd)


@jax.custom_jvp
def materialized(x: jax.Array) -> jax.Array:
    """``x`` itself; where it is differentiated, stored once by XLA:CPU (see the JVP below)."""
    return x


@materialized.defjvp
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


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``nn.Conv``'s convolution for the nets' 1-d convolutions (channels-last, one group, no
    dilation). In float32 on XLA:CPU, where each was measured faster (docs/BENCHMARKS.md):

    * kernel 1, stride 1: ``pointwise`` (gradients as matmuls, which read the input in place);
    * every other: the input ``materialized``, and for kernels above 1 with a stride,
      ``strided`` (input gradient as one stride-1 convolution).

    Elsewhere XLA's own: bfloat16, where the pointwise gradient measured slower on CPU, and
    GPUs, which were not measured with these.
    """
    if (feature_group_count != 1 or len(window_strides) != 1
            or any(d not in (None, 1, (1,)) for d in (lhs_dilation, rhs_dilation))):
        raise ValueError("the nets' convolution takes a 1-d window without dilation or groups")
    stride, kernel = int(window_strides[0]), rhs.shape[0]
    if not (enabled() and cpu_float32(lhs)):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    if kernel == 1 and stride == 1:
        if tuple(map(tuple, padding)) != ((0, 0),):
            raise ValueError("the pointwise convolution takes kernel 1 without padding")
        return pointwise(lhs, rhs)
    lhs = materialized(lhs)
    if kernel > 1 and stride > 1:
        return strided(lhs, rhs, stride, tuple(int(p) for p in padding[0]))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
