"""The checkpoint layout: sharded or large leaves by name, the others packed per dtype; older
checkpoints.

States here are numpy trees, or put on 2 x 4 or 8 x 1 (data x fsdp) meshes of the simulated
devices: nothing is compiled.
"""

import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dreambooth_jax import sharding
from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.training import checkpoints
from dreambooth_jax.training.step import TrainState


def _state(kernel_shape=(3, 3, 64, 128), seed=0) -> TrainState:
  rng = np.random.default_rng(seed)
  normal = lambda shape, dtype=np.float32: rng.standard_normal(shape).astype(dtype)
  params = {"unet": {"conv": {"kernel": normal(kernel_shape), "bias": normal((128,))},
                     "norm": {"scale": normal((64,), ml_dtypes.bfloat16)}}}
  moments = lambda: jax.tree.map(lambda x: normal(x.shape, x.dtype), params)
  return TrainState(step=np.int32(7), params=params,
                    opt_state=({"count": np.int32(7), "mu": moments(), "nu": moments()},),
                    rng=np.array([3, 4], np.uint32), nonfinite_steps=np.int32(1),
                    first_nonfinite_step=np.int32(5))


def _target(state: TrainState, mesh) -> TrainState:
  return jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                      state, sharding.state_shardings(state, mesh))


def _assert_restored(restored: TrainState, state: TrainState, target: TrainState) -> None:
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b, strict=True),
               restored, state)
  for leaf, like in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert leaf.sharding == like.sharding


def test_sharded_leaves_are_kept_by_name_and_whole_ones_packed_per_dtype(tmp_path):
  state = _state()
  fsdp_mesh = sharding.make_mesh(data=2, fsdp=4)
  manager = checkpoints.make_manager(str(tmp_path), 2)
  checkpoints.save(manager, sharding.put_state(state, fsdp_mesh))
  checkpoints.wait(manager)
  saved = manager.item_metadata(7).tree
  # 128 bias + 2 x 128 moments of it; the bf16 scale and its moments; 4 int32 scalars; the key.
  assert {dtype: tuple(meta.shape) for dtype, meta in saved["packed"].items()} == {
      "float32": (3 * 128,), "bfloat16": (3 * 64,), "int32": (4,), "uint32": (2,)}
  assert sorted(saved["arrays"]) == ["opt_state.0.mu.unet.conv.kernel",
                                     "opt_state.0.nu.unet.conv.kernel", "params.unet.conv.kernel"]
  layout = manager.item_metadata(7).custom_metadata["packed"]
  assert layout[:3] == [["step", "int32", []], ["params.unet.conv.bias", "float32", [128]],
                        ["params.unet.norm.scale", "bfloat16", [64]]]
  assert len(layout) == 11  # 4 int32 scalars, the key, 2 x 3 bias and scale entries
  assert "_sharding" not in os.listdir(tmp_path / "checkpoints" / "7" / "default")

  target = _target(state, sharding.make_mesh(data=8, fsdp=1))
  restored = checkpoints.restore_latest(checkpoints.make_manager(str(tmp_path), 2), target)
  _assert_restored(restored, state, target)


def test_a_replicated_state_packs_every_leaf_below_the_size_bound(tmp_path):
  """On a data-parallel mesh every leaf is whole on each device: all but those of
  PACK_MAX_SIZE elements or more go into the packed arrays, whatever their size class."""
  large = (4, 4, 128, 128)  # 2**18 elements: the first size kept as an array
  for kernel_shape, arrays in (((3, 3, 64, 128), []), (large, ["opt_state.0.mu.unet.conv.kernel",
                               "opt_state.0.nu.unet.conv.kernel", "params.unet.conv.kernel"])):
    state = _state(kernel_shape)
    manager = checkpoints.make_manager(str(tmp_path / str(kernel_shape[0])), 2)
    checkpoints.save(manager, sharding.put_state(state, sharding.make_mesh(data=8, fsdp=1)))
    checkpoints.wait(manager)
    saved = manager.item_metadata(7).tree
    assert sorted(saved["arrays"]) == arrays
    packed_kernels = 0 if arrays else 3 * 3 * 3 * 64 * 128
    assert tuple(saved["packed"]["float32"].shape) == (3 * 128 + packed_kernels,)

    fsdp_target = _target(state, sharding.make_mesh(data=2, fsdp=4))
    assert sharding.FSDP_AXIS in fsdp_target.params["unet"]["conv"]["kernel"].sharding.spec
    _assert_restored(checkpoints.restore_latest(manager, fsdp_target), state, fsdp_target)


def test_a_checkpoint_written_before_the_packing_restores(tmp_path):
  """Earlier versions saved the TrainState's own tree, every leaf an array of its own."""
  state = _state()
  manager = checkpoints.make_manager(str(tmp_path), 2)
  manager.save(7, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  assert "packed" not in manager.item_metadata(7).tree
  target = _target(state, sharding.make_mesh(data=8, fsdp=1))
  _assert_restored(checkpoints.restore(manager, 7, target), state, target)


def _renamed_norm(state: TrainState) -> TrainState:
  rename = lambda tree: {"unet": {"conv": tree["unet"]["conv"], "norm_1": tree["unet"]["norm"]}}
  moments = state.opt_state[0]
  return state.replace(params=rename(state.params), opt_state=(
      {"count": moments["count"], "mu": rename(moments["mu"]), "nu": rename(moments["nu"])},))


@pytest.mark.parametrize("other, message", [
    # 2**19 elements: kept by name, as every leaf of PACK_MAX_SIZE or more is.
    (_state(kernel_shape=(4, 4, 128, 256)),
     r"params\.unet\.conv\.kernel is float32\[4, 4, 128, 256\] there, "
     r"float32\[3, 3, 64, 128\] here"),
    # Same shapes, sizes and tree order of the packed leaves; only a name differs.
    (_renamed_norm(_state()), r"params\.unet\.norm\.scale is missing there, bfloat16\[64\] here"),
], ids=["large_leaf_shape", "small_leaf_name"])
def test_a_checkpoint_of_another_model_is_refused_naming_the_leaf(tmp_path, other, message):
  manager = checkpoints.make_manager(str(tmp_path), 2)
  checkpoints.save(manager, other)
  checkpoints.wait(manager)
  kept = sorted(manager.item_metadata(7).tree["arrays"])
  assert kept == (["opt_state.0.mu.unet.conv.kernel", "opt_state.0.nu.unet.conv.kernel",
                   "params.unet.conv.kernel"] if other.params["unet"]["conv"]["kernel"].size
                  >= checkpoints.PACK_MAX_SIZE else [])
  target = _target(_state(), sharding.make_mesh(data=8, fsdp=1))
  with pytest.raises(CheckpointError, match="does not match the state being trained: " + message):
    checkpoints.restore_latest(manager, target)


def test_a_per_leaf_checkpoint_of_another_model_is_refused(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path), 2)
  manager.save(7, args=ocp.args.StandardSave(_state(kernel_shape=(3, 3, 64, 256))))
  manager.wait_until_finished()
  target = _target(_state(), sharding.make_mesh(data=8, fsdp=1))
  with pytest.raises(CheckpointError, match=r"checkpoints/7 does not match the state being "
                     r"trained: params\.unet\.conv\.kernel is float32\[3, 3, 64, 256\] there"):
    checkpoints.restore(manager, 7, target)
