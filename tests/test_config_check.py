"""config_check: every bad config or workdir fails early with one line naming the field, and the
CLI turns that into `error: ...` on stderr, exit 2, and an untouched workdir."""

import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from dreambooth_jax.training import config_check
from dreambooth_jax.training.config_check import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _field_of(message: str) -> str:
  """The leading `config.<field>` token of a one-line error."""
  return message.split(":", 1)[0].split(" ", 1)[0]


def expect_error(config, field: str) -> str:
  with pytest.raises(ConfigError) as e:
    config_check.check_config(config)
  message = str(e.value)
  assert "\n" not in message and "\r" not in message, message
  assert message.startswith(f"config.{field}"), message
  assert _field_of(message) == f"config.{field}", message
  return message


def test_small_config_is_accepted_unchanged(small_config):
  before = small_config.to_json_best_effort(sort_keys=True)
  assert config_check.check_config(small_config) is None
  assert small_config.to_json_best_effort(sort_keys=True) == before


def test_demo_config_with_builtins_is_accepted():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config_check.check_config(tiny.get_config())


def test_unknown_field(small_config):
  small_config.lock()
  with small_config.unlocked():
    small_config.train.bogus = 1
  message = expect_error(small_config, "train.bogus")
  assert message == "config.train.bogus: unknown field (see configs/common.py for the fields)"


def test_unknown_top_level_section(small_config):
  with small_config.unlocked():
    small_config.extra = 3
  expect_error(small_config, "extra")


def test_resolution_not_multiple_of_8(small_config):
  small_config.data.resolution = 100
  message = expect_error(small_config, "data.resolution")
  assert message == "config.data.resolution: must be a positive multiple of 8, got 100"


@pytest.mark.parametrize("resolution", [0, -8, 4])
def test_resolution_too_small(small_config, resolution):
  small_config.data.resolution = resolution
  expect_error(small_config, "data.resolution")


def test_steps_zero(small_config):
  small_config.train.steps = 0
  small_config.train.warmup_steps = 0  # so that only steps is wrong
  assert expect_error(small_config, "train.steps") == "config.train.steps: must be >= 1, got 0"


def test_batch_size_zero(small_config):
  small_config.train.batch_size = 0
  message = expect_error(small_config, "train.batch_size")
  assert message == "config.train.batch_size: must be >= 1, got 0"


def test_negative_prior_loss_weight(small_config):
  small_config.train.prior_loss_weight = -1
  message = expect_error(small_config, "train.prior_loss_weight")
  assert message.startswith("config.train.prior_loss_weight: must be >= 0, got -1")


def test_bogus_lr_schedule(small_config):
  small_config.train.lr_schedule = "bogus"
  message = expect_error(small_config, "train.lr_schedule")
  assert "'bogus'" in message and "cosine" in message


def test_bad_dtype(small_config):
  small_config.model.dtype = "int8"
  message = expect_error(small_config, "model.dtype")
  assert "float32" in message and "bfloat16" in message


def test_warmup_longer_than_steps(small_config):
  small_config.train.warmup_steps = small_config.train.steps + 1
  message = expect_error(small_config, "train.warmup_steps")
  assert message == "config.train.warmup_steps: must be between 0 and train.steps (6), got 7"


def test_warmup_equal_to_steps_is_fine(small_config):
  small_config.train.warmup_steps = small_config.train.steps
  config_check.check_config(small_config)


@pytest.mark.parametrize("prompt", ["a photo of dog", "a photo of sksdog", "a photo that asks"])
def test_instance_prompt_without_identifier(small_config, prompt):
  small_config.data.instance_prompt = prompt
  message = expect_error(small_config, "data.instance_prompt")
  assert message == (f"config.data.instance_prompt: {prompt!r} does not contain the "
                     "identifier 'sks' (or the placeholder {identifier})")


@pytest.mark.parametrize("prompt", ["sks", "sks dog", "a photo of sks", "a (sks) dog, photo"])
def test_instance_prompt_with_identifier(small_config, prompt):
  small_config.data.instance_prompt = prompt
  config_check.check_config(small_config)


@pytest.mark.parametrize("field,value,kind", [
    ("train.steps", "10", "an integer"),
    ("train.steps", 10.0, "an integer"),
    ("train.learning_rate", "1e-4", "a number"),
    ("data.center_crop", 1, "true or false"),
    ("data.instance_prompt", 3, "a string"),
])
def test_wrong_type(small_config, field, value, kind):
  section, name = field.split(".")
  with small_config.ignore_type():
    setattr(small_config[section], name, value)
  assert small_config[section][name] == value and type(small_config[section][name]) is type(value)
  message = expect_error(small_config, field)
  assert message == f"config.{field}: must be {kind}, got {value!r}"


def test_int_for_float_field_is_fine(small_config):
  with small_config.ignore_type():
    small_config.train.learning_rate = 1
  config_check.check_config(small_config)


def test_instance_dir_missing(small_config, tmp_path):
  missing = str(tmp_path / "no_such_dir")
  small_config.data.instance_dir = missing
  message = expect_error(small_config, "data.instance_dir")
  assert message == f"config.data.instance_dir: {missing} is not a directory"


def test_instance_dir_unset(small_config):
  small_config.data.instance_dir = ""
  expect_error(small_config, "data.instance_dir")


def test_instance_dir_without_images(small_config, tmp_path):
  (tmp_path / "notes.txt").write_text("no images here")
  (tmp_path / ".hidden.png").write_bytes(b"")
  small_config.data.instance_dir = str(tmp_path)
  message = expect_error(small_config, "data.instance_dir")
  assert message.startswith(f"config.data.instance_dir: {tmp_path} holds no images")


def test_pretrained_dir_missing_unet(small_config, tiny_dir, tmp_path):
  broken = tmp_path / "pipeline"
  shutil.copytree(tiny_dir, broken)
  os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")  # configs only
  small_config.model.pretrained = str(broken)
  message = expect_error(small_config, "model.pretrained")
  assert message == (f"config.model.pretrained: {broken / 'unet'} has no weights (looked for "
                     "diffusion_pytorch_model.safetensors, diffusion_pytorch_model.bin, "
                     "diffusion_flax_model.msgpack)")
  shutil.rmtree(broken / "unet")  # a whole component folder gone
  message = expect_error(small_config, "model.pretrained")
  assert "'unet'" in message and str(broken) in message
  assert message == (f"config.model.pretrained: {broken} is missing component 'unet' "
                     "(unet/config.json not found)")


def test_pretrained_unset(small_config):
  small_config.model.pretrained = ""
  expect_error(small_config, "model.pretrained")


# ---------------------------------------------------------------------------------------------
# check_workdir


def test_check_workdir_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  with pytest.raises(ConfigError) as e:
    config_check.check_workdir(str(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  assert str(e.value).startswith("--workdir")


def test_check_workdir_empty():
  with pytest.raises(ConfigError, match="--workdir"):
    config_check.check_workdir("")


def test_check_workdir_new_or_existing_dir_is_fine_and_not_created(tmp_path):
  config_check.check_workdir(str(tmp_path))
  nested = tmp_path / "a" / "b" / "run"
  config_check.check_workdir(str(nested))
  assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# The CLI (two subprocesses, started together: each pays the jax imports)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """{case: (workdir, finished process)} of the CLI on an unknown field and on a bad value."""
  root = tmp_path_factory.mktemp("cli")
  flags = {"unknown_field": "--config.train.bogus=1",
           "bad_resolution": "--config.data.resolution=100"}
  started = {case: (root / case / "run", subprocess.Popen(
      [sys.executable, "-m", "dreambooth_jax.main", "--config=configs/tiny.py",
       f"--workdir={root / case / 'run'}", flag], cwd=str(REPO), env=dict(os.environ),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
             for case, flag in flags.items()}
  finished = {}
  for case, (workdir, process) in started.items():
    stderr = process.communicate(timeout=120)[1]
    finished[case] = (workdir, process.returncode, stderr)
  return finished


def _untouched(workdir: pathlib.Path) -> bool:
  return not workdir.exists() or not any(workdir.iterdir())


def test_cli_unknown_field_fails_before_any_work(cli_runs):
  workdir, returncode, stderr = cli_runs["unknown_field"]
  assert returncode == 2, stderr  # bad input, as the README's exit table says
  assert stderr.strip().splitlines()[-1] == (
      "error: --config.train.bogus: unknown config field (the fields are listed in "
      "configs/common.py)")
  assert "Traceback" not in stderr
  assert _untouched(workdir)


def test_cli_bad_resolution_is_one_line_and_writes_nothing(cli_runs):
  workdir, returncode, stderr = cli_runs["bad_resolution"]
  assert returncode == 2, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines, stderr
  assert lines[-1] == "error: config.data.resolution: must be a positive multiple of 8, got 100"
  assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
  assert "Traceback" not in stderr
  assert "Done." not in stderr
  assert _untouched(workdir)


def test_resume_accepts_changes_to_the_fields_the_readme_lets_change(small_config):
  """`log.*`, `sample.*`, `checkpoint.*`, `class_images.batch_size`, the speed and memory
  levers, the mesh and the export may change on resume; the math may not."""
  previous = json.loads(small_config.to_json_best_effort())
  changed = copy.deepcopy(small_config)
  changed.log.every_steps = 7
  changed.sample.num_images = 5
  changed.sample.scheduler = "euler"
  changed.checkpoint.every_steps = 11
  changed.class_images.batch_size = 3
  changed.train.steps = 60
  changed.train.remat = True
  changed.train.grad_accum_steps = 2
  changed.train.prefetch_batches = 0
  changed.model.attention = "chunked"
  changed.mesh.fsdp = 2
  changed.export.single_file = True
  assert config_check.check_resume(previous, changed) == []
  changed.train.learning_rate = 1e-3
  changed.class_images.num_inference_steps = 3
  with pytest.raises(config_check.ConfigError) as info:
    config_check.check_resume(previous, changed)
  assert str(info.value).startswith(
      "config differs from the run this workdir holds (class_images.num_inference_steps: 2 → 3; "
      "train.learning_rate: ")
