"""The README's first command, the demo, run in full and checked against what the README says
it does ("What the demo does").

It runs as a user runs it: one CPU device, XLA's default optimisation level and the user's own
jit cache folder (none of the suite's settings). `.ci/run` sets DREAMBOOTH_JAX_DEMO_WORKDIR so
that its real-client check loads this run's export instead of running the demo a second time;
in the suite it takes one worker's time while the other runs the rest.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from dreambooth_jax import models
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_ONLY = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@pytest.fixture(scope="module")
def demo():
  """(workdir, completed process) of the README's demo command."""
  workdir = os.environ.get("DREAMBOOTH_JAX_DEMO_WORKDIR")
  if not workdir:
    workdir = os.path.join(tempfile.mkdtemp(prefix="demo"), "run")
  env = {k: v for k, v in os.environ.items() if k not in SUITE_ONLY}
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.main", "--config=configs/demo.py",
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_the_demo_prints_where_the_results_are(demo):
  workdir, result = demo
  last_line = result.stderr.strip().splitlines()[-1]  # on stderr, with the progress and logs
  assert last_line == (
      f"Done. Metrics: {workdir}/metrics.jsonl  checkpoints: {workdir}/checkpoints  "
      f"pipeline: {workdir}/export  samples: {workdir}/samples")
  print(last_line)  # shown by `pytest -rP`


def test_the_demo_generates_64_class_images_of_a_ball_and_trains_600_steps(demo):
  workdir, _ = demo
  assert sorted(os.listdir(os.path.join(workdir, "class_images"))) == [
      f"class_{i:05d}.png" for i in range(64)]
  rows = conftest.metric_rows(workdir)
  assert [row["step"] for row in rows] == list(range(10, 601, 10))
  assert all(np.isfinite(row["loss"]) for row in rows)
  # Checkpointed every 200 steps, the newest two kept.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["400", "600"]


def test_the_demo_tunes_every_unet_weight_and_the_text_encoder(demo):
  workdir, _ = demo
  base = models.resolve_pretrained("builtin:toyworld")
  for folder, name in [("unet", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")]:
    tuned = load_file(os.path.join(workdir, "export", folder, name))
    before = load_file(os.path.join(base, folder, name))
    assert sorted(tuned) == sorted(before)
    assert not [key for key in before if np.array_equal(tuned[key], before[key])]
  vae = load_file(os.path.join(workdir, "export", "vae", "diffusion_pytorch_model.safetensors"))
  base_vae = load_file(os.path.join(base, "vae", "diffusion_pytorch_model.safetensors"))
  assert all(np.array_equal(vae[k], base_vae[k]) for k in base_vae)  # the VAE stays frozen
  assert os.path.getsize(os.path.join(workdir, "export.safetensors")) > 0  # export.single_file


def test_the_demo_samples_the_subject_in_four_new_scenes_and_a_ball(demo):
  workdir, _ = demo
  grid = Image.open(os.path.join(workdir, "samples", "grid.png"))
  assert grid.size == (8 * 32, 5 * 32)  # 8 images of 32 px per prompt, a row per prompt
  with open(os.path.join(workdir, "samples", "prompts.json")) as f:
    assert json.load(f) == {"prompt0": "a sks ball on the beach",
                            "prompt1": "a sks ball in the snow",
                            "prompt2": "a sks ball at night", "prompt3": "a sks ball on grass",
                            "prompt4": "a ball"}
