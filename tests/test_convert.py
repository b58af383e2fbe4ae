"""The convert CLI: a diffusers folder to a single file and back, through the command a user types."""

import errno
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from dreambooth_jax import convert, failpoints, models
from dreambooth_jax.models import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*flags):
  return subprocess.run([sys.executable, "-m", "dreambooth_jax.convert", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def _as_float16(tree):
  return jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), tree)


def _float_dtypes(path) -> set[str]:
  return {v.dtype.name for v in safetensors.numpy.load_file(str(path)).values()
          if v.dtype.kind == "f"}


def test_folder_to_single_file_and_back_keeps_every_weight(tmp_path, tiny_dir, tiny):
  """The CLI's defaults: a float16 single file (with a progress bar), and back to a float32
  diffusers folder; --fp16_variant adds float16 copies. Every weight survives, rounded once
  to float16."""
  single = tmp_path / "model.safetensors"
  result = _convert(f"--source={tiny_dir}", "--to=single_file", f"--out={single}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert single.is_file() and f"Wrote {single}" in result.stderr
  assert "convert: 100%" in result.stderr and "2/2" in result.stderr  # the progress bar
  assert _float_dtypes(single) == {"float16"}
  back = tmp_path / "back"
  result = _convert(f"--source={single}", f"--single_file_config={tiny_dir}", "--to=diffusers",
                    f"--out={back}", "--fp16_variant")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (back / "model_index.json").is_file()
  assert not os.path.exists(str(back) + ".tmp")
  assert _float_dtypes(back / "unet" / "diffusion_pytorch_model.safetensors") == {"float32"}
  assert _float_dtypes(back / "unet" / "diffusion_pytorch_model.fp16.safetensors") == {"float16"}
  assert _float_dtypes(back / "text_encoder" / "model.fp16.safetensors") == {"float16"}
  expected = _as_float16(tiny[1])
  for variant in (None, "fp16"):
    _, params = models.load_pretrained(str(back), variant=variant)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_dtype_float32_keeps_every_weight_exactly(tmp_path, tiny_dir, tiny):
  single = str(tmp_path / "model.safetensors")
  convert.convert(tiny_dir, single, "single_file", dtype="float32")
  assert _float_dtypes(single) == {"float32"}
  _, params = models.load_pretrained(single, single_file_config=tiny_dir)
  jax.tree.map(np.testing.assert_array_equal, params, tiny[1])


def test_a_conversion_failing_mid_way_writes_nothing(tmp_path, tiny_dir, monkeypatch):
  """A full disk during the last write of either form leaves no file and no folder."""
  monkeypatch.setenv(failpoints.ENV, "export:0:enospc")  # the folder written, not yet renamed
  with pytest.raises(OSError, match="No space left on device"):
    convert.convert(tiny_dir, str(tmp_path / "folder"), "diffusers")
  assert os.listdir(tmp_path) == []
  monkeypatch.delenv(failpoints.ENV)
  real_save = weights._safetensors_save_file  # pylint: disable=protected-access

  def disk_full(arrays, path, metadata):
    real_save(dict(list(arrays.items())[:3]), path, metadata)  # a torn file on disk
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(weights, "_safetensors_save_file", disk_full)
  with pytest.raises(OSError, match="No space left on device"):
    convert.convert(tiny_dir, str(tmp_path / "x.safetensors"), "single_file")
  assert os.listdir(tmp_path) == []


def test_a_bad_output_is_refused_in_one_line_before_any_work(tmp_path, tiny_dir):
  result = _convert(f"--source={tiny_dir}", "--to=single_file", f"--out={tmp_path / 'x.bin'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --out: a single file must end in .safetensors, got {tmp_path / 'x.bin'}")
  assert os.listdir(tmp_path) == []
