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
  if architecture in ARCHITECTURES:
    path = os.path.join(os.path.dirname(__file__), "architectures", f"{architecture}.json")
    with open(path) as f:
      return json.load(f)
  from dreambooth_jax import models  # pylint: disable=g-import-not-at-top
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


def abstract_pipeline(configs: dict[str, dict[str, Any]], dtype: str):
  """(Components, abstract float32 params): modules from configs, parameters as shapes only."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import models  # pylint: disable=g-import-not-at-top
  compute = jnp.dtype(dtype)
  unet = FlaxUNet2DConditionModel.from_config(configs["unet"], dtype=compute)
  vae = FlaxAutoencoderKL.from_config(configs["vae"], dtype=compute)
  text_config = CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                  if k not in ("architectures", "model_type")})
  text_encoder = FlaxCLIPTextModel(text_config, dtype=compute, _do_init=False)
  # Token ids only need to be < vocab_size for shapes; the tiny tokenizer's are.
  tokenizer = models.load_tokenizer(models.BUILTIN_TINY)
  key = jax.random.PRNGKey(0)
  params = {"unet": jax.eval_shape(unet.init_weights, key),
            "vae": jax.eval_shape(vae.init_weights, key),
            "text_encoder": text_encoder.params_shape_tree}
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  components = models.Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                 unet=unet, scheduler_config=configs["scheduler"])
  return components, params


def plan(config, architecture: str, devices=None) -> dict[str, Any]:
  """Compiles the train step for abstract inputs; returns per-device memory and FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import sharding, train_step  # pylint: disable=g-import-not-at-top
  configs = architecture_configs(architecture)
  components, params = abstract_pipeline(configs, config.model.dtype)
  mesh = sharding.make_mesh(devices)
  train_config = config.train
  optimizer = train_step.make_optimizer(train_config)
  trained = train_config.train_text_encoder
  state = jax.eval_shape(lambda p: train_step.create_train_state(p, optimizer, 0, trained),
                         params)
  frozen = train_step.frozen_params(params, trained)
  size = config.data.resolution
  rows = train_config.batch_size * (2 if train_config.with_prior_preservation else 1)
  rows = -(-rows // mesh.size) * mesh.size
  length = components.text_encoder.config.max_position_embeddings
  batch = {"pixel_values": jax.ShapeDtypeStruct((rows, 3, size, size), np.float32),
           "input_ids": jax.ShapeDtypeStruct((rows, length), np.int32),
           "instance_mask": jax.ShapeDtypeStruct((rows,), np.float32),
           "prior_mask": jax.ShapeDtypeStruct((rows,), np.float32),
           "example_id": jax.ShapeDtypeStruct((rows,), np.int32)}
  step_fn = train_step.jit_on_mesh(components, optimizer, train_config, mesh)
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
  if FLAGS.devices:  # read when jax first starts its backend, which has not happened yet
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.devices}")
  import jax  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import cli_errors  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if FLAGS.devices:
    devices = (devices if len(devices) >= FLAGS.devices else jax.devices("cpu"))[:FLAGS.devices]
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
