"""The combined DreamBooth loss: exact, independent of device count and row placement."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from dreambooth_jax import sharding
from dreambooth_jax.data import input_pipeline
from dreambooth_jax.training import config_check, step as train_step
from dreambooth_jax.models import schedulers

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
  state = jax.device_get(train_step.create_train_state(params, optimizer, 0, False))
  frozen = jax.device_get(train_step.frozen_params(params, False))
  step = train_step.make_train_step(components, optimizer, config.train)
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
    single["instance_mask"] = single["instance_count"] = np.ones(1, np.float32)
    single["prior_mask"] = single["prior_count"] = np.zeros(1, np.float32)
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
  schedule = dataclasses.replace(components.noise_schedule(), prediction_type="v_prediction")
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  noise = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  timesteps = np.asarray([10, 900])
  alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float64)[timesteps]
  expected = (np.sqrt(alphas_cumprod)[:, None, None, None] * noise -
              np.sqrt(1 - alphas_cumprod)[:, None, None, None] * latents)
  target = schedulers.training_target(schedule, latents, noise, timesteps)
  np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)
  epsilon = dataclasses.replace(schedule, prediction_type="epsilon")
  assert schedulers.training_target(epsilon, latents, noise, timesteps) is noise


def test_lr_schedule_warmup_then_linear_decay():
  config = common.get_config().train
  config.learning_rate, config.warmup_steps, config.steps = 1e-4, 2, 6
  config.lr_schedule = "linear"
  schedule = train_step.make_schedule(config)
  np.testing.assert_allclose([float(schedule(s)) for s in range(7)],
                             [0, 5e-5, 1e-4, 7.5e-5, 5e-5, 2.5e-5, 0], atol=1e-10)


def test_lr_schedule_warmup_then_cosine_decay():
  config = common.get_config().train
  config.learning_rate, config.warmup_steps, config.steps = 1e-4, 2, 6
  config.lr_schedule = "cosine"
  assert "cosine" in config_check.LR_SCHEDULES  # what check_config accepts
  schedule = train_step.make_schedule(config)
  # After warmup: peak · (1 + cos(π · (s - 2) / 4)) / 2, 0 at train.steps and after.
  np.testing.assert_allclose([float(schedule(s)) for s in range(8)],
                             [0, 5e-5, 1e-4, 8.535533905932737e-05, 5e-5,
                              1.4644660940672624e-05, 0, 0], rtol=1e-6, atol=1e-12)


def _adam_updates(optimizer, params, grads_per_step):
  """The updates `optimizer` makes, step by step, on `params` for the given gradients."""
  opt_state, updates = optimizer.init(params), []
  for grads in grads_per_step:
    update, opt_state = optimizer.update(grads, opt_state, params)
    updates.append(jax.device_get(update))
  return updates


@pytest.mark.parametrize("lr_schedule", ["linear", "cosine"])
def test_text_encoder_learning_rate_has_the_unets_schedule_shape(lr_schedule):
  """train.text_encoder_learning_rate is the encoder's peak on the UNet's warmup and decay;
  from train.text_encoder_steps on its LR is 0. A constant gradient makes each AdamW update
  -lr(step) (bias-corrected moments: m̂ = g, v̂ = g²; to 1e-5 relative, float32's rounding
  of AdamW's bias correction 1 - 0.999^t), so the updates show the LRs."""
  config = common.get_config().train
  config.learning_rate, config.text_encoder_learning_rate = 1e-3, 3e-3
  config.warmup_steps, config.steps, config.text_encoder_steps = 2, 8, 6
  config.lr_schedule, config.train_text_encoder, config.weight_decay = lr_schedule, True, 0.0
  params = {"unet": {"w": jnp.zeros(3)}, "text_encoder": {"w": jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates = _adam_updates(train_step.make_optimizer(config), params, [grads] * 8)
  unet_lr = np.asarray([-u["unet"]["w"][0] for u in updates])
  text_lr = np.asarray([-u["text_encoder"]["w"][0] for u in updates])
  decay = np.arange(6) / 6  # fraction of the 6 steps after warmup gone
  shape = np.concatenate([[0, 0.5], 1 - decay if lr_schedule == "linear"
                          else (1 + np.cos(np.pi * decay)) / 2])
  np.testing.assert_allclose(unet_lr, 1e-3 * shape, rtol=2e-5, atol=1e-12)
  np.testing.assert_allclose(text_lr, 3e-3 * shape * (np.arange(8) < 6), rtol=2e-5,
                             atol=1e-12)
  assert text_lr[5] > 0 and unet_lr[7] > 0  # the two stops are really at different steps


def _numpy_adamw(grads_per_step, lr, b1, b2, eps):
  """AdamW (no weight decay) on float64 gradients: the reference the clipping is checked on."""
  m = v = 0.0
  updates = []
  for t, g in enumerate(grads_per_step, 1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return updates


def test_max_grad_norm_clips_the_global_gradient_norm_before_adamw():
  """train.max_grad_norm=1: a gradient of global norm 10 (over the UNet and text encoder
  together) enters AdamW divided by 10; one of norm 0.5 unchanged."""
  config = common.get_config().train
  config.learning_rate, config.weight_decay, config.max_grad_norm = 1e-3, 0.0, 1.0
  config.train_text_encoder = True
  params = {"unet": {"w": jnp.zeros(4)}, "text_encoder": {"w": jnp.zeros(2)}}
  big = np.asarray([6.0, 0.0, 0.0, 0.0, 8.0, 0.0])  # norm 10
  small = np.asarray([-0.3, 0.0, 0.0, 0.0, 0.4, 0.0])  # norm 0.5
  as_tree = lambda g: {"unet": {"w": jnp.asarray(g[:4], jnp.float32)},
                       "text_encoder": {"w": jnp.asarray(g[4:], jnp.float32)}}
  updates = _adam_updates(train_step.make_optimizer(config), params,
                          [as_tree(big), as_tree(small)])
  got = [np.concatenate([u["unet"]["w"], u["text_encoder"]["w"]]) for u in updates]
  adam = dict(lr=1e-3, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
  expected = _numpy_adamw([big / 10, small], **adam)
  for step in range(2):
    # 2e-5: float32's rounding of AdamW's bias correction (see above).
    np.testing.assert_allclose(got[step], expected[step], rtol=2e-5, atol=1e-12)
  unclipped = _numpy_adamw([big, small], **adam)
  # Unclipped, the second update would be another (Adam is scale-free in one step, not across
  # steps): 2.4 times the first weight's.
  assert abs(unclipped[1][0] / got[1][0] - 2.373) < 1e-3


def test_clipping_with_the_steps_own_norm_is_optax_clipping_bit_for_bit():
  """The clip that takes the step's gradient norm gives optax.clip_by_global_norm's numbers,
  clipped or not, and its state is the same (empty), so checkpoints keep their tree."""
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  norm = train_step.optax.tree.norm(grads)
  for max_norm in (1.0, 100.0):  # clipped (norm ~4.6) and not
    reference, reference_state = train_step.optax.clip_by_global_norm(max_norm).update(
        grads, train_step.optax.EmptyState())
    ours = train_step.clip_by_global_norm(max_norm)
    for extra in ({}, {"grad_norm": norm}):
      clipped, state = ours.update(grads, ours.init(grads), **extra)
      assert state == reference_state
      jax.tree.map(np.testing.assert_array_equal, clipped, reference)
  # The norm it is given is the one it clips with.
  halved, _ = train_step.clip_by_global_norm(1.0).update(grads, (), grad_norm=2 * norm)
  np.testing.assert_allclose(halved["a"], grads["a"] / (2 * norm), rtol=1e-6)


def test_an_infinite_loss_of_a_finite_gradient_is_not_applied(setup, monkeypatch):
  """The step checks the loss as well as the gradient norm: a loss made +Inf by a constant
  (its gradient unchanged, finite) leaves weights and AdamW's state as they were, counted."""
  _, data, state, frozen, step, _ = setup
  combine_losses = train_step.combine_losses
  monkeypatch.setattr(train_step, "combine_losses", lambda *args: (
      lambda losses: dict(losses, loss=losses["loss"] + jnp.inf))(combine_losses(*args)))
  # A function of its own: jax's trace cache must not hand `step` to other tests patched.
  new_state, metrics = jax.jit(lambda *args: step(*args))(state, frozen, data.batch(0))
  assert float(metrics["loss"]) == np.inf and np.isfinite(float(metrics["grad_norm"]))
  assert int(new_state.nonfinite_steps) == 1 and int(new_state.first_nonfinite_step) == 1
  jax.tree.map(np.testing.assert_array_equal, (new_state.params, new_state.opt_state),
               (state.params, state.opt_state))


def test_the_step_reduces_its_gradients_to_their_global_norm_once(setup, monkeypatch):
  """The metric, the non-finite check and the clipping share one norm: a second reduction
  over every gradient is ~200 more small kernels a step (benchmark --compare's floor)."""
  _, data, state, frozen, step, _ = setup
  norms = []
  norm = train_step.optax.tree.norm
  monkeypatch.setattr(train_step.optax.tree, "norm", lambda tree: norms.append(1) or norm(tree))
  jax.eval_shape(step, state, frozen, data.batch(0))
  assert len(norms) == 1


def _text_encoder_data(components):
  return input_pipeline.DreamBoothData(
      instance_images=_images(1, 2), class_images=[],
      instance_ids=input_pipeline.tokenize(components.tokenizer, "a photo of sks toy"),
      class_ids=input_pipeline.tokenize(components.tokenizer, "a photo of toy"),
      batch_size=2, resolution=32, center_crop=True, random_flip=False, seed=0)


def _max_change(new, old):
  return max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


def test_text_encoder_stays_frozen_by_default(tiny):
  components, params = tiny
  config = common.get_config()
  config.train.learning_rate = 1e-3
  optimizer = train_step.make_optimizer(config.train)
  state = train_step.create_train_state(params, optimizer, 0, False)
  frozen = train_step.frozen_params(params, False)
  assert "text_encoder" not in state.params and "text_encoder" in frozen
  step = jax.jit(train_step.make_train_step(components, optimizer, config.train))
  new_state, metrics = step(state, frozen, _text_encoder_data(components).batch(0))
  assert float(metrics["prior_loss"]) == 0.0  # no prior rows
  assert "text_encoder_learning_rate" not in metrics
  assert _max_change(new_state.params["unet"], params["unet"]) > 1e-4


def test_text_encoder_own_learning_rate_and_stop_step(tiny):
  """lr 2e-3 for the encoder, 1e-3 for the UNet, encoder frozen after step 1."""
  components, params = tiny
  config = common.get_config()
  config.train.learning_rate = 1e-3
  config.train.train_text_encoder = True
  config.train.text_encoder_learning_rate = 2e-3
  config.train.text_encoder_steps = 1
  config.train.weight_decay = 0.0
  config.train.steps = 3
  optimizer = train_step.make_optimizer(config.train)
  state = train_step.create_train_state(params, optimizer, 0, True)
  frozen = train_step.frozen_params(params, True)
  assert "text_encoder" in state.params and "text_encoder" not in frozen
  data = _text_encoder_data(components)
  step = jax.jit(train_step.make_train_step(components, optimizer, config.train))
  first, metrics = step(state, frozen, data.batch(0))
  assert float(metrics["learning_rate"]) == pytest.approx(1e-3)
  assert float(metrics["text_encoder_learning_rate"]) == pytest.approx(2e-3)
  # Adam's first update is ±lr on every weight with a clear gradient: the largest change of
  # each model is its own learning rate.
  assert _max_change(first.params["text_encoder"], params["text_encoder"]) == pytest.approx(
      2e-3, rel=1e-3)
  assert _max_change(first.params["unet"], params["unet"]) == pytest.approx(1e-3, rel=1e-3)
  second, metrics = step(first, frozen, data.batch(1))
  assert float(metrics["text_encoder_learning_rate"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, second.params["text_encoder"],
               first.params["text_encoder"])  # frozen from step 2 on
  assert _max_change(second.params["unet"], first.params["unet"]) > 1e-4


def _numpy_alphas_cumprod(scheduler_config):
  """ᾱ_t from the scheduler config alone (scaled_linear betas, as SD's schedulers use)."""
  assert scheduler_config["beta_schedule"] == "scaled_linear"
  betas = np.linspace(scheduler_config["beta_start"] ** 0.5, scheduler_config["beta_end"] ** 0.5,
                      scheduler_config["num_train_timesteps"], dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_numpy(tiny, prediction_type):
  components, _ = tiny
  alphas_cumprod = _numpy_alphas_cumprod(components.scheduler_config)
  schedule = dataclasses.replace(components.noise_schedule(), prediction_type=prediction_type)
  timesteps = np.asarray([0, 10, 100, 500, 999])
  snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
  gamma = 5.0
  expected = np.minimum(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
  weights = train_step.snr_weights(schedule, timesteps, gamma)
  np.testing.assert_allclose(weights, expected, rtol=1e-4)
  assert expected[0] < 1 and expected[-1] == pytest.approx(
      1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))


def test_min_snr_loss_is_the_weighted_mean_of_per_example_mse(setup, tiny):
  components, data, state, frozen, _, loss_fn = setup
  gamma = 2.0
  weighted_loss_fn = jax.jit(train_step.make_loss_fn(components, LAMBDA, min_snr_gamma=gamma))
  batch = data.batch(0)
  key = jax.random.fold_in(state.rng, 0)
  _, metrics = weighted_loss_fn(state.params, frozen, batch, key)
  plain = []
  for row in range(4):
    single = dict(_single_row(batch, row), instance_mask=np.ones(1, np.float32),
                  prior_mask=np.zeros(1, np.float32), instance_count=np.ones(1, np.float32),
                  prior_count=np.zeros(1, np.float32))
    plain.append(float(loss_fn(state.params, frozen, single, key)[1]["loss"]))
  time_keys = train_step.example_streams(key, batch["example_id"][:4])[3]
  timesteps = np.asarray([int(jax.random.randint(k, (), 0, 1000)) for k in time_keys])
  alphas_cumprod = _numpy_alphas_cumprod(components.scheduler_config)[timesteps]
  snr = alphas_cumprod / (1 - alphas_cumprod)
  weighted = np.asarray(plain) * np.minimum(snr, gamma) / snr
  assert not np.allclose(weighted, plain)  # the weights really act here
  np.testing.assert_allclose(float(metrics["instance_loss"]), weighted[:2].mean(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["prior_loss"]), weighted[2:].mean(), rtol=1e-4)


def test_offset_noise_adds_one_constant_per_example_and_channel():
  keys = jax.random.split(jax.random.PRNGKey(0), 512)
  example_keys, _, noise_keys, _ = train_step.example_streams(keys[0], jnp.arange(512))
  plain = np.asarray(train_step.draw_noise(noise_keys, example_keys, (4, 6, 6), 0.0))
  offset = np.asarray(train_step.draw_noise(noise_keys, example_keys, (4, 6, 6), 0.1))
  difference = offset - plain
  # Constant over each (example, channel) image plane...
  np.testing.assert_allclose(difference, difference[:, :, :1, :1] * np.ones((1, 1, 6, 6)),
                             atol=1e-6)
  planes = difference[:, :, 0, 0]
  # ...differing between channels and examples, with standard deviation 0.1.
  assert (np.std(planes, axis=1) > 0).all() and (np.std(planes, axis=0) > 0).all()
  assert np.std(planes) == pytest.approx(0.1, rel=0.1)
  assert abs(np.mean(planes)) < 0.02
