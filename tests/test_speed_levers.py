"""Gradient accumulation, remat, memory-efficient attention, bf16 and prefetching: each changes
speed or memory, and none changes what is computed beyond a stated tolerance."""

import threading
import time

import jax
import numpy as np
import pytest

from configs import common
from dreambooth_jax import models, sharding
from dreambooth_jax.data import frozen_cache, prefetch
from dreambooth_jax.training import step as train_step


def _images(seed, count, size=32):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _config(**train):
  config = common.get_config()
  config.data.resolution = 32
  config.data.random_flip = True
  config.train.batch_size = 4  # 8 real rows: one per device, or two micro-batches of 4
  config.train.learning_rate = 1e-3
  config.train.prior_loss_weight = 0.5
  # A larger Adam eps keeps the update a smooth function of the gradient, so that float
  # rounding of near-zero gradients cannot flip an update's sign (see training/test_step.py).
  config.train.adam_eps = 1e-4
  for name, value in train.items():
    config.train[name] = value
  return config


def _step_on_8_devices(components, params, config):
  """(jitted step, its data, state, frozen params, mesh) as train.py sets them up."""
  mesh = sharding.make_mesh()
  data = frozen_cache.training_data(config, components, params, mesh, _images(1, 3),
                                    _images(2, 4), "a photo of sks toy", "a photo of toy")
  optimizer = train_step.make_optimizer(config.train)
  state = sharding.put_state(train_step.create_train_state(
      params, optimizer, 0, False, config.train.param_dtype), mesh)
  frozen = train_step.frozen_params(params, False, True, True)
  step_fn = train_step.jit_on_mesh(components, optimizer, config.train, mesh, state, frozen)
  return step_fn, data, state, frozen, mesh


def _train(components, params, config, steps):
  """`steps` jitted steps on 8 devices; (per-step metrics, final trained params, final AdamW
  state) on the host."""
  step_fn, data, state, frozen, mesh = _step_on_8_devices(components, params, config)
  history = []
  for step in range(steps):
    state, metrics = step_fn(state, frozen, sharding.put_batch(data.batch(step), mesh))
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params), jax.device_get(state.opt_state)


@pytest.fixture(scope="module")
def fp32_run(tiny):
  components, params = tiny
  return _train(components, jax.device_get(params), _config(), 3)


def test_gradient_accumulation_is_the_large_batch_step(tiny, fp32_run):
  components, params = tiny
  history, trained, _ = _train(components, jax.device_get(params), _config(grad_accum_steps=2),
                               3)
  reference_history, reference, _ = fp32_run
  for metrics, expected in zip(history, reference_history):
    for name in ("loss", "instance_loss", "prior_loss", "grad_norm"):
      np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               trained, reference)
  moved = trained["unet"]["conv_in"]["kernel"] - np.asarray(params["unet"]["conv_in"]["kernel"])
  assert np.abs(moved).max() > 1e-3  # three real updates, not a no-op


def test_the_step_waits_for_the_other_devices_once(tiny):
  """One sum over the devices per step, after the backward pass: the gradients and the metrics
  together. The batch carries its row counts, so the loss's means need no sum of the masks
  between the forward and the backward pass (that barrier cost the 4-device tiny step ~7% on
  CPU; README, Performance)."""
  components, params = tiny
  step_fn, data, state, frozen, mesh = _step_on_8_devices(components, jax.device_get(params),
                                                          _config())
  compiled = step_fn.lower(state, frozen, sharding.put_batch(data.batch(0), mesh)).compile()
  assert compiled.as_text().count(" all-reduce(") == 1
  # Without the counts the loss sums the masks over the devices: a second all-reduce.
  batch = {k: v for k, v in data.batch(0).items() if not k.endswith("_count")}
  compiled = step_fn.lower(state, frozen, sharding.put_batch(batch, mesh)).compile()
  assert compiled.as_text().count(" all-reduce(") == 2


def test_microbatches_interleave_rows_so_each_keeps_every_devices_share():
  batch = {"example_id": np.arange(16), "pixel_values": np.arange(32).reshape(16, 2)}
  split = jax.device_get(train_step.split_microbatches(batch, 4))
  np.testing.assert_array_equal(split["example_id"],
                                [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]])
  np.testing.assert_array_equal(split["pixel_values"][1, 2], [18, 19])  # row 9


def test_bfloat16_compute_stays_within_tolerance_of_float32(tiny_dir, fp32_run):
  """model.dtype=bfloat16 (fp32 master weights): per-step loss within 0.5% of float32, and the
  parameter change of 3 steps pointing the same way (cosine > 0.95)."""
  components, params = models.load_pretrained(tiny_dir, dtype="bfloat16")
  params = jax.device_get(params)
  history, trained, opt_state = _train(components, params, _config(), 3)
  reference_history, reference, _ = fp32_run
  # Master weights and every AdamW moment stay float32, and so does the loss.
  assert {leaf.dtype for leaf in jax.tree.leaves(trained)} == {np.dtype(np.float32)}
  moments = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0]
  assert len(moments) == 2 * len(jax.tree.leaves(trained))
  assert {leaf.dtype for leaf in moments} == {np.dtype(np.float32)}
  for metrics, expected in zip(history, reference_history):
    assert metrics["loss"].dtype == np.float32
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=5e-3)
  change = lambda tree: np.concatenate([
      (np.asarray(a, np.float64) - b).ravel()
      for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves({"unet": params["unet"]}))])
  bf16_change, fp32_change = change(trained), change(reference)
  cosine = bf16_change @ fp32_change / np.linalg.norm(bf16_change) / np.linalg.norm(fp32_change)
  assert 0.95 < cosine < 1.0  # close, and not trivially identical


def test_a_bfloat16_prediction_is_reduced_in_float32():
  """The per-example MSE of bfloat16 model outputs is the float32 mean of their squared error:
  a bfloat16 sum of 4096 terms would be off by ~1e-3 relative."""
  rng = np.random.default_rng(0)
  prediction, target = (jax.numpy.asarray(rng.normal(size=(2, 4, 32, 32)), jax.numpy.bfloat16)
                        for _ in range(2))
  mse = train_step.per_example_mse(prediction, target)
  assert mse.dtype == np.float32
  exact = np.square(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))
  np.testing.assert_allclose(mse, exact.reshape(2, -1).mean(1), rtol=1e-6)


def test_bfloat16_param_dtype_keeps_weights_and_adam_moments_in_bfloat16(tiny):
  components, params = tiny
  config = _config(param_dtype="bfloat16")
  history, trained, _ = _train(components, jax.device_get(params), config, 1)
  assert {leaf.dtype for leaf in jax.tree.leaves(trained)} == {np.dtype(jax.numpy.bfloat16)}
  optimizer = train_step.make_optimizer(config.train)
  state = jax.eval_shape(lambda p: train_step.create_train_state(p, optimizer, 0, False,
                                                                 "bfloat16"), params)
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  assert moments and {leaf.dtype for leaf in moments} == {np.dtype(jax.numpy.bfloat16)}
  assert np.isfinite(history[0]["loss"])


def _cached_batch(components, params):
  data = frozen_cache.training_data(_config(), components, params, sharding.make_mesh(),
                                    _images(1, 3), _images(2, 4), "a photo of sks toy",
                                    "a photo of toy")
  return data.batch(0)


def _loss_and_grads(components, params, remat=False):
  loss_fn = train_step.make_loss_fn(components, 0.5, remat=remat)
  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, metrics = grad_fn({"unet": params["unet"]}, {}, _cached_batch(components, params),
                           jax.random.PRNGKey(0))
  return float(metrics["loss"]), jax.device_get(grads)


@pytest.fixture(scope="module")
def plain_loss_and_grads(tiny):
  return _loss_and_grads(*tiny)


def test_remat_recomputes_the_same_gradient(tiny, plain_loss_and_grads):
  components, params = tiny
  loss_fn = train_step.make_loss_fn(components, 0.5, remat=True)
  jaxpr = str(jax.make_jaxpr(loss_fn)({"unet": params["unet"]}, {},
                                      _cached_batch(components, params), jax.random.PRNGKey(0)))
  # One rematerialized call per ResNet and transformer block of the tiny UNet.
  blocks = sum(1 for name in jax.tree.leaves(jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path), params["unet"]))
               if name.endswith("['conv1']['kernel']") or name.endswith("['proj_in']['kernel']"))
  assert blocks > 2 and jaxpr.count("remat") == blocks
  loss, grads = _loss_and_grads(components, params, remat=True)
  plain_loss, plain_grads = plain_loss_and_grads
  assert loss == plain_loss
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads,
               plain_grads)


def test_memory_efficient_attention_computes_the_same_loss(tiny_dir, tiny, plain_loss_and_grads):
  components, params = models.load_pretrained(tiny_dir, attention="chunked")
  assert components.unet.attention_implementation == "chunked"
  assert tiny[0].unet.attention_implementation == "xla"
  loss, grads = _loss_and_grads(components, params)
  plain_loss, plain_grads = plain_loss_and_grads
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads,
               plain_grads)


def test_prefetch_yields_in_order_and_works_ahead_on_one_thread():
  made, threads = [], set()

  def make(step):
    made.append(step)
    threads.add(threading.current_thread().name)
    return step * 10

  batches = prefetch.prefetched(make, range(6), ahead=2)
  assert next(batches) == 0
  time.sleep(0.2)
  assert made == [0, 1, 2]  # the step in use and the 2 after it, no more
  assert list(batches) == [10, 20, 30, 40, 50]
  assert len(threads) == 1 and threading.current_thread().name not in threads


def test_prefetch_off_builds_each_batch_when_needed_and_errors_surface_at_their_step():
  made = []
  batches = prefetch.prefetched(lambda step: made.append(step) or step, range(5), ahead=0)
  assert next(batches) == 0 and made == [0]

  def failing(step):
    if step == 2:
      raise ValueError("bad image")
    return step

  batches = prefetch.prefetched(failing, range(5), ahead=2)
  assert [next(batches), next(batches)] == [0, 1]
  with pytest.raises(ValueError, match="bad image"):
    next(batches)
