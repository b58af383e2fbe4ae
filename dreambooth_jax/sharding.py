"""The device mesh and how arrays are laid out on it.

One code path for 1 CPU, 8 TPU cores or a pod slice: the mesh has a `data` and an `fsdp` axis.
Batches are split over all devices (both axes). Parameters and optimizer state are replicated
when `fsdp` is 1; otherwise each large array is split along `fsdp` on one of its dimensions
(ZeRO-3 / FSDP: the compiler gathers what a layer needs when it needs it), so a model too big
for one device's memory still trains. The numbers do not depend on the mesh shape.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dreambooth_jax.errors import MeshError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a batch's rows are split over every device
MIN_FSDP_SIZE = 2**14  # arrays with fewer elements stay replicated (biases, norms, counters)


def make_mesh(devices: Sequence[jax.Device] | None = None, data: int = 0,
              fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh of `devices` (default: all); data=0 takes what fsdp leaves."""
  devices = jax.devices() if devices is None else list(devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise MeshError(f"config.mesh.fsdp: {fsdp} does not divide the {len(devices)} devices")
  data = data or len(devices) // fsdp
  if data * fsdp != len(devices):
    raise MeshError(f"config.mesh.data × config.mesh.fsdp = {data} × {fsdp} is not the "
                    f"{len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def use_devices(count: int) -> list[jax.Device]:
  """The first `count` devices (0 = all); more than present are simulated CPU devices.

  Must run before jax starts its backend (before the first jax.devices() or computation).
  """
  if count:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")
  devices = jax.devices()
  if count:
    devices = devices if len(devices) >= count else jax.devices("cpu")
    if len(devices) < count:  # jax started before the flag could be set
      raise MeshError(f"--devices={count}: only {len(devices)} devices, and jax has already "
                      "started, so no more can be simulated")
    devices = devices[:count]
  return devices


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Rows split over every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def microbatch_sharded(mesh: Mesh) -> NamedSharding:
  """[micro-batches, rows, ...]: the rows of each micro-batch split over every device."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def fsdp_spec(shape: Sequence[int], fsdp: int) -> PartitionSpec:
  """Splits the largest dimension that `fsdp` divides; small arrays stay replicated."""
  if fsdp == 1 or math.prod(shape) < MIN_FSDP_SIZE:
    return PartitionSpec()
  candidates = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda a: (shape[a], -a))
  return PartitionSpec(*([None] * axis), FSDP_AXIS)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for parameters / optimizer state (arrays or shape structs) on `mesh`."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), tree)


def place(value: Any, sharding: NamedSharding) -> jax.Array:
  """device_put, except that with several processes a process-local value (which every process
  holds alike, e.g. weights each one loaded) goes through the host: jax does not move data
  from one host's device to another's."""
  if jax.process_count() > 1 and (not isinstance(value, jax.Array) or value.is_fully_addressable):
    return put_global(np.asarray(value), sharding)
  return jax.device_put(value, sharding)


def put_state(tree: Any, mesh: Mesh) -> Any:
  """Parameters or a TrainState laid out by state_shardings."""
  return jax.tree.map(place, tree, state_shardings(tree, mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  sharding = replicated(mesh)
  return jax.tree.map(lambda value: place(value, sharding), tree)


def local_rows(mesh: Mesh, num_rows: int) -> slice:
  """The rows of a data-sharded [num_rows, ...] batch that this process's devices hold.

  Devices are ordered host by host, so a process's rows are one contiguous block; each
  process builds only those rows of a batch.
  """
  blocks = {(index[0].start or 0, index[0].stop or num_rows) for index in
            data_sharded(mesh).addressable_devices_indices_map((num_rows,)).values()}
  start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
  if sum(b[1] - b[0] for b in blocks) != stop - start:
    raise MeshError("this process's devices hold rows that are not one contiguous block")
  return slice(start, stop)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, num_rows: int | None = None
              ) -> dict[str, jax.Array]:
  """This process's rows (local_rows; all rows on one host) → global arrays of num_rows rows,
  split over every device."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, v, None if num_rows is None else (num_rows,) + v.shape[1:])
          for k, v in batch.items()}


class BatchPutter:
  """put_batch for one batch after another, keeping the device arrays of the fields whose host
  values equal the previous batch's.

  A DreamBooth batch's masks, row counts, example ids and cached prompt embeddings are the same
  every step; putting them again was ~3% of the tiny 4-device step's time on CPU in one
  timing (one fixed batch fed every step against a fresh one). Not thread-safe: one caller
  (the prefetch thread).
  """

  def __init__(self, mesh: Mesh, num_rows: int | None = None):
    self._mesh, self._num_rows = mesh, num_rows
    self._last: dict[str, tuple[np.ndarray, jax.Array]] = {}

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    changed = {k: v for k, v in batch.items() if not self._same(k, v)}
    placed = put_batch(changed, self._mesh, self._num_rows)
    self._last.update({k: (changed[k], placed[k]) for k in changed})
    return {k: self._last[k][1] for k in batch}

  def _same(self, name: str, value: np.ndarray) -> bool:
    last = self._last.get(name)
    return (last is not None and last[0].shape == value.shape and last[0].dtype == value.dtype
            and np.array_equal(last[0], value))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole → a global array laid out by `sharding`."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(tree: Any) -> Any:
  """Global arrays → numpy on every process (an all-gather when other hosts hold parts).

  Every process must call it for the same arrays.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def local_row_values(array: jax.Array) -> list[tuple[int, np.ndarray]]:
  """(row, value) of each row of a data-sharded array held by this process, each row once."""
  rows = []
  for shard in array.addressable_shards:
    if shard.replica_id == 0:
      start = shard.index[0].start or 0
      rows += [(start + i, value) for i, value in enumerate(np.asarray(shard.data))]
  return sorted(rows, key=lambda row: row[0])
