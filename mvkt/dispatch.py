"""How train steps reach the devices: batches cut on the host or on the devices, one step or
``K`` steps per jitted call.

On an accelerator the step of these nets takes milliseconds, and what surrounds it decides
how long a run takes: the host's crops and transfers, and one Python dispatch per step.

- **Device-resident training data** (``DeviceData``): when the training split fits the budget
  (``config.train.device_data_gb``), it is placed on every device once. The host then sends
  only the record indices and crop starts of each batch (``TrainBatches``'s step-addressable
  schedule, unchanged) and the step cuts the crops on the devices: the same samples as
  ``Split.crop``, bit for bit, because the device copy is ``Split.crop`` of whole records.
- **Several steps per call** (``config.train.steps_per_dispatch=K``): a ``lax.scan`` over K
  steps' inputs, with the K steps' metrics stacked. A call never runs past a point of the
  loop's cadence (log, evaluation, checkpoint, stop check): where fewer than K steps are left
  before a point, they run as one-step calls, so every point stays where it is with K = 1
  and there are two compilations (K steps, one step). Not a ``lax.cond`` that skips the
  steps past a point: on XLA:CPU a step inside a conditional ran 36x slower (15.7 s against
  0.43 s, resnet1d_wang teacher at batch 128), and inside a rolled loop 25x slower, so on
  CPU the K steps are unrolled; on accelerators the loop stays rolled (one step compiled).

``Dispatcher`` is what the loop calls: ``chunks`` (which steps each call runs), ``produce``
(the call's global inputs, on the prefetch threads) and ``__call__`` (the jitted call).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import flax
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mvkt import data as data_lib
from mvkt import input_pipeline
from mvkt import parallel as parallel_lib
from mvkt import periodic

# config.train.device_data_gb < 0 (automatic): the training data may take this share of one
# device's memory (of the host's memory on XLA:CPU, whose devices have no memory of their own).
AUTOMATIC_SHARE = 0.25


def memory_budget_bytes(device_data_gb: float, device: jax.Device | None = None) -> int:
    """Bytes of one device the training data may take: 0 off, > 0 that many GB, < 0 automatic."""
    if device_data_gb == 0:
        return 0
    if device_data_gb > 0:
        return int(device_data_gb * 2**30)
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    capacity = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(capacity * AUTOMATIC_SHARE)


def padded_length(split: data_lib.Split, crop_length: int) -> int:
    """Samples per record on the device: every crop's end lies within it."""
    return max(int(np.max(split.lengths)), crop_length)


def device_bytes(split: data_lib.Split, crop_length: int) -> int:
    """What ``DeviceData.place`` puts on each device: float32 signals and labels."""
    leads = len(split.lead_idx)
    return len(split) * (padded_length(split, crop_length) * leads + split.num_classes) * 4


@flax.struct.dataclass
class DeviceData:
    """The training split on every device: ``x`` (N, padded, 12) float32 as ``Split.crop`` reads
    it (zero-padded past each record's end, re-standardised where the split is), ``y`` (N, C)."""

    x: jax.Array
    y: jax.Array

    @classmethod
    def place(cls, split: data_lib.Split, *, crop_length: int, parallel: parallel_lib.Parallelism,
              chunk: int = 512) -> "DeviceData":
        length = padded_length(split, crop_length)
        host = np.empty((len(split), length, len(split.lead_idx)), np.float32)
        for first in range(0, len(split), chunk):
            rows = np.arange(first, min(first + chunk, len(split)))
            host[rows] = split.crop(rows, np.zeros(len(rows), np.int64), length)
        return cls(parallel.replicate(host), parallel.replicate(split.y.astype(np.float32)))


def crops_on_device(data: DeviceData, feed: dict, crop_length: int, sharding: NamedSharding) -> dict:
    """The batch ``update_fn`` expects, cut from the device copy: ``x`` (B, crop, 12), ``y``,
    ``index``, and any cached teacher targets the host sent with the indices."""
    index, start = feed["index"], feed["start"]
    leads = data.x.shape[2]

    def one(i, s):
        return jax.lax.dynamic_slice(data.x, (i, s, 0), (1, crop_length, leads))[0]

    x = jax.lax.with_sharding_constraint(jax.vmap(one)(index, start), sharding)
    batch = {"x": x, "y": data.y[index], "index": index}
    batch.update({k: v for k, v in feed.items() if k not in ("index", "start")})
    return batch


class Dispatcher:
    """The loop's steps as jitted calls of ``update_fn``: ``chunks`` -> ``produce`` -> ``__call__``.

    ``source``: the teacher's target source (its cached targets travel with each batch), or None.
    With ``device_data`` the host sends indices and starts; without it, the crops. With
    ``steps_per_dispatch`` K > 1 a call of K steps takes their inputs stacked on a leading axis
    and returns their metrics stacked (K,); the steps just before a cadence point are one-step calls.
    """

    def __init__(self, *, update_fn: Callable, host_update: Callable, loader: input_pipeline.TrainBatches,
                 source: Any, parallel: parallel_lib.Parallelism, steps_per_dispatch: int = 1,
                 device_data: DeviceData | None = None, donate: bool = True):
        self.loader, self.source, self.parallel = loader, source, parallel
        self.k = int(steps_per_dispatch)
        self.device_data = device_data
        crop_length = loader.crop_length
        batch_sharding = parallel.batch

        def inputs(data, feed):
            return feed if data is None else crops_on_device(data, feed, crop_length, batch_sharding)

        donated = (0,) if donate else ()
        if device_data is None:
            self._one = lambda state, data, feed, rng: host_update(state, feed, rng)  # today's path
        else:
            self._one = jax.jit(lambda state, data, feed, rng: update_fn(state, inputs(data, feed), rng),
                                donate_argnums=donated)
        unroll = True if jax.default_backend() == "cpu" else 1  # see the module docstring

        def k_steps(state, data, feeds, rng):
            return jax.lax.scan(lambda s, feed: update_fn(s, inputs(data, feed), rng), state, feeds, unroll=unroll)

        self._k = jax.jit(k_steps, donate_argnums=donated) if self.k > 1 else None
        # Stacked inputs: the batch axis (1) is the sharded one.
        self._stacked = NamedSharding(parallel.mesh, P(None, parallel_lib.DATA_AXIS))
        self._called: set[Callable] = set()  # the programs called once (compiled)

    @property
    def on_device(self) -> bool:
        return self.device_data is not None

    def chunks(self, start: int, stop: int, cadence: periodic.Cadence) -> Iterator[tuple[int, int]]:
        """(first step, number of steps) of each call: K steps, or 1 where fewer than K are left
        before the next cadence point."""
        step = start
        while step < stop:
            count = self.k if min(cadence.next_point(step), stop) - step >= self.k else 1
            yield step, count
            step += count

    def _feed(self, step: int) -> dict:
        """This host's inputs of one step, as NumPy."""
        indices, starts = self.loader.host_crops(step)
        if self.on_device:
            feed = {"index": indices.astype(np.int32), "start": starts.astype(np.int32)}
        else:
            feed = self.loader.batch_of(indices, starts)
        if self.source is not None:
            feed.update(self.source.batch_targets(indices, starts))
        return feed

    def produce(self, chunk: tuple[int, int]) -> dict:
        """The global inputs of one call (run on the prefetch threads)."""
        first, count = chunk
        if count == 1:
            return self.parallel.to_global(self._feed(first))
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[self._feed(first + i) for i in range(count)])
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(self._stacked, a), stacked)

    def _program(self, feed: dict) -> Callable:
        """K steps when the inputs are stacked (``produce`` of a K-step chunk), else one."""
        return self._k if self._k is not None and feed["index"].ndim == 2 else self._one

    def first_call(self, feed: dict) -> bool:
        """Whether the call with ``feed`` is the first of its program in this process."""
        return self._program(feed) not in self._called

    def __call__(self, state, feed: dict, rng: jax.Array):
        program = self._program(feed)
        self._called.add(program)
        return program(state, self.device_data, feed, rng)


def choose_device_data(split: data_lib.Split, *, crop_length: int, device_data_gb: float) -> tuple[bool, str]:
    """(place the training data on the devices, why) for ``config.train.device_data_gb``."""
    needed = device_bytes(split, crop_length)
    budget = memory_budget_bytes(device_data_gb)
    if device_data_gb == 0:
        return False, "host loader (config.train.device_data_gb=0)"
    if needed > budget:
        return False, (f"host loader: the training data needs {needed / 2**20:.0f} MiB per device, more than "
                       f"the budget of {budget / 2**20:.0f} MiB (config.train.device_data_gb)")
    return True, f"training data on the devices ({needed / 2**20:.0f} MiB of a {budget / 2**20:.0f} MiB budget)"
