"""The demo's subject: five procedurally drawn "photos" of one distinctive toy.

A red-and-yellow checkered cube with a blue ball on top, drawn at varying places, sizes and
backgrounds; deterministic, so every machine trains on the same pictures.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from dreambooth_jax import models

BUILTIN_DEMO_TOY = "builtin:demo-toy"


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


def resolve_instance_dir(instance_dir: str) -> str:
  """Returns instance_dir, or the cached demo folder (drawn on first use) for the builtin."""
  if instance_dir != BUILTIN_DEMO_TOY:
    return instance_dir
  directory = os.path.join(models.cache_dir(), "demo-toy")
  if len([n for n in os.listdir(directory) if n.endswith(".png")] if os.path.isdir(directory)
         else []) < 5:
    os.makedirs(directory, exist_ok=True)
    for index in range(5):
      path = os.path.join(directory, f"toy_{index}.png")
      draw_toy(index).save(path + ".tmp", format="PNG")
      os.replace(path + ".tmp", path)
  return directory
