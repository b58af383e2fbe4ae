"""Speed of the real train step on synthetic data: compile time, s/step, images/s, memory, MFU.

python -m dreambooth_jax.benchmark --config=configs/tiny.py [--devices=8] [--compare | --loop]
    [--config.train.batch_size=4 ...]

The step is the one train.py runs (same caches, prefetching, jit, shardings and donation), fed
random images of the configured resolution, so no class images are generated and nothing is
written. Prints one `name: value` line per figure; --compare then prints a markdown table of
s/step with each optimisation switched off (and each memory lever on), one at a time, and the
floor under the step (the UNet's forward and backward pass and the optimizer update alone). It does
not turn on the persistent compilation cache (unless $JAX_COMPILATION_CACHE_DIR is set), so
compile times are real. --loop also runs train.py's own loop (prefetching, metrics, progress bar,
checkpoint schedule) on a temporary workdir and prints its s/step beside the step's.
"""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import copy
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from dreambooth_jax import cli_errors, models, sharding, train
from dreambooth_jax.data import demo_data, frozen_cache, input_pipeline, prefetch
from dreambooth_jax.models import sampling
from dreambooth_jax.training import config_check, step as train_step

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so that importing this module adds no flags."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_integer("warmup_steps", 2, "Steps run (after compiling) before timing.")
  flags.DEFINE_integer("timed_steps", 10, "Steps timed; the median is reported.")
  flags.DEFINE_integer("devices", 0, "Devices of the data-parallel mesh; 0 = those present. "
                       "More than present are simulated on the CPU.")
  flags.DEFINE_bool("compare", False, "Also run the config with each optimisation switched "
                    "off (and each memory lever on), one at a time, and print a table.")
  flags.DEFINE_bool("loop", False, "Also time train.py's loop over the same steps (on every "
                    "device present, a temporary workdir and random class images) and print "
                    "loop / step.")
  flags.DEFINE_integer("loop_rounds", 1, "With --loop: loops run, each between two timings of "
                       "the step; the median of their loop / step ratios is printed.")
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


def synthetic_data(config: ml_collections.ConfigDict, components: models.Components,
                   params: dict[str, Any], mesh: jax.sharding.Mesh
                   ) -> input_pipeline.DreamBoothData:
  """Random instance and class images of the configured size, cached as the config says."""
  rng = np.random.default_rng(0)
  size = config.data.resolution
  images = lambda n: [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(n)]
  with_prior = config.train.with_prior_preservation
  return frozen_cache.training_data(config, components, params, mesh, images(4),
                                    images(4) if with_prior else [], "a photo of sks dog",
                                    "a photo of dog")


class _Timer:
  """Runs a compiled program step after step and reports its figures; subclasses compile."""

  mesh: jax.sharding.Mesh
  compiled: Any
  compile_seconds: float
  images_per_step: int

  def _step(self) -> Any:
    raise NotImplementedError

  def time_steps(self, count: int) -> list[float]:
    """Runs `count` steps back to back; the seconds of each after the first."""
    ends = []
    for _ in range(count):
      jax.block_until_ready(self._step())
      ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]

  def figures(self, seconds_per_step: float) -> dict[str, Any]:
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # One device's share of the SPMD program; a loop body (grad_accum_steps) counts once.
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = self.compiled.memory_analysis()
    device = self.mesh.devices.flat[0]
    figures = {
        "devices": f"{self.mesh.size} × {device.device_kind}",
        "compile_seconds": self.compile_seconds,
        "seconds_per_step": seconds_per_step,
        "images_per_second": self.images_per_step / seconds_per_step,
        "flops_per_step": flops,
        "temporary_gib_per_device": memory.temp_size_in_bytes / 2**30 if memory else None,
    }
    device_memory = device.memory_stats() or {}
    if "peak_bytes_in_use" in device_memory:  # since the process started
      figures["peak_device_memory_gib"] = device_memory["peak_bytes_in_use"] / 2**30
    peak = peak_flops(device.device_kind)
    if peak and flops:
      figures["mfu"] = flops / seconds_per_step / peak
    return figures


class StepTimer(_Timer):
  """One config's train step, compiled, fed and timed as train.py runs it.

  A step's time runs from the end of the previous step to the end of this one, so building
  and transferring its batch counts unless it was prefetched while the previous step ran.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               devices: list[jax.Device] | None = None, left_out: tuple[str, ...] = ()):
    """`left_out`: batch fields not fed (scripts/step_findings.py: without "instance_count" and
    "prior_count" the loss sums the masks over the devices, as it did before they existed)."""
    components, params = models.load_configured(config.model)
    self.components = components
    self.mesh = mesh = sharding.make_mesh(devices, config.mesh.data, config.mesh.fsdp)
    params = sharding.put_state(params, mesh)
    train_config = config.train
    optimizer = train_step.make_optimizer(train_config)
    data = synthetic_data(config, components, params, mesh)
    self.frozen = train_step.frozen_params(params, train_config.train_text_encoder,
                                           data.instance_latents is not None,
                                           data.prompt_embeddings is not None)
    self.state = sharding.put_state(train_step.create_train_state(
        params, optimizer, config.seed, train_config.train_text_encoder,
        train_config.param_dtype), mesh)
    rows = sharding.local_rows(mesh, data.num_rows)
    put_batch = sharding.BatchPutter(mesh, data.num_rows)
    put = lambda step: put_batch(
        {k: v for k, v in data.batch(step, rows).items() if k not in left_out})
    step_fn = train_step.jit_on_mesh(components, optimizer, train_config, mesh, self.state,
                                     self.frozen)
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.frozen, put(0)).compile()
    self.compile_seconds = time.perf_counter() - start
    self.images_per_step = train_config.batch_size * (2 if data.with_prior else 1)
    self.num_rows = data.num_rows
    self._batches = prefetch.prefetched(put, itertools.count(), train_config.prefetch_batches)

  def _step(self) -> Any:
    self.state, metrics = self.compiled(self.state, self.frozen, next(self._batches))
    return self.state, metrics


class FloorTimer(_Timer):
  """The floor under a config's step: the UNet's forward and backward pass and the optimizer
  update alone, on the step's rows (padding included), mesh, dtypes and donation.

  No VAE, text encoder, noise, timestep draws, masks or loss weighting, and the same batch
  every step: what the step costs beyond this is the step's own overhead.
  """

  def __init__(self, config: ml_collections.ConfigDict, step: StepTimer,
               predict: Callable[..., jax.Array] | None = None):
    """Built from the step's own timer: its model, mesh, trained UNet weights and rows.

    `predict` replaces the model's own UNet call (components.predict's signature), to time
    another UNet implementation on the same weights (scripts/floor_vs_diffusers.py).
    """
    components = step.components
    predict = predict or components.predict
    self.mesh = mesh = step.mesh
    train_config = config.train
    optimizer = train_step.make_optimizer(train_config)
    # A copy: the step timer's state is donated to its own program.
    self.params = jax.tree.map(jnp.copy, step.state.params["unet"])
    self.opt_state = sharding.put_state(optimizer.init(self.params), mesh)
    rng = np.random.default_rng(0)
    latent = config.data.resolution // components.vae_scale_factor
    latent_shape = (step.num_rows, components.latent_channels, latent, latent)
    context_shape = (step.num_rows, components.text_encoder.max_position_embeddings,
                     components.unet.cross_attention_dim)
    batch = {"noisy_latents": rng.standard_normal(latent_shape, np.float32),
             "target": rng.standard_normal(latent_shape, np.float32),
             "encoder_hidden_states": rng.standard_normal(context_shape, np.float32),
             "timesteps": rng.integers(0, 1000, step.num_rows).astype(np.int32)}
    self.batch = sharding.put_batch(batch, mesh)
    self.images_per_step = step.images_per_step

    def floor_step(unet_params, opt_state, batch):
      def loss(trained):
        prediction = predict(trained, batch["noisy_latents"], batch["timesteps"],
                             batch["encoder_hidden_states"], train_config.remat)
        return train_step.per_example_mse(prediction, batch["target"]).mean()
      value, grads = jax.value_and_grad(loss)(unet_params)
      updates, opt_state = optimizer.update(grads, opt_state, unet_params)
      return optax.apply_updates(unet_params, updates), opt_state, value

    param_sharding = sharding.state_shardings(self.params, mesh)
    opt_sharding = sharding.state_shardings(self.opt_state, mesh)
    step_fn = jax.jit(floor_step, in_shardings=(param_sharding, opt_sharding,
                                                 sharding.data_sharded(mesh)),
                      out_shardings=(param_sharding, opt_sharding, sharding.replicated(mesh)),
                      donate_argnums=(0, 1))
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.params, self.opt_state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start

  def _step(self) -> Any:
    self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.batch)
    return self.params, loss


def run(config: ml_collections.ConfigDict, warmup_steps: int, timed_steps: int,
        devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Compiles and times the train step; the figures, with the median s/step."""
  timer = StepTimer(config, devices)
  timer.time_steps(warmup_steps)
  return timer.figures(statistics.median(timer.time_steps(timed_steps + 1)))


def time_loop(config: ml_collections.ConfigDict, warmup_steps: int,
              timed_steps: int) -> tuple[float, float | None]:
  """Mean s/step of train.train_and_evaluate's loop over `timed_steps` after `warmup_steps`
  (each rounded up to whole log intervals), from its own metrics.jsonl; and what a checkpoint
  save adds to the log interval it falls in (checkpoint_seconds), None without one.

  Each logged row's steps_per_sec covers the wall time since the previous row: the step, the
  batches' prefetching, the metrics pulled every log step, the progress bar and the checkpoints
  the config schedules. Class images are random PNGs (nothing is generated); no validation
  grids or samples; the export after the loop is not timed.
  """
  every = config.log.every_steps
  warmup = max(1, -(-warmup_steps // every)) * every
  timed = -(-timed_steps // every) * every
  variant = copy.deepcopy(config)
  with variant.unlocked():
    variant.train.steps = warmup + timed
    variant.eval.every_steps = 0
    variant.sample.prompts = ()
    variant.mesh.data = 0  # every device present, as train.py runs
  with tempfile.TemporaryDirectory() as workdir:
    if variant.train.with_prior_preservation:
      variant.data.class_dir = os.path.join(workdir, "class_images")
      os.makedirs(variant.data.class_dir)
      rng = np.random.default_rng(1)
      size = variant.data.resolution
      for index in range(variant.data.num_class_images):
        sampling.write_png(rng.integers(0, 256, (size, size, 3), np.uint8),
                           os.path.join(variant.data.class_dir, f"class_{index:05d}.png"))
    train.train_and_evaluate(variant, os.path.join(workdir, "run"))
    with open(os.path.join(workdir, "run", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  intervals = {row["step"]: every / row["steps_per_sec"] for row in rows if row["step"] > warmup}
  return (sum(intervals.values()) / timed,
          checkpoint_seconds(intervals, every, config.checkpoint.every_steps))


def checkpoint_seconds(intervals: dict[int, float], log_every: int,
                       checkpoint_every: int) -> float | None:
  """The mean of the log intervals that hold a save less the median of those that do not.

  A loop's speed drifts by more than a save costs between runs, but hardly within one. The
  interval logged at step e holds the saves after steps e - log_every to e - 1 (a save follows
  its step's metrics row)."""
  def holds_a_save(end: int) -> bool:
    return any(step and step % checkpoint_every == 0 for step in range(end - log_every, end))
  with_save = [seconds for end, seconds in intervals.items() if holds_a_save(end)]
  without = [seconds for end, seconds in intervals.items() if not holds_a_save(end)]
  if not with_save or not without:
    return None
  return statistics.mean(with_save) - statistics.median(without)


def time_loop_and_step(config: ml_collections.ConfigDict, warmup_steps: int, timed_steps: int,
                       devices: list[jax.Device] | None = None,
                       rounds: int = 1) -> dict[str, Any]:
  """The loop's mean s/step, `rounds` times, each between two timings of the step alone;
  figures of the step. This machine's speed drifts by more than the loop's overhead between
  runs, so each loop is set against the steps timed just before and after it (the mean of their
  means) and the median of those ratios is reported."""
  timer = StepTimer(config, devices)
  timer.time_steps(warmup_steps)
  steps = [timer.time_steps(timed_steps + 1)]
  loops, saves = [], []
  for _ in range(rounds):
    seconds_per_step, save_seconds = time_loop(config, warmup_steps, timed_steps)
    loops.append(seconds_per_step)
    saves += [save_seconds] if save_seconds is not None else []
    steps.append(timer.time_steps(timed_steps + 1))
  step_means, ratios = loop_ratios(steps, loops)
  return {**timer.figures(statistics.median(itertools.chain(*steps))),
          "step_mean_seconds": statistics.median(step_means),
          "loop_seconds_per_step": statistics.median(loops),
          "loop_vs_step": statistics.median(ratios),
          "loop_vs_step_each_round": " ".join(f"{ratio:.3f}" for ratio in ratios),
          "loop_seconds_per_checkpoint": statistics.median(saves) if saves else None}


def loop_ratios(step_timings: list[list[float]], loop_seconds: list[float]
                ) -> tuple[list[float], list[float]]:
  """For loop i, timed between step_timings[i] and [i + 1]: the mean of those two timings'
  means, and the loop's s/step over it."""
  means = [statistics.mean(timings) for timings in step_timings]
  brackets = [(before + after) / 2 for before, after in zip(means, means[1:])]
  return brackets, [loop / step for loop, step in zip(loop_seconds, brackets)]


def comparisons(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """(field, value) switching one optimisation of `config` off, or a memory lever on."""
  changes = [("train.cache_latents", False), ("train.cache_text_embeddings", False),
             ("train.prefetch_batches", 0),
             ("model.dtype", "float32" if config.model.dtype != "float32" else "bfloat16"),
             ("train.remat", True), ("model.memory_efficient_attention", True),
             ("train.grad_accum_steps", 2 * config.train.grad_accum_steps)]
  current = lambda field: config[field.split(".")[0]][field.split(".")[1]]
  return [(field, value) for field, value in changes if current(field) != value]


ROUND_STEPS = 5  # consecutive steps per variant and round of a comparison


FLOOR = "floor: UNet forward + backward + optimizer"


def time_in_turns(timers: list[_Timer], warmup_steps: int, rounds: int,
                  alternate: bool = False) -> list[list[float]]:
  """Each timer's step seconds, timed in `rounds` rounds of ROUND_STEPS consecutive steps each,
  the timers taking turns, so that load from elsewhere on the machine falls on all alike.

  `alternate` reverses the order every other round, so that no timer always runs after the
  same other one (scripts/floor_vs_diffusers.py).
  """
  for timer in timers:
    timer.time_steps(warmup_steps)
  durations = [[] for _ in timers]
  for round_index in range(rounds):
    turns = list(zip(timers, durations))
    for timer, seconds in turns[::-1] if alternate and round_index % 2 else turns:
      seconds.extend(timer.time_steps(ROUND_STEPS))
  return durations


def compare(config: ml_collections.ConfigDict, warmup_steps: int, timed_steps: int,
            devices: list[jax.Device] | None = None) -> list[dict[str, Any]]:
  """The config as given, then each comparison, then the floor (FloorTimer); one row each.

  The variants are timed in turns (time_in_turns).
  """
  settings = [("", None)] + comparisons(config)
  timers = []
  for field, value in settings:
    variant = copy.deepcopy(config)
    if field:
      section, name = field.split(".")
      with variant.unlocked():
        variant[section][name] = value
    timers.append(StepTimer(variant, devices))
  timers.append(FloorTimer(config, timers[0]))
  durations = time_in_turns(timers, warmup_steps, -(-timed_steps // (ROUND_STEPS - 1)))
  names = [f"{field}={value}" if field else "as configured" for field, value in settings]
  return [{"setting": name, **timer.figures(statistics.median(seconds))}
          for name, timer, seconds in zip(names + [FLOOR], timers, durations)]


def format_comparison(rows: list[dict[str, Any]]) -> str:
  """A markdown table: s/step, its ratio to the first row and to the floor (the last row, if
  it is one), and compiler temp memory."""
  base = rows[0]["seconds_per_step"]
  floor = rows[-1]["seconds_per_step"] if rows[-1]["setting"] == FLOOR else None
  lines = ["| setting | s/step | vs as configured | vs floor | temp GiB/device | compile s |",
           "| --- | --- | --- | --- | --- | --- |"]
  for row in rows:
    temp = row["temporary_gib_per_device"]
    seconds = row["seconds_per_step"]
    lines.append(f"| {row['setting']} | {seconds:.4f} | {seconds / base:.2f}× | "
                 f"{'n/a' if floor is None else f'{seconds / floor:.2f}×'} | "
                 f"{'n/a' if temp is None else f'{temp:.4f}'} | {row['compile_seconds']:.1f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.timed_steps < 1 or FLAGS.warmup_steps < 0 or FLAGS.loop_rounds < 1:
    raise app.UsageError("--timed_steps and --loop_rounds must be >= 1 and --warmup_steps >= 0")
  if FLAGS.loop_rounds != 1 and not FLAGS.loop:
    raise app.UsageError("--loop_rounds counts loops: give it with --loop")
  config = FLAGS.config
  # Synthetic images are used: a config without photos (e.g. sd15.py) is benchmarked as is.
  config.data.instance_dir = config.data.instance_dir or demo_data.BUILTIN_DEMO_TOY
  if FLAGS.devices < 0:
    raise app.UsageError("--devices must be >= 0")
  with cli_errors.one_line_errors():
    # Before the config check, which may build a builtin model and so start jax.
    devices = sharding.use_devices(FLAGS.devices)
    config_check.check_config(config)
    if FLAGS.compare and FLAGS.loop:
      raise app.UsageError("--compare and --loop are separate runs: give one")
    if FLAGS.compare:
      rows = compare(config, FLAGS.warmup_steps, FLAGS.timed_steps, devices)
      figures = rows[0]
    elif FLAGS.loop:
      figures = time_loop_and_step(config, FLAGS.warmup_steps, FLAGS.timed_steps, devices,
                                   FLAGS.loop_rounds)
    else:
      figures = run(config, FLAGS.warmup_steps, FLAGS.timed_steps, devices)
  for name, value in figures.items():
    if name != "setting" and value is not None:
      print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
  if FLAGS.compare:
    print(format_comparison(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
