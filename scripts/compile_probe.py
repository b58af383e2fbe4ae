"""Prints what one compile of the tiny train step costs, and its step time, under XLA flags.

  python scripts/compile_probe.py                                      # XLA's defaults
  python scripts/compile_probe.py --xla_backend_optimization_level=1   # what the tests use

Arguments are appended to XLA_FLAGS (after 8 simulated CPU devices; NDEV=1 for one). CPU
seconds are the process's own, so they hold up when other work shares the machine. Nothing is
read from or written to the persistent compilation cache.
"""

import os
import resource
import sys
import time

os.environ["XLA_FLAGS"] = " ".join(
    [f"--xla_force_host_platform_device_count={os.environ.get('NDEV', '8')}", *sys.argv[1:]])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from dreambooth_jax import models, sharding  # noqa: E402  pylint: disable=g-import-not-at-top
from dreambooth_jax.data import input_pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from dreambooth_jax.training import step as train_step  # noqa: E402  pylint: disable=g-import-not-at-top

TIMED_STEPS = 10


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main() -> None:
  components, params = models.load_pretrained(models.resolve_pretrained(models.BUILTIN_TINY))
  config = common.get_config()
  rng = np.random.default_rng(0)
  images = lambda n: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
  data = input_pipeline.DreamBoothData(
      instance_images=images(3), class_images=images(4),
      instance_ids=input_pipeline.tokenize(components.tokenizer, "a photo of sks toy"),
      class_ids=input_pipeline.tokenize(components.tokenizer, "a red cube"),
      batch_size=2, resolution=32, center_crop=False, random_flip=True, seed=3,
      pad_to_multiple=8)
  optimizer = train_step.make_optimizer(config.train)
  mesh = sharding.make_mesh(jax.devices())
  replicated = sharding.replicated(mesh)
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(components, optimizer, config.train), replicated, replicated,
      sharding.data_sharded(mesh), replicated)
  state = sharding.put_replicated(train_step.create_train_state(params, optimizer, 0, False), mesh)
  frozen = sharding.put_replicated(train_step.frozen_params(params, False), mesh)
  batch = sharding.put_batch(data.batch(0), mesh)

  lowered = step_fn.lower(state, frozen, batch)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  compiled = lowered.compile()
  compile_wall, compile_cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  state, _ = compiled(state, frozen, batch)
  jax.block_until_ready(state)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(TIMED_STEPS):
    state, _ = compiled(state, frozen, batch)
  jax.block_until_ready(state)
  step_wall = (time.perf_counter() - wall) / TIMED_STEPS
  step_cpu = (_cpu_seconds() - cpu) / TIMED_STEPS
  print(f"{' '.join(sys.argv[1:]) or 'XLA defaults'}: compile {compile_wall:.1f} s "
        f"({compile_cpu:.1f} s CPU), step {step_wall * 1e3:.0f} ms ({step_cpu * 1e3:.0f} ms CPU) "
        f"on {len(jax.devices())} devices")


if __name__ == "__main__":
  main()
