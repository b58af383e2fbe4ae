"""The DreamBooth paper's evaluation protocol as data: its 30 subjects and 25 + 25 prompts.

Transcribed exactly from `dataset/prompts_and_classes.txt` of https://github.com/google/dreambooth
(the dataset released with Ruiz et al., "DreamBooth", CVPR 2023, arXiv 2208.12242): the
"Classes" table gives `SUBJECTS` (folder name → class noun), the "Object Prompts" and "Live
Subject Prompts" lists give `OBJECT_PROMPTS` and `LIVE_PROMPTS`, where `{0}` is the unique
identifier and `{1}` the class noun (`'a {0} {1} in the jungle'.format(unique_token,
class_token)`). The repository README says 9 of the 30 subjects are live (the dogs and cats) and
21 are objects; that is the `live` flag here.

The paper (Sec. 4.1) generates 4 images per subject and prompt: 30 × 25 × 4 = 3,000 images, scored
with DINO and CLIP-I against the subject's real images and CLIP-T against the prompt. Keeping the
protocol as data lets the evaluation be run exactly as published, with any identifier.
"""

from __future__ import annotations

from typing import NamedTuple

IMAGES_PER_PROMPT = 4


class Subject(NamedTuple):
  """One subject of the dataset: its folder name, class noun and whether it is alive."""
  name: str
  class_noun: str
  live: bool


_LIVE = frozenset({"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"})

# (folder name, class noun) in the order of prompts_and_classes.txt.
_CLASSES = (
    ("backpack", "backpack"),
    ("backpack_dog", "backpack"),
    ("bear_plushie", "stuffed animal"),
    ("berry_bowl", "bowl"),
    ("can", "can"),
    ("candle", "candle"),
    ("cat", "cat"),
    ("cat2", "cat"),
    ("clock", "clock"),
    ("colorful_sneaker", "sneaker"),
    ("dog", "dog"),
    ("dog2", "dog"),
    ("dog3", "dog"),
    ("dog5", "dog"),
    ("dog6", "dog"),
    ("dog7", "dog"),
    ("dog8", "dog"),
    ("duck_toy", "toy"),
    ("fancy_boot", "boot"),
    ("grey_sloth_plushie", "stuffed animal"),
    ("monster_toy", "toy"),
    ("pink_sunglasses", "glasses"),
    ("poop_emoji", "toy"),
    ("rc_car", "toy"),
    ("red_cartoon", "cartoon"),
    ("robot_toy", "toy"),
    ("shiny_sneaker", "sneaker"),
    ("teapot", "teapot"),
    ("vase", "vase"),
    ("wolf_plushie", "stuffed animal"),
)

SUBJECTS: dict[str, Subject] = {
    name: Subject(name, class_noun, name in _LIVE) for name, class_noun in _CLASSES}

OBJECT_PROMPTS: tuple[str, ...] = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

LIVE_PROMPTS: tuple[str, ...] = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

# The paper's class prompt "a [class noun]" (Sec. 3.3: the prior-preservation samples are drawn
# with c_pr = Γ(f("a [class noun]"))). PRES (Sec. 4.3) scores the fine-tuned model's images of
# "random subjects of the prior class" against the subject's real images, so they are generated
# from this same prompt: no identifier, only the class noun.
CLASS_PROMPT = "a {0}"


def prompts_for(identifier: str, class_noun: str, live: bool) -> list[str]:
  """The paper's 25 evaluation prompts for one subject, e.g. 'a sks dog in the jungle'."""
  templates = LIVE_PROMPTS if live else OBJECT_PROMPTS
  return [template.format(identifier, class_noun) for template in templates]


def subject_prompts(subject: str, identifier: str) -> list[str]:
  """`prompts_for` a dataset subject by folder name (live or object prompts as the paper)."""
  if subject not in SUBJECTS:
    raise ValueError(f"unknown DreamBooth subject {subject!r}; one of: {', '.join(SUBJECTS)}")
  entry = SUBJECTS[subject]
  return prompts_for(identifier, entry.class_noun, entry.live)


def class_prompt(class_noun: str) -> str:
  """The bare class prompt of the PRES metric, 'a [class noun]' (e.g. 'a dog')."""
  return CLASS_PROMPT.format(class_noun)
