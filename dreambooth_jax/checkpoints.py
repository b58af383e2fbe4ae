"""Orbax checkpoints of the TrainState under workdir/checkpoints/<step>/.

Orbax writes each step into a temporary directory and renames it when complete, so the newest
step directory it lists is always whole; incomplete ones are cleaned up on the next start.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from dreambooth_jax.train_step import TrainState


def make_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
  """Starts an asynchronous save of `state` at its step (skipped if that step exists)."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> TrainState | None:
  """The newest checkpoint laid out like `target` (same shardings), or None if there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
