"""The combined DreamBooth loss: exact, independent of device count and row placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from dreambooth_jax import input_pipeline, sharding, train_step

LAMBDA = 0.5


def _images(seed, count, size=32):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def setup(tiny):
  components, params = tiny
  config = common.get_config()
  config.train.learning_rate = 1e-3
  config.train.prior_loss_weight = LAMBDA
  # Adam's first step is lr·g/(|g|+eps): with a tiny eps, a gradient that is ~0 turns float
  # rounding (which differs with the all-reduce order) into a ±lr jump. A larger eps keeps
  # the update a smooth function of the gradient, so device counts can be compared tightly.
  config.train.adam_eps = 1e-4
  # Instance and prior examples deliberately differ: other images and other prompts.
  data = input_pipeline.DreamBoothData(
      instance_images=_images(1, 3), class_images=_images(2, 4),
      instance_ids=input_pipeline.tokenize(components.tokenizer, "a photo of sks toy"),
      class_ids=input_pipeline.tokenize(components.tokenizer, "a red cube on the beach"),
      batch_size=2, resolution=32, center_crop=False, random_flip=True, seed=3,
      pad_to_multiple=8)
  optimizer = train_step.make_optimizer(config.train)
  schedule = train_step.make_schedule(config.train)
  state = jax.device_get(train_step.create_train_state(params, optimizer, 0, False))
  frozen = jax.device_get(train_step.frozen_params(params, False))
  step = train_step.make_train_step(components, optimizer, schedule, LAMBDA)
  loss_fn = jax.jit(train_step.make_loss_fn(components, LAMBDA))
  return components, data, state, frozen, step, loss_fn


def _single_row(batch, row):
  return {k: v[row:row + 1] for k, v in batch.items()}


def test_loss_equals_numpy_combination_of_per_example_mse(setup):
  _, data, state, frozen, _, loss_fn = setup
  batch = data.batch(0)
  assert batch["pixel_values"].shape[0] == 8  # 2 instance + 2 prior + 4 padding rows
  key = jax.random.fold_in(state.rng, 0)
  _, metrics = loss_fn(state.params, frozen, batch, key)
  # Each example alone, as an "instance" row, gives its own MSE.
  per_example = []
  for row in range(4):
    single = _single_row(batch, row)
    single["instance_mask"] = np.ones(1, np.float32)
    single["prior_mask"] = np.zeros(1, np.float32)
    per_example.append(float(loss_fn(state.params, frozen, single, key)[1]["loss"]))
  per_example = np.asarray(per_example, np.float64)
  assert len(set(np.round(per_example, 5))) == 4  # the rows really differ
  expected_instance = per_example[:2].mean()
  expected_prior = per_example[2:].mean()
  np.testing.assert_allclose(float(metrics["instance_loss"]), expected_instance, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["prior_loss"]), expected_prior, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), expected_instance + LAMBDA * expected_prior,
                             rtol=1e-5)


def test_mse_is_mean_over_one_examples_elements():
  prediction = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
  target = np.zeros_like(prediction)
  expected = [np.mean(prediction[0] ** 2), np.mean(prediction[1] ** 2)]
  np.testing.assert_allclose(train_step.per_example_mse(prediction, target), expected)
  losses = train_step.combine_losses(jnp.asarray([1.0, 2.0, 4.0, 100.0]),
                                     jnp.asarray([1.0, 1.0, 0.0, 0.0]),
                                     jnp.asarray([0.0, 0.0, 1.0, 0.0]), 0.25)
  assert float(losses["instance_loss"]) == 1.5
  assert float(losses["prior_loss"]) == 4.0
  assert float(losses["loss"]) == 2.5  # the padding row (100) never counts


def test_row_order_does_not_change_the_loss(setup):
  _, data, state, frozen, _, loss_fn = setup
  batch = data.batch(1)
  key = jax.random.fold_in(state.rng, 1)
  _, reference = loss_fn(state.params, frozen, batch, key)
  order = np.asarray([5, 2, 7, 0, 3, 1, 6, 4])
  shuffled = {k: v[order] for k, v in batch.items()}
  _, metrics = loss_fn(state.params, frozen, shuffled, key)
  for name in ("loss", "instance_loss", "prior_loss"):
    np.testing.assert_allclose(float(metrics[name]), float(reference[name]), rtol=1e-6)


def test_same_loss_and_update_on_1_2_4_8_devices(setup):
  _, data, state, frozen, step, _ = setup
  results = []
  for count in (1, 2, 4, 8):
    mesh = sharding.make_mesh(jax.devices()[:count])
    replicated = sharding.replicated(mesh)
    step_fn = train_step.jit_train_step(step, replicated, replicated,
                                        sharding.data_sharded(mesh), replicated)
    new_state, metrics = step_fn(sharding.put_replicated(state, mesh),
                                 sharding.put_replicated(frozen, mesh),
                                 sharding.put_batch(data.batch(0), mesh))
    assert new_state.params["unet"]["conv_in"]["kernel"].sharding.mesh.size == count
    results.append(jax.device_get((metrics, new_state.params)))
  reference_metrics, reference_params = results[0]
  for metrics, params in results[1:]:
    for name in ("loss", "instance_loss", "prior_loss"):
      np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, reference_params)
  # The step really moved the parameters (so "equal" above is not trivially true).
  before = state.params["unet"]["conv_in"]["kernel"]
  assert np.abs(reference_params["unet"]["conv_in"]["kernel"] - before).max() > 1e-4


def test_v_prediction_target_is_the_velocity(tiny):
  components, _ = tiny
  scheduler = components.noise_scheduler()
  state = scheduler.create_state()
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  noise = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  timesteps = np.asarray([10, 900])
  alphas_cumprod = np.asarray(state.common.alphas_cumprod, np.float64)[timesteps]
  expected = (np.sqrt(alphas_cumprod)[:, None, None, None] * noise -
              np.sqrt(1 - alphas_cumprod)[:, None, None, None] * latents)
  target = train_step.diffusion_target(scheduler, state, "v_prediction", latents, noise,
                                       timesteps)
  np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)
  assert train_step.diffusion_target(scheduler, state, "epsilon", latents, noise,
                                     timesteps) is noise


def test_lr_schedule_warmup_then_linear_decay():
  config = common.get_config().train
  config.learning_rate, config.warmup_steps, config.steps = 1e-4, 2, 6
  config.lr_schedule = "linear"
  schedule = train_step.make_schedule(config)
  np.testing.assert_allclose([float(schedule(s)) for s in range(7)],
                             [0, 5e-5, 1e-4, 7.5e-5, 5e-5, 2.5e-5, 0], atol=1e-10)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_text_encoder_changes_only_when_trained(tiny, train_text_encoder):
  components, params = tiny
  config = common.get_config()
  config.train.learning_rate = 1e-3
  optimizer = train_step.make_optimizer(config.train)
  state = train_step.create_train_state(params, optimizer, 0, train_text_encoder)
  frozen = train_step.frozen_params(params, train_text_encoder)
  assert ("text_encoder" in state.params) == train_text_encoder
  assert ("text_encoder" in frozen) != train_text_encoder
  data = input_pipeline.DreamBoothData(
      instance_images=_images(1, 2), class_images=[],
      instance_ids=input_pipeline.tokenize(components.tokenizer, "a photo of sks toy"),
      class_ids=input_pipeline.tokenize(components.tokenizer, "a photo of toy"),
      batch_size=2, resolution=32, center_crop=True, random_flip=False, seed=0)
  step = jax.jit(train_step.make_train_step(components, optimizer,
                                            train_step.make_schedule(config.train), 1.0))
  new_state, metrics = step(state, frozen, data.batch(0))
  assert float(metrics["prior_loss"]) == 0.0  # no prior rows
  text_params = new_state.params.get("text_encoder", frozen.get("text_encoder"))
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(text_params),
                                                         jax.tree.leaves(params["text_encoder"])))
  assert (moved > 1e-4) == train_text_encoder
