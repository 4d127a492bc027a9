"""Device mesh, shardings and host-to-device transfer for data-parallel training.

One 1-D mesh axis, ``data``, spans every device of every host. Batches are
sharded along it; parameters, optimizer state, BatchNorm statistics and the CLT
memory bank are replicated. Because everything runs under one ``jax.jit`` over
global arrays, reductions over the batch (losses, BatchNorm statistics,
contrastive similarity matrices) are global: 1 device and N devices compute the
same function of the same global batch.

Each host owns a contiguous slice of every global batch (``host_slice``) and
hands only that slice to ``to_global``, which assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """The mesh and the two shardings the trainer uses."""

    mesh: jax.sharding.Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def host_slice(self, global_batch_size: int) -> slice:
        """The rows of a global batch that this host loads."""
        check_batch_size(global_batch_size, self.num_devices)
        per_host = global_batch_size // jax.process_count()
        start = jax.process_index() * per_host
        return slice(start, start + per_host)

    def to_global(self, local_batch: Any) -> Any:
        """Host-local NumPy batch (this host's rows) -> globally sharded jax.Arrays."""
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(self.batch, np.asarray(a)), local_batch
        )

    def replicate(self, tree: Any) -> Any:
        """Every leaf replicated on every device of every process.

        A leaf already placed with this sharding is kept as is. Any other jax array
        (e.g. an init output on this process's first device) goes through host
        memory: ``device_put`` of a single-device array to a sharding that spans
        other processes fails, while a NumPy value (the same on every process, as
        seeded initialisation makes it) is placed on all of them.
        """
        target = self.replicated

        def place(leaf):
            if isinstance(leaf, jax.Array):
                if leaf.sharding == target:
                    return leaf
                if leaf.sharding.is_equivalent_to(target, leaf.ndim):
                    # Same devices, no copy; but the step is compiled for the sharding the
                    # arrays carry, and its outputs carry ``target``: an equivalent
                    # single-device sharding here would compile the step twice.
                    return jax.device_put(leaf, target)
                leaf = np.asarray(leaf)
            return jax.device_put(leaf, target)

        return jax.tree.map(place, tree)


def make_parallelism(devices: Sequence[jax.Device] | None = None) -> Parallelism:
    """A data-parallel mesh over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    # Auto (not Explicit) axes: flax's Dropout draws its mask without a sharding,
    # which Explicit mode rejects. Semantics are unchanged: jit computes the
    # function of the global arrays either way.
    mesh = jax.make_mesh(
        (len(devices),), (DATA_AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )
    return Parallelism(mesh=mesh)


def check_batch_size(global_batch_size: int, num_devices: int) -> None:
    if global_batch_size % num_devices or global_batch_size % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch_size} must be divisible by the number "
            f"of devices ({num_devices}) and of hosts ({jax.process_count()}); "
            "change --config.train.batch_size"
        )
