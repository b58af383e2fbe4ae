"""Orbax checkpoints of the TrainState under workdir/checkpoints/<step>/.

Orbax writes each step into a temporary directory and renames it when complete, so the newest
step directory it lists is always whole; a temporary one left by a killed process is deleted on
the next start. A save that fails (disk full) leaves the previous checkpoints untouched.

A checkpoint holds the TrainState's leaves by name ("params.unet.conv_in.kernel") under
"arrays", except those below sharding.MIN_FSDP_SIZE elements (biases, norms, counters: always
replicated, on any mesh), which are packed in tree order into one flat array per dtype under
"packed". Orbax's cost is per array (~1.7 ms of CPU each): the tiny model's 630 leaves took
~1.1 s per save, its 48 large ones and three packed arrays ~0.15 s. Checkpoints written before
the packing (every leaf as it is, the TrainState's own tree) still restore.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dreambooth_jax import failpoints
from dreambooth_jax import sharding
from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.training.step import TrainState

PACKED, ARRAYS = "packed", "arrays"  # the checkpoint's two groups (module docstring)


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
  # The handler named up front, so that a new manager can read a checkpoint's metadata (which
  # layout it has) before anything was saved or restored through it.
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
  """Starts an asynchronous save of `state` at its step (skipped if that step exists)."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  try:
    manager.save(step, args=ocp.args.StandardSave(_saved_tree(state)))
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
  saved = manager.item_metadata(step).tree
  if PACKED not in saved:  # written before the packing: the TrainState's own tree
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  named, treedef = _named_leaves(abstract)
  packed = {dtype: np.empty(size, dtype) for dtype, size in _packed_sizes(named).items()}
  arrays = {name: leaf for name, leaf in named if not _is_packed(leaf)}
  expected = {PACKED: packed, ARRAYS: arrays}
  _check_matches(saved, expected, os.path.join(manager.directory, str(step)))
  restored = manager.restore(step, args=ocp.args.StandardRestore(expected))
  offsets = dict.fromkeys(packed, 0)
  leaves = []
  for name, leaf in named:
    if not _is_packed(leaf):
      leaves.append(restored[ARRAYS][name])
      continue
    dtype, size = np.dtype(leaf.dtype).name, math.prod(leaf.shape)
    value = restored[PACKED][dtype][offsets[dtype]:offsets[dtype] + size].reshape(leaf.shape)
    offsets[dtype] += size
    leaves.append(sharding.place(value, leaf.sharding))
  return jax.tree.unflatten(treedef, leaves)


def _is_packed(leaf: Any) -> bool:
  """Below sharding.MIN_FSDP_SIZE elements: replicated on every mesh, so one copy is all of it."""
  return math.prod(leaf.shape) < sharding.MIN_FSDP_SIZE


def _named_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """(name, leaf) in tree order, named by their path ("opt_state.0.mu.unet.conv_in.kernel")."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path, simple=True, separator="."), leaf)
          for path, leaf in with_paths], treedef


def _packed_sizes(named: list[tuple[str, Any]]) -> dict[str, int]:
  sizes = {}
  for _, leaf in named:
    if _is_packed(leaf):
      dtype = np.dtype(leaf.dtype).name
      sizes[dtype] = sizes.get(dtype, 0) + math.prod(leaf.shape)
  return sizes


def _saved_tree(state: TrainState) -> dict[str, dict[str, Any]]:
  """The state as a checkpoint holds it: large leaves by name, the small ones packed."""
  named, _ = _named_leaves(state)
  small = [leaf for _, leaf in named if _is_packed(leaf)]
  # Small leaves are replicated: this process's first copy is the whole value, and reading it
  # needs no other host. One device_get starts every transfer before waiting for any.
  local = [leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf for leaf in small]
  parts = {}
  for leaf, value in zip(small, jax.device_get(local)):
    parts.setdefault(np.dtype(leaf.dtype).name, []).append(np.ravel(value))
  return {PACKED: {dtype: np.concatenate(values) for dtype, values in parts.items()},
          ARRAYS: {name: leaf for name, leaf in named if not _is_packed(leaf)}}


def _check_matches(saved: dict[str, Any], expected: dict[str, dict[str, Any]],
                   directory: str) -> None:
  """Orbax reads a stored array into any requested shape (cut or padded); a checkpoint of
  another model must be refused instead, naming the first array that differs."""
  for group, leaves in expected.items():
    stored = saved.get(group, {})
    for name, leaf in leaves.items():
      found = stored.get(name)
      if found is None or tuple(found.shape) != tuple(leaf.shape) or (
          np.dtype(found.dtype) != np.dtype(leaf.dtype)):
        there = "missing" if found is None else f"{np.dtype(found.dtype).name}{list(found.shape)}"
        raise CheckpointError(
            f"the checkpoint in {directory} does not match the state being trained: "
            f"{group}.{name} is {there} there, {np.dtype(leaf.dtype).name}{list(leaf.shape)} "
            "here (another model, optimizer or train.param_dtype?)")
    extra = sorted(set(stored) - set(leaves))
    if extra:
      raise CheckpointError(
          f"the checkpoint in {directory} does not match the state being trained: it holds "
          f"{group}.{extra[0]}, which this state has not (another model or optimizer?)")
