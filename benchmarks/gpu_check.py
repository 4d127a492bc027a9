"""Which convolutions a training step uses on this machine's backend, as JSON.

    python -m benchmarks.gpu_check [--archs=resnet1d_wang,xresnet1d50]

``mvkt.cpu_conv`` replaces the nets' convolution gradients on XLA:CPU in float32 (custom
derivatives measured faster there). On a GPU every convolution must be XLA's own (cuDNN): this
traces each net's float32 training loss and counts the calls of ``mvkt.cpu_conv``'s kernels in
its jaxpr (all 0: XLA's own convolutions only). Run by ``benchmarks/gpu_session.sh`` on a lent
GPU; on CPU the counts are above 0 unless ``MVKT_CPU_CONV=0``.
"""

from __future__ import annotations

import json
import sys

import pathlib

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

def cpu_kernels_in_loss(arch: str, *, width_mult: float = 1.0, crop: int = 250) -> dict[str, int]:
    """Calls of ``mvkt.cpu_conv``'s kernels (by name) in the jaxpr of ``arch``'s float32
    training loss on this backend: what ``jax.grad`` differentiates, with their custom
    derivatives. All zero: every convolution is XLA's own."""
    import re

    import jax
    import jax.numpy as jnp

    from mvkt import cpu_conv, models

    model = models.create_model(arch, num_classes=5, width_mult=width_mult)
    x = jnp.zeros((2, crop, 12), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

    def loss(params):
        (logits, _), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(logits)

    text = str(jax.make_jaxpr(loss)(variables["params"]))
    names = [f.__name__ for f in (cpu_conv.pointwise, cpu_conv.strided, cpu_conv.materialized)]
    return {name: len(re.findall(rf"\b{name}\b", text)) for name in names}


def report(archs: list[str]) -> dict:
    import jax

    from mvkt import cpu_conv

    probe = jax.numpy.zeros(1, jax.numpy.float32)
    return {
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
        "cpu_conv_switch_on": cpu_conv.enabled(),
        "cpu_conv_applies_to_float32": cpu_conv.cpu_float32(probe),
        "cpu_kernels_in_loss": {arch: cpu_kernels_in_loss(arch) for arch in archs},
    }


def main(argv) -> int:
    del argv
    print(json.dumps(report(flags.FLAGS.archs), indent=2))
    return 0


if __name__ == "__main__":
    flags.DEFINE_list("archs", ["resnet1d_wang", "xresnet1d50"], "mvkt.models architectures")
    app.run(main)
