"""Images → arrays, prompts → token ids, and the deterministic batch of each step.

A step's batch is a pure function of (seed, step): which images, their crops and flips. So a
resumed run sees exactly the batches an uninterrupted one would, with no iterator state to save.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth_jax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def is_url(path: str) -> bool:
  """gs://bucket/dir and other fsspec URLs, read through fsspec (gs:// needs gcsfs)."""
  return "://" in path


def _filesystem(url: str, field: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:  # e.g. gs:// without gcsfs
    raise DataError(f"{field}: {url} needs a filesystem package that is not installed "
                    f"({e}); for gs:// run pip install -e \".[gcs]\"") from e


def list_images(directory: str, field: str = "data.instance_dir") -> list[str]:
  """Sorted image paths in `directory` (not recursive): a local folder or a URL (gs://...)."""
  if not directory:
    raise DataError(f"{field}: not set")
  if is_url(directory):
    fs, root = _filesystem(directory, field)
    if not fs.isdir(root):
      raise DataError(f"{field}: {directory} is not a directory")
    protocol = directory.split("://", 1)[0]
    files = [entry["name"] for entry in fs.ls(root, detail=True) if entry["type"] == "file"]
    return sorted(f"{protocol}://{name.split('://', 1)[-1].lstrip('/')}" for name in files
                  if os.path.basename(name).lower().endswith(IMAGE_EXTENSIONS)
                  and not os.path.basename(name).startswith("."))
  if not os.path.isdir(directory):
    raise DataError(f"{field}: {directory} is not a directory")
  return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
                and os.path.isfile(os.path.join(directory, name)))


def load_image(path: str, resolution: int | None) -> np.ndarray:
  """Reads an image upright in RGB with its shorter side resized to `resolution` (uint8 HWC).

  resolution=None keeps the image's own size.
  """
  try:
    if is_url(path):
      fs, name = _filesystem(path, path)
      with fs.open(name, "rb") as f:
        source = io.BytesIO(f.read())
    else:
      source = path
    with Image.open(source) as image:
      image = ImageOps.exif_transpose(image)
      image.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise DataError(f"{path}: not a readable image ({e})") from e
  if image.mode in ("I", "I;16", "I;16B", "F"):
    warnings.warn(f"{path}: {image.mode} grayscale image converted to 8-bit RGB")
    high = 65535.0 if image.mode.startswith("I") else 1.0
    scaled = np.clip(np.asarray(image, np.float64) / high * 255.0, 0, 255).round()
    image = Image.fromarray(scaled.astype(np.uint8), "L")
  elif image.mode in ("L", "LA", "1"):
    warnings.warn(f"{path}: grayscale image converted to RGB")
  elif image.mode == "CMYK":
    warnings.warn(f"{path}: CMYK image converted to RGB")
  if "A" in image.mode or "transparency" in image.info:
    warnings.warn(f"{path}: transparent image composited onto white")
    rgba = image.convert("RGBA")
    image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image.alpha_composite(rgba)
  image = image.convert("RGB")
  if resolution is None:
    return np.asarray(image, dtype=np.uint8)
  width, height = image.size
  scale = resolution / min(width, height)
  if scale > 1:
    warnings.warn(f"{path}: {width}x{height} is smaller than {resolution} px; upscaled")
  size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
  image = image.resize(size, Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def crop_offsets(height: int, width: int, resolution: int, center: bool,
                 rng: np.random.Generator | None) -> tuple[int, int]:
  """(top, left) of a resolution-sized crop: the centre, or uniform (draws 2 numbers)."""
  if center:
    return (height - resolution) // 2, (width - resolution) // 2
  return (int(rng.integers(0, height - resolution + 1)),
          int(rng.integers(0, width - resolution + 1)))


def crop(image: np.ndarray, resolution: int, center: bool,
         rng: np.random.Generator | None) -> np.ndarray:
  top, left = crop_offsets(*image.shape[:2], resolution, center, rng)
  return image[top:top + resolution, left:left + resolution]


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] NHWC → float32 [-1, 1] NCHW, the layout the VAE takes."""
  return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def tokenize(tokenizer, prompt: str) -> np.ndarray:
  """Token ids padded to the tokenizer's max length (int32, shape [L])."""
  return tokenizer.encode([prompt])[0]


@dataclasses.dataclass(frozen=True)
class LatentDistributions:
  """The VAE's latent distribution of each training image, encoded once (frozen_cache.py)."""
  mean: np.ndarray  # float32 [images, variants, h, w, c]; variant 1 is the flipped image
  std: np.ndarray


@dataclasses.dataclass(frozen=True)
class Choice:
  """Which image a batch row shows, and how it is cropped and flipped."""
  index: int
  top: int
  left: int
  flip: bool


@dataclasses.dataclass(frozen=True)
class DreamBoothData:
  """Preloaded images and token ids; `batch(step)` builds a step's global batch.

  Rows are [instance × batch_size, prior × batch_size (if any), padding]. Padding rows (so the
  batch splits evenly over devices) have zero masks and never touch the loss. With cached
  latents a row carries its image's latent mean and std instead of its pixels, and with cached
  prompt embeddings its prompt's embedding instead of token ids (frozen_cache.py).
  """
  instance_images: list[np.ndarray]
  class_images: list[np.ndarray]
  instance_ids: np.ndarray
  class_ids: np.ndarray
  batch_size: int
  resolution: int
  center_crop: bool
  random_flip: bool
  seed: int
  pad_to_multiple: int = 1
  instance_latents: LatentDistributions | None = None
  class_latents: LatentDistributions | None = None
  prompt_embeddings: np.ndarray | None = None  # [instance, class] × [tokens, features]

  @property
  def with_prior(self) -> bool:
    return bool(self.class_images)

  @property
  def num_rows(self) -> int:
    real = self.batch_size * (2 if self.with_prior else 1)
    return -(-real // self.pad_to_multiple) * self.pad_to_multiple

  def _choose(self, images: list[np.ndarray], stream: int, step: int) -> list[Choice]:
    """`batch_size` images for `step`: epochs of seeded permutations, crops and flips."""
    choices = []
    for slot in range(self.batch_size):
      counter = step * self.batch_size + slot
      epoch, position = divmod(counter, len(images))
      index = int(np.random.default_rng([self.seed, stream, epoch]).permutation(len(images))[
          position])
      rng = np.random.default_rng([self.seed, stream, counter, 1])
      top, left = crop_offsets(*images[index].shape[:2], self.resolution, self.center_crop, rng)
      flip = bool(self.random_flip and rng.random() < 0.5)
      choices.append(Choice(index, top, left, flip))
    return choices

  def _pixels(self, images: list[np.ndarray], choice: Choice) -> np.ndarray:
    size = self.resolution
    crop = images[choice.index][choice.top:choice.top + size, choice.left:choice.left + size]
    return crop[:, ::-1] if choice.flip else crop

  def batch(self, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """The `rows` (default: all) of step's batch; only those rows' images are touched."""
    instance_choices = self._choose(self.instance_images, 0, step)
    class_choices = self._choose(self.class_images, 1, step) if self.with_prior else []
    # (is a class row, choice) per row; padding rows copy row 0.
    sources = [(False, c) for c in instance_choices] + [(True, c) for c in class_choices]
    num_real = len(sources)
    sources += [sources[0]] * (self.num_rows - num_real)
    instance_mask = np.zeros(self.num_rows, np.float32)
    instance_mask[:len(instance_choices)] = 1.0
    prior_mask = np.zeros(self.num_rows, np.float32)
    prior_mask[len(instance_choices):num_real] = 1.0
    instance_mask, prior_mask = instance_mask[rows], prior_mask[rows]
    batch = {"instance_mask": instance_mask, "prior_mask": prior_mask,
             # The whole batch's counts in every row, so that each row's share of the loss is
             # known on its own device (train_step.with_row_counts).
             "instance_count": np.full_like(instance_mask, len(instance_choices)),
             "prior_count": np.full_like(prior_mask, len(class_choices)),
             # Keys the per-example noise, so the loss does not depend on the row's device.
             "example_id": np.arange(self.num_rows, dtype=np.int32)[rows]}
    sources = sources[rows]
    if self.instance_latents is not None:
      dists = [(self.class_latents if is_class else self.instance_latents, c)
               for is_class, c in sources]
      batch["latent_mean"] = np.stack([d.mean[c.index, int(c.flip)] for d, c in dists])
      batch["latent_std"] = np.stack([d.std[c.index, int(c.flip)] for d, c in dists])
    else:
      batch["pixel_values"] = to_model_range(np.stack([
          self._pixels(self.class_images if is_class else self.instance_images, c)
          for is_class, c in sources]))
    prompts = [int(is_class) for is_class, _ in sources]
    if self.prompt_embeddings is not None:
      batch["encoder_hidden_states"] = self.prompt_embeddings[prompts]
    else:
      batch["input_ids"] = np.stack([self.instance_ids, self.class_ids])[prompts]
    return batch


def load_images(paths: list[str], resolution: int) -> list[np.ndarray]:
  return [load_image(path, resolution) for path in paths]
