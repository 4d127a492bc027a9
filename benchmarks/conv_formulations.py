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

Each formulation's gradients are checked against `lax` first. The timing rounds alternate the
formulations (order reversed every other round); the table gives the median step and the
ratio to `lax`, with the load average before and after.
"""

from __future__ import annotations

import argparse
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

FORMULATIONS = {"lax": conv_lax, "im2col": conv_im2col, "shifted_dots": conv_shifted_dots,
                "dot_weight_grad": conv_dot_weight_grad}


def step_fn(conv):
    def loss(ws, x):
        for i, w in enumerate(ws):  # kernels 7, 5, 3 (stride 2), 1: the shapes of resnet1d_wang's convs
            x = jax.nn.relu(conv(x, w, 2 if i == 2 else 1))
        return jnp.sum(x ** 2)
    return jax.jit(jax.value_and_grad(loss))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=250)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
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
    times = {name: [] for name in steps}
    for r in range(args.repeats):
        for name, f in (steps.items() if r % 2 == 0 else reversed(list(steps.items()))):
            start = time.perf_counter()
            for _ in range(args.steps):
                jax.block_until_ready(f(ws, x))
            times[name].append((time.perf_counter() - start) / args.steps)
    load_end = os.getloadavg()
    median = {name: statistics.median(t) for name, t in times.items()}
    lines = [f"load {load_start[0]:.2f} -> {load_end[0]:.2f}", "",
             "| formulation | median step ms | vs lax | max relative gradient error |", "|---|---:|---:|---:|"]
    for name in steps:
        lines.append(f"| {name} | {1e3 * median[name]:.1f} | {median[name] / median['lax']:.2f}x | "
                     f"{errors[name]:.1e} |")
    print("\n".join(lines))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(
            {"settings": vars(args), "load_average_start": load_start, "load_average_end": load_end,
             "step_times_s": times, "median_step_s": median, "max_relative_gradient_error": errors,
             "jax": jax.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
