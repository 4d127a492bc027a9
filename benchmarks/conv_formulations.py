"""Forward + backward of a resnet1d_wang-sized conv stack under four formulations of the 1-d
convolution, side by side in one process (XLA:CPU), to see whether any avoids the transposes
XLA adds around weight-gradient convolutions (see benchmarks/profile_step.py).

    python benchmarks/conv_formulations.py --out=benchmarks/results/conv_formulations.json

| formulation | forward | weight gradient |
|---|---|---|
| `lax` | `lax.conv_general_dilated` (what mvkt's Flax nets run) | XLA's |
| `im2col` | one matmul over the 5 shifted copies concatenated | XLA's (of the matmul) |
| `shifted_dots` | a sum of one matmul per kernel tap | XLA's (of the matmuls) |
| `dot_weight_grad` | `lax` | custom VJP: one dot over (batch x time) per tap |
| `flat_weight_grad` | `lax` | custom VJP: records padded and laid end to end, so that each tap is a contiguous row slice and its weight gradient one (rows x C)^T (rows x F) matmul (stride 1; stride 2 as `lax`) |

A second table times the pointwise (kernel 1) convolutions that dominate xresnet1d50 as
`lax.conv_general_dilated` against the same product written as a dot over channels, at
xresnet1d50's shapes. A third gives the rate of the kernels a weight gradient can be built
from, at resnet1d_wang's activation size: XLA's weight-gradient convolution (its transposes
included) and the matmuls that contract over batch x time. A fourth times the input gradient
of resnet1d_wang's two kernel-5 stride-2 convolutions: XLA's (a convolution over the output
gradient dilated with zeros) against mvkt's (`cpu_conv.strided_input_gradient`, one stride-1
convolution by the phase-regrouped taps), with the forward for scale. A fifth times a
kernel-5 weight gradient whose input is an array against the same weight gradient whose input
is relu(h * s + b) computed in the same program: XLA:CPU fuses that elementwise producer into
the transpose it makes for the weight-gradient convolution.

Each formulation's gradients are checked against `lax` first. The timing rounds alternate the
formulations (order reversed every other round); the table gives the median step and the
ratio to `lax`, with the load average before and after.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

DN = ("NWC", "WIO", "NWC")


def conv_lax(x, w, stride=1):
    pad = (w.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, w, (stride,), [(pad, pad)], dimension_numbers=DN)


def _taps(x, k, stride, t_out):
    pad = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    return [jax.lax.slice_in_dim(xp, j, j + stride * (t_out - 1) + 1, stride, axis=1) for j in range(k)]


def _t_out(x, stride):
    return (x.shape[1] - 1) // stride + 1


def conv_im2col(x, w, stride=1):
    k, c_in, c_out = w.shape
    cols = jnp.concatenate(_taps(x, k, stride, _t_out(x, stride)), axis=-1)
    return cols @ w.reshape(k * c_in, c_out)


def conv_shifted_dots(x, w, stride=1):
    return sum(tap @ w[j] for j, tap in enumerate(_taps(x, w.shape[0], stride, _t_out(x, stride))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_dot_weight_grad(x, w, stride=1):
    return conv_lax(x, w, stride)


def _fwd(x, w, stride):
    return conv_lax(x, w, stride), (x, w)


def _bwd(stride, residuals, dy):
    x, w = residuals
    (dx,) = jax.vjp(lambda x_: conv_lax(x_, w, stride), x)[1](dy)
    taps = _taps(x, w.shape[0], stride, dy.shape[1])
    return dx, jnp.stack([jnp.einsum("btc,btf->cf", tap, dy) for tap in taps])


conv_dot_weight_grad.defvjp(_fwd, _bwd)


def _flat_weight_grad(x, dy, k):
    """dW[j] = sum over (b, t) of xpad[b, t + j]^T dy[b, t], stride 1: with every record padded
    to T + k - 1 rows and dy padded with zeros after each record, the rows of all records in
    one (B * (T + k - 1), C) matrix line up, and tap j is the row slice starting at j."""
    pad = (k - 1) // 2
    b, t, c = x.shape
    rows = b * (t + k - 1)
    xf = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (0, 0))).reshape(rows, c)
    dyf = jnp.pad(dy, ((0, 0), (0, k - 1), (0, 0))).reshape(rows, dy.shape[-1])
    n = rows - (k - 1)
    return jnp.stack([jax.lax.dot_general(xf[j:j + n], dyf[:n], (((0,), (0,)), ((), ()))) for j in range(k)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_flat_weight_grad(x, w, stride=1):
    return conv_lax(x, w, stride)


def _flat_bwd(stride, residuals, dy):
    x, w = residuals
    (dx,) = jax.vjp(lambda x_: conv_lax(x_, w, stride), x)[1](dy)
    if stride != 1:
        (dw,) = jax.vjp(lambda w_: conv_lax(x, w_, stride), w)[1](dy)
        return dx, dw
    return dx, _flat_weight_grad(x, dy, w.shape[0])


conv_flat_weight_grad.defvjp(_fwd, _flat_bwd)

FORMULATIONS = {"lax": conv_lax, "im2col": conv_im2col, "shifted_dots": conv_shifted_dots,
                "dot_weight_grad": conv_dot_weight_grad, "flat_weight_grad": conv_flat_weight_grad}

# xresnet1d50's pointwise convolutions at batch 128 and 250-sample crops: (time, C in, C out).
POINTWISE_SHAPES = [(125, 64, 256), (125, 256, 64), (63, 512, 128), (32, 1024, 256)]


def pointwise_dot(x, w):
    return jax.lax.dot_general(x, w[0], (((2,), (0,)), ((), ())))


def pointwise_step(conv):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w))), argnums=(0, 1)))


def _alternating(fns: dict, args: tuple | dict, *, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each function (``args``: shared, or per function), the order
    reversed every other round."""
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, f in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
            call_args = args[name] if isinstance(args, dict) else args
            jax.block_until_ready(f(*call_args))
            start = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(f(*call_args))
            times[name].append((time.perf_counter() - start) / steps)
    return times


def _timed(fns: dict, args: tuple | dict, *, repeats: int, steps: int) -> dict:
    """``_alternating``'s times with their medians and the load average around them."""
    before = os.getloadavg()
    times = _alternating(fns, args, repeats=repeats, steps=steps)
    after = os.getloadavg()
    return {"step_times_s": times, "median_step_s": {name: statistics.median(t) for name, t in times.items()},
            "load_average_start": before, "load_average_end": after}


def _kernel_table(title: str, timed: dict, rate: str | None = None, flops: dict | None = None) -> list[str]:
    """Markdown rows (ms, and the FLOP rate when ``flops`` is given) of one ``_timed`` table."""
    load = f"load {timed['load_average_start'][0]:.2f} -> {timed['load_average_end'][0]:.2f}"
    header = ["", f"| {title} | ms | {rate} | {load} |", "|---|---:|---:|---|"] if flops else \
        ["", f"| {title} | ms | {load} |", "|---|---:|---|"]
    return header + [f"| {name} | {1e3 * m:.2f} | " + (f"{flops[name] / m / 1e9:.0f} | |" if flops else "|")
                     for name, m in timed["median_step_s"].items()]


def weight_gradient_kernels(x: jax.Array, dy: jax.Array) -> tuple[dict, dict, dict]:
    """(functions, their arguments, FLOPs) of the kernels a weight gradient of ``x`` (B, T, C)
    against ``dy`` (B, T, F) can use: XLA's weight-gradient convolution for kernels 5 and 1,
    and one tap's (B*T x C)^T (B*T x F) matmul with the contraction on rows (as XLA gets it
    from `flat_weight_grad`) or, pre-transposed, on columns."""
    b, t, c = x.shape
    rows = x.reshape(b * t, c)
    grads = {k: jnp.zeros((k, c, dy.shape[-1]), jnp.float32) for k in (5, 1)}

    def xla_weight_grad(k):
        return jax.jit(lambda x_, dy_: jax.vjp(lambda w: conv_lax(x_, w), grads[k])[1](dy_)[0])

    fns = {"XLA weight-gradient convolution, kernel 5": xla_weight_grad(5),
           "XLA weight-gradient convolution, kernel 1": xla_weight_grad(1),
           "one tap: rows^T @ dy rows (contraction on rows)": jax.jit(
               lambda a, g: jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())))),
           "one tap, pre-transposed: (C x rows) @ dy rows": jax.jit(lambda a, g: a @ g)}
    args = dict(zip(fns, [(x, dy), (x, dy), (rows, dy.reshape(b * t, -1)),
                          (jnp.asarray(np.ascontiguousarray(np.asarray(rows).T)), dy.reshape(b * t, -1))]))
    one_tap = 2.0 * b * t * c * dy.shape[-1]
    flops = dict(zip(fns, [5 * one_tap, one_tap, one_tap, one_tap]))
    return fns, args, flops


def strided_input_gradients(rng, batch: int, crop: int, channels: int) -> tuple[dict, dict, dict]:
    """(functions, arguments, useful FLOPs) for the input gradient of resnet1d_wang's two
    kernel-5 stride-2 convolutions (lengths ``crop`` and ``ceil(crop / 2)``): XLA's, mvkt's,
    and the forward of the same convolution."""
    from mvkt import cpu_conv  # noqa: PLC0415 - the library's formulation, as the nets run it

    fns, args, flops = {}, {}, {}
    length = crop
    for stage in (1, 2):
        x = jnp.asarray(rng.standard_normal((batch, length, channels)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((5, channels, channels)) * 0.05, jnp.float32)
        y = conv_lax(x, w, 2)
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        useful = 2.0 * y.shape[0] * y.shape[1] * 5 * channels * channels
        rows = {
            f"stage {stage} ({length} -> {y.shape[1]}): forward": (jax.jit(lambda x_, w_: conv_lax(x_, w_, 2)), (x, w)),
            f"stage {stage} ({length} -> {y.shape[1]}): XLA's input gradient": (
                jax.jit(lambda x_, w_, g: jax.vjp(lambda a: conv_lax(a, w_, 2), x_)[1](g)[0]), (x, w, dy)),
            f"stage {stage} ({length} -> {y.shape[1]}): mvkt's input gradient (polyphase)": (
                jax.jit(functools.partial(cpu_conv.strided_input_gradient, stride=2, padding=(2, 2), length=length)),
                (dy, w)),
        }
        reference = rows[f"stage {stage} ({length} -> {y.shape[1]}): XLA's input gradient"]
        ours = rows[f"stage {stage} ({length} -> {y.shape[1]}): mvkt's input gradient (polyphase)"]
        np.testing.assert_allclose(ours[0](*ours[1]), reference[0](*reference[1]), rtol=1e-4, atol=1e-4)
        for name, (f, a) in rows.items():
            fns[name], args[name], flops[name] = f, a, useful
        length = y.shape[1]
    return fns, args, flops


def fused_input_weight_gradients(rng, batch: int, crop: int, channels: int) -> tuple[dict, dict]:
    """A kernel-5 weight gradient of an array, and of relu(h * s + b) computed in the same
    program (as a BatchNorm + ReLU output is in the train step)."""
    h = jnp.asarray(rng.standard_normal((batch, crop, channels)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, crop, channels)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
    w = jnp.zeros((5, channels, channels), jnp.float32)

    def weight_grad(x, g):
        return jax.vjp(lambda w_: conv_lax(x, w_), w)[1](g)[0]

    fns = {"input: an array": jax.jit(weight_grad),
           "input: relu(h * s + b) in the same program": jax.jit(
               lambda h_, s_, g: weight_grad(jax.nn.relu(h_ * s_ + 0.1), g))}
    args = {"input: an array": (jax.nn.relu(h * s + 0.1), dy),
            "input: relu(h * s + b) in the same program": (h, s, dy)}
    a, b = (jax.block_until_ready(fns[n](*args[n])) for n in fns)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    return fns, args


def step_fn(conv):
    def loss(ws, x):
        for i, w in enumerate(ws):  # kernels 7, 5, 3 (stride 2), 1: the shapes of resnet1d_wang's convs
            x = jax.nn.relu(conv(x, w, 2 if i == 2 else 1))
        return jnp.sum(x ** 2)
    return jax.jit(jax.value_and_grad(loss))


def define_flags() -> None:
    flags.DEFINE_integer("batch_size", 128, "records per convolution")
    flags.DEFINE_integer("crop", 250, "samples per record")
    flags.DEFINE_integer("channels", 128, "input and output channels")
    flags.DEFINE_integer("repeats", 6, "alternating timing rounds")
    flags.DEFINE_integer("steps", 3, "calls per round")
    flags.DEFINE_string("out", "", "JSON results")


def main(argv) -> int:
    del argv
    args = harness.flag_values()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch_size, args.crop, args.channels)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((k, args.channels, args.channels)) * 0.05, jnp.float32)
          for k in (7, 5, 3, 1)]
    steps = {name: step_fn(conv) for name, conv in FORMULATIONS.items()}
    reference = steps["lax"](ws, x)
    errors = {}
    for name, f in steps.items():
        value = jax.block_until_ready(f(ws, x))
        errors[name] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                           for a, b in zip(value[1], reference[1]))
        if errors[name] > 1e-2:  # float32 sums in another order, through 4 layers
            raise SystemExit(f"{name}: gradients differ from lax by {errors[name]:.2e} (relative)")
    load_start = os.getloadavg()
    times = _alternating(steps, (ws, x), repeats=args.repeats, steps=args.steps)
    load_end = os.getloadavg()
    median = {name: statistics.median(t) for name, t in times.items()}
    lines = [f"load {load_start[0]:.2f} -> {load_end[0]:.2f}", "",
             "| formulation | median step ms | vs lax | max relative gradient error |", "|---|---:|---:|---:|"]
    for name in steps:
        lines.append(f"| {name} | {1e3 * median[name]:.1f} | {median[name] / median['lax']:.2f}x | "
                     f"{errors[name]:.1e} |")

    pointwise = []
    lines += ["", "| pointwise shape (batch 128) | conv ms | dot ms | dot vs conv | load before -> after |",
              "|---|---:|---:|---:|---|"]
    for t, c_in, c_out in POINTWISE_SHAPES:
        px = jnp.asarray(rng.standard_normal((args.batch_size, t, c_in)), jnp.float32)
        pw = jnp.asarray(rng.standard_normal((1, c_in, c_out)) * 0.05, jnp.float32)
        fns = {"conv": pointwise_step(conv_lax), "dot": pointwise_step(pointwise_dot)}
        before = os.getloadavg()
        shape_times = _alternating(fns, (px, pw), repeats=args.repeats, steps=args.steps)
        after = os.getloadavg()
        conv_s, dot_s = (statistics.median(shape_times[n]) for n in ("conv", "dot"))
        pointwise.append({"shape": [args.batch_size, t, c_in, c_out], "step_times_s": shape_times,
                          "median_step_s": {"conv": conv_s, "dot": dot_s},
                          "load_average_start": before, "load_average_end": after})
        lines.append(f"| ({t}, {c_in} -> {c_out}) | {1e3 * conv_s:.1f} | {1e3 * dot_s:.1f} | "
                     f"{dot_s / conv_s:.2f}x | {before[0]:.2f} -> {after[0]:.2f} |")
    kernels, kernel_args, kernel_flops = weight_gradient_kernels(
        x, jnp.asarray(rng.standard_normal(x.shape), jnp.float32))
    kernel = {**_timed(kernels, kernel_args, repeats=args.repeats, steps=args.steps), "flops": kernel_flops}
    lines += _kernel_table(f"weight-gradient kernel, x {tuple(x.shape)}", kernel, "GFLOP/s", kernel_flops)
    strided, strided_args, strided_flops = strided_input_gradients(rng, args.batch_size, args.crop, args.channels)
    strided_timed = {**_timed(strided, strided_args, repeats=args.repeats, steps=args.steps),
                     "useful_flops": strided_flops}
    lines += _kernel_table(f"kernel 5, stride 2, batch {args.batch_size}, {args.channels} channels", strided_timed,
                           "useful GFLOP/s", strided_flops)
    fused, fused_args = fused_input_weight_gradients(rng, args.batch_size, args.crop, args.channels)
    fused_timed = _timed(fused, fused_args, repeats=args.repeats, steps=args.steps)
    lines += _kernel_table(f"kernel-5 weight gradient, {tuple(x.shape)}", fused_timed)
    print("\n".join(lines))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(
            {"settings": vars(args), "load_average_start": load_start, "load_average_end": load_end,
             "step_times_s": times, "median_step_s": median, "max_relative_gradient_error": errors,
             "pointwise": pointwise,
             "weight_gradient_kernels": kernel, "strided_input_gradient": strided_timed,
             "fused_weight_gradient_input": fused_timed,
             "jax": jax.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    harness.define_flags(define_flags)
    app.run(main)
