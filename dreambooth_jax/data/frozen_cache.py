"""Work on frozen models done once before training instead of in every step.

The VAE is never trained, so each training image's latent distribution (mean and std) is the
same at every step: it is encoded once, split over the devices, and each step samples its
latent from the cached distribution with the same key the uncached step would use. Likewise,
while the text encoder is frozen the two prompts always embed to the same vectors. Both are
exact: the loss equals the uncached step's up to float rounding (tests/data/test_frozen_cache.py).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from dreambooth_jax import models, sharding
from dreambooth_jax.data import input_pipeline

ROWS_PER_DEVICE = 4  # images encoded per device per call


def caches_latents(config: ml_collections.ConfigDict) -> bool:
  """Latents are cached when asked for and every step sees the same (centre) crop."""
  if config.train.cache_latents and not config.data.center_crop:
    logging.info("data.center_crop is false: random crops are encoded by the VAE every step "
                 "(train.cache_latents needs centre crops)")
  return config.train.cache_latents and config.data.center_crop


def caches_prompt_embeddings(config: ml_collections.ConfigDict) -> bool:
  return config.train.cache_text_embeddings and not config.train.train_text_encoder


def latent_distributions(components: models.Components, vae_params: Any,
                         images: list[np.ndarray], resolution: int, with_flips: bool,
                         mesh: jax.sharding.Mesh, desc: str = "encode"
                         ) -> input_pipeline.LatentDistributions:
  """Each image's centre crop (and its mirror image, with_flips) through the VAE encoder."""
  variants = []
  for image in images:
    crop = input_pipeline.crop(image, resolution, True, None)
    variants.append(crop)
    if with_flips:
      variants.append(crop[:, ::-1])
  chunk = ROWS_PER_DEVICE * mesh.size
  vae_params = sharding.put_state(vae_params, mesh)  # a no-op when already laid out so
  encode = jax.jit(
      lambda params, pixels: _mean_and_std(components, params, pixels),
      in_shardings=(None, sharding.data_sharded(mesh)),  # the VAE keeps its layout
      out_shardings=sharding.replicated(mesh))
  means, stds = [], []
  for start in tqdm(range(0, len(variants), chunk), desc=desc, unit="batch",
                    disable=len(variants) <= chunk):
    rows = variants[start:start + chunk]
    rows += [rows[0]] * (chunk - len(rows))  # one shape, one compile
    pixels = sharding.put_global(input_pipeline.to_model_range(np.stack(rows)),
                                 sharding.data_sharded(mesh))
    mean, std = sharding.to_host(encode(vae_params, pixels))
    means.append(mean)
    stds.append(std)
  count, per_image = len(variants), 2 if with_flips else 1
  shape = (len(images), per_image) + means[0].shape[1:]
  return input_pipeline.LatentDistributions(
      mean=np.concatenate(means)[:count].reshape(shape),
      std=np.concatenate(stds)[:count].reshape(shape))


def _mean_and_std(components: models.Components, vae_params: Any, pixels: jax.Array):
  """The float32 mean and std the training step would compute from these pixels."""
  return components.encode_pixels(vae_params, pixels)


def prompt_embeddings(components: models.Components, text_params: Any,
                      token_ids: np.ndarray) -> np.ndarray:
  """The text encoder's last hidden states of each row of token ids ([prompts, tokens, dim])."""
  encode = jax.jit(components.encode_text)
  return np.asarray(sharding.to_host(encode(text_params, token_ids)))


def training_data(config: ml_collections.ConfigDict, components: models.Components,
                  params: dict[str, Any], mesh: jax.sharding.Mesh,
                  instance_images: list[np.ndarray], class_images: list[np.ndarray],
                  instance_prompt: str, class_prompt: str) -> input_pipeline.DreamBoothData:
  """The run's batches, with latents and prompt embeddings cached as the config says."""
  data_config, train_config = config.data, config.train
  ids = {"instance_ids": input_pipeline.tokenize(components.tokenizer, instance_prompt),
         "class_ids": input_pipeline.tokenize(components.tokenizer, class_prompt)}
  cached = {}
  if caches_latents(config):
    encode = lambda images, desc: latent_distributions(
        components, params["vae"], images, data_config.resolution, data_config.random_flip,
        mesh, desc) if images else None
    cached["instance_latents"] = encode(instance_images, "encode instance images")
    cached["class_latents"] = encode(class_images, "encode class images")
  if caches_prompt_embeddings(config):
    cached["prompt_embeddings"] = prompt_embeddings(
        components, params["text_encoder"], np.stack([ids["instance_ids"], ids["class_ids"]]))
  return input_pipeline.DreamBoothData(
      instance_images=instance_images, class_images=class_images, **ids,
      batch_size=train_config.batch_size, resolution=data_config.resolution,
      center_crop=data_config.center_crop, random_flip=data_config.random_flip,
      seed=config.seed, pad_to_multiple=mesh.size * train_config.grad_accum_steps, **cached)
