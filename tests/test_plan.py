"""The plan command: abstract weights, the real step compiled, per-device sizes that add up."""

import copy
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dreambooth_jax import plan
from tests import conftest
from tests.test_demo import CACHE_LOGS, default_cache_used, user_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
# The train state's bytes besides the weights and moments: the step, the rng key (2 × uint32),
# the two non-finite counters, and AdamW's and its schedule's step counts.
STATE_SCALARS = 7 * 4


def test_plan_of_the_tiny_model_counts_what_is_on_each_device(small_config, tiny):
  components, params = tiny
  figures = plan.plan(small_config, "builtin:tiny-sd", jax.devices())
  assert figures["mesh"] == "8 × cpu" and figures["global_batch_rows"] == 8
  assert figures["trained_parameters"] == count(params["unet"])
  # Replicated on every device: the UNet (fp32) and AdamW's two moments of it; latents and
  # prompt embeddings are cached, so neither the VAE nor the text encoder is an argument. The
  # batch is split over the 8 devices: 1 row each (latent mean and std, the prompt embedding,
  # 2 masks, the 2 row counts and the example id).
  latent = (32 // components.vae_scale_factor) ** 2 * components.vae.latent_channels
  row = 4 * (2 * latent + 77 * components.text_encoder.hidden_size + 5)
  state = 4 * 3 * count(params["unet"]) + STATE_SCALARS
  assert figures["argument_gib_per_device"] * 2**30 == state + row  # exact, to the byte
  # Outputs: the new state and the 6 scalar metrics (loss, instance_loss, prior_loss,
  # grad_norm, learning_rate, nonfinite_steps), plus XLA's table of the output buffers, 8 bytes
  # for each output array: 3 per UNet weight, 6 state scalars, 6 metrics.
  arrays = 3 * len(jax.tree.leaves(params["unet"])) + 6 + 6
  assert figures["output_gib_per_device"] * 2**30 == state + 6 * 4 + 8 * arrays
  assert figures["donated_gib_per_device"] * 2**30 == state  # the whole state is updated in place
  assert figures["flops_per_step_per_device"] > 1e6


def test_plan_without_caches_holds_the_vae_encoder_and_text_encoder(small_config, tiny):
  _, params = tiny
  small_config.train.cache_latents = False
  small_config.train.cache_text_embeddings = False
  figures = plan.plan(small_config, "builtin:tiny-sd", jax.devices())
  # jit drops the VAE decoder, which training never runs; a row is pixels and token ids.
  unused = count(params["vae"]["decoder"]) + count(params["vae"]["post_quant_conv"])
  expected = 4 * (count(params) - unused + 2 * count(params["unet"]))
  row = 4 * (3 * 32 * 32 + 77 + 5)
  assert figures["argument_gib_per_device"] * 2**30 == expected + STATE_SCALARS + row


def test_memory_levers_lower_the_compilers_temporary_memory(small_config):
  """At 64 px with 2 rows per device: chunked attention and 2 micro-batches each need less."""
  small_config.data.resolution = 64
  small_config.train.batch_size = 8
  temporary = {}
  for name, section, field, value in [("plain", "train", "grad_accum_steps", 1),
                                      ("attention", "model", "memory_efficient_attention", True),
                                      ("accumulation", "train", "grad_accum_steps", 2)]:
    config = copy.deepcopy(small_config)
    config[section][field] = value
    figures = plan.plan(config, "builtin:tiny-sd", jax.devices())
    temporary[name] = figures["temporary_gib_per_device"]
  assert temporary["attention"] < 0.8 * temporary["plain"]
  assert temporary["accumulation"] < 0.8 * temporary["plain"]


@pytest.mark.parametrize("architecture,unet,vae,text_encoder", [
    ("sd15", 859_520_964, 83_653_863, 123_060_480),
    ("sd21", 865_910_724, 83_653_863, None),
])
def test_shipped_architectures_have_the_published_sizes(architecture, unet, vae, text_encoder):
  _, params = plan.abstract_pipeline(plan.architecture_configs(architecture), "float32")
  assert count(params["unet"]) == unet
  assert count(params["vae"]) == vae
  if text_encoder is not None:
    assert count(params["text_encoder"]) == text_encoder


def test_default_architecture():
  assert plan.default_architecture("stable-diffusion-v1-5/stable-diffusion-v1-5") == "sd15"
  assert plan.default_architecture("stabilityai/stable-diffusion-2-1") == "sd21"
  assert plan.default_architecture("builtin:tiny-sd") == "builtin:tiny-sd"


def test_plan_and_benchmark_clis_simulate_the_requested_devices_and_only_plan_caches(tmp_path):
  """One CPU device present (none of the suite's 8): `--devices=2` gives both CLIs a mesh of 2.

  In a user's environment (no $JAX_COMPILATION_CACHE_DIR): plan looks its step up in, and
  leaves it in, ~/.cache/dreambooth_jax/jax_cache; benchmark compiles with the cache off (jax
  then logs neither hits nor misses). Both run at once.
  """
  env = dict(user_env(tmp_path, suite_xla=True), XLA_FLAGS=conftest.TEST_XLA_FLAGS,
             **CACHE_LOGS)
  commands = {
      "plan": ["dreambooth_jax.plan", "--config=configs/tiny.py", "--devices=2"],
      "benchmark": ["dreambooth_jax.benchmark", "--config=configs/tiny.py", "--devices=2",
                    "--warmup_steps=0", "--timed_steps=1", "--config.train.batch_size=1"],
  }
  started = {name: subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
  results = {name: process.communicate(timeout=600) + (process.returncode,)
             for name, process in started.items()}
  for name, (_, stderr, returncode) in results.items():
    assert returncode == 0, f"{name}: {stderr[-2000:]}"

  stdout, stderr, _ = results["plan"]
  lines = dict(line.split(": ", 1) for line in stdout.splitlines())
  assert lines["architecture"] == "builtin:tiny-sd" and lines["mesh"] == "2 × cpu"
  assert lines["global_batch_rows"] == "4"  # batch 2 + 2 prior
  assert float(lines["peak_estimate_gib_per_device"]) > 0
  assert default_cache_used(tmp_path, stderr, "jit_train_step")

  stdout, stderr, _ = results["benchmark"]
  lines = dict(line.split(": ", 1) for line in stdout.splitlines())
  assert lines["devices"] == "2 × cpu"
  assert float(lines["seconds_per_step"]) > 0 and float(lines["compile_seconds"]) > 0
  assert "Compiling jit(train_step)" in stderr  # compiles are logged...
  assert "persistent compilation cache" not in stderr.lower()  # ...but none looked up


@pytest.mark.parametrize("architecture", ["sd15", "sd21"])
def test_builtin_random_model_is_the_shipped_architecture(architecture, monkeypatch, tmp_path):
  """`builtin:random-<name>` builds random weights of dreambooth_jax/architectures/<name>.json
  (the sizes checked above) with a tokenizer whose ids fit its vocabulary. Recorded, not
  written: the writer it calls is the one every `builtin:tiny-sd` run goes through."""
  from dreambooth_jax.models import builtin  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path))  # no copy built earlier is reused
  built = []

  def record(configs, tokenizer, out_dir, seed):
    built.append((configs, tokenizer, seed))
    os.makedirs(out_dir)
    return out_dir

  monkeypatch.setattr(builtin, "_save_random", record)
  directory = builtin.resolve_pretrained(f"builtin:random-{architecture}")
  assert directory.startswith(str(tmp_path / f"random-{architecture}-"))
  (configs, tokenizer, seed), = built
  assert configs == plan.architecture_configs(architecture) and seed == 0
  text_config = configs["text_encoder"]
  assert tokenizer.model_max_length == text_config["max_position_embeddings"] == 77
  assert len(tokenizer) <= text_config["vocab_size"]  # every id it can give is an embedding row
