"""Orbax checkpoints of the TrainState under workdir/checkpoints/<step>/.

Orbax writes each step into a temporary directory and renames it when complete, so the newest
step directory it lists is always whole; a temporary one left by a killed process is deleted on
the next start. A save that fails (disk full) leaves the previous checkpoints untouched.

A checkpoint holds the TrainState's leaves by name ("params.unet.conv_in.kernel") under
"arrays", except those every device holds whole and of fewer than PACK_MAX_SIZE elements
(biases, norms and counters on any mesh; on a data-parallel mesh every weight of the tiny model
and SD's smaller ones), which are packed in tree order into one flat array per dtype under
"packed", with their names, dtypes and shapes in the item's custom metadata. Orbax's cost is
per array (~1.7 ms of CPU each): the tiny model's 630 leaves took ~1.1 s per save; its 48
large ones and three packed arrays ~0.2 s; all of it packed, ~0.12 s. A restore follows the
stored layout, leaf by name, whatever mesh wrote it and whatever mesh reads it, and refuses a
checkpoint whose names, dtypes or shapes differ from the state's. Checkpoints written before
the packing (every leaf as it is, the TrainState's own tree) still restore.
"""

from __future__ import annotations

import functools
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
PACK_MAX_SIZE = 2**18  # elements (1 MiB of float32): larger replicated leaves stay arrays


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
    manager.save(step, args=_save_args(state))
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
  directory = os.path.join(manager.directory, str(step))
  metadata = manager.item_metadata(step)
  if metadata is None:
    raise CheckpointError(f"{directory} holds no Orbax checkpoint item; it was not written by "
                          "this trainer")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  named, treedef = _named_leaves(abstract)
  layout = _stored_layout(metadata)
  _check_matches(layout, named, directory)
  if PACKED not in metadata.tree:  # written before the packing: the TrainState's own tree
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  arrays = {name: leaf for name, leaf in named if layout[name][0] == ARRAYS}
  packed = {dtype: np.empty(meta.shape, dtype) for dtype, meta in metadata.tree[PACKED].items()}
  restored = manager.restore(step, args=ocp.args.StandardRestore({PACKED: packed,
                                                                   ARRAYS: arrays}))
  leaves = []
  for name, leaf in named:
    group, dtype, shape, start = layout[name]
    if group == ARRAYS:
      leaves.append(restored[ARRAYS][name])
    else:
      value = restored[PACKED][dtype][start:start + math.prod(shape)].reshape(shape)
      leaves.append(sharding.place(value, leaf.sharding))
  return jax.tree.unflatten(treedef, leaves)


def _is_packed(leaf: Any) -> bool:
  """Whole on every device (so one local copy is all of it) and below PACK_MAX_SIZE elements,
  so that no large weight is copied once more on the host (SD 1.5's packed leaves: 92 MB).
  (Typed PRNG keys have no numpy dtype: Orbax saves them as they are.)"""
  return ((not isinstance(leaf, jax.Array) or leaf.is_fully_replicated)
          and math.prod(leaf.shape) < PACK_MAX_SIZE
          and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))


def _named_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """(name, leaf) in tree order, named by their path ("opt_state.0.mu.unet.conv_in.kernel")."""
  leaves, treedef = jax.tree.flatten(tree)
  return list(zip(_leaf_names(treedef), leaves)), treedef


@functools.lru_cache(maxsize=8)
def _leaf_names(treedef: Any) -> tuple[str, ...]:
  """The paths of a tree structure's leaves, worked out once per structure (every save)."""
  positions = jax.tree.unflatten(treedef, range(treedef.num_leaves))
  return tuple(jax.tree_util.keystr(path, simple=True, separator=".")
               for path, _ in jax.tree_util.tree_flatten_with_path(positions)[0])


def _save_args(state: TrainState) -> ocp.args.StandardSave:
  """The state as a checkpoint holds it: the leaves _is_packed picks packed per dtype, the
  others by name, and the packed ones' names, dtypes and shapes (in packing order) as the
  item's custom metadata."""
  named, _ = _named_leaves(state)
  small, large = [], {}
  for name, leaf in named:
    if _is_packed(leaf):
      small.append((name, np.dtype(leaf.dtype).name, leaf))
    else:
      large[name] = leaf
  # Packed leaves are replicated: this process's first copy is the whole value, and reading it
  # needs no other host. One device_get starts every transfer before waiting for any.
  local = [leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
           for _, _, leaf in small]
  parts = {}
  for (_, dtype, _), value in zip(small, jax.device_get(local)):
    parts.setdefault(dtype, []).append(np.ravel(value))
  tree = {PACKED: {dtype: np.concatenate(values) for dtype, values in parts.items()},
          ARRAYS: large}
  layout = [[name, dtype, list(leaf.shape)] for name, dtype, leaf in small]
  return ocp.args.StandardSave(tree, custom_metadata={PACKED: layout})


def _stored_layout(metadata: Any) -> dict[str, tuple[str, str, tuple[int, ...], int]]:
  """name -> (group, dtype, shape, start in its dtype's packed array) of each stored leaf; in a
  checkpoint from before the packing every leaf is an array of its own, named by its path."""
  arrays = (metadata.tree.get(ARRAYS, {}) if PACKED in metadata.tree else
            {".".join(keys): meta for keys, meta in ocp.tree.to_flat_dict(metadata.tree).items()})
  layout = {name: (ARRAYS, np.dtype(meta.dtype).name, tuple(meta.shape), 0)
            for name, meta in arrays.items()}
  starts = {}
  for name, dtype, shape in (metadata.custom_metadata or {}).get(PACKED, []):
    start = starts.get(dtype, 0)
    layout[name] = (PACKED, dtype, tuple(shape), start)
    starts[dtype] = start + math.prod(shape)
  return layout


def _check_matches(layout: dict[str, tuple[str, str, tuple[int, ...], int]],
                   named: list[tuple[str, Any]], directory: str) -> None:
  """A checkpoint of another model is refused, naming the first leaf that differs. (Orbax would
  cast a stored array to the requested dtype, and reads a packed one at its stored size.)"""
  mismatch = f"the checkpoint in {directory} does not match the state being trained: "
  for name, leaf in named:
    here = (np.dtype(leaf.dtype).name, tuple(leaf.shape))
    stored = layout.get(name)
    if stored is None or stored[1:3] != here:
      there = "missing" if stored is None else f"{stored[1]}{list(stored[2])}"
      raise CheckpointError(f"{mismatch}{name} is {there} there, {here[0]}{list(here[1])} here "
                            "(another model, optimizer or train.param_dtype?)")
  extra = sorted(set(layout) - {name for name, _ in named})
  if extra:
    raise CheckpointError(f"{mismatch}it holds {extra[0]}, which this state has not (another "
                          "model or optimizer?)")
