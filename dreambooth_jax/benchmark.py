"""Speed of the real train step on synthetic data: compile time, s/step, images/s, memory, MFU.

python -m dreambooth_jax.benchmark --config=configs/demo.py [--config.train.batch_size=4 ...]

The step is the one train.py runs (same jit, shardings and donation), fed random images of the
configured resolution, so no class images are generated and nothing is written. Prints one
`name: value` line per figure.
"""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dreambooth_jax import (cli_errors, config_check, demo_data, input_pipeline, models, sharding,
                            train_step)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_integer("warmup_steps", 2, "Steps run (after compiling) before timing.")
  flags.DEFINE_integer("timed_steps", 10, "Steps timed; the median is reported.")
  flags.mark_flags_as_required(["config"])


# Dense bf16 peak FLOP/s per chip (vendor figures), for MFU. Keyed by a substring of
# jax's device_kind, lower-cased.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS.items():  # most specific names first within each family
    if name in kind:
      return flops
  return None


def synthetic_data(config: ml_collections.ConfigDict, tokenizer, pad_to_multiple: int
                   ) -> input_pipeline.DreamBoothData:
  """Random instance and class images of the configured size, the configured prompts."""
  rng = np.random.default_rng(0)
  size = config.data.resolution
  images = lambda n: [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(n)]
  with_prior = config.train.with_prior_preservation
  return input_pipeline.DreamBoothData(
      instance_images=images(4), class_images=images(4) if with_prior else [],
      instance_ids=input_pipeline.tokenize(tokenizer, "a photo of sks dog"),
      class_ids=input_pipeline.tokenize(tokenizer, "a photo of dog"),
      batch_size=config.train.batch_size, resolution=size, center_crop=True,
      random_flip=config.data.random_flip, seed=config.seed, pad_to_multiple=pad_to_multiple)


def run(config: ml_collections.ConfigDict, warmup_steps: int, timed_steps: int
        ) -> dict[str, Any]:
  """Compiles and times the train step; returns the figures."""
  components, params = models.load_pretrained(config.model.pretrained,
                                              config.model.revision or None, config.model.dtype)
  mesh = sharding.make_mesh()
  params = sharding.put_replicated(params, mesh)
  train_config = config.train
  optimizer = train_step.make_optimizer(train_config)
  frozen = train_step.frozen_params(params, train_config.train_text_encoder)
  state = sharding.put_replicated(train_step.create_train_state(
      params, optimizer, config.seed, train_config.train_text_encoder), mesh)
  step_fn = train_step.jit_on_mesh(components, optimizer, train_config, mesh)
  data = synthetic_data(config, components.tokenizer, mesh.size)
  batches = [sharding.put_batch(data.batch(step), mesh)
             for step in range(warmup_steps + timed_steps)]

  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batches[0]).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  durations = []
  for index, batch in enumerate(batches):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    if index >= warmup_steps:
      durations.append(time.perf_counter() - start)
  seconds = statistics.median(durations)
  rows = train_config.batch_size * (2 if data.with_prior else 1)
  figures = {
      "devices": f"{mesh.size} × {jax.devices()[0].device_kind}",
      "compile_seconds": compile_seconds,
      "seconds_per_step": seconds,
      "images_per_second": rows / seconds,
      "flops_per_step": flops,
  }
  memory = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    figures["peak_device_memory_gib"] = memory["peak_bytes_in_use"] / 2**30
  peak = peak_flops(jax.devices()[0].device_kind)
  if peak and flops:
    # cost_analysis counts the whole (SPMD-partitioned) program of one device.
    figures["mfu"] = flops / seconds / peak
  return figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.timed_steps < 1 or FLAGS.warmup_steps < 0:
    raise app.UsageError("--timed_steps must be >= 1 and --warmup_steps >= 0")
  config = FLAGS.config
  # Synthetic images are used: a config without photos (e.g. sd15.py) is benchmarked as is.
  config.data.instance_dir = config.data.instance_dir or demo_data.BUILTIN_DEMO_TOY
  with cli_errors.one_line_errors():
    config_check.check_config(config)
    figures = run(config, FLAGS.warmup_steps, FLAGS.timed_steps)
  for name, value in figures.items():
    print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
