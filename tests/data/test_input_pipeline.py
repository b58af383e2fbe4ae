"""input_pipeline: file listing, image decoding edge cases, crops, token ids and the per-step batch.

Images are drawn here with PIL (no model is loaded); only the tiny pipeline's tokenizer is read.
"""

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax import models
from dreambooth_jax.data import input_pipeline
from dreambooth_jax.data.input_pipeline import DataError, DreamBoothData


# ---------------------------------------------------------------------------------------------
# list_images


def test_list_images_sorted_filtered_and_hidden_skipped(tmp_path):
  names = ["b.png", "a.JPG", "c.jpeg", "D.WebP", "e.PNG", "f.Jpeg",  # images, any case
           "notes.txt", "g.gif", "h.bmp", "i.png.tmp", "png",  # not images
           ".hidden.png", ".x.jpg"]  # hidden
  for name in names:
    (tmp_path / name).write_bytes(b"")
  got = input_pipeline.list_images(str(tmp_path))
  expected = sorted(["b.png", "a.JPG", "c.jpeg", "D.WebP", "e.PNG", "f.Jpeg"])
  assert got == [os.path.join(str(tmp_path), n) for n in expected]
  # Sorted by full path (byte order: upper case first), not by directory order.
  assert [os.path.basename(p) for p in got] == ["D.WebP", "a.JPG", "b.png", "c.jpeg", "e.PNG",
                                                "f.Jpeg"]


def test_list_images_not_recursive_and_empty(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "a.png").write_bytes(b"")
  assert input_pipeline.list_images(str(tmp_path)) == []


def test_list_images_missing_dir_names_field_and_path(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(DataError) as e:
    input_pipeline.list_images(missing, field="data.class_dir")
  assert str(e.value) == f"data.class_dir: {missing} is not a directory"


def test_list_images_file_instead_of_dir(tmp_path):
  path = tmp_path / "a.png"
  path.write_bytes(b"")
  with pytest.raises(DataError, match="data.instance_dir") as e:
    input_pipeline.list_images(str(path))
  assert str(path) in str(e.value)


def test_list_images_unset_dir_names_field():
  with pytest.raises(DataError) as e:
    input_pipeline.list_images("")
  assert str(e.value) == "data.instance_dir: not set"
  with pytest.raises(DataError) as e:
    input_pipeline.list_images("", field="data.class_dir")
  assert str(e.value) == "data.class_dir: not set"


# ---------------------------------------------------------------------------------------------
# load_image


def _save(image: Image.Image, path, **kwargs) -> str:
  image.save(str(path), **kwargs)
  return str(path)


def test_load_image_resizes_shorter_side(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
  path = _save(Image.fromarray(rgb), tmp_path / "wide.png")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a large RGB image decodes without any warning
    out = input_pipeline.load_image(path, 30)
  assert out.shape == (30, 50, 3)
  assert out.dtype == np.uint8
  # Portrait, with a non-integer scale: 61x101 (WxH) at 32 -> 32 x round(101 * 32 / 61) = 53.
  path = _save(Image.fromarray(rgb[:, :61].repeat(2, axis=0)[:101]), tmp_path / "tall.png")
  out = input_pipeline.load_image(path, 32)
  assert out.shape == (53, 32, 3)
  assert out.dtype == np.uint8


def test_load_image_same_size_is_pixel_exact(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  path = _save(Image.fromarray(rgb), tmp_path / "x.png")
  np.testing.assert_array_equal(input_pipeline.load_image(path, 16), rgb)


def test_load_image_honours_exif_orientation(tmp_path):
  # Stored 60 wide x 40 tall, red block in the stored top-left corner, the rest grey.
  stored = np.full((40, 60, 3), 128, np.uint8)
  stored[:16, :16] = (255, 0, 0)
  image = Image.fromarray(stored)
  plain = input_pipeline.load_image(_save(image, tmp_path / "plain.jpg", quality=95), 32)
  assert plain.shape == (32, 48, 3)  # no EXIF: landscape, red at top-left

  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation 6: the camera was turned; display rotated 90 degrees clockwise
  path = _save(image, tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
  with Image.open(path) as check:
    assert check.getexif()[0x0112] == 6 and check.size == (60, 40)
  out = input_pipeline.load_image(path, 32)
  assert out.shape == (48, 32, 3)  # width and height swapped: 40x60 -> 32x48 (WxH)

  def is_red(pixel):
    return pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60

  def is_grey(pixel):
    return all(abs(int(c) - 128) < 30 for c in pixel)

  # Rotating 90 degrees clockwise moves the stored top-left corner to the top-right.
  assert is_red(out[2, 29]), out[2, 29]
  assert is_grey(out[2, 2]), out[2, 2]
  assert is_grey(out[45, 2]), out[45, 2]
  assert is_grey(out[45, 29]), out[45, 29]
  assert is_red(plain[2, 2]) and is_grey(plain[2, 45])


def test_load_image_rgba_composited_on_white(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
  rgba[:, 4:] = (255, 0, 0, 255)  # opaque red right half
  rgba[0, 0] = (0, 0, 255, 0)  # transparent blue: colour must not leak
  path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
  with pytest.warns(UserWarning, match="a.png: transparent image composited onto white"):
    out = input_pipeline.load_image(path, 8)
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, :4], np.full((8, 4, 3), 255, np.uint8))
  np.testing.assert_array_equal(out[:, 4:], np.broadcast_to([255, 0, 0], (8, 4, 3)))


def test_load_image_palette_transparency_composited_on_white(tmp_path):
  image = Image.new("P", (8, 8), 0)
  image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
  image.paste(1, (0, 0, 8, 4))  # top half green (index 1), bottom half index 0 = transparent
  path = _save(image, tmp_path / "p.png", transparency=0)
  with pytest.warns(UserWarning, match="p.png: transparent image"):
    out = input_pipeline.load_image(path, 8)
  np.testing.assert_array_equal(out[:4], np.broadcast_to([0, 255, 0], (4, 8, 3)))
  np.testing.assert_array_equal(out[4:], np.full((4, 8, 3), 255, np.uint8))


def test_load_image_cmyk_to_rgb(tmp_path):
  path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
  with Image.open(path) as check:
    assert check.mode == "CMYK"
  with pytest.warns(UserWarning, match="cmyk.jpg: CMYK image converted to RGB"):
    out = input_pipeline.load_image(path, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out.reshape(-1, 3).astype(int), [[255, 0, 0]] * 256, atol=3)


def test_load_image_grayscale_warns_and_becomes_rgb(tmp_path):
  gray = np.tile(np.arange(0, 240, 30, dtype=np.uint8), (8, 1))
  path = _save(Image.fromarray(gray, "L"), tmp_path / "g.png")
  with pytest.warns(UserWarning, match="grayscale image converted to RGB") as record:
    out = input_pipeline.load_image(path, 8)
  assert len(record) == 1 and path in str(record[0].message)
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_load_image_16bit_png_scaled_to_8bit(tmp_path):
  values = np.zeros((4, 6), np.uint16)
  values[:, :2] = 65535
  values[:, 2:4] = 32896  # 32896 / 65535 * 255 = 128.0
  path = _save(Image.fromarray(values), tmp_path / "deep.png")
  with Image.open(path) as check:
    assert check.mode == "I;16"
  with pytest.warns(UserWarning, match="I;16 grayscale image converted to 8-bit RGB") as record:
    out = input_pipeline.load_image(path, 4)
  assert len(record) == 1 and path in str(record[0].message)
  assert out.shape == (4, 6, 3) and out.dtype == np.uint8
  expected = np.zeros((4, 6, 3), np.uint8)
  expected[:, :2] = 255
  expected[:, 2:4] = 128
  np.testing.assert_array_equal(out, expected)


def test_load_image_small_image_upscaled_with_warning(tmp_path):
  path = _save(Image.new("RGB", (10, 20), (10, 200, 30)), tmp_path / "small.png")
  with pytest.warns(UserWarning, match="10x20 is smaller than 32 px; upscaled"):
    out = input_pipeline.load_image(path, 32)
  assert out.shape == (64, 32, 3)  # 10x20 scaled by 3.2 -> 32x64 (WxH)
  np.testing.assert_array_equal(out, np.broadcast_to([10, 200, 30], (64, 32, 3)))


def test_load_image_not_an_image_names_path(tmp_path):
  path = tmp_path / "x.png"
  path.write_text("this is not a png\n")
  with pytest.raises(DataError) as e:
    input_pipeline.load_image(str(path), 8)
  assert str(e.value).startswith(f"{path}: not a readable image")
  assert "\n" not in str(e.value)


def test_load_image_truncated_jpeg_names_path(tmp_path):
  rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  full = tmp_path / "full.jpg"
  Image.fromarray(rgb).save(str(full), quality=90)
  data = full.read_bytes()
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError) as e:
    input_pipeline.load_image(str(path), 32)
  assert str(e.value).startswith(f"{path}: not a readable image")
  assert "\n" not in str(e.value)


def test_load_images_keeps_order(tmp_path):
  paths = []
  for value in (10, 20, 30):
    paths.append(_save(Image.new("RGB", (8, 8), (value, 0, 0)), tmp_path / f"{value}.png"))
  images = input_pipeline.load_images(paths, 8)
  assert [int(image[0, 0, 0]) for image in images] == [10, 20, 30]


# ---------------------------------------------------------------------------------------------
# crop, to_model_range


def _position_image(height: int, width: int) -> np.ndarray:
  """Channel 0 is the row, channel 1 the column: a crop reveals its own offset."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("height,width,top,left", [(10, 14, 2, 4), (11, 15, 2, 4), (6, 9, 0, 1),
                                                   (6, 6, 0, 0)])
def test_center_crop_offsets(height, width, top, left):
  image = _position_image(height, width)
  out = input_pipeline.crop(image, 6, True, np.random.default_rng(0))
  assert out.shape == (6, 6, 3)
  assert (int(out[0, 0, 0]), int(out[0, 0, 1])) == (top, left)
  np.testing.assert_array_equal(out, image[top:top + 6, left:left + 6])


def test_center_crop_does_not_consume_rng():
  rng = np.random.default_rng(5)
  input_pipeline.crop(_position_image(10, 14), 6, True, rng)
  assert rng.random() == np.random.default_rng(5).random()


def test_random_crop_in_bounds_and_reproducible():
  image = _position_image(10, 14)
  tops, lefts = set(), set()
  for seed in range(300):
    out = input_pipeline.crop(image, 6, False, np.random.default_rng(seed))
    assert out.shape == (6, 6, 3)
    top, left = int(out[0, 0, 0]), int(out[0, 0, 1])
    assert 0 <= top <= 4 and 0 <= left <= 8
    np.testing.assert_array_equal(out, image[top:top + 6, left:left + 6])
    again = input_pipeline.crop(image, 6, False, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, again)
    tops.add(top)
    lefts.add(left)
  # Every offset, the extremes included, is reachable.
  assert tops == set(range(5))
  assert lefts == set(range(9))


def test_to_model_range():
  images = np.zeros((2, 4, 6, 3), np.uint8)
  images[0, 1, 2] = (255, 0, 51)
  images[1] = 255
  out = input_pipeline.to_model_range(images)
  assert out.shape == (2, 3, 4, 6)
  assert out.dtype == np.float32
  assert out[0, 0, 1, 2] == 1.0 and out[0, 1, 1, 2] == -1.0
  assert out[0, 2, 1, 2] == pytest.approx(51 / 127.5 - 1)
  assert out[0, 0, 0, 0] == -1.0
  assert np.all(out[1] == 1.0)
  assert out.min() == -1.0 and out.max() == 1.0
  np.testing.assert_allclose(out, images.transpose(0, 3, 1, 2) / 127.5 - 1, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# tokenize


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
  return models.ClipTokenizer.from_directory(os.path.join(tiny_dir, "tokenizer"))


def test_tokenize(tokenizer):
  ids = input_pipeline.tokenize(tokenizer, "a photo of sks dog")
  assert ids.shape == (77,)
  assert ids.dtype == np.int32
  unpadded = [tokenizer.bos_token_id,
              *tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a photo of sks dog")),
              tokenizer.eos_token_id]
  assert ids[0] == tokenizer.bos_token_id
  n = len(unpadded)
  assert 3 < n < 77
  np.testing.assert_array_equal(ids[:n], unpadded)
  assert ids[n - 1] == tokenizer.eos_token_id
  assert np.all(ids[n:] == tokenizer.pad_token_id)
  # A prompt longer than the context is truncated, still ending with eos.
  long_ids = input_pipeline.tokenize(tokenizer, " ".join(["dog"] * 200))
  assert long_ids.shape == (77,) and long_ids.dtype == np.int32
  assert long_ids[0] == tokenizer.bos_token_id and long_ids[-1] == tokenizer.eos_token_id
  assert not np.array_equal(input_pipeline.tokenize(tokenizer, "a photo of dog"), ids)


# ---------------------------------------------------------------------------------------------
# DreamBoothData


def _images(count: int, seed: int, height: int = 40, width: int = 48) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


INSTANCE_IDS = np.arange(77, dtype=np.int32)
CLASS_IDS = np.arange(100, 177, dtype=np.int32)


def _data(instance, class_images=(), **overrides) -> DreamBoothData:
  kwargs = dict(instance_images=list(instance), class_images=list(class_images),
                instance_ids=INSTANCE_IDS, class_ids=CLASS_IDS, batch_size=2, resolution=32,
                center_crop=False, random_flip=True, seed=0, pad_to_multiple=1)
  kwargs.update(overrides)
  return DreamBoothData(**kwargs)


def test_batch_with_prior_padded_to_8():
  data = _data(_images(3, 0), _images(4, 1), pad_to_multiple=8)
  assert data.with_prior and data.num_rows == 8
  batch = data.batch(0)
  assert sorted(batch) == ["example_id", "input_ids", "instance_count", "instance_mask",
                           "pixel_values", "prior_count", "prior_mask"]
  assert batch["pixel_values"].shape == (8, 3, 32, 32)
  assert batch["pixel_values"].dtype == np.float32
  assert batch["input_ids"].shape == (8, 77)
  assert batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["instance_mask"], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["prior_mask"], [0, 0, 1, 1, 0, 0, 0, 0])
  assert batch["instance_mask"].dtype == np.float32 and batch["prior_mask"].dtype == np.float32
  # The whole batch's row counts in every row (padding included), for the loss's means.
  np.testing.assert_array_equal(batch["instance_count"], [2] * 8)
  np.testing.assert_array_equal(batch["prior_count"], [2] * 8)
  assert batch["instance_count"].dtype == np.float32
  np.testing.assert_array_equal(batch["example_id"], np.arange(8))
  assert batch["example_id"].dtype == np.int32
  np.testing.assert_array_equal(batch["input_ids"][:2], [INSTANCE_IDS] * 2)
  np.testing.assert_array_equal(batch["input_ids"][2:4], [CLASS_IDS] * 2)
  assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0


def test_batch_padding_rounds_up_to_multiple():
  data = _data(_images(3, 0), _images(4, 1), batch_size=3, pad_to_multiple=4)
  assert data.num_rows == 8  # 6 real rows -> 8
  batch = data.batch(5)
  np.testing.assert_array_equal(batch["instance_mask"], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["prior_mask"], [0, 0, 0, 1, 1, 1, 0, 0])
  assert batch["pixel_values"].shape == (8, 3, 32, 32)


def test_batch_without_prior_unpadded():
  data = _data(_images(3, 0), batch_size=2, pad_to_multiple=1)
  assert not data.with_prior and data.num_rows == 2
  batch = data.batch(0)
  assert batch["pixel_values"].shape == (2, 3, 32, 32)
  assert batch["input_ids"].shape == (2, 77)
  np.testing.assert_array_equal(batch["instance_mask"], [1, 1])
  np.testing.assert_array_equal(batch["prior_mask"], [0, 0])
  np.testing.assert_array_equal(batch["example_id"], [0, 1])
  np.testing.assert_array_equal(batch["input_ids"], [INSTANCE_IDS] * 2)
  values = batch["pixel_values"]
  assert values.min() >= -1.0 and values.max() <= 1.0
  assert values.min() < -0.9 and values.max() > 0.9  # uses the range, not a constant


def test_batch_is_a_pure_function_of_seed_and_step():
  instance, klass = _images(3, 0), _images(4, 1)
  data = _data(instance, klass, pad_to_multiple=8)
  same = _data(instance, klass, pad_to_multiple=8)  # a fresh object: no hidden iterator state
  for step in (0, 7, 123):
    a, b = data.batch(step), same.batch(step)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Out of order calls give the same batches (a resumed run sees what a straight run saw).
  np.testing.assert_array_equal(data.batch(7)["pixel_values"],
                                _data(instance, klass, pad_to_multiple=8)
                                .batch(7)["pixel_values"])
  pixels = data.batch(3)["pixel_values"]
  assert not np.array_equal(pixels[:4], data.batch(4)["pixel_values"][:4])
  other_seed = _data(instance, klass, pad_to_multiple=8, seed=1).batch(3)["pixel_values"]
  assert not np.array_equal(pixels[:4], other_seed[:4])


def _match(row: np.ndarray, candidates: list[np.ndarray]) -> int:
  """Index of the candidate (HWC uint8) that `row` (CHW in [-1, 1]) is, or -1."""
  for index, candidate in enumerate(candidates):
    if np.array_equal(row, input_pipeline.to_model_range(candidate[None])[0]):
      return index
  return -1


def test_every_instance_image_once_per_epoch():
  instance = _images(3, 3)
  crops = [input_pipeline.crop(image, 32, True, None) for image in instance]
  data = _data(instance, batch_size=1, center_crop=True, random_flip=False)
  orders = []
  for epoch in range(4):
    used = [_match(data.batch(step)["pixel_values"][0], crops)
            for step in range(3 * epoch, 3 * epoch + 3)]
    assert sorted(used) == [0, 1, 2], (epoch, used)
    orders.append(tuple(used))
  assert len(set(orders)) > 1  # a fresh permutation per epoch, not the file order every time


def test_every_instance_image_once_per_epoch_batch_of_two():
  instance = _images(5, 4)
  crops = [input_pipeline.crop(image, 32, True, None) for image in instance]
  data = _data(instance, batch_size=2, center_crop=True, random_flip=False)
  # Steps 0..4 consume 10 slots = exactly two epochs of 5 images.
  used = [_match(row, crops) for step in range(5) for row in data.batch(step)["pixel_values"]]
  assert sorted(used[:5]) == [0, 1, 2, 3, 4]
  assert sorted(used[5:]) == [0, 1, 2, 3, 4]


def test_random_flip_gives_both_orientations():
  instance = _images(1, 5)
  crop = input_pipeline.crop(instance[0], 32, True, None)
  flipped = crop[:, ::-1]
  assert not np.array_equal(crop, flipped)
  data = _data(instance, batch_size=1, center_crop=True, random_flip=True)
  seen = []
  for step in range(24):
    seen.append(_match(data.batch(step)["pixel_values"][0], [crop, flipped]))
  assert -1 not in seen  # only ever the crop or its horizontal mirror
  assert seen.count(0) >= 3 and seen.count(1) >= 3, seen
  no_flip = _data(instance, batch_size=1, center_crop=True, random_flip=False)
  assert all(_match(no_flip.batch(step)["pixel_values"][0], [crop]) == 0 for step in range(24))


def test_instance_images_can_be_read_from_an_fsspec_url(tmp_path):
  """gs://bucket/dir goes through fsspec (with gcsfs); the in-memory filesystem stands in."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fs = fsspec.filesystem("memory")
  for index in range(2):
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 100 * index, np.uint8)).save(buffer, format="PNG")
    fs.pipe(f"/bucket_test/dog/photo{index}.png", buffer.getvalue())
  fs.pipe("/bucket_test/dog/notes.txt", b"not an image")
  fs.pipe("/bucket_test/dog/.hidden.png", b"skipped")
  paths = input_pipeline.list_images("memory://bucket_test/dog")
  assert paths == ["memory://bucket_test/dog/photo0.png", "memory://bucket_test/dog/photo1.png"]
  image = input_pipeline.load_image(paths[1], 32)
  assert image.shape == (32, 38, 3) and (image == 100).all()
  with pytest.raises(input_pipeline.DataError, match=r"memory://bucket_test/cat is not a dir"):
    input_pipeline.list_images("memory://bucket_test/cat")
  fs.pipe("/bucket_test/dog/broken.png", b"garbage")
  with pytest.raises(input_pipeline.DataError, match=r"memory://bucket_test/dog/broken.png: "
                     r"not a readable image"):
    input_pipeline.load_image("memory://bucket_test/dog/broken.png", 32)


def test_gs_url_without_gcsfs_names_the_extra_to_install():
  pytest.importorskip("fsspec")
  try:
    import gcsfs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("gcsfs is installed")
  except ImportError:
    pass
  with pytest.raises(input_pipeline.DataError, match=r'data.instance_dir: gs://b/dog needs a '
                     r'filesystem package .* pip install -e "\.\[gcs\]"'):
    input_pipeline.list_images("gs://b/dog")
