"""Prior-preservation images: the frozen model's own samples of the class prompt.

Missing images are generated in batches sharded over all devices and written one PNG at a
time, atomically, as class_<index>.png. Image <index> is seeded by its index, so an interrupted
generation resumes by making only the files that are not there, and makes the same ones.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from dreambooth_jax import distributed, errors, failpoints, models, sharding
from dreambooth_jax.data import input_pipeline
from dreambooth_jax.models import sampling


def missing_indices(class_dir: str, num_class_images: int) -> list[int]:
  """Indices of class_<i>.png still to make, given the images already in class_dir."""
  existing = input_pipeline.list_images(class_dir, "data.class_dir") if os.path.isdir(
      class_dir) else []
  shortfall = num_class_images - len(existing)
  if shortfall <= 0:
    return []
  names = {os.path.basename(p) for p in existing}
  free = (i for i in range(num_class_images + len(existing))
          if f"class_{i:05d}.png" not in names)
  return [next(free) for _ in range(shortfall)]


def ensure_class_images(class_dir: str, num_class_images: int, class_prompt: str,
                        components: models.Components, params, mesh: jax.sharding.Mesh,
                        resolution: int, class_config, seed: int,
                        stop_requested: Callable[[], bool] = lambda: False) -> list[str]:
  """Generates what class_dir lacks; returns the first num_class_images image paths.

  Raises errors.Preempted between batches once stop_requested() is true.
  """
  if distributed.is_main():
    os.makedirs(class_dir, exist_ok=True)
    for name in os.listdir(class_dir):
      if ".png.tmp" in name:  # left by a process killed mid-write
        os.remove(os.path.join(class_dir, name))
  distributed.barrier("class images: listed")
  todo = missing_indices(class_dir, num_class_images)
  if todo:
    logging.info("Generating %d class images for %r into %s", len(todo), class_prompt, class_dir)
    sampler = sampling.make_sampler(components, mesh, resolution, class_config.scheduler,
                                    class_config.num_inference_steps,
                                    class_config.guidance_scale)
    prompt_ids = input_pipeline.tokenize(components.tokenizer, class_prompt)
    batch_size = -(-class_config.batch_size // mesh.size) * mesh.size
    with tqdm(total=len(todo), desc="class images", unit="img") as progress:
      for start in range(0, len(todo), batch_size):
        if stop_requested():
          raise errors.Preempted(
              f"stopped generating class images with {len(todo) - start} still missing; "
              "rerun the same command to make the rest")
        indices = todo[start:start + batch_size]
        prompts = np.repeat(prompt_ids[None], len(indices), axis=0)
        images = sampling.generate_sharded(sampler, params, mesh, prompts, indices, seed)
        # Each process writes the images its devices made: no image twice, none missed.
        for row, image in sharding.local_row_values(images):
          if row < len(indices):
            index = indices[row]
            sampling.write_png(image, os.path.join(class_dir, f"class_{index:05d}.png"),
                               before_commit=lambda i=index: failpoints.at("class_image", i))
        progress.update(len(indices))
  distributed.barrier("class images: written")
  return input_pipeline.list_images(class_dir, "data.class_dir")[:num_class_images]
