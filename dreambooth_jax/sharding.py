"""The device mesh and how arrays are laid out on it.

One code path for 1 CPU, 8 TPU cores or a pod: batches are split along the `data` axis,
parameters and optimizer state are replicated.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def use_devices(count: int) -> list[jax.Device]:
  """The first `count` devices (0 = all); more than present are simulated CPU devices.

  Must run before jax starts its backend (before the first jax.devices() or computation).
  """
  if count:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")
  devices = jax.devices()
  if count:
    devices = (devices if len(devices) >= count else jax.devices("cpu"))[:count]
  return devices


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def microbatch_sharded(mesh: Mesh) -> NamedSharding:
  """[micro-batches, rows, ...]: the rows of each micro-batch split along the data axis."""
  return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host arrays (the process's rows) → global arrays split along the data axis."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
