"""The README's first command, the demo, run in full and checked against what the README says
it does ("What the demo does"); then the sample CLI on its export.

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
from dreambooth_jax.toyworld import pretrain
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
  with open(os.path.join(workdir, "export", "text_encoder", "config.json")) as f:
    assert json.load(f)["max_position_embeddings"] == pretrain.MAX_LENGTH
  with open(os.path.join(workdir, "prompts.json")) as f:
    assert json.load(f)["instance_prompt"] == "a sks ball"


def test_the_demo_also_writes_the_single_file_in_float16(demo):
  """export.single_file (set by the demo): float16, as many weights as the three components."""
  workdir, _ = demo
  exported = [load_file(os.path.join(workdir, "export", name, file))
              for name, file in (("unet", "diffusion_pytorch_model.safetensors"),
                                 ("vae", "diffusion_pytorch_model.safetensors"),
                                 ("text_encoder", "model.safetensors"))]
  single = load_file(os.path.join(workdir, "export.safetensors"))
  floats = [v for v in single.values() if v.dtype.kind == "f"]
  assert {v.dtype.name for v in floats} == {"float16"}
  assert sum(v.size for v in floats) == sum(v.size for tensors in exported
                                            for v in tensors.values())


def test_the_demo_samples_the_subject_in_four_new_scenes_and_a_ball(demo):
  workdir, _ = demo
  grid = Image.open(os.path.join(workdir, "samples", "grid.png"))
  assert grid.size == (8 * 32, 5 * 32)  # 8 images of 32 px per prompt, a row per prompt
  with open(os.path.join(workdir, "samples", "prompts.json")) as f:
    assert json.load(f) == {"prompt0": "a sks ball on the beach",
                            "prompt1": "a sks ball in the snow",
                            "prompt2": "a sks ball at night", "prompt3": "a sks ball on grass",
                            "prompt4": "a ball"}


def test_the_sample_cli_draws_from_the_demos_export(demo, tmp_path):
  workdir, _ = demo
  out = tmp_path / "samples"
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.sample",
                           f"--pipeline={workdir}/export", "--prompt=a sks ball on the beach",
                           "--prompt=a ball", "--num_images=3", f"--out={out}", "--steps=2",
                           "--scheduler=dpm"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == [
      "grid.png", "prompt0_000.png", "prompt0_001.png", "prompt0_002.png", "prompt1_000.png",
      "prompt1_001.png", "prompt1_002.png", "prompts.json"]
  assert Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
