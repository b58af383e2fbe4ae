"""Text-to-image sampling with classifier-free guidance, sharded over the mesh.

Used for class-image generation, for the sampling CLI and at the end of training. Each image's
starting noise is keyed by its global index, so image k is the same whatever the batch size or
device count: a resumed class-image generation re-makes exactly the missing files.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dreambooth_jax import atomic_files, failpoints, models, sharding


ANCESTRAL_NOISE_STREAM = 1  # folded into an image's key for the noise of ancestral steps

# make_sampler's jitted functions by settings, so that a run whose class images, validation
# grids and final samples share settings traces and lowers the sampler once, not three times.
_SAMPLERS: dict[tuple, tuple[models.Components, Callable]] = {}
_MAX_SAMPLERS = 8


def image_keys(seed: int | jax.Array, image_ids: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), image_ids)


def initial_noise(keys: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
  """Each image's N(0, I) starting latents [N, C, h, w] (before init_noise_sigma)."""
  return jax.vmap(lambda k: jax.random.normal(k, latent_shape))(keys)


def make_sampler(components: models.Components, mesh: jax.sharding.Mesh, resolution: int,
                 scheduler_name: str = "ddim", num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, as_uint8: bool = True) -> Callable:
  """sample(params, prompt_ids[N, L], image_ids[N], seed) → uint8 images [N, H, W, 3]
  (float32 in [0, 1] unless as_uint8).

  N must be a multiple of the mesh size (see `generate`, which pads). Every random draw of
  image k (its starting noise, and the noise of ancestral steps) is keyed by k alone. The same
  components and settings give the same jitted function back.
  """
  key = (id(components), mesh, resolution, scheduler_name, num_inference_steps, guidance_scale,
         as_uint8)
  if key in _SAMPLERS and _SAMPLERS[key][0] is components:
    return _SAMPLERS[key][1]
  if len(_SAMPLERS) >= _MAX_SAMPLERS:
    del _SAMPLERS[next(iter(_SAMPLERS))]
  sample = _sampler_function(components, mesh, resolution, scheduler_name, num_inference_steps,
                             guidance_scale, as_uint8)
  _SAMPLERS[key] = (components, sample)
  return sample


def _sampler_function(components: models.Components, mesh: jax.sharding.Mesh, resolution: int,
                      scheduler_name: str, num_inference_steps: int, guidance_scale: float,
                      as_uint8: bool) -> Callable:
  sampler = components.sampler(scheduler_name, num_inference_steps)
  latent_size = resolution // components.vae_scale_factor
  latent_shape = (components.latent_channels, latent_size, latent_size)
  uncond_ids = jnp.asarray(components.tokenizer.encode([""])[0])

  def sample(params, prompt_ids, image_ids, seed):
    text = lambda ids: components.encode_text(params["text_encoder"], ids)
    context = jnp.concatenate([text(jnp.broadcast_to(uncond_ids, prompt_ids.shape)),
                               text(prompt_ids)])
    keys = image_keys(seed, image_ids)
    noise_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, ANCESTRAL_NOISE_STREAM)
    latents = initial_noise(keys, latent_shape) * sampler.init_noise_sigma

    def step_one_image(state, guided, latent, key, i):
      return sampler.step(state, guided, i, latent, jax.random.fold_in(key, i))

    def denoise(i, carry):
      latents, state = carry
      model_input = sampler.scale_model_input(jnp.concatenate([latents] * 2), i)
      timesteps = jnp.broadcast_to(sampler.timesteps_jnp[i], model_input.shape[:1])
      prediction = components.predict(params["unet"], model_input, timesteps, context)
      uncond_pred, cond_pred = jnp.split(prediction, 2)
      guided = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
      return jax.vmap(step_one_image, (0, 0, 0, 0, None))(state, guided, latents, noise_keys, i)

    state = jax.vmap(sampler.init_state)(latents)
    latents, _ = jax.lax.fori_loop(0, sampler.num_steps, denoise, (latents, state))
    images = components.decode(params["vae"], latents)
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return jnp.round(images * 255).astype(jnp.uint8) if as_uint8 else images

  batch = sharding.data_sharded(mesh)
  # The params keep their own layout: replicated, or split along fsdp while training.
  return jax.jit(sample, in_shardings=(None, batch, batch, None), out_shardings=batch)


def generate_sharded(sampler: Callable, params, mesh: jax.sharding.Mesh,
                     prompt_ids: np.ndarray, image_ids: Sequence[int], seed: int) -> jax.Array:
  """Runs `sampler` on one batch padded to a multiple of the mesh size: images split over
  the devices (rows past len(image_ids) are padding)."""
  num = len(image_ids)
  padded = -(-num // mesh.size) * mesh.size
  ids = np.asarray(list(image_ids) + [image_ids[-1]] * (padded - num), np.int32)
  prompts = np.concatenate([prompt_ids, np.repeat(prompt_ids[-1:], padded - num, axis=0)])
  rows = sharding.data_sharded(mesh)
  return sampler(params, sharding.put_global(prompts, rows), sharding.put_global(ids, rows), seed)


def generate(sampler: Callable, params, mesh: jax.sharding.Mesh, prompt_ids: np.ndarray,
             image_ids: Sequence[int], seed: int) -> np.ndarray:
  """generate_sharded's images on every process's host."""
  images = generate_sharded(sampler, params, mesh, prompt_ids, image_ids, seed)
  return np.asarray(sharding.to_host(images))[:len(image_ids)]


def sample_resolution(components: models.Components, requested: int) -> int:
  """`requested` px (0 = the UNet's native size), checked against the VAE's factor."""
  resolution = requested or components.unet.sample_size * components.vae_scale_factor
  if resolution % components.vae_scale_factor:
    raise models.ModelLoadError(f"--resolution must be a multiple of "
                                f"{components.vae_scale_factor}, got {resolution}")
  return resolution


def write_png(image: np.ndarray, path: str,
              before_commit: Callable[[], None] | None = None) -> None:
  """Writes a PNG atomically: a killed process leaves either the whole file or none."""
  tmp_path = f"{path}.tmp{os.getpid()}"
  Image.fromarray(image).save(tmp_path, format="PNG")
  if before_commit is not None:
    before_commit()
  os.replace(tmp_path, path)
  failpoints.trace("write", path)


def make_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """Tiles N×H×W×3 images into one picture, row-major, with `columns` per row."""
  num, height, width, channels = images.shape
  columns = columns or int(np.ceil(np.sqrt(num)))
  rows = -(-num // columns)
  grid = np.zeros((rows * height, columns * width, channels), images.dtype)
  for index, image in enumerate(images):
    row, column = divmod(index, columns)
    grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
  return grid


def sample_grid(sampler: Callable, params, mesh: jax.sharding.Mesh, tokenizer,
                prompts: Sequence[str], num_images: int, seed: int) -> np.ndarray:
  """num_images per prompt in one sharded batch; image k of every prompt starts from noise k."""
  ids = np.concatenate([np.repeat(tokenizer.encode([prompt]), num_images, 0)
                        for prompt in prompts])
  images = generate(sampler, params, mesh, ids, list(range(num_images)) * len(prompts), seed)
  return images.reshape(len(prompts), num_images, *images.shape[1:])


def write_samples(components: models.Components, params, mesh: jax.sharding.Mesh,
                  prompts: list[str], num_images: int, out_dir: str, resolution: int,
                  scheduler: str, num_inference_steps: int, guidance_scale: float,
                  seed: int) -> np.ndarray:
  """num_images PNGs per prompt plus grid.png (a row per prompt); returns the grid.

  Every process samples; only process 0 writes.
  """
  sampler = make_sampler(components, mesh, resolution, scheduler, num_inference_steps,
                         guidance_scale)
  images = sample_grid(sampler, params, mesh, components.tokenizer, prompts, num_images, seed)
  grid = make_grid(images.reshape(-1, *images.shape[2:]), columns=num_images)
  if jax.process_index() != 0:
    return grid
  os.makedirs(out_dir, exist_ok=True)
  for prompt_index, prompt_images in enumerate(images):
    for index, image in enumerate(prompt_images):
      write_png(image, os.path.join(out_dir, f"prompt{prompt_index}_{index:03d}.png"))
  write_png(grid, os.path.join(out_dir, "grid.png"))
  atomic_files.write_json(os.path.join(out_dir, "prompts.json"),
                          {f"prompt{i}": p for i, p in enumerate(prompts)})
  return grid


def labelled_grid(images: np.ndarray, labels: Sequence[str], scale: int = 2) -> np.ndarray:
  """Rows of images, each upscaled `scale` times, with its label on the left."""
  rows, columns, height, width, _ = images.shape
  cell_h, cell_w = height * scale, width * scale
  label_w = 220
  canvas = Image.new("RGB", (label_w + columns * (cell_w + 2), rows * (cell_h + 2)),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for r in range(rows):
    draw.text((6, r * (cell_h + 2) + cell_h // 2 - 6), labels[r], fill=(0, 0, 0), font=font)
    for c in range(columns):
      tile = Image.fromarray(images[r, c]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
      canvas.paste(tile, (label_w + c * (cell_w + 2), r * (cell_h + 2)))
  return np.asarray(canvas)
