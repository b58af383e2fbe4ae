"""Orbax checkpoints of the TrainState under workdir/checkpoints/<step>/.

Orbax writes each step into a temporary directory and renames it when complete, so the newest
step directory it lists is always whole; a temporary one left by a killed process is deleted on
the next start. A save that fails (disk full) leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from dreambooth_jax import failpoints
from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.training.step import TrainState


def _install_commit_fault() -> None:
  """Lets DREAMBOOTH_JAX_FAILPOINTS stop a save after its files are written, before the rename."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  if getattr(finalize, "with_fault", False):
    return

  async def finalize_with_fault(self, *args, **kwargs):
    name = self._final_path.name  # pylint: disable=protected-access
    if name.isdigit():  # the step folder, not one of the items inside it
      failpoints.at("checkpoint_commit", int(name))
    return await finalize(self, *args, **kwargs)

  finalize_with_fault.with_fault = True
  atomicity.AtomicRenameTemporaryPath.finalize = finalize_with_fault


def make_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  if failpoints.enabled():
    _install_commit_fault()
  # Replica-parallel writing splits each replicated array over its replicas so that several
  # hosts share the writing; on one host it only adds a small compiled slice per array shape
  # (seconds per save for the ~700 UNet arrays), so one host writes each array whole. No
  # sharding file: every restore passes the target's shardings (restore_latest), so it was never
  # read, and writing it, one small file per array, took a quarter of a save's CPU time.
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                                                enable_write_sharding_file=False),
      override=True)
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
  try:
    manager.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # a previous async save's failure surfaces here too
    raise _save_error(manager, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the in-flight save is committed; a failed one raises CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _save_error(manager, e) from e


def _save_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointError:
  manager.reload()
  kept = manager.latest_step()
  kept_text = f"step {kept}" if kept is not None else "none"
  return CheckpointError(f"saving a checkpoint in {manager.directory} failed ({error}); "
                         f"the newest complete checkpoint is kept: {kept_text}")


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> TrainState | None:
  """The newest checkpoint laid out like `target` (same shardings), or None if there is none."""
  step = manager.latest_step()
  return None if step is None else restore(manager, step, target)


def restore(manager: ocp.CheckpointManager, step: int, target: TrainState) -> TrainState:
  """The checkpoint of `step` laid out like `target`, whose shardings it needs (no sharding
  file is written)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
