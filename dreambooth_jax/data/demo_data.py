"""Builtin instance folders: subject "photos" drawn procedurally, so no download is needed.

- builtin:toyworld-subject (the demo's): the toy world's subject, an orange-and-teal striped
  ball, in its 4 photos at 32x32 (`toyworld.world.subject_photos`), all in one room.
- builtin:demo-toy (tests and benchmarks): five photos of a red-and-yellow checkered cube with
  a blue ball on top, at varying places, sizes and backgrounds.

Both are deterministic, so every machine trains on the same pictures.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from dreambooth_jax import build_cache
from dreambooth_jax.toyworld import world

BUILTIN_DEMO_TOY = "builtin:demo-toy"
BUILTIN_TOYWORLD_SUBJECT = "builtin:toyworld-subject"
TOYWORLD_PHOTO_SIZE = 32  # the toy-world model's resolution


def draw_toy(seed: int, size: int = 64) -> Image.Image:
  rng = np.random.default_rng([seed, 7])
  background = tuple(int(c) for c in rng.integers(60, 200, 3))
  image = Image.new("RGB", (size, size), background)
  draw = ImageDraw.Draw(image)
  cube = int(size * rng.uniform(0.35, 0.5))
  left = int(rng.integers(2, size - cube - 2))
  top = int(rng.integers(size // 4, size - cube - 2))
  cell = max(cube // 4, 1)
  for row in range(4):
    for column in range(4):
      color = (220, 30, 30) if (row + column) % 2 == 0 else (240, 220, 40)
      x, y = left + column * cell, top + row * cell
      draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
  radius = max(cube // 4, 2)
  center_x, center_y = left + 2 * cell, top - radius
  draw.ellipse([center_x - radius, center_y - radius, center_x + radius, center_y + radius],
               fill=(30, 60, 230))
  return image


def _toyworld_subject_photos() -> list[Image.Image]:
  return [Image.fromarray(photo) for photo in world.subject_photos(TOYWORLD_PHOTO_SIZE)]


# name -> (cache folder, file stem, the photos)
_BUILTINS = {
    BUILTIN_DEMO_TOY: ("demo-toy", "toy", lambda: [draw_toy(index) for index in range(5)]),
    BUILTIN_TOYWORLD_SUBJECT: ("toyworld-subject", "subject", _toyworld_subject_photos),
}
BUILTIN_INSTANCE_DIRS = tuple(_BUILTINS)


def resolve_instance_dir(instance_dir: str) -> str:
  """Returns instance_dir, or the cached folder of a builtin (drawn on first use)."""
  if instance_dir not in _BUILTINS:
    return instance_dir
  folder, stem, draw_photos = _BUILTINS[instance_dir]

  def draw(directory: str) -> None:
    os.makedirs(directory)
    for index, photo in enumerate(draw_photos()):
      photo.save(os.path.join(directory, f"{stem}_{index}.png"), format="PNG")

  return build_cache.built_dir(folder, draw, sys.modules[__name__], world)
