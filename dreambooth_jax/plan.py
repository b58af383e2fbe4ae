"""Will it fit? The real train step compiled for abstract weights: memory and FLOPs per device.

python -m dreambooth_jax.plan --config=configs/sd15.py --devices=8 [--config.train.batch_size=8]

Nothing is downloaded and no weight is created: the modules are built from architecture configs
(dreambooth_jax/architectures/sd15.json, sd21.json, or the configs of a local pipeline
directory), their parameters exist only as shapes (jax.eval_shape), and the step train.py runs
is lowered and compiled for a mesh of --devices devices. On a machine without that many
accelerators, the devices are simulated CPU devices: the per-device sizes of arguments
(parameters, optimizer state, batch) and outputs are exact; temporaries are the CPU
compiler's estimate, close to but not the same as a TPU's or GPU's.
"""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import json
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_integer("devices", 0, "Devices of the data-parallel mesh; 0 = those present. "
                       "More than present are simulated on the CPU.")
  flags.DEFINE_string("architecture", "", "sd15, sd21, or a local diffusers directory; "
                      "default: model.pretrained's directory, else sd21 for a hub id naming "
                      "2-1/2.1, else sd15.")
  flags.mark_flags_as_required(["config"])


ARCHITECTURES = ("sd15", "sd21")


def architecture_configs(architecture: str) -> dict[str, dict[str, Any]]:
  """{unet, vae, text_encoder, scheduler} configs of a shipped architecture or a local dir."""
  from dreambooth_jax import models  # pylint: disable=g-import-not-at-top
  if architecture in ARCHITECTURES:
    return models.architecture_configs(architecture)
  directory = models.resolve_pretrained(architecture)
  files = {"unet": "unet/config.json", "vae": "vae/config.json",
           "text_encoder": "text_encoder/config.json",
           "scheduler": "scheduler/scheduler_config.json"}
  configs = {}
  for part, name in files.items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise models.ModelLoadError(f"--architecture: {path} not found")
    with open(path) as f:
      configs[part] = json.load(f)
  return configs


def default_architecture(pretrained: str) -> str:
  if pretrained.startswith("builtin:") or os.path.isdir(pretrained):
    return pretrained
  return "sd21" if ("2-1" in pretrained or "2.1" in pretrained) else "sd15"


def abstract_pipeline(configs: dict[str, dict[str, Any]], dtype: str, attention: str = "xla"):
  """(Components, abstract float32 params): modules from configs, parameters as shapes only."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import models  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.models import pipeline  # pylint: disable=g-import-not-at-top
  # Token ids only need to be < vocab_size for shapes; the tiny tokenizer's are.
  tokenizer = models.load_tokenizer(models.BUILTIN_TINY)
  components = pipeline.build_components(configs, tokenizer, dtype, attention)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        components.abstract_params())
  return components, params


def placeholder_data(config, components, num_devices: int):
  """Training data of the run's layout (pixels or cached latents, ids or cached embeddings)
  holding zeros: its batches have the shapes and dtypes of the real ones."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.data import frozen_cache  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  size = config.data.resolution
  images = [np.zeros((size, size, 3), np.uint8)]
  with_prior = config.train.with_prior_preservation
  cached = {}
  if frozen_cache.caches_latents(config):
    latent_size = size // components.vae_scale_factor
    zeros = np.zeros((1, 2 if config.data.random_flip else 1, latent_size, latent_size,
                      components.vae.latent_channels), np.float32)
    latents = input_pipeline.LatentDistributions(mean=zeros, std=zeros)
    cached.update(instance_latents=latents, class_latents=latents if with_prior else None)
  if frozen_cache.caches_prompt_embeddings(config):
    text_encoder = components.text_encoder
    cached["prompt_embeddings"] = np.zeros(
        (2, text_encoder.max_position_embeddings, text_encoder.hidden_size), text_encoder.dtype)
  ids = np.zeros(components.text_encoder.max_position_embeddings, np.int32)
  return input_pipeline.DreamBoothData(
      instance_images=images, class_images=images if with_prior else [], instance_ids=ids,
      class_ids=ids, batch_size=config.train.batch_size, resolution=size,
      center_crop=config.data.center_crop, random_flip=config.data.random_flip, seed=0,
      pad_to_multiple=num_devices * config.train.grad_accum_steps, **cached)


def plan(config, architecture: str, devices=None) -> dict[str, Any]:
  """Compiles the train step for abstract inputs; returns per-device memory and FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import sharding  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.training import step as train_step  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.models import pipeline  # pylint: disable=g-import-not-at-top
  configs = architecture_configs(architecture)
  components, params = abstract_pipeline(configs, config.model.dtype,
                                         pipeline.configured_attention(config.model))
  mesh = sharding.make_mesh(devices, config.mesh.data, config.mesh.fsdp)
  train_config = config.train
  optimizer = train_step.make_optimizer(train_config)
  trained = train_config.train_text_encoder
  state = jax.eval_shape(lambda p: train_step.create_train_state(
      p, optimizer, 0, trained, train_config.param_dtype), params)
  data = placeholder_data(config, components, mesh.size)
  frozen = train_step.frozen_params(params, trained, data.instance_latents is not None,
                                    data.prompt_embeddings is not None)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data.batch(0))
  rows = data.num_rows
  step_fn = train_step.jit_on_mesh(components, optimizer, train_config, mesh, state, frozen)
  compiled = step_fn.lower(state, frozen, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: n / 2**30
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  return {
      "mesh": f"{mesh.size} × {mesh.devices.flat[0].device_kind}",
      "global_batch_rows": rows,
      "trained_parameters": count(state.params),
      "argument_gib_per_device": gib(memory.argument_size_in_bytes),
      "output_gib_per_device": gib(memory.output_size_in_bytes),
      "temporary_gib_per_device": gib(memory.temp_size_in_bytes),
      "donated_gib_per_device": gib(memory.alias_size_in_bytes),
      "peak_estimate_gib_per_device": gib(memory.argument_size_in_bytes +
                                          memory.output_size_in_bytes +
                                          memory.temp_size_in_bytes -
                                          memory.alias_size_in_bytes),
      "flops_per_step_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.devices < 0:
    raise app.UsageError("--devices must be >= 0")
  from dreambooth_jax import cli_errors, compilation_cache, sharding  # pylint: disable=g-import-not-at-top
  devices = sharding.use_devices(FLAGS.devices)
  compilation_cache.enable()
  with cli_errors.one_line_errors():
    architecture = FLAGS.architecture or default_architecture(FLAGS.config.model.pretrained)
    figures = plan(FLAGS.config, architecture, devices)
  print(f"architecture: {architecture}")
  for name, value in figures.items():
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
