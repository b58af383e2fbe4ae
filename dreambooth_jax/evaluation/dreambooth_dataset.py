"""The paper's 30-subject DreamBooth dataset as a tensorflow-datasets builder, from a local copy.

The images cannot be downloaded by TFDS (they live in a git repository), so the builder reads a
clone of https://github.com/google/dreambooth through TFDS's `manual_dir`; see
`MANUAL_DOWNLOAD_INSTRUCTIONS`. There is one builder config per subject (`dreambooth/dog`,
`dreambooth/backpack`, ...): the evaluation trains and scores one subject at a time, so only that
subject's folder is read and prepared.

It runs without TensorFlow: records are written as `array_record` and read back through
`builder.as_data_source()`, and every feature is one that encodes and decodes in NumPy. Images
are stored as the files' own bytes (a scalar `object` Tensor), unchanged, and decoded with PIL by
`decode_image`, upright (EXIF) and RGB like the training images (`input_pipeline.load_image`).
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

from etils import epath
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
import tensorflow_datasets as tfds

from dreambooth_jax.data import input_pipeline
from dreambooth_jax.evaluation import prompts as eval_prompts
from dreambooth_jax.errors import DreamBoothDataError

SOURCE_URL = "https://github.com/google/dreambooth"
METADATA_FILE = "prompts_and_classes.txt"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
The DreamBooth dataset is read from a local copy of its GitHub repository:

  git clone {SOURCE_URL}

and manual_dir must be the clone's dataset/ folder (the one holding backpack/, dog/, ...,
{METADATA_FILE}), e.g.

  tfds.download.DownloadConfig(manual_dir="dreambooth/dataset")
"""

_HOW_TO_GET = (f"the DreamBooth dataset is read from a local copy: git clone {SOURCE_URL} and "
               "point manual_dir at its dataset/ folder")


class SubjectImages(NamedTuple):
  """One subject's real images (uint8 HWC RGB, in file-name order) and its class."""
  images: list[np.ndarray]
  class_noun: str
  live: bool


def _check_subject_name(subject: str) -> eval_prompts.Subject:
  if subject not in eval_prompts.SUBJECTS:
    raise DreamBoothDataError(f"unknown DreamBooth subject {subject!r}; one of: "
                              f"{', '.join(eval_prompts.SUBJECTS)}")
  return eval_prompts.SUBJECTS[subject]


def subject_dir(manual_dir: str | os.PathLike | None, subject: str) -> str:
  """`manual_dir/subject`, or one clear error naming the missing path and where to get it."""
  _check_subject_name(subject)
  if not manual_dir:
    raise DreamBoothDataError(f"no manual_dir given; {_HOW_TO_GET}")
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise DreamBoothDataError(f"{manual_dir}: no such directory; {_HOW_TO_GET}")
  path = os.path.join(manual_dir, subject)
  if not os.path.isdir(path):
    hint = _HOW_TO_GET
    if os.path.isdir(os.path.join(manual_dir, "dataset", subject)):
      hint = (f"{manual_dir} looks like the repository root: use "
              f"{os.path.join(manual_dir, 'dataset')}")
    raise DreamBoothDataError(f"{path}: no such folder for subject {subject!r}; {hint}")
  return path


def read_classes(path: str | os.PathLike) -> dict[str, str]:
  """Subject → class noun from the "Classes" table of the dataset's prompts_and_classes.txt."""
  classes = {}
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f]
  try:
    start = lines.index("subject_name,class") + 1
  except ValueError as e:
    raise DreamBoothDataError(f"{path}: no 'subject_name,class' table") from e
  for line in lines[start:]:
    if not line:
      break
    name, _, class_noun = line.partition(",")
    classes[name] = class_noun
  return classes


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
  """Encoded image bytes → uint8 HWC RGB, upright by its EXIF orientation."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image = ImageOps.exif_transpose(image)
      image.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise DreamBoothDataError(f"{name}: not a readable image ({e})") from e
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


class DreamBooth(tfds.core.GeneratorBasedBuilder):
  """The DreamBooth dataset (Ruiz et al., CVPR 2023): 4-6 photos of each of 30 subjects.

  Prepared from a local clone of https://github.com/google/dreambooth: `git clone` it and pass
  its dataset/ folder as `tfds.download.DownloadConfig(manual_dir=...)`. One config per subject
  (the folder name); its "train" split holds that subject's photos in file-name order. Build it
  with `file_format="array_record"` and read it with `as_data_source()`: no TensorFlow needed.
  """

  name = "dreambooth"
  # TFDS looks for a builder's URL checksums next to its code_path, whose default for a class
  # in a package needs importlib_resources (an etils extra, not installed with tfds). Nothing
  # is downloaded here, so point it at this file directly.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: encoded image bytes, one config per subject."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=s.name, description=f"{s.name}: a {s.class_noun} ({'live' if s.live else 'object'})")
      for s in eval_prompts.SUBJECTS.values()
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Photos of one DreamBooth subject, with its class noun.",
        features=tfds.features.FeaturesDict({
            # The file's bytes as published (JPEG); tfds.features.Image would need TF to encode
            # arrays and would decode without EXIF orientation.
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "height": tfds.features.Scalar(dtype=np.int32),  # upright, as decode_image gives
            "width": tfds.features.Scalar(dtype=np.int32),
            "file_name": tfds.features.Text(),
            "subject": tfds.features.Text(),
            "class_noun": tfds.features.Text(),
            "live": tfds.features.Scalar(dtype=np.bool_),
        }),
        homepage="https://dreambooth.github.io/",
        citation=("@inproceedings{ruiz2023dreambooth, title={DreamBooth: Fine Tuning "
                  "Text-to-Image Diffusion Models for Subject-Driven Generation}, author={Ruiz, "
                  "Nataniel and Li, Yuanzhen and Jampani, Varun and Pritch, Yael and Rubinstein, "
                  "Michael and Aberman, Kfir}, booktitle={CVPR}, year={2023}}"),
        disable_shuffling=True,  # keep file-name order
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(str(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: str):
    subject = _check_subject_name(self.builder_config.name)
    directory = subject_dir(manual_dir, subject.name)
    class_noun = subject.class_noun
    metadata = os.path.join(manual_dir, METADATA_FILE)
    if os.path.isfile(metadata):
      listed = read_classes(metadata).get(subject.name, class_noun)
      if listed != class_noun:
        raise DreamBoothDataError(f"{metadata}: class of {subject.name!r} is {listed!r}, not "
                                  f"{class_noun!r} as in the paper's dataset")
    paths = input_pipeline.list_images(directory, field=f"DreamBooth subject {subject.name!r}")
    if not paths:
      extensions = ", ".join(input_pipeline.IMAGE_EXTENSIONS)
      raise DreamBoothDataError(f"{directory}: no images ({extensions})")
    for path in paths:
      with open(path, "rb") as f:
        data = f.read()
      height, width = decode_image(data, path).shape[:2]
      file_name = os.path.basename(path)
      yield file_name, {
          "image": data,
          "height": height,
          "width": width,
          "file_name": file_name,
          "subject": subject.name,
          "class_noun": class_noun,
          "live": subject.live,
      }


def prepare(data_dir: str | os.PathLike | None, manual_dir: str | os.PathLike | None,
            subject: str) -> DreamBooth:
  """The subject's builder, prepared in `data_dir` from `manual_dir` unless it already is."""
  _check_subject_name(subject)
  builder = DreamBooth(config=subject, data_dir=None if data_dir is None else os.fspath(data_dir),
                       file_format="array_record")
  if not builder.data_path.exists():  # what TFDS itself checks before reusing a prepared copy
    subject_dir(manual_dir, subject)  # the clear error, before TFDS's own
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def read_examples(builder: DreamBooth) -> list[dict]:
  """Every record of the prepared "train" split, strings decoded, image still encoded."""
  source = builder.as_data_source(split="train")
  examples = []
  for i in range(len(source)):
    example = dict(source[i])
    for key in ("file_name", "subject", "class_noun"):
      example[key] = example[key].decode("utf-8")
    example["live"] = bool(example["live"])
    examples.append(example)
  return examples


def load_subject(data_dir: str | os.PathLike | None, manual_dir: str | os.PathLike | None,
                 subject: str) -> SubjectImages:
  """A subject's real photos (decoded), class noun and live flag, for training and metrics.

  Prepares the subject's TFDS config in `data_dir` from the clone's dataset/ folder `manual_dir`
  on first use; afterwards `manual_dir` is not read (delete `data_dir/dreambooth/<subject>` to
  re-prepare after changing the copy).
  """
  examples = read_examples(prepare(data_dir, manual_dir, subject))
  entry = eval_prompts.SUBJECTS[subject]
  images = [decode_image(e["image"], f"{subject}/{e['file_name']}") for e in examples]
  return SubjectImages(images, entry.class_noun, entry.live)
