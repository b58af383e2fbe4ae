"""Images → arrays, prompts → token ids, and the deterministic batch of each step.

A step's batch is a pure function of (seed, step): which images, their crops and flips. So a
resumed run sees exactly the batches an uninterrupted one would, with no iterator state to save.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(ValueError):
  """Unusable input data; the message names the file or directory."""


def list_images(directory: str, field: str = "data.instance_dir") -> list[str]:
  """Sorted image paths in `directory` (not recursive)."""
  if not directory:
    raise DataError(f"{field}: not set")
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
    with Image.open(path) as image:
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


def crop(image: np.ndarray, resolution: int, center: bool, rng: np.random.Generator) -> np.ndarray:
  height, width = image.shape[:2]
  if center:
    top, left = (height - resolution) // 2, (width - resolution) // 2
  else:
    top = int(rng.integers(0, height - resolution + 1))
    left = int(rng.integers(0, width - resolution + 1))
  return image[top:top + resolution, left:left + resolution]


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] NHWC → float32 [-1, 1] NCHW, the layout the diffusers VAE takes."""
  return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def tokenize(tokenizer, prompt: str) -> np.ndarray:
  """Token ids padded to the tokenizer's max length (int32, shape [L])."""
  ids = tokenizer(prompt, padding="max_length", truncation=True,
                  max_length=tokenizer.model_max_length, return_tensors="np").input_ids
  return ids[0].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class DreamBoothData:
  """Preloaded images and token ids; `batch(step)` builds a step's global batch.

  Rows are [instance × batch_size, prior × batch_size (if any), padding]. Padding rows (so the
  batch splits evenly over devices) have zero masks and never touch the loss.
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

  @property
  def with_prior(self) -> bool:
    return bool(self.class_images)

  @property
  def num_rows(self) -> int:
    real = self.batch_size * (2 if self.with_prior else 1)
    return -(-real // self.pad_to_multiple) * self.pad_to_multiple

  def _pick(self, images: list[np.ndarray], stream: int, step: int) -> list[np.ndarray]:
    """`batch_size` images for `step`: epochs of seeded permutations, crops and flips."""
    chosen = []
    for slot in range(self.batch_size):
      counter = step * self.batch_size + slot
      epoch, position = divmod(counter, len(images))
      order = np.random.default_rng([self.seed, stream, epoch]).permutation(len(images))
      rng = np.random.default_rng([self.seed, stream, counter, 1])
      image = crop(images[order[position]], self.resolution, self.center_crop, rng)
      if self.random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
      chosen.append(image)
    return chosen

  def batch(self, step: int) -> dict[str, np.ndarray]:
    images = self._pick(self.instance_images, 0, step)
    ids = [self.instance_ids] * self.batch_size
    instance_mask = [1.0] * self.batch_size
    if self.with_prior:
      images += self._pick(self.class_images, 1, step)
      ids += [self.class_ids] * self.batch_size
      instance_mask += [0.0] * self.batch_size
    prior_mask = [1.0 - m for m in instance_mask]
    num_real = len(images)
    for _ in range(self.num_rows - num_real):
      images.append(images[0])
      ids.append(ids[0])
      instance_mask.append(0.0)
      prior_mask.append(0.0)
    return {
        "pixel_values": to_model_range(np.stack(images)),
        "input_ids": np.stack(ids),
        "instance_mask": np.asarray(instance_mask, np.float32),
        "prior_mask": np.asarray(prior_mask, np.float32),
        # Keys the per-example noise, so the loss does not depend on the row's device.
        "example_id": np.arange(self.num_rows, dtype=np.int32),
    }


def load_images(paths: list[str], resolution: int) -> list[np.ndarray]:
  return [load_image(path, resolution) for path in paths]
