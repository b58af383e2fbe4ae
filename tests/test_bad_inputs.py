"""The bad-input matrix, end to end through train.train_and_evaluate (and once through the CLI).

Promise (README, "Bad input"): every bad config field, data file, model directory or workdir
fails with a one-line error naming the field or file, before any expensive work (model loading,
class images) and before anything is written to the workdir. Images that can be used after a
conversion (CMYK, RGBA, 16-bit, grayscale) or an upscale train, with a warning naming each file.
A batch that does not fill the devices is padded with zero-weight rows.

The unit-level checks live in test_config_check.py and data/test_input_pipeline.py; here every case
goes through the whole entry point, so a check that exists but runs too late is caught.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from dreambooth_jax import cli_errors, errors, models, train
from dreambooth_jax.data import class_images, input_pipeline
from dreambooth_jax.training import config_check
from tests import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Bad files


def _noise(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _good_png(path: pathlib.Path) -> pathlib.Path:
  Image.fromarray(_noise(40, 48, 3)).save(str(path))
  return path


def _text_as_jpg(path: pathlib.Path) -> pathlib.Path:
  path.write_text("this is a text file, not a JPEG\n")
  return path


def _truncated_jpeg(path: pathlib.Path) -> pathlib.Path:
  full = path.with_name("full_" + path.name + ".bak")  # not an image extension: not listed
  Image.fromarray(_noise(64, 64, 3, seed=1)).save(str(full), format="JPEG", quality=90)
  data = full.read_bytes()
  full.unlink()
  path.write_bytes(data[:len(data) // 2])
  return path


def _instance_dir_with(tmp_path: pathlib.Path, make_bad) -> tuple[str, str]:
  """A folder holding one good image and one bad file (sorted after it); (folder, bad path)."""
  folder = tmp_path / "instance"
  folder.mkdir()
  _good_png(folder / "a_good.png")
  return str(folder), str(make_bad(folder / "b_bad.jpg"))


def _model_copy(tiny_dir: str, tmp_path: pathlib.Path, drop: str) -> str:
  """A copy of the tiny pipeline with `drop` (a folder or a file, relative) removed."""
  copy = tmp_path / "model"
  shutil.copytree(tiny_dir, copy)
  target = copy / drop
  if target.is_dir():
    shutil.rmtree(target)
  else:
    target.unlink()
  return str(copy)


# ---------------------------------------------------------------------------------------------
# The matrix. Each case edits the small config (files under tmp_path) and returns
# (expected exception type, the prefix the one-line message must start with, other substrings).


def _set(section: str, name: str, value, **also):
  def case(config, tmp_path, tiny_dir):
    del tmp_path, tiny_dir
    config[section][name] = value
    for field, other in also.items():
      config[section][field] = other
    return config_check.ConfigError, f"config.{section}.{name}: ", ()
  return case


def _missing_instance_dir(config, tmp_path, tiny_dir):
  del tiny_dir
  missing = str(tmp_path / "no_such_dir")
  config.data.instance_dir = missing
  return config_check.ConfigError, "config.data.instance_dir: ", (missing,)


def _empty_instance_dir(config, tmp_path, tiny_dir):
  del tiny_dir
  empty = tmp_path / "empty"
  empty.mkdir()
  config.data.instance_dir = str(empty)
  return config_check.ConfigError, "config.data.instance_dir: ", (str(empty),)


def _instance_dir_is_a_file(config, tmp_path, tiny_dir):
  del tiny_dir
  path = _good_png(tmp_path / "one.png")
  config.data.instance_dir = str(path)
  return config_check.ConfigError, "config.data.instance_dir: ", (str(path),)


def _bad_image(make_bad):
  def case(config, tmp_path, tiny_dir):
    del tiny_dir
    config.data.instance_dir, bad = _instance_dir_with(tmp_path, make_bad)
    return input_pipeline.DataError, f"{bad}: ", ("not a readable image",)
  return case


def _model_missing_unet(config, tmp_path, tiny_dir):
  broken = _model_copy(tiny_dir, tmp_path, "unet")
  config.model.pretrained = broken
  return config_check.ConfigError, "config.model.pretrained: ", (broken, "'unet'")


def _model_missing_unet_weights(config, tmp_path, tiny_dir):
  broken = _model_copy(tiny_dir, tmp_path, "unet/diffusion_pytorch_model.safetensors")
  config.model.pretrained = broken
  # Either check may report it: the cheap pre-flight (ConfigError) or the loader (ModelLoadError).
  return (config_check.ConfigError, models.ModelLoadError), None, (
      "model.pretrained: ", os.path.join(broken, "unet"))


def _model_dir_missing(config, tmp_path, tiny_dir):
  del tiny_dir
  missing = str(tmp_path / "no_such_model")
  config.model.pretrained = missing
  return (config_check.ConfigError, models.ModelLoadError), None, ("model.pretrained: ", missing)


def _resolution_not_multiple_of_vae_factor(config, tmp_path, tiny_dir):
  """A model whose VAE downsamples 16×: 40 px passes the multiple-of-8 rule, not this one."""
  model = tmp_path / "model16"
  shutil.copytree(tiny_dir, model)
  vae_config = model / "vae" / "config.json"
  settings = json.loads(vae_config.read_text())
  settings["block_out_channels"] = [32] * 5
  vae_config.write_text(json.dumps(settings))
  config.model.pretrained = str(model)
  config.data.resolution = 40
  return config_check.ConfigError, "config.data.resolution: ", (
      "40 is not a multiple of the VAE's downsampling factor 16",)


CASES = {
    "instance_dir_missing": _missing_instance_dir,
    "instance_dir_empty": _empty_instance_dir,
    "instance_dir_is_a_file": _instance_dir_is_a_file,
    "not_an_image": _bad_image(_text_as_jpg),
    "truncated_jpeg": _bad_image(_truncated_jpeg),
    "resolution_not_multiple_of_8": _set("data", "resolution", 36),
    "resolution_not_multiple_of_vae_factor": _resolution_not_multiple_of_vae_factor,
    "cudnn_attention_off_gpu": _set("model", "attention", "cudnn"),
    "prior_loss_weight_negative": _set("train", "prior_loss_weight", -0.5),
    "steps_zero": _set("train", "steps", 0),
    "steps_negative": _set("train", "steps", -3, warmup_steps=0),
    "prompt_without_identifier": _set("data", "instance_prompt", "a photo of dog"),
    "model_dir_missing_unet": _model_missing_unet,
    "model_dir_missing_unet_weights": _model_missing_unet_weights,
    "model_dir_missing": _model_dir_missing,
}


def _snapshot(root: pathlib.Path):
  """Every path under root with its size and mtime; None if root does not exist."""
  if not root.exists():
    return None
  entries = []
  for path in sorted(root.rglob("*")) + [root]:
    stat = path.lstat()
    entries.append((str(path.relative_to(root)), stat.st_size if path.is_file() else -1,
                    stat.st_mtime_ns))
  return entries


@pytest.fixture
def no_expensive_work(monkeypatch):
  """Records (instead of doing) model loading and class-image generation."""
  started = []

  class ExpensiveWorkStarted(Exception):
    pass

  def refuse(name):
    def stub(*args, **kwargs):
      del args, kwargs
      started.append(name)
      raise ExpensiveWorkStarted(f"{name} was called before the bad input was reported")
    return stub

  monkeypatch.setattr(models, "load_pretrained", refuse("models.load_pretrained"))
  monkeypatch.setattr(class_images, "ensure_class_images",
                      refuse("class_images.ensure_class_images"))
  return started


def _expect_bad_input(config, workdir: pathlib.Path, watched: pathlib.Path, started: list,
                      error_types, prefix, substrings) -> str:
  """Runs train_and_evaluate and checks the promise; returns the error message."""
  before = _snapshot(watched)
  with pytest.raises(Exception) as info:  # pylint: disable=broad-exception-caught
    train.train_and_evaluate(config, str(workdir))
  # Nothing written, nothing expensive started: checked first, whatever was raised.
  assert _snapshot(watched) == before, f"{watched} changed; raised {info.value!r}"
  assert not started, f"{started} ran; raised {info.value!r}"
  assert isinstance(info.value, error_types), repr(info.value)
  assert isinstance(info.value, cli_errors.INPUT_ERRORS), repr(info.value)  # the CLI's exit 2
  message = str(info.value)
  assert "\n" not in message and "\r" not in message, message
  if prefix is not None:
    assert message.startswith(prefix), message
  for part in substrings:
    assert part in message, message
  return message


@pytest.mark.parametrize("existing_workdir", [False, True], ids=["new_workdir", "existing_workdir"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_in_one_line_before_any_work(case, existing_workdir, small_config,
                                                     tiny_dir, tmp_path, no_expensive_work):
  expected = CASES[case](small_config, tmp_path, tiny_dir)
  if existing_workdir:  # a workdir with earlier content: its listing must not change
    workdir = tmp_path / "run"
    (workdir / "sub").mkdir(parents=True)
    (workdir / "notes.txt").write_text("mine\n")
    (workdir / "sub" / "keep.txt").write_text("also mine\n")
    watched = workdir
  else:  # a workdir (and parent) that do not exist yet: neither may be created
    watched = tmp_path / "runs"
    workdir = watched / "run"
  _expect_bad_input(small_config, workdir, watched, no_expensive_work, *expected)


def test_workdir_that_is_a_file(small_config, tmp_path, no_expensive_work):
  workdir = tmp_path / "run"
  workdir.write_text("not a directory\n")
  message = _expect_bad_input(small_config, workdir, tmp_path, no_expensive_work,
                              config_check.ConfigError, "--workdir: ", (str(workdir),))
  assert workdir.read_text() == "not a directory\n"
  assert "is a file" in message


def _make_read_only(path: pathlib.Path) -> str:
  """Makes `path` unwritable even for root; returns how (for undoing), or skips."""
  if os.geteuid() == 0:
    if shutil.which("chattr") is None:
      pytest.skip("running as root without chattr: cannot make a directory read-only")
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
      pytest.skip(f"chattr +i is not supported here: {result.stderr.strip()}")
    how = "chattr"
  else:
    path.chmod(0o555)
    how = "chmod"
  if os.access(path, os.W_OK):
    _undo_read_only(path, how)
    pytest.skip(f"{how} did not make {path} unwritable")
  return how


def _undo_read_only(path: pathlib.Path, how: str) -> None:
  if how == "chattr":
    subprocess.run(["chattr", "-i", str(path)], check=True)
  else:
    path.chmod(0o755)


@pytest.mark.parametrize("inside", [True, False], ids=["new_workdir_in_it", "it_is_the_workdir"])
def test_read_only_workdir(inside, small_config, tmp_path, no_expensive_work):
  read_only = tmp_path / "ro"
  read_only.mkdir()
  (read_only / "old.txt").write_text("x\n")
  workdir = read_only / "run" if inside else read_only
  how = _make_read_only(read_only)
  try:
    _expect_bad_input(small_config, workdir, read_only, no_expensive_work,
                      config_check.ConfigError, "--workdir: ", (str(read_only), "not writable"))
    assert not (read_only / "run").exists()
  finally:
    _undo_read_only(read_only, how)


# ---------------------------------------------------------------------------------------------
# Convertible images: one full in-process run (same shapes as the small config: no new compile)


def test_convertible_images_train_with_a_warning_each(tiny_dir, tmp_path, monkeypatch):
  folder = tmp_path / "instance"
  folder.mkdir()
  Image.fromarray(_noise(48, 40, 4, seed=2), "CMYK").save(str(folder / "cmyk.jpg"),
                                                                   quality=95)
  Image.fromarray(_noise(48, 40, 4, seed=3), "RGBA").save(str(folder / "rgba.png"))
  deep = (_noise(48, 40, 1, seed=4)[..., 0].astype(np.uint16) * 257)
  Image.fromarray(deep).save(str(folder / "deep16.png"))
  Image.fromarray(_noise(48, 40, 1, seed=5)[..., 0], "L").save(str(folder / "gray.png"))
  Image.fromarray(_noise(24, 20, 3, seed=6)).save(str(folder / "small.png"))
  Image.fromarray(_noise(48, 40, 3, seed=7)).save(str(folder / "plain.png"))  # needs nothing
  modes = {}
  for path in folder.iterdir():
    with Image.open(path) as image:
      modes[path.name] = image.mode
  assert modes == {"cmyk.jpg": "CMYK", "rgba.png": "RGBA", "deep16.png": "I;16",
                   "gray.png": "L", "small.png": "RGB", "plain.png": "RGB"}

  # Batch padding (README "Batch padding"). DreamBoothData's padding itself is unit-tested in
  # data/test_input_pipeline.py (test_batch_with_prior_padded_to_8: batch 2 + 2 prior -> 8 rows;
  # test_batch_padding_rounds_up_to_multiple: batch 3 + 3 prior -> 8 rows, 6 weighted); here we
  # check that the trainer pads to the device count: batch 1 + 1 prior on 8 devices -> 8 rows.
  made = []
  real_data = input_pipeline.DreamBoothData

  def recording_data(**kwargs):
    made.append(real_data(**kwargs))
    return made[-1]

  monkeypatch.setattr(input_pipeline, "DreamBoothData", recording_data)

  config = conftest.make_small_config(tiny_dir, str(folder))
  assert config.data.resolution == 32 and config.train.batch_size == 1
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(jax.device_get(state.step)) == 6
  assert len(made) == 1 and jax.device_count() == 8
  data = made[0]
  assert data.pad_to_multiple == 8 and data.num_rows == 8
  batch = data.batch(0)
  assert batch["latent_mean"].shape[0] == 8  # latents are cached (train.cache_latents)
  np.testing.assert_array_equal(batch["instance_mask"], [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["prior_mask"], [0, 1, 0, 0, 0, 0, 0, 0])

  messages = [str(w.message) for w in caught]
  expected = {"cmyk.jpg": None, "rgba.png": None,
              "deep16.png": "I;16 grayscale image converted to 8-bit RGB",
              "gray.png": "grayscale image converted to RGB",
              "small.png": "20x24 is smaller than 32 px; upscaled"}
  unwarned = []
  for name, text in expected.items():
    path = str(folder / name)
    naming = [m for m in messages if path in m]
    if not naming or (text is not None and not any(text in m for m in naming)):
      unwarned.append(name)
  assert not unwarned, f"no warning naming {unwarned}; warnings naming instance files: " + str(
      [m for m in messages if str(folder) in m])
  assert not [m for m in messages if str(folder / "plain.png") in m]


# ---------------------------------------------------------------------------------------------
# The CLI: exit status 2, one `error:` line naming the file or the key. Both commands fail before
# training; they run at once (each pays the jax imports).


@pytest.fixture(scope="module")
def cli_failures(tmp_path_factory, tiny_dir, instance_dir):
  """{case: (workdir, what to expect in the line, the finished process)} of two CLI runs."""
  root = tmp_path_factory.mktemp("cli")
  truncated_dir = root / "truncated"
  truncated_dir.mkdir()
  instance, bad = _instance_dir_with(truncated_dir, _truncated_jpeg)
  odd_model = root / "odd_model"  # a UNet with a class embedding, which our UNet has not
  shutil.copytree(tiny_dir, odd_model)
  unet_config = odd_model / "unet" / "config.json"
  unet_config.write_text(json.dumps(dict(json.loads(unet_config.read_text()),
                                         class_embed_type="timestep")))
  cases = {"truncated_jpeg": ([f"--config.data.instance_dir={instance}"], bad),
           "cannot_honour": ([f"--config.model.pretrained={odd_model}",
                              f"--config.data.instance_dir={instance_dir}"], str(odd_model))}
  started = {}
  for case, (flags, named) in cases.items():
    workdir = root / case / "w"
    started[case] = (workdir, named, subprocess.Popen(
        [sys.executable, "-m", "dreambooth_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", *flags], cwd=str(REPO), env=dict(os.environ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  finished = {}
  for case, (workdir, named, process) in started.items():
    _, stderr = process.communicate(timeout=300)
    finished[case] = (workdir, named, process.returncode, stderr)
  return finished


def _one_error_line(returncode: int, stderr: str) -> str:
  """The `error:` line of a CLI run that exited 2 with exactly one, as its last line."""
  assert returncode == 2, stderr[-3000:]
  errors_ = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors_) == 1, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == errors_[0]
  assert "Traceback" not in stderr
  return errors_[0]


def test_cli_truncated_jpeg(cli_failures):
  workdir, bad, returncode, stderr = cli_failures["truncated_jpeg"]
  line = _one_error_line(returncode, stderr)
  # Pillow's own words end the line; the bytes it left unread vary with its version.
  assert re.fullmatch(rf"error: {re.escape(bad)}: not a readable image \(image file is "
                      r"truncated( \(\d+ bytes not processed\))?\)", line), line
  assert not workdir.exists()


def test_cli_model_config_we_cannot_honour_stops_the_run_naming_the_key(cli_failures):
  """README "Model loading": a config our modules cannot honour stops the run with one line
  naming the key (a bad input: exit status 2)."""
  workdir, _, returncode, stderr = cli_failures["cannot_honour"]
  line = _one_error_line(returncode, stderr)
  assert line == ("error: model.pretrained: unet config class_embed_type='timestep' is not "
                  "supported (only None)"), line
  assert not (workdir / "checkpoints").exists() and not (workdir / "class_images").exists()


@pytest.mark.parametrize("error,status", [
    (errors.ConfigError("config.train.steps: must be >= 1, got 0"), 2),
    (errors.DataError("/data/dog/a.jpg: not a readable image"), 2),
    (errors.ModelLoadError("model.pretrained: /m is missing component 'unet'"), 2),
    (errors.MeshError("config.mesh.data: 3 does not divide 8 devices"), 2),
    (errors.NonFiniteLossError("non-finite loss or gradient at step 4"), 1),
    (errors.CheckpointError("saving a checkpoint in /w failed (disk full)"), 1),
    (errors.WorkdirLockedError("--workdir: /w is in use by pid 7 on host-a"), 1),
])
def test_each_error_ends_the_command_with_one_line_and_its_exit_status(error, status, capsys):
  """The README's exit-status table, for the errors the CLI runs above reach only in-process."""
  with pytest.raises(SystemExit) as info:
    with cli_errors.one_line_errors():
      raise error
  assert info.value.code == status
  assert capsys.readouterr().err == f"error: {error}\n"
