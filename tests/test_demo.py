"""The README's first command, the demo, run in full and checked against what the README says
it does ("What the demo does"); then the sample CLI on its export.

It runs as a user of the core install runs it: one CPU device, XLA's default optimisation
level, no $JAX_COMPILATION_CACHE_DIR or $DREAMBOOTH_JAX_CACHE (none of the suite's settings),
diffusers, transformers and torch unimportable, and a HOME of its own whose
~/.cache/dreambooth_jax links to the suite's build cache (so the built models and compiled
programs are reused, and the default jit cache folder is checked). `.ci/run` sets
DREAMBOOTH_JAX_DEMO_WORKDIR so that its real-client check loads this run's export instead of
running the demo a second time; in the suite it takes one worker's time while the other runs
the rest.
"""

import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from dreambooth_jax import build_cache, models
from dreambooth_jax.toyworld import pretrain
from tests import conftest
from tests.test_core_imports import without_oracles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_ONLY = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
# jax logs each program's persistent-cache hit (JAX_LOG_COMPILES) or miss
# (JAX_EXPLAIN_CACHE_MISSES), and only when the cache is on.
CACHE_LOGS = {"JAX_LOG_COMPILES": "1", "JAX_EXPLAIN_CACHE_MISSES": "1"}


def user_env(home: pathlib.Path, suite_xla: bool = False) -> dict[str, str]:
  """A user's environment: HOME=home, no $JAX_COMPILATION_CACHE_DIR or $DREAMBOOTH_JAX_CACHE,
  so the programs' default folders are home/.cache/dreambooth_jax and its jax_cache.

  That folder links to the suite's build cache, so nothing is built again and the jit cache
  stays warm. With suite_xla, the suite's XLA flags and compile-time threshold are kept (its
  cache entries then match).
  """
  os.makedirs(build_cache.root(), exist_ok=True)
  (home / ".cache").mkdir(parents=True, exist_ok=True)
  link = home / ".cache" / "dreambooth_jax"
  if not link.exists():
    os.symlink(build_cache.root(), link)
  dropped = ("JAX_COMPILATION_CACHE_DIR", "DREAMBOOTH_JAX_CACHE") + (() if suite_xla else SUITE_ONLY)
  env = {k: v for k, v in os.environ.items() if k not in dropped}
  env["HOME"] = str(home)
  return env


def default_cache_used(home: pathlib.Path, stderr: str, program: str) -> bool:
  """Whether the run looked `program` up in the jit cache and it is now in the default folder."""
  looked_up = (f"Persistent compilation cache hit for '{program}'" in stderr or
               f"PERSISTENT COMPILATION CACHE MISS for '{program}'" in stderr)
  folder = home / ".cache" / "dreambooth_jax" / "jax_cache"
  return looked_up and bool(glob.glob(str(folder / f"{program}-*")))


@pytest.fixture(scope="module")
def demo():
  """(workdir, completed process, HOME) of the README's demo command."""
  workdir = os.environ.get("DREAMBOOTH_JAX_DEMO_WORKDIR")
  if not workdir:
    workdir = os.path.join(tempfile.mkdtemp(prefix="demo"), "run")
  home = pathlib.Path(tempfile.mkdtemp(prefix="demo_home"))
  env = dict(user_env(home), **CACHE_LOGS)
  result = subprocess.run(without_oracles("main", "--config=configs/demo.py",
                                          f"--workdir={workdir}"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result, home


def test_the_demo_prints_where_the_results_are(demo):
  workdir, result, _ = demo
  last_line = result.stderr.strip().splitlines()[-1]  # on stderr, with the progress and logs
  assert last_line == (
      f"Done. Metrics: {workdir}/metrics.jsonl  checkpoints: {workdir}/checkpoints  "
      f"pipeline: {workdir}/export  samples: {workdir}/samples")
  print(last_line)  # shown by `pytest -rP`


def test_the_demo_generates_64_class_images_of_a_ball_and_trains_600_steps(demo):
  workdir, _, _ = demo
  assert sorted(os.listdir(os.path.join(workdir, "class_images"))) == [
      f"class_{i:05d}.png" for i in range(64)]
  rows = conftest.metric_rows(workdir)
  assert [row["step"] for row in rows] == list(range(10, 601, 10))
  assert all(np.isfinite(row["loss"]) for row in rows)
  # Checkpointed every 200 steps, the newest two kept.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["400", "600"]


def test_the_demo_tunes_every_unet_weight_and_the_text_encoder(demo):
  workdir, _, _ = demo
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
  workdir, _, _ = demo
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
  workdir, _, _ = demo
  grid = Image.open(os.path.join(workdir, "samples", "grid.png"))
  assert grid.size == (8 * 32, 5 * 32)  # 8 images of 32 px per prompt, a row per prompt
  with open(os.path.join(workdir, "samples", "prompts.json")) as f:
    assert json.load(f) == {"prompt0": "a sks ball on the beach",
                            "prompt1": "a sks ball in the snow",
                            "prompt2": "a sks ball at night", "prompt3": "a sks ball on grass",
                            "prompt4": "a ball"}


def test_the_demo_keeps_its_compiled_programs_in_the_default_cache_folder(demo):
  """No $JAX_COMPILATION_CACHE_DIR: main looks its train step up in, and leaves it in,
  ~/.cache/dreambooth_jax/jax_cache."""
  _, result, home = demo
  assert default_cache_used(home, result.stderr, "jit_train_step")


def _sample(out: pathlib.Path, *flags: str, env=None, ir_dir=None) -> subprocess.Popen:
  """The sample CLI on `flags`, started (several run at once), with the oracles blocked."""
  env = dict(env or os.environ)
  if ir_dir:
    env["JAX_DUMP_IR_TO"] = str(ir_dir)  # the programs jax compiles, as StableHLO text
  return subprocess.Popen(without_oracles("sample", f"--out={out}", "--steps=2",
                                          "--scheduler=dpm", *flags),
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.fixture(scope="module")
def samples(demo, tmp_path_factory):
  """Three sample runs on the demo's export: {name: (out folder, stderr, IR folder, HOME)}.
  "plain": the defaults (seed 0, guidance 7.5, native size, float32); "seed": the same but
  --seed=1, started when "plain" is done (the same program: a jit-cache hit, not a second
  compile); "flags": the other flags set, in a user's environment, beside the two."""
  workdir, _, _ = demo
  root = tmp_path_factory.mktemp("samples")
  pipeline = f"--pipeline={workdir}/export"
  home = root / "home"
  started = {
      "plain": lambda: _sample(root / "plain", pipeline, "--prompt=a sks ball on the beach",
                               "--prompt=a ball", "--num_images=3", ir_dir=root / "plain_ir"),
      "flags": lambda: _sample(root / "flags", pipeline, "--prompt=a ball", "--num_images=2",
                               "--resolution=48", "--dtype=bfloat16", "--guidance_scale=2.75",
                               env=dict(user_env(home, suite_xla=True), **CACHE_LOGS),
                               ir_dir=root / "flags_ir"),
      "seed": lambda: _sample(root / "seed", pipeline, "--prompt=a ball", "--prompt=a ball",
                              "--num_images=3", "--seed=1", env=dict(os.environ, **CACHE_LOGS)),
  }
  runs = {name: start() for name, start in started.items() if name != "seed"}
  done = {}
  for name in ("plain", "seed", "flags"):
    if name == "seed":
      runs["seed"] = started["seed"]()
    _, stderr = runs[name].communicate(timeout=600)
    assert runs[name].returncode == 0, f"{name}: {stderr[-3000:]}"
    done[name] = (root / name, stderr, root / f"{name}_ir", home)
  return done


def _png(folder: pathlib.Path, name: str) -> np.ndarray:
  return np.asarray(Image.open(folder / name))


def _sampler_ir(ir_dir: pathlib.Path) -> str:
  """The StableHLO of the sampling program (the one jit(sample) the CLI compiles)."""
  path, = glob.glob(str(ir_dir / "*jit_sample_compile.mlir"))
  with open(path) as f:
    return f.read()


def test_the_sample_cli_draws_from_the_demos_export(samples):
  out, _, _, _ = samples["plain"]
  assert sorted(os.listdir(out)) == [
      "grid.png", "prompt0_000.png", "prompt0_001.png", "prompt0_002.png", "prompt1_000.png",
      "prompt1_001.png", "prompt1_002.png", "prompts.json"]
  assert Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
  # --resolution=0 (the default): the UNet's native size, 32 px for the demo's model.
  assert {Image.open(out / f"prompt{i}_{k:03d}.png").size
          for i in range(2) for k in range(3)} == {(32, 32)}


def test_the_sample_cli_seed_gives_image_k_its_noise(samples):
  """--seed: image k of a prompt starts from the same noise wherever it sits in the batch (the
  same prompt twice gives the same images, on other devices); another seed, other images."""
  plain, _, _, _ = samples["plain"]
  seeded, _, _, _ = samples["seed"]
  for k in range(3):
    np.testing.assert_array_equal(_png(seeded, f"prompt0_{k:03d}.png"),
                                  _png(seeded, f"prompt1_{k:03d}.png"))
    assert not np.array_equal(_png(seeded, f"prompt1_{k:03d}.png"),
                              _png(plain, f"prompt1_{k:03d}.png"))  # "a ball" at seed 0
  assert not np.array_equal(_png(seeded, "prompt0_000.png"), _png(seeded, "prompt0_001.png"))


def test_another_seed_or_prompt_runs_the_same_compiled_sampler(samples):
  """The seed and the prompts are inputs of the sampling program, not part of it: the "seed"
  run loads what "plain" compiled."""
  _, stderr, _, _ = samples["seed"]
  assert "Persistent compilation cache hit for 'jit_sample'" in stderr


def test_the_sample_cli_resolution_dtype_and_guidance_reach_the_sharded_sampler(samples):
  """--resolution=48 gives 48 px images; the compiled sampler computes in bf16 with guidance
  2.75 (the defaults' has neither), and its 8 images are split over the 8 devices."""
  out, _, ir_dir, _ = samples["flags"]
  assert Image.open(out / "grid.png").size == (2 * 48, 48)
  assert {Image.open(out / f"prompt0_{k:03d}.png").size for k in range(2)} == {(48, 48)}
  flags_ir, plain_ir = _sampler_ir(ir_dir), _sampler_ir(samples["plain"][2])
  assert "bf16" in flags_ir and "bf16" not in plain_ir
  assert "2.750000e+00" in flags_ir and "2.750000e+00" not in plain_ir
  assert "7.500000e+00" in plain_ir and "7.500000e+00" not in flags_ir
  for ir, size in ((flags_ir, 48), (plain_ir, 32)):
    assert '<["data"=8, "fsdp"=1]>' in ir  # every device of the suite's 8
    # The result: 8 images (2, padded to the mesh), rows split over the mesh.
    assert re.search(rf'-> \(tensor<8x{size}x{size}x3xui8> \{{jax.result_info = "result", '
                     r'sdy.sharding = #sdy.sharding<@mesh, \[\{"data", "fsdp"\}', ir), size


def test_the_sample_cli_keeps_its_programs_in_the_default_cache_folder(samples):
  _, stderr, _, home = samples["flags"]
  assert default_cache_used(home, stderr, "jit_sample")
