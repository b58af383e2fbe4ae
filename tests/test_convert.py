"""The convert CLI: a diffusers folder to a single file and back, through the command a user types."""

import os
import subprocess
import sys

import jax
import numpy as np

from dreambooth_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*flags):
  return subprocess.run([sys.executable, "-m", "dreambooth_jax.convert", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def test_folder_to_single_file_and_back_keeps_every_weight(tmp_path, tiny_dir, tiny):
  single = tmp_path / "model.safetensors"
  result = _convert(f"--source={tiny_dir}", "--to=single_file", f"--out={single}",
                    "--dtype=float32")
  assert result.returncode == 0, result.stderr[-2000:]
  assert single.is_file() and "Wrote" in result.stderr
  back = tmp_path / "back"
  result = _convert(f"--source={single}", f"--single_file_config={tiny_dir}", "--to=diffusers",
                    f"--out={back}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (back / "model_index.json").is_file()
  assert not os.path.exists(str(back) + ".tmp")
  _, params = models.load_pretrained(str(back))
  jax.tree.map(np.testing.assert_array_equal, params, tiny[1])


def test_a_bad_output_is_refused_in_one_line_before_any_work(tmp_path, tiny_dir):
  result = _convert(f"--source={tiny_dir}", "--to=single_file", f"--out={tmp_path / 'x.bin'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --out: a single file must end in .safetensors, got {tmp_path / 'x.bin'}")
  assert os.listdir(tmp_path) == []
