"""The paper's evaluation protocol as data, and the DreamBooth TFDS builder on a tiny fake copy."""

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image, ImageOps
import pytest
import tensorflow_datasets as tfds

from dreambooth_jax.data import input_pipeline
from dreambooth_jax.evaluation import dreambooth_dataset, prompts as eval_prompts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Subjects of the fake copy and the colour of each of their two photos.
FAKE = {"dog": ((200, 30, 30), (30, 200, 30)), "backpack": ((30, 30, 200), (220, 220, 40)),
        "cat2": ((40, 220, 220), (90, 90, 90))}


def test_prompt_lists_are_the_papers_25_plus_25():
  assert len(eval_prompts.OBJECT_PROMPTS) == 25 and len(eval_prompts.LIVE_PROMPTS) == 25
  for templates in (eval_prompts.OBJECT_PROMPTS, eval_prompts.LIVE_PROMPTS):
    assert len(set(templates)) == 25
    for template in templates:
      assert template.count("{0}") == 1 and template.count("{1}") == 1
      assert "{0} {1}" in template  # the identifier right before the class noun
  # The two lists share their first 10 (scenes) and last 5 (property changes) prompts.
  assert eval_prompts.OBJECT_PROMPTS[:10] == eval_prompts.LIVE_PROMPTS[:10]
  assert eval_prompts.OBJECT_PROMPTS[20:] == eval_prompts.LIVE_PROMPTS[20:]
  assert eval_prompts.OBJECT_PROMPTS[0] == "a {0} {1} in the jungle"
  assert eval_prompts.LIVE_PROMPTS[13] == "a {0} {1} wearing a black top hat and a monocle"
  assert eval_prompts.IMAGES_PER_PROMPT == 4


def test_prompts_for_fills_identifier_and_class():
  live = eval_prompts.prompts_for("sks", "dog", live=True)
  objects = eval_prompts.prompts_for("zwx", "stuffed animal", live=False)
  assert live[0] == "a sks dog in the jungle" and live[10] == "a sks dog wearing a red hat"
  assert objects[10] == "a zwx stuffed animal with a wheat field in the background"
  for prompts, filled in ((live, "sks dog"), (objects, "zwx stuffed animal")):
    assert len(prompts) == 25
    assert all(filled in p and "{" not in p for p in prompts)
  assert eval_prompts.subject_prompts("cat2", "sks") == eval_prompts.prompts_for("sks", "cat", True)
  assert eval_prompts.subject_prompts("vase", "sks")[-1] == "a cube shaped sks vase"
  assert eval_prompts.class_prompt("dog") == "a dog"
  assert eval_prompts.class_prompt("stuffed animal") == "a stuffed animal"


def test_the_30_subjects():
  subjects = eval_prompts.SUBJECTS
  assert len(subjects) == 30
  assert all(name == s.name for name, s in subjects.items())
  live = sorted(name for name, s in subjects.items() if s.live)
  assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
  assert all(subjects[name].class_noun in ("cat", "dog") for name in live)
  # The dataset README: 30 subjects of 15 classes, 9 live and 21 objects.
  assert len({s.class_noun for s in subjects.values()}) == 15
  assert subjects["bear_plushie"].class_noun == "stuffed animal"
  assert subjects["pink_sunglasses"].class_noun == "glasses"
  assert subjects["red_cartoon"] == ("red_cartoon", "cartoon", False)
  assert 30 * 25 * eval_prompts.IMAGES_PER_PROMPT == 3000  # the paper's image count


def _metadata_text() -> str:
  """prompts_and_classes.txt in the published file's layout."""
  def prompt_list(templates):
    return ",\n".join(f"'{t}'.format(unique_token, class_token)" for t in templates)
  classes = "\n".join(f"{s.name},{s.class_noun}" for s in eval_prompts.SUBJECTS.values())
  return (f"Classes\n\nsubject_name,class\n{classes}\n\nPrompts\n\nObject Prompts\n\n"
          f"prompt_list = [\n{prompt_list(eval_prompts.OBJECT_PROMPTS)}\n]\n\n"
          f"Live Subject Prompts\n\nprompt_list = [\n{prompt_list(eval_prompts.LIVE_PROMPTS)}\n]\n")


def _photo(color, size=(24, 16)) -> np.ndarray:
  """A flat colour with a dark square top-left, so orientation shows."""
  image = np.empty((size[1], size[0], 3), np.uint8)
  image[:] = color
  image[:4, :4] = 0
  return image


def make_fake_copy(root) -> str:
  """A clone's dataset/ folder with 3 subjects of 2 JPEGs each (cat2/01.jpg EXIF-rotated)."""
  dataset = root / "dreambooth" / "dataset"
  dataset.mkdir(parents=True)
  (dataset / "prompts_and_classes.txt").write_text(_metadata_text())
  (dataset / "references_and_licenses.txt").write_text("backpack\nhttps://unsplash.com/...\n")
  for subject, colors in FAKE.items():
    (dataset / subject).mkdir()
    for i, color in enumerate(colors):
      image = Image.fromarray(_photo(color))
      exif = Image.Exif()
      if (subject, i) == ("cat2", 1):
        exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
      image.save(dataset / subject / f"{i:02d}.jpg", quality=95, exif=exif)
  return str(dataset)


def _upright(path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def test_read_classes_parses_the_published_layout(tmp_path):
  path = tmp_path / "prompts_and_classes.txt"
  path.write_text(_metadata_text())
  assert dreambooth_dataset.read_classes(path) == {
      s.name: s.class_noun for s in eval_prompts.SUBJECTS.values()}


def test_builder_prepares_from_fake_copy_and_reads_back(tmp_path):
  manual_dir = make_fake_copy(tmp_path)
  data_dir = tmp_path / "tfds"
  for subject, colors in FAKE.items():
    builder = dreambooth_dataset.prepare(data_dir, manual_dir, subject)
    assert builder.info.file_format.value == "array_record"
    assert builder.info.splits["train"].num_examples == 2
    examples = dreambooth_dataset.read_examples(builder)
    assert [e["file_name"] for e in examples] == ["00.jpg", "01.jpg"]
    for i, example in enumerate(examples):
      path = os.path.join(manual_dir, subject, example["file_name"])
      with open(path, "rb") as f:
        assert example["image"] == f.read()  # the published bytes, unchanged
      assert example["subject"] == subject
      assert example["class_noun"] == eval_prompts.SUBJECTS[subject].class_noun
      assert example["live"] == eval_prompts.SUBJECTS[subject].live
      decoded = dreambooth_dataset.decode_image(example["image"])
      np.testing.assert_array_equal(decoded, _upright(path))  # pixel-exact vs. the file
      assert (example["height"], example["width"]) == decoded.shape[:2]
      expected = _photo(colors[i])
      if (subject, i) == ("cat2", 1):
        expected = np.rot90(expected, k=-1)  # EXIF orientation 6, applied
      assert decoded.shape == expected.shape
      assert np.abs(decoded.astype(int) - expected).mean() < 4  # right photo, JPEG-close

  images, class_noun, live = dreambooth_dataset.load_subject(data_dir, manual_dir, "cat2")
  assert (class_noun, live) == ("cat", True)
  assert [im.shape for im in images] == [(16, 24, 3), (24, 16, 3)]
  assert all(im.dtype == np.uint8 for im in images)
  np.testing.assert_array_equal(images[0], _upright(os.path.join(manual_dir, "cat2", "00.jpg")))
  # Once prepared, the copy is not needed.
  again = dreambooth_dataset.load_subject(data_dir, None, "cat2")
  assert all(np.array_equal(a, b) for a, b in zip(again.images, images))
  assert set(FAKE) <= set(os.listdir(data_dir / "dreambooth"))  # one config per subject


def test_builder_runs_without_tensorflow(tmp_path):
  """Prepare and read back in a fresh interpreter where `import tensorflow` fails."""
  manual_dir = make_fake_copy(tmp_path)
  script = textwrap.dedent(f"""
      import sys
      try:
        import tensorflow
      except ImportError:
        print("no tensorflow")
      else:
        sys.exit(0)
      from dreambooth_jax.evaluation import dreambooth_dataset
      images, class_noun, live = dreambooth_dataset.load_subject(
          {str(tmp_path / "tfds")!r}, {manual_dir!r}, "dog")
      assert len(images) == 2 and class_noun == "dog" and live
      loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
      print("tensorflow modules:", loaded)
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  if "no tensorflow" not in result.stdout:
    pytest.skip("TensorFlow is installed here; this test shows the builder works without it")
  assert "tensorflow modules: []" in result.stdout


def test_missing_data_errors_name_the_path_and_the_source(tmp_path):
  data_dir = tmp_path / "tfds"
  missing = tmp_path / "no" / "dataset"
  with pytest.raises(dreambooth_dataset.DreamBoothDataError) as e:
    dreambooth_dataset.load_subject(data_dir, missing, "dog")
  message = str(e.value)
  assert str(missing) in message and "https://github.com/google/dreambooth" in message
  assert "\n" not in message
  assert isinstance(e.value, input_pipeline.DataError)  # the CLIs' exit status 2
  assert not (data_dir / "dreambooth" / "dog" / "1.0.0").exists()

  with pytest.raises(dreambooth_dataset.DreamBoothDataError, match="no manual_dir given"):
    dreambooth_dataset.load_subject(data_dir, None, "dog")

  manual_dir = make_fake_copy(tmp_path)
  with pytest.raises(dreambooth_dataset.DreamBoothDataError) as e:
    dreambooth_dataset.load_subject(data_dir, manual_dir, "teapot")
  assert os.path.join(manual_dir, "teapot") in str(e.value)
  assert "https://github.com/google/dreambooth" in str(e.value)

  clone = os.path.dirname(manual_dir)  # the repository root instead of its dataset/ folder
  with pytest.raises(dreambooth_dataset.DreamBoothDataError,
                     match="looks like the repository root: use .*dataset"):
    dreambooth_dataset.load_subject(data_dir, clone, "dog")

  with pytest.raises(dreambooth_dataset.DreamBoothDataError, match="unknown DreamBooth subject"):
    dreambooth_dataset.load_subject(data_dir, manual_dir, "dog4")


def test_builder_checks_the_copy_itself(tmp_path):
  """Through TFDS directly: a missing subject folder, an empty one, a class that disagrees."""
  manual_dir = make_fake_copy(tmp_path)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)

  def build(subject):
    builder = dreambooth_dataset.DreamBooth(config=subject, data_dir=str(tmp_path / "tfds"),
                                            file_format="array_record")
    builder.download_and_prepare(download_config=config)

  with pytest.raises(dreambooth_dataset.DreamBoothDataError, match="teapot: no such folder"):
    build("teapot")
  os.mkdir(os.path.join(manual_dir, "vase"))
  with pytest.raises(dreambooth_dataset.DreamBoothDataError, match="vase: no images"):
    build("vase")
  metadata = os.path.join(manual_dir, "prompts_and_classes.txt")
  with open(metadata, encoding="utf-8") as f:
    text = f.read()
  with open(metadata, "w", encoding="utf-8") as f:
    f.write(text.replace("\ndog,dog\n", "\ndog,wolf\n"))
  with pytest.raises(dreambooth_dataset.DreamBoothDataError, match="'wolf', not 'dog'"):
    build("dog")
  with open(os.path.join(manual_dir, "cat2", "02.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated")
  with pytest.raises(dreambooth_dataset.DreamBoothDataError, match="02.jpg: not a readable"):
    build("cat2")


def test_decode_image_gives_rgb_uint8():
  buffer = io.BytesIO()
  Image.fromarray(np.full((5, 7), 128, np.uint8), "L").save(buffer, format="PNG")
  image = dreambooth_dataset.decode_image(buffer.getvalue())
  assert image.shape == (5, 7, 3) and image.dtype == np.uint8 and (image == 128).all()
