"""The training state, the DreamBooth loss and the jitted step.

The loss is mean_i MSE(instance_i) + λ · mean_j MSE(prior_j), where MSE is the mean over one
example's latent elements. Which rows are instance or prior examples is carried by masks in the
batch, and each row's noise is keyed by its example id, so the number does not depend on the
device count or on which device holds which row.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from dreambooth_jax import models, sharding
from dreambooth_jax.models import schedulers

PyTree = Any


OFFSET_NOISE_STREAM = 3  # folded into an example's key for its offset noise


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree  # trained: {"unet": ..., "text_encoder": ...(only when trained)}
  opt_state: PyTree
  rng: jax.Array  # raw uint32[2] base key; each step folds in its step number
  nonfinite_steps: jax.Array  # steps whose loss or gradient was NaN/Inf (not applied)
  first_nonfinite_step: jax.Array  # the first such step (1-based), 0 if none


def make_schedule(train_config, peak: float | None = None, stop_step: int = 0) -> optax.Schedule:
  """Warmup then constant/linear/cosine to 0 at train.steps; 0 from `stop_step` on if set."""
  peak = train_config.learning_rate if peak is None else peak
  warmup, steps = train_config.warmup_steps, train_config.steps
  decay_steps = max(steps - warmup, 1)
  after_warmup = {
      "constant": optax.constant_schedule(peak),
      "linear": optax.linear_schedule(peak, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(peak, decay_steps),
  }[train_config.lr_schedule]
  schedule = after_warmup
  if warmup:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup],
                                    [warmup])
  if stop_step:
    schedule = optax.join_schedules([schedule, optax.constant_schedule(0.0)], [stop_step])
  return schedule


def make_text_encoder_schedule(train_config) -> optax.Schedule:
  return make_schedule(train_config, train_config.text_encoder_learning_rate or None,
                       train_config.text_encoder_steps)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm that takes the norm when the caller has it (`grad_norm=`).

  The train step computes the global norm anyway, for its metrics and its non-finite check;
  clipping with that value spares a second reduction over every gradient (one small kernel
  per weight array, ~200 in the tiny UNet). Same numbers and the same (empty) state as
  optax's, so checkpoints are unchanged.
  """
  def update_fn(updates, state, params=None, *, grad_norm=None, **unused_extra_args):
    del params
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    keep = norm < max_norm
    return jax.tree.map(lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm),
                        updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(train_config) -> optax.GradientTransformationExtraArgs:
  """Clipping of the global gradient norm, then AdamW (its own schedule for the text encoder).

  Its update takes the gradient's global norm as `grad_norm=` where the caller has it.
  """
  def adamw(schedule):
    return optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2,
                       eps=train_config.adam_eps, weight_decay=train_config.weight_decay)

  clip = clip_by_global_norm(train_config.max_grad_norm)
  if not train_config.train_text_encoder:
    return optax.chain(clip, adamw(make_schedule(train_config)))
  per_model = optax.multi_transform(
      {"unet": adamw(make_schedule(train_config)),
       "text_encoder": adamw(make_text_encoder_schedule(train_config))},
      lambda params: {name: jax.tree.map(lambda _, n=name: n, tree)
                      for name, tree in params.items()})
  return optax.chain(clip, per_model)


def trainable_names(train_text_encoder: bool) -> tuple[str, ...]:
  return ("unet", "text_encoder") if train_text_encoder else ("unet",)


def create_train_state(params: dict[str, PyTree], optimizer: optax.GradientTransformation,
                       seed: int, train_text_encoder: bool,
                       param_dtype: str = "float32") -> TrainState:
  """Trained params (and so AdamW's moments) in param_dtype; the step counters int32."""
  trained = {name: jax.tree.map(lambda x: x.astype(param_dtype), params[name])
             for name in trainable_names(train_text_encoder)}
  return TrainState(step=jnp.asarray(0, jnp.int32), params=trained,
                    opt_state=optimizer.init(trained), rng=jax.random.PRNGKey(seed),
                    nonfinite_steps=jnp.asarray(0, jnp.int32),
                    first_nonfinite_step=jnp.asarray(0, jnp.int32))


def per_example_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return error.reshape(error.shape[0], -1).mean(axis=1)


def combine_losses(mse: jax.Array, instance_mask: jax.Array, prior_mask: jax.Array,
                   prior_loss_weight: float, counts: tuple[jax.Array, jax.Array] | None = None
                   ) -> dict[str, jax.Array]:
  """mean over instance rows + λ · mean over prior rows; padding rows have both masks 0.

  `counts` (instance rows, prior rows of the whole batch; scalars or one value per row) make
  a micro-batch's terms sum, over the micro-batches, to the whole batch's loss; by default they
  are this batch's own counts. Each row is divided by them before the sum, so that with counts
  per row no term of the gradient waits for a sum over the devices.
  """
  if counts is None:
    counts = (jnp.sum(instance_mask), jnp.sum(prior_mask))
  instance_loss = jnp.sum(mse * (instance_mask / jnp.maximum(counts[0], 1.0)))
  prior_loss = jnp.sum(mse * (prior_mask / jnp.maximum(counts[1], 1.0)))
  return {"loss": instance_loss + prior_loss_weight * prior_loss,
          "instance_loss": instance_loss, "prior_loss": prior_loss}


def with_row_counts(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch with "instance_count" and "prior_count" (the whole batch's instance and prior
  rows, repeated in every row) where it lacks them.

  The input pipeline writes them, so that the loss divides each row by them without a sum over
  the devices between the forward and the backward pass: a barrier that cost the 4-device tiny
  step 1–7% on CPU (scripts/step_findings.py; README, Performance).
  """
  if "instance_count" in batch:
    return batch
  rows = batch["instance_mask"].shape[0]
  return dict(batch, instance_count=jnp.full(rows, jnp.sum(batch["instance_mask"])),
              prior_count=jnp.full(rows, jnp.sum(batch["prior_mask"])))


def example_streams(step_key: jax.Array, example_ids: jax.Array) -> tuple[jax.Array, ...]:
  """(example, latent-sample, noise, timestep) keys of each row, from its example id only."""
  example_keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, example_ids)
  latent_keys, noise_keys, time_keys = jnp.moveaxis(
      jax.vmap(lambda k: jax.random.split(k, 3))(example_keys), 1, 0)
  return example_keys, latent_keys, noise_keys, time_keys


def draw_noise(noise_keys: jax.Array, example_keys: jax.Array, shape: tuple[int, ...],
               offset_noise: float) -> jax.Array:
  """Gaussian noise of `shape` (C, H, W) per row, plus offset_noise × N(0, 1) per channel."""
  noise = jax.vmap(lambda k: jax.random.normal(k, shape))(noise_keys)
  if offset_noise:
    offsets = jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(k, OFFSET_NOISE_STREAM), (shape[0], 1, 1)))(example_keys)
    noise = noise + offset_noise * offsets
  return noise


def snr_weights(schedule: schedulers.NoiseSchedule, timesteps: jax.Array, gamma: float
                ) -> jax.Array:
  """Min-SNR-γ weight of each example's MSE: min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR+1) (v)."""
  snr = schedulers.snr(schedule, timesteps)
  prediction_type = schedule.prediction_type
  clipped = jnp.minimum(snr, gamma)
  return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def make_loss_fn(components: models.Components, prior_loss_weight: float,
                 min_snr_gamma: float = 0.0, offset_noise: float = 0.0,
                 remat: bool = False) -> Callable:
  """loss_fn(trained, frozen, batch, step_key) → (loss, metrics); pure.

  A batch carries pixels or cached latent distributions ("latent_mean", "latent_std"), and
  token ids or cached prompt embeddings ("encoder_hidden_states"); the loss is the same. Its
  instance and prior means divide by the batch's row counts (with_row_counts).
  """
  schedule = components.noise_schedule()
  if schedule.prediction_type == "sample":
    raise ValueError("model.pretrained: training a model that predicts the sample itself "
                     "(prediction_type=sample) is not supported")
  num_train_timesteps = schedule.num_train_timesteps

  def loss_fn(trained, frozen, batch, step_key):
    params = {**frozen, **trained}
    example_keys, latent_keys, noise_keys, time_keys = example_streams(step_key,
                                                                       batch["example_id"])

    if "latent_mean" in batch:
      mean, std = batch["latent_mean"], batch["latent_std"]
    else:
      mean, std = components.encode_pixels(jax.lax.stop_gradient(params["vae"]),
                                           batch["pixel_values"])
    latent_noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(latent_keys)
    latents = components.latents(mean, std, latent_noise)

    noise = draw_noise(noise_keys, example_keys, latents.shape[1:], offset_noise)
    timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_train_timesteps))(time_keys)
    noisy_latents = schedulers.add_noise(schedule, latents, noise, timesteps)

    if "encoder_hidden_states" in batch:
      encoder_hidden_states = batch["encoder_hidden_states"]
    else:
      text_params = params["text_encoder"]
      if "text_encoder" not in trained:
        text_params = jax.lax.stop_gradient(text_params)
      encoder_hidden_states = components.encode_text(text_params, batch["input_ids"])

    prediction = components.predict(params["unet"], noisy_latents, timesteps,
                                    encoder_hidden_states, remat)
    target = schedulers.training_target(schedule, latents, noise, timesteps)
    mse = per_example_mse(prediction, target)
    if min_snr_gamma:
      mse = mse * snr_weights(schedule, timesteps, min_snr_gamma)
    batch = with_row_counts(batch)
    metrics = combine_losses(mse, batch["instance_mask"], batch["prior_mask"],
                             prior_loss_weight, (batch["instance_count"], batch["prior_count"]))
    return metrics["loss"], metrics

  return loss_fn


def split_microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """[rows, ...] → [count, rows/count, ...]; micro-batch m takes rows m, m+count, m+2·count...

  Interleaved, so that each micro-batch holds rows of every device's shard (no data moves) and
  a mix of instance and prior rows.
  """
  return {k: jnp.swapaxes(v.reshape(v.shape[0] // count, count, *v.shape[1:]), 0, 1)
          for k, v in batch.items()}


def accumulated_grads(loss_fn: Callable, params: PyTree, frozen: PyTree,
                      batch: dict[str, jax.Array], step_key: jax.Array, count: int,
                      microbatch_sharding=None) -> tuple[PyTree, dict[str, jax.Array]]:
  """Gradient and metrics of the whole batch, summed over `count` sequential micro-batches.

  Each micro-batch's rows keep the whole batch's instance and prior row counts
  (with_row_counts) and their example ids (hence their noise), so the sum is the whole batch's.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if count == 1:
    return grad_fn(params, frozen, batch, step_key)
  microbatches = split_microbatches(with_row_counts(batch), count)
  if microbatch_sharding is not None:
    microbatches = jax.lax.with_sharding_constraint(microbatches, microbatch_sharding)

  def add_microbatch(total, microbatch):  # summed in float32 whatever the params' dtype
    grads, metrics = grad_fn(params, frozen, microbatch, step_key)
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, (grads, metrics)), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), jax.eval_shape(
      grad_fn, params, frozen, jax.tree.map(lambda v: v[0], microbatches), step_key))
  (grads, metrics), _ = jax.lax.scan(add_microbatch, zeros, microbatches)
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), metrics


def make_train_step(components: models.Components, optimizer: optax.GradientTransformation,
                    train_config, microbatch_sharding=None) -> Callable:
  """train_step(state, frozen, batch) → (state, metrics), not yet jitted.

  microbatch_sharding: how the [micro-batches, rows, ...] split of the batch is laid out when
  train.grad_accum_steps > 1 (the rows axis along the data axis).
  """
  loss_fn = make_loss_fn(components, train_config.prior_loss_weight, train_config.min_snr_gamma,
                         train_config.offset_noise, train_config.remat)
  grad_accum_steps = train_config.grad_accum_steps
  schedule = make_schedule(train_config)
  text_encoder_schedule = make_text_encoder_schedule(train_config)
  text_encoder_stop = train_config.text_encoder_steps

  def train_step(state: TrainState, frozen: PyTree, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(state.rng, state.step)
    grads, metrics = accumulated_grads(loss_fn, state.params, frozen, batch, step_key,
                                       grad_accum_steps, microbatch_sharding)
    if "text_encoder" in grads and text_encoder_stop:  # frozen from then on: no gradient
      grads = dict(grads, text_encoder=jax.tree.map(
          lambda g: jnp.where(state.step < text_encoder_stop, g, 0.0), grads["text_encoder"]))
    grad_norm = optax.tree.norm(grads)
    # A NaN/Inf step leaves params and optimizer state as they were; the host decides whether
    # to stop (the default) or go on, from the counters. A branch, not a select of new or old
    # per element: the select read and wrote every weight and moment once more (7% of the
    # tiny step's memory traffic, ~10% of its time on CPU; benchmark --compare).
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply_update(operands):
      grads, grad_norm, params, opt_state = operands
      updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, apply_update, lambda operands: operands[2:],
                                     (grads, grad_norm, state.params, state.opt_state))
    nonfinite_steps = state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
    first_nonfinite_step = jnp.where((state.first_nonfinite_step == 0) & ~finite,
                                     state.step + 1, state.first_nonfinite_step)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   nonfinite_steps=nonfinite_steps)
    if "text_encoder" in state.params:
      metrics["text_encoder_learning_rate"] = text_encoder_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         nonfinite_steps=nonfinite_steps,
                         first_nonfinite_step=first_nonfinite_step), metrics

  return train_step


def frozen_params(params: dict[str, PyTree], train_text_encoder: bool,
                  cached_latents: bool = False, cached_embeddings: bool = False
                  ) -> dict[str, PyTree]:
  """The untrained params the step reads: no VAE with cached latents, no text encoder with
  cached prompt embeddings (so they take no device memory in the step)."""
  unused = set(trainable_names(train_text_encoder))
  if cached_latents:
    unused.add("vae")
  if cached_embeddings:
    unused.add("text_encoder")
  return {name: value for name, value in params.items() if name not in unused}


def jit_on_mesh(components: models.Components, optimizer: optax.GradientTransformation,
                train_config, mesh: jax.sharding.Mesh, state: PyTree, frozen: PyTree
                ) -> Callable:
  """The train step jitted for `mesh`: the state and frozen params (arrays or shapes) laid out
  by sharding.state_shardings, the batch split over every device, the metrics replicated."""
  step = make_train_step(components, optimizer, train_config,
                         sharding.microbatch_sharded(mesh))
  return jit_train_step(step, sharding.state_shardings(state, mesh),
                        sharding.state_shardings(frozen, mesh), sharding.data_sharded(mesh),
                        sharding.replicated(mesh))


def jit_train_step(train_step: Callable, state_sharding, frozen_sharding, batch_sharding,
                   replicated_sharding) -> Callable:
  return jax.jit(train_step,
                 in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding),
                 donate_argnums=(0,))
