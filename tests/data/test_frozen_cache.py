"""Cached latents and prompt embeddings: the same loss and gradient as encoding every step."""

import jax
import numpy as np
import pytest

from configs import common
from dreambooth_jax import sharding
from dreambooth_jax.data import frozen_cache, input_pipeline
from dreambooth_jax.training import step as train_step

LAMBDA = 0.5


def _images(seed, count, size=32):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for _ in range(count)]


def _config(**train):
  config = common.get_config()
  config.data.resolution = 32
  config.data.random_flip = True
  config.train.batch_size = 2
  config.train.prior_loss_weight = LAMBDA
  for name, value in train.items():
    config.train[name] = value
  return config


@pytest.fixture(scope="module")
def cached_and_plain(tiny):
  """(components, params, mesh, data with both caches, the same data without)."""
  components, params = tiny
  mesh = sharding.make_mesh()
  args = (components, params, mesh, _images(1, 3), _images(2, 5), "a photo of sks toy",
          "a red cube on the beach")
  cached = frozen_cache.training_data(_config(), *args)
  plain = frozen_cache.training_data(
      _config(cache_latents=False, cache_text_embeddings=False), *args)
  return components, params, mesh, cached, plain


def test_cached_batches_carry_latents_and_embeddings_instead_of_pixels_and_ids(
    cached_and_plain):
  components, _, _, cached, plain = cached_and_plain
  batch, plain_batch = cached.batch(0), plain.batch(0)
  rows = {"instance_mask", "prior_mask", "instance_count", "prior_count", "example_id"}
  assert set(plain_batch) == {"pixel_values", "input_ids", *rows}
  assert set(batch) == {"latent_mean", "latent_std", "encoder_hidden_states", *rows}
  # 3 instance and 5 class images, each encoded unflipped and flipped (data.random_flip).
  latent = 32 // components.vae_scale_factor
  channels = components.vae.latent_channels
  assert cached.instance_latents.mean.shape == (3, 2, latent, latent, channels)
  assert cached.class_latents.std.shape == (5, 2, latent, latent, channels)
  assert cached.prompt_embeddings.shape == (2, 77, components.text_encoder.hidden_size)
  assert batch["latent_mean"].shape == (8, latent, latent, channels)  # padded to 8 devices
  for name in ("instance_mask", "prior_mask", "example_id"):
    np.testing.assert_array_equal(batch[name], plain_batch[name])


def test_cached_distributions_are_the_vaes_of_each_crop_and_its_mirror_image(cached_and_plain):
  components, params, mesh, cached, _ = cached_and_plain
  image = cached.class_images[4]  # the last image: encoded in a padded chunk
  crop = input_pipeline.crop(image, 32, True, None)
  pixels = input_pipeline.to_model_range(np.stack([crop, crop[:, ::-1]]))
  mean, std = jax.jit(lambda p, x: frozen_cache._mean_and_std(components, p, x))(
      params["vae"], pixels)
  np.testing.assert_allclose(cached.class_latents.mean[4], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cached.class_latents.std[4], std, rtol=1e-5, atol=1e-6)
  assert not np.allclose(mean[0], mean[1])  # the flipped image really is another latent


@pytest.mark.parametrize("step", [0, 1])
def test_loss_and_gradient_equal_the_uncached_step_given_the_same_rng(cached_and_plain, step):
  components, params, _, cached, plain = cached_and_plain
  batch, plain_batch = cached.batch(step), plain.batch(step)
  assert np.asarray(plain_batch["instance_mask"]).sum() == 2
  trained = {"unet": params["unet"]}
  key = jax.random.fold_in(jax.random.PRNGKey(0), step)
  grad_fn = jax.jit(jax.grad(train_step.make_loss_fn(components, LAMBDA), has_aux=True))
  grads, metrics = grad_fn(trained, train_step.frozen_params(params, False, True, True), batch,
                           key)
  plain_grads, plain_metrics = grad_fn(trained, train_step.frozen_params(params, False),
                                       plain_batch, key)
  for name in ("loss", "instance_loss", "prior_loss"):
    np.testing.assert_allclose(float(metrics[name]), float(plain_metrics[name]), rtol=1e-5)
  assert float(metrics["prior_loss"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads, plain_grads)


def test_the_step_reads_no_vae_or_text_encoder_when_both_are_cached(tiny):
  _, params = tiny
  assert set(train_step.frozen_params(params, False)) == {"vae", "text_encoder"}
  assert set(train_step.frozen_params(params, False, True, True)) == set()
  assert set(train_step.frozen_params(params, False, True, False)) == {"text_encoder"}
  assert set(train_step.frozen_params(params, True, False, False)) == {"vae"}


def test_what_is_cached_follows_the_config():
  assert frozen_cache.caches_latents(_config())
  assert not frozen_cache.caches_latents(_config(cache_latents=False))
  random_crops = _config()
  random_crops.data.center_crop = False  # every step crops elsewhere: nothing to cache
  assert not frozen_cache.caches_latents(random_crops)
  assert frozen_cache.caches_prompt_embeddings(_config())
  assert not frozen_cache.caches_prompt_embeddings(_config(train_text_encoder=True))
  assert not frozen_cache.caches_prompt_embeddings(_config(cache_text_embeddings=False))
