"""Joining the processes of a multi-host run (a TPU pod slice, or several GPU/CPU hosts).

Every host runs the same command. On a Cloud TPU pod slice jax finds the other workers by
itself; elsewhere the coordinator's address, the process count and this process's id come from
config.distributed.* or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment variables. Process 0 writes the workdir's files; all processes train and write
checkpoints together.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _tpu_pod_slice() -> bool:
  """Whether this is one worker of a multi-host Cloud TPU slice."""
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(distributed_config) -> None:
  """jax.distributed.initialize when there is more than one process; must precede any jax use.

  CPU processes exchange data with gloo (what jax offers for CPU collectives).
  """
  address = (distributed_config.coordinator_address or
             os.environ.get("JAX_COORDINATOR_ADDRESS", ""))
  if not address and not _tpu_pod_slice():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    num_processes = distributed_config.num_processes or int(
        os.environ.get("JAX_NUM_PROCESSES", "0"))
    process_id = distributed_config.process_id
    if process_id < 0:
      process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    jax.distributed.initialize(address, num_processes=num_processes or None,
                               process_id=None if process_id < 0 else process_id)
  else:
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d of %d devices here", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main() -> bool:
  """Process 0, the one that writes the workdir's files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
