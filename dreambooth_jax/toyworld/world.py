"""A procedural toy world: captioned pictures of plain objects in a few scenes, and one subject.

Why: DreamBooth's questions (does the model learn *this* subject, can it put it in new scenes,
does "a ball" stay generic?) need a world small enough that a tiny text-to-image model can be
pretrained on it in minutes and judged by small classifiers (`judges`). Everything is drawn
with PIL from a seed, so every machine sees the same pictures.

The world: 1-3 objects of one class (ball, box, tree, cup), all of one plain colour and one
size, standing on the ground of one scene (grass, snow, night, beach, room: each a distinct
background). Captions follow one grammar,

  [count] [size] [colour] noun [scene]     e.g. "two big red boxes on the beach"

where count is "a"/"two"/"three" (plural noun for 2-3) and size, colour and scene may each be
left out (`sample_example`'s `drop_prob`), so that short prompts such as "a ball" or "a ball in
the snow" are inside the grammar a text encoder learns. Object positions are random and not
captioned.

The subject: one ball painted in orange-and-teal vertical stripes. World objects are always a
single plain colour (orange and teal balls do occur, separately), so the striped ball is never
drawn by `sample_example`/`generate`; `subject_photos` gives its 4 "photos", all in one scene
(`SUBJECT_SCENE`), so that showing it anywhere else is a real recontextualisation.

Sizes are fractions of the image side, chosen so that pictures still read at 32x32: a "small"
object's bounding square is at least 10 px there and each subject stripe at least 2.5 px wide.
Drawing is done at 4x (at least 128 px) and area-averaged down, which anti-aliases every edge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

Rgb = tuple[int, int, int]

CLASSES = ("ball", "box", "tree", "cup")
PLURALS = {"ball": "balls", "box": "boxes", "tree": "trees", "cup": "cups"}
# Plain, mutually distant colours; none is close to a background (no green on grass, no white
# on snow). Orange and teal are also the subject's, which the world only ever shows separately.
COLOURS: dict[str, Rgb] = {
    "red": (210, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 40),
    "teal": (15, 150, 140),
    "blue": (40, 75, 215),
    "purple": (140, 55, 180),
}
SCENES = ("on grass", "in the snow", "at night", "on the beach", "in a room")
SIZES = ("small", "big")
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# How often `sample_example` draws 1, 2 and 3 objects: single objects dominate, as in the
# DreamBooth prompts ("a sks ball on the beach").
COUNT_PROBS = (0.5, 0.25, 0.25)

SUBJECT_CLASS = "ball"
SUBJECT_COLOURS = ("orange", "teal")
SUBJECT_SCENE = "in a room"

# Object side (width of its bounding square) as a fraction of the image side: (mean, jitter).
_SIZE_FRACTION = {"small": (0.34, 0.02), "big": (0.5, 0.02)}
# The subject's stripe count: 4 bands keep each >= 2.5 px on a small ball at 32 px.
_SUBJECT_STRIPES = 4
_TRUNK = (105, 70, 40)
_MIN_RENDER = 128

# Fixed (scene-independent) layouts of the 4 subject photos: (size word, centre x, bottom y).
_SUBJECT_PHOTO_LAYOUTS = (("big", 0.32, 0.93), ("small", 0.7, 0.86),
                          ("big", 0.62, 0.97), ("small", 0.3, 0.8))
SUBJECT_PHOTO_COUNT = len(_SUBJECT_PHOTO_LAYOUTS)


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One world picture with its caption and the attributes it was drawn from.

  The caption may omit size, colour or scene (see `caption_for`); the attributes are always
  complete. `eq=False`: images are arrays, so examples compare (and hash) by identity.
  """
  image: np.ndarray  # uint8 [size, size, 3]
  caption: str
  class_name: str
  colour: str | None  # None for a striped ball
  scene: str
  size: str
  count: int
  positions: tuple[tuple[float, float], ...]  # each object's centre (x, y), fractions of side
  seed: int  # `render_example(..., seed=seed)` redraws the image
  stripes: tuple[str, str] | None = None  # SUBJECT_COLOURS for the subject


def _all_caption_words() -> tuple[str, ...]:
  words = set(COUNT_WORDS.values()) | set(SIZES) | set(COLOURS) | set(CLASSES)
  words |= set(PLURALS.values())
  for scene in SCENES:
    words |= set(scene.split())
  return tuple(sorted(words))


# Every word a caption (or `prompt_for` without an identifier) can contain, sorted: what a
# word-level tokenizer needs. An identifier such as "sks" is the caller's to add.
VOCABULARY = _all_caption_words()


def caption_for(class_name: str, count: int = 1, colour: str | None = None,
                size: str | None = None, scene: str | None = None) -> str:
  """The caption "[count] [size] [colour] noun [scene]"; a None part is left out ("a ball")."""
  _check(class_name=class_name, count=count, colour=colour, size=size, scene=scene)
  words = [COUNT_WORDS[count]]
  if size is not None:
    words.append(size)
  if colour is not None:
    words.append(colour)
  words.append(class_name if count == 1 else PLURALS[class_name])
  if scene is not None:
    words.append(scene)
  return " ".join(words)


def prompt_for(class_name: str, scene: str | None = None, identifier: str | None = None) -> str:
  """A prompt in the caption grammar: "a ball", "a ball in the snow", "a sks ball on grass"."""
  caption = caption_for(class_name, 1, scene=scene)
  if identifier is None:
    return caption
  if not identifier or " " in identifier:
    raise ValueError(f"identifier must be one word, got {identifier!r}")
  return f"a {identifier} {caption[2:]}"


def _check(*, class_name: str | None = None, count: int | None = None,
           colour: str | None = None, size: str | None = None,
           scene: str | None = None) -> None:
  """Raises ValueError naming the first attribute that is not part of the world."""
  for name, value, allowed in (("class", class_name, CLASSES), ("count", count, COUNTS),
                               ("colour", colour, tuple(COLOURS)), ("size", size, SIZES),
                               ("scene", scene, SCENES)):
    if value is not None and value not in allowed:
      raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def _jitter(rng: np.random.Generator, rgb: Rgb, amount: int) -> Rgb:
  return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _shade(rgb: Rgb, factor: float) -> Rgb:
  return tuple(int(c * factor) for c in rgb)


def _gradient(draw: ImageDraw.ImageDraw, top: Rgb, bottom: Rgb, y0: int, y1: int,
              width: int) -> None:
  """Vertical linear gradient between rows y0 and y1 (exclusive)."""
  span = max(y1 - y0 - 1, 1)
  for y in range(y0, y1):
    t = (y - y0) / span
    colour = tuple(int(round(a + (b - a) * t)) for a, b in zip(top, bottom))
    draw.line([(0, y), (width - 1, y)], fill=colour)


def _dots(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, y_max: float,
          radius: float, colour: Rgb, res: int) -> None:
  for _ in range(n):
    x, y = rng.uniform(0, 1) * res, rng.uniform(0, y_max) * res
    r = radius * res * rng.uniform(0.7, 1.3)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _draw_scene(draw: ImageDraw.ImageDraw, scene: str, rng: np.random.Generator,
                res: int) -> float:
  """Paints a scene's background; returns the horizon (ground starts there), a fraction."""
  if scene == "on grass":
    horizon = rng.uniform(0.42, 0.52)
    h = int(horizon * res)
    _gradient(draw, _jitter(rng, (95, 160, 230), 10), _jitter(rng, (175, 215, 245), 8), 0, h,
              res)
    _gradient(draw, _jitter(rng, (85, 165, 60), 10), _jitter(rng, (55, 125, 40), 10), h, res,
              res)
    for _ in range(14):  # grass tufts
      x, y = rng.uniform(0, 1) * res, rng.uniform(horizon + 0.03, 1) * res
      w = 0.012 * res
      draw.polygon([(x - w, y), (x + w, y), (x, y - 0.05 * res)], fill=(40, 105, 35))
  elif scene == "in the snow":
    horizon = rng.uniform(0.4, 0.5)
    h = int(horizon * res)
    _gradient(draw, _jitter(rng, (160, 165, 178), 8), _jitter(rng, (205, 208, 216), 6), 0, h,
              res)
    _gradient(draw, _jitter(rng, (246, 248, 252), 3), _jitter(rng, (222, 228, 240), 5), h, res,
              res)
    _dots(draw, rng, 25, horizon, 0.01, (250, 250, 255), res)  # snowflakes
  elif scene == "at night":
    horizon = rng.uniform(0.55, 0.65)
    h = int(horizon * res)
    _gradient(draw, _jitter(rng, (8, 10, 35), 5), _jitter(rng, (30, 38, 85), 8), 0, h, res)
    _dots(draw, rng, 18, horizon - 0.05, 0.008, (250, 245, 200), res)  # stars
    x, y, r = rng.uniform(0.12, 0.88) * res, rng.uniform(0.1, 0.22) * res, 0.07 * res
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(240, 235, 190))  # moon
    _gradient(draw, _jitter(rng, (28, 34, 58), 5), _jitter(rng, (14, 16, 30), 4), h, res, res)
  elif scene == "on the beach":
    horizon = rng.uniform(0.5, 0.58)
    sea = horizon - rng.uniform(0.14, 0.2)
    _gradient(draw, _jitter(rng, (110, 185, 240), 8), _jitter(rng, (185, 225, 250), 6), 0,
              int(sea * res), res)
    _gradient(draw, _jitter(rng, (25, 80, 150), 8), _jitter(rng, (45, 115, 180), 8),
              int(sea * res), int(horizon * res), res)
    _gradient(draw, _jitter(rng, (240, 222, 165), 6), _jitter(rng, (220, 195, 135), 6),
              int(horizon * res), res, res)
    x, y, r = rng.uniform(0.1, 0.9) * res, rng.uniform(0.08, 0.18) * res, 0.06 * res
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 245, 170))  # sun
  elif scene == "in a room":
    horizon = rng.uniform(0.55, 0.65)
    h = int(horizon * res)
    wall = _jitter(rng, (228, 212, 180), 8)
    draw.rectangle([0, 0, res, h], fill=wall)
    x0, w = rng.uniform(0.08, 0.6) * res, rng.uniform(0.2, 0.3) * res  # a picture frame
    y0 = rng.uniform(0.08, 0.16) * res
    draw.rectangle([x0, y0, x0 + w, y0 + 0.7 * w], fill=_shade(wall, 0.8),
                   outline=(120, 85, 55), width=max(1, int(0.015 * res)))
    floor = _jitter(rng, (150, 100, 60), 8)
    draw.rectangle([0, h, res, res], fill=floor)
    for k in range(1, 4):  # floor boards
      y = h + (res - h) * k / 4
      draw.line([(0, y), (res, y)], fill=_shade(floor, 0.8), width=max(1, int(0.01 * res)))
    draw.rectangle([0, h - 0.02 * res, res, h], fill=(245, 240, 230))  # skirting board
  else:
    raise ValueError(f"unknown scene {scene!r}; expected one of {list(SCENES)}")
  return horizon


def _draw_striped_ball(image: Image.Image, stripes: tuple[str, str], box: Sequence[float],
                       res: int) -> None:
  """A ball of vertical bands alternating between two colours (the subject's pattern)."""
  x0, y0, x1, y1 = box
  layer = Image.new("RGB", (res, res), COLOURS[stripes[0]])
  band = (x1 - x0) / _SUBJECT_STRIPES
  for k in range(1, _SUBJECT_STRIPES, 2):
    ImageDraw.Draw(layer).rectangle([x0 + k * band, y0, x0 + (k + 1) * band, y1],
                                    fill=COLOURS[stripes[1]])
  mask = Image.new("L", (res, res), 0)
  ImageDraw.Draw(mask).ellipse(box, fill=255)
  image.paste(layer, (0, 0), mask)
  ImageDraw.Draw(image).ellipse(box, outline=(45, 45, 50), width=max(1, round(0.025 * res)))


def _draw_object(image: Image.Image, class_name: str, colour: Rgb | None, cx: float,
                 bottom: float, side: float, res: int,
                 stripes: tuple[str, str] | None = None) -> None:
  """Draws one object whose bounding square (side, in pixels) stands on `bottom` at `cx`.

  A ball with `stripes` (and colour None) is striped instead of plain.
  """
  draw = ImageDraw.Draw(image)
  outline = _shade(colour, 0.5) if colour is not None else None
  width = max(1, round(0.025 * res))
  x0, y0, x1, y1 = cx - side / 2, bottom - side, cx + side / 2, bottom
  if class_name == "ball":
    if stripes is not None:
      _draw_striped_ball(image, stripes, (x0, y0, x1, y1), res)
    else:
      draw.ellipse([x0, y0, x1, y1], fill=colour, outline=outline, width=width)
  elif class_name == "box":
    top = bottom - 0.82 * side
    draw.rectangle([x0, top, x1, y1], fill=colour, outline=outline, width=width)
    draw.line([(x0, top + 0.2 * side), (x1, top + 0.2 * side)], fill=outline, width=width)
  elif class_name == "tree":
    trunk_w = 0.2 * side
    draw.rectangle([cx - trunk_w / 2, bottom - 0.3 * side, cx + trunk_w / 2, bottom],
                   fill=_TRUNK, outline=_shade(_TRUNK, 0.6), width=width)
    for base, tip, half in ((0.22, 0.58, 0.5), (0.5, 1.0, 0.38)):  # two stacked tiers
      draw.polygon([(cx - half * side, bottom - base * side),
                    (cx + half * side, bottom - base * side), (cx, bottom - tip * side)],
                   fill=colour, outline=outline, width=width)
  elif class_name == "cup":
    body_cx = cx - 0.1 * side
    top, top_half, bottom_half = bottom - 0.8 * side, 0.38 * side, 0.27 * side
    handle = [body_cx + 0.2 * side, top + 0.18 * side, body_cx + 0.6 * side, top + 0.58 * side]
    draw.ellipse(handle, outline=outline, width=int(round(0.13 * side)))
    draw.ellipse([handle[0] + 0.03 * side, handle[1] + 0.03 * side, handle[2] - 0.03 * side,
                  handle[3] - 0.03 * side], outline=colour, width=int(round(0.07 * side)))
    draw.polygon([(body_cx - top_half, top), (body_cx + top_half, top),
                  (body_cx + bottom_half, bottom), (body_cx - bottom_half, bottom)],
                 fill=colour, outline=outline, width=width)
  else:
    raise ValueError(f"unknown class {class_name!r}; expected one of {list(CLASSES)}")


def _layout(rng: np.random.Generator, count: int, sides: np.ndarray,
            horizon: float) -> list[tuple[float, float]]:
  """(centre x, bottom y) fractions for `count` objects: on the ground, not mostly hidden.

  Centres are kept at least 0.45 side apart (big triples overlap, but each stays visible);
  bottoms lie between a quarter of the way from the horizon to the lower edge and that edge.
  """
  low = horizon + 0.25 * (1 - horizon)
  for _ in range(200):
    xs = np.sort(rng.uniform(sides / 2, 1 - sides / 2))
    gaps = np.diff(xs)
    if np.all(gaps >= 0.45 * np.maximum(sides[1:], sides[:-1])):
      break
  else:  # the rejection sampler failed: spread evenly
    xs = np.linspace(sides[0] / 2, 1 - sides[-1] / 2, count)
  bottoms = rng.uniform(low, 0.98, count)
  return list(zip(xs.tolist(), bottoms.tolist()))


def _render(class_name: str, colour: str | None, scene: str, size_word: str, count: int,
            seed: int, size: int, stripes: tuple[str, str] | None,
            layout: Sequence[tuple[float, float]] | None = None
            ) -> tuple[np.ndarray, tuple[tuple[float, float], ...]]:
  """(image, object centres as (x, y) fractions); a fixed `layout` serves the subject photos."""
  if size < 8:
    raise ValueError(f"image size must be at least 8 px, got {size}")
  rng = np.random.default_rng([seed, 11])
  res = max(_MIN_RENDER, 4 * size)
  image = Image.new("RGB", (res, res))
  horizon = _draw_scene(ImageDraw.Draw(image), scene, rng, res)
  mean, jitter = _SIZE_FRACTION[size_word]
  sides = rng.uniform(mean - jitter, mean + jitter, count)
  if layout is None:
    layout = _layout(rng, count, sides, horizon)
  # Back to front: objects standing higher up are further away.
  for (cx, bottom), side in sorted(zip(layout, sides), key=lambda item: item[0][1]):
    _draw_object(image, class_name, None if colour is None else COLOURS[colour], cx * res,
                 bottom * res, side * res, res, stripes)
  image = image.resize((size, size), Image.Resampling.BOX)
  centres = tuple((cx, bottom - side / 2) for (cx, bottom), side in zip(layout, sides))
  return np.asarray(image, dtype=np.uint8), centres


def render_example(class_name: str, colour: str | None, scene: str, size_word: str,
                   count: int, seed: int, size: int = 64,
                   stripes: tuple[str, str] | None = None) -> Example:
  """Draws one specified picture as an Example with its full caption; layout comes from seed.

  `stripes` (with colour None) draws one ball striped in those two colours: SUBJECT_COLOURS
  is the subject; any other pair is a decoy that is not part of the world either (the
  judges' hard negatives). The same seed gives the same layout at every `size`.
  """
  _check(class_name=class_name, count=count, colour=colour, size=size_word, scene=scene)
  if stripes is None:
    if colour is None:
      raise ValueError("colour is required for plain objects")
  else:
    if class_name != SUBJECT_CLASS or count != 1 or colour is not None:
      raise ValueError(f"only one {SUBJECT_CLASS} (count 1, colour None) is drawn striped")
    if len(stripes) != 2 or stripes[0] == stripes[1]:
      raise ValueError(f"stripes need two different colours, got {stripes}")
    _check(colour=stripes[0])
    _check(colour=stripes[1])
    stripes = tuple(stripes)
  image, centres = _render(class_name, colour, scene, size_word, count, seed, size, stripes)
  return Example(image=image, caption=caption_for(class_name, count, colour, size_word, scene),
                 class_name=class_name, colour=colour, scene=scene, size=size_word,
                 count=count, positions=centres, seed=seed, stripes=stripes)


def render(class_name: str, colour: str | None, scene: str, size_word: str, count: int,
           seed: int, size: int = 64, subject: bool = False) -> np.ndarray:
  """Draws one specified picture (uint8 [size, size, 3]); positions and jitter come from seed.

  `subject=True` draws the subject instead of a plain object: it needs class_name ==
  SUBJECT_CLASS, count 1 and colour None (its colours are its own).
  """
  return render_example(class_name, colour, scene, size_word, count, seed, size,
                        stripes=SUBJECT_COLOURS if subject else None).image


def sample_example(rng: np.random.Generator | int, size: int = 64,
                   drop_prob: float = 0.25) -> Example:
  """One random world picture and caption; never the subject.

  Class, colour, scene and size are uniform, count follows COUNT_PROBS. Each of size, colour
  and scene is left out of the caption with probability `drop_prob` (the attributes keep them).
  """
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  class_name = CLASSES[rng.integers(len(CLASSES))]
  colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
  scene = SCENES[rng.integers(len(SCENES))]
  size_word = SIZES[rng.integers(len(SIZES))]
  count = int(rng.choice(COUNTS, p=COUNT_PROBS))
  keep = rng.uniform(size=3) >= drop_prob
  seed = int(rng.integers(2**31))
  example = render_example(class_name, colour, scene, size_word, count, seed, size)
  caption = caption_for(class_name, count, colour=colour if keep[1] else None,
                        size=size_word if keep[0] else None, scene=scene if keep[2] else None)
  return dataclasses.replace(example, caption=caption)


def generate(seed: int, n: int, size: int = 64, drop_prob: float = 0.25) -> list[Example]:
  """The first n examples of the world stream `seed` (the same list on every machine)."""
  rng = np.random.default_rng(seed)
  return [sample_example(rng, size, drop_prob) for _ in range(n)]


def stream(seed: int, size: int = 64, drop_prob: float = 0.25) -> Iterator[Example]:
  """The endless example stream whose first n items are `generate(seed, n, ...)`."""
  rng = np.random.default_rng(seed)
  while True:
    yield sample_example(rng, size, drop_prob)


def subject_photos(size: int = 64) -> list[np.ndarray]:
  """The subject's 4 "photos": uint8 [size, size, 3], all SUBJECT_SCENE, varied place and size."""
  return [_render(SUBJECT_CLASS, None, SUBJECT_SCENE, size_word, 1, seed=1000 + k, size=size,
                  stripes=SUBJECT_COLOURS, layout=[(cx, bottom)])[0]
          for k, (size_word, cx, bottom) in enumerate(_SUBJECT_PHOTO_LAYOUTS)]
