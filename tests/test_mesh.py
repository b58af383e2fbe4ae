"""The data × fsdp mesh: the same numbers on every shape, parameters split along fsdp, and
checkpoints that restore onto another mesh."""

import math
import os

import jax
import numpy as np
import pytest

from configs import common
from dreambooth_jax import sharding
from dreambooth_jax.data import frozen_cache
from dreambooth_jax.training import checkpoints, step as train_step

SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def _images(seed, count):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def _config():
  config = common.get_config()
  config.data.resolution = 32
  config.train.batch_size = 4
  config.train.learning_rate = 1e-3
  config.train.adam_eps = 1e-4  # updates smooth in the gradient (see training/test_step.py)
  return config


def _state_on(mesh, params, config):
  optimizer = train_step.make_optimizer(config.train)
  return optimizer, sharding.put_state(train_step.create_train_state(params, optimizer, 0, False),
                                       mesh)


@pytest.fixture(scope="module")
def runs(tiny):
  """Two steps on each mesh shape: {shape: (losses, final state on the host, the state, every
  weight of the pipeline as the run lays it out, frozen ones included)}."""
  components, params = tiny
  params = jax.device_get(params)
  config = _config()
  instance, classes = _images(1, 3), _images(2, 4)
  results = {}
  for data, fsdp in SHAPES:
    mesh = sharding.make_mesh(data=data, fsdp=fsdp)
    placed = sharding.put_state(params, mesh)
    batches = frozen_cache.training_data(config, components, placed, mesh, instance, classes,
                                         "a photo of sks toy", "a photo of toy")
    optimizer, state = _state_on(mesh, placed, config)
    frozen = train_step.frozen_params(placed, False, True, True)
    step_fn = train_step.jit_on_mesh(components, optimizer, config.train, mesh, state, frozen)
    losses = []
    for step in range(2):
      state, metrics = step_fn(state, frozen, sharding.put_batch(batches.batch(step), mesh))
      losses.append(float(metrics["loss"]))
    results[(data, fsdp)] = (losses, jax.device_get(state), state, placed)
  return results


def test_loss_and_updated_parameters_are_the_same_on_every_mesh_shape(runs, tiny):
  reference_losses, reference_state, *_ = runs[(8, 1)]
  for shape in SHAPES[1:]:
    losses, state, *_ = runs[shape]
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, reference_state.params)
  moved = (reference_state.params["unet"]["conv_in"]["kernel"] -
           np.asarray(tiny[1]["unet"]["conv_in"]["kernel"]))
  assert np.abs(moved).max() > 1e-3


def _assert_fsdp_layout(tree, fsdp: int) -> int:
  """Every array of >= MIN_FSDP_SIZE elements split `fsdp` ways along its largest divisible
  dimension, the rest whole; returns how many arrays are split."""
  split = 0
  for leaf in jax.tree.leaves(tree):
    spec = leaf.sharding.spec
    if fsdp > 1 and leaf.size >= sharding.MIN_FSDP_SIZE and any(
        size % fsdp == 0 for size in leaf.shape):
      axis = list(spec).index(sharding.FSDP_AXIS)
      assert leaf.shape[axis] == max(s for s in leaf.shape if s % fsdp == 0)
      assert leaf.addressable_shards[0].data.shape[axis] == leaf.shape[axis] // fsdp
      split += 1
    else:
      assert sharding.FSDP_AXIS not in tuple(spec)
  return split


def test_fsdp_splits_every_large_array_and_replicates_the_small_ones(runs):
  for (_, fsdp), (_, _, state, placed) in runs.items():
    _assert_fsdp_layout(state, fsdp)
    # The frozen weights too (the README: parameters, AdamW's moments and the frozen weights):
    # the run lays out the whole pipeline so before it encodes or trains.
    for name in ("vae", "text_encoder"):
      split = _assert_fsdp_layout(placed[name], fsdp)
      assert (split > 0) == (fsdp > 1), (name, fsdp, split)
  # The tiny model has many small arrays, which stay whole: fsdp = 8 still cuts a device's
  # share of the state by more than half (SD 1.5: below).
  per_device = lambda state: sum(leaf.addressable_shards[0].data.nbytes
                                 for leaf in jax.tree.leaves(state))
  assert per_device(runs[(1, 8)][2]) < 0.5 * per_device(runs[(8, 1)][2])


def test_fsdp_8_holds_an_eighth_of_sd15s_training_state_per_device():
  from dreambooth_jax import plan  # pylint: disable=g-import-not-at-top
  _, params = plan.abstract_pipeline(plan.architecture_configs("sd15"), "bfloat16")
  config = _config()
  optimizer = train_step.make_optimizer(config.train)
  state = jax.eval_shape(lambda p: train_step.create_train_state(p, optimizer, 0, False), params)
  per_device = lambda mesh: sum(
      math.prod(shard.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      for leaf, shard in zip(jax.tree.leaves(state),
                             jax.tree.leaves(sharding.state_shardings(state, mesh))))
  whole = per_device(sharding.make_mesh(data=8, fsdp=1))
  assert whole / 2**30 == pytest.approx(3 * 859_520_964 * 4 / 2**30, rel=1e-3)
  assert per_device(sharding.make_mesh(data=1, fsdp=8)) < whole / 8 * 1.01


def test_fsdp_spec_picks_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((3, 3, 64, 128), 4) == jax.sharding.PartitionSpec(
      None, None, None, sharding.FSDP_AXIS)
  assert sharding.fsdp_spec((1024, 30), 4) == jax.sharding.PartitionSpec(sharding.FSDP_AXIS)
  assert sharding.fsdp_spec((999, 33), 2) == jax.sharding.PartitionSpec()  # none divisible
  assert sharding.fsdp_spec((64,), 2) == jax.sharding.PartitionSpec()  # small: replicated
  assert sharding.fsdp_spec((1024, 1024), 1) == jax.sharding.PartitionSpec()


def test_a_checkpoint_written_on_one_mesh_restores_onto_another(runs, tmp_path):
  _, host_state, state, _ = runs[(8, 1)]
  manager = checkpoints.make_manager(str(tmp_path), 2)
  checkpoints.save(manager, state)
  checkpoints.wait(manager)
  target_mesh = sharding.make_mesh(data=2, fsdp=4)
  target = runs[(2, 4)][2]
  restored = checkpoints.restore_latest(checkpoints.make_manager(str(tmp_path), 2), target)
  assert int(restored.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), host_state)
  for leaf, like in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert leaf.sharding == like.sharding and leaf.sharding.mesh.shape == target_mesh.shape


@pytest.mark.parametrize("data,fsdp,field", [(3, 2, "mesh.data × config.mesh.fsdp"),
                                              (0, 3, "mesh.fsdp"), (2, 2, "mesh.data")])
def test_a_mesh_that_does_not_match_the_devices_is_refused_naming_the_fields(data, fsdp, field):
  with pytest.raises(sharding.MeshError, match=r"config\." + field.replace(".", r"\.")):
    sharding.make_mesh(data=data, fsdp=fsdp)
  assert math.prod(sharding.make_mesh(data=0, fsdp=2).devices.shape) == 8


def test_devices_that_cannot_be_simulated_any_more_are_refused_in_one_line(monkeypatch):
  """--devices=N after jax has started: the first N when there are enough, else an input
  error, never silently fewer devices."""
  # use_devices appends to $XLA_FLAGS: restored afterwards, for the CLI runs of later tests.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  present = len(jax.devices())  # jax has started (8 simulated devices in the suite)
  assert sharding.use_devices(2) == jax.devices()[:2]
  with pytest.raises(sharding.MeshError, match=rf"^--devices={present + 8}: only {present} "
                     r"devices, and jax has already started, so no more can be simulated$"):
    sharding.use_devices(present + 8)


def test_the_batch_putter_puts_again_only_the_fields_that_changed():
  """Fields equal to the previous batch's (same values, shape and dtype) keep their device
  arrays; any other is put again, split over every device."""
  mesh = sharding.make_mesh(fsdp=2)
  put = sharding.BatchPutter(mesh)
  rows = np.arange(16, dtype=np.float32).reshape(8, 2)
  first = put({"mask": np.ones(8, np.float32), "latent": rows})
  second = put({"mask": np.ones(8, np.float32), "latent": rows + 1})
  assert second["mask"] is first["mask"] and second["latent"] is not first["latent"]
  np.testing.assert_array_equal(second["latent"], rows + 1)
  assert second["latent"].sharding == sharding.data_sharded(mesh)
  assert len(second["latent"].addressable_shards) == 8
  third = put({"mask": np.ones(8, np.int32), "latent": rows[:, :1] + 1})  # dtype, shape
  assert third["mask"] is not second["mask"] and third["mask"].dtype == np.int32
  np.testing.assert_array_equal(third["latent"], rows[:, :1] + 1)
  assert put({"mask": np.ones(8, np.int32)})["mask"] is third["mask"]
