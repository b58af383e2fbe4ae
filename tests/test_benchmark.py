"""The benchmark measures the real train step: figures present, consistent and positive."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreambooth_jax import benchmark
from tests import conftest


def test_benchmark_figures_of_the_small_config(small_config):
  figures = benchmark.run(small_config, warmup_steps=1, timed_steps=3)
  assert figures["devices"] == "8 × cpu"
  assert figures["compile_seconds"] > 0 and figures["seconds_per_step"] > 0
  rows = small_config.train.batch_size * 2  # instance + prior rows (padding rows not counted)
  assert figures["images_per_second"] == pytest.approx(rows / figures["seconds_per_step"])
  # One device's share of a UNet + VAE-encoder + text-encoder forward and backward: far more
  # than nothing, far less than a TFLOP for the 32 px tiny model.
  assert 1e6 < figures["flops_per_step"] < 1e12
  assert "mfu" not in figures  # no peak FLOP/s known for a CPU


@pytest.mark.parametrize("kind,flops", [("TPU v4", 275e12), ("TPU v5 lite", 197e12),
                                        ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, flops):
  assert benchmark.peak_flops(kind) == flops


def test_comparisons_switch_each_optimisation_off_and_each_memory_lever_on(small_config):
  assert benchmark.comparisons(small_config) == [
      ("train.cache_latents", False), ("train.cache_text_embeddings", False),
      ("train.prefetch_batches", 0), ("model.dtype", "bfloat16"), ("train.remat", True),
      ("model.memory_efficient_attention", True), ("train.grad_accum_steps", 2)]
  small_config.model.dtype = "bfloat16"
  small_config.train.cache_latents = False  # already off: not a comparison
  changes = dict(benchmark.comparisons(small_config))
  assert changes["model.dtype"] == "float32" and "train.cache_latents" not in changes


def test_compare_times_the_config_and_each_change_alone_in_turns(small_config, monkeypatch):
  made, calls = [], []

  class FakeTimer:
    def __init__(self, config, devices=None):
      self.name = (config.train.prefetch_batches, config.train.remat, config.model.dtype)
      self.seconds = 0.5 if config.train.remat else 0.25
      made.append(self.name)

    def time_steps(self, count):
      calls.append((self.name, count))
      return [self.seconds] * max(count - 1, 0)

    def figures(self, seconds_per_step):
      return {"seconds_per_step": seconds_per_step, "compile_seconds": 3.0,
              "temporary_gib_per_device": 0.125}

  class FakeFloor(FakeTimer):
    def __init__(self, config, step):
      assert step.name == made[0]  # built on the timer of the config as given
      self.name, self.seconds = "floor", 0.2
      made.append(self.name)

  monkeypatch.setattr(benchmark, "StepTimer", FakeTimer)
  monkeypatch.setattr(benchmark, "FloorTimer", FakeFloor)
  monkeypatch.setattr(benchmark, "comparisons",
                      lambda config: [("train.prefetch_batches", 0), ("train.remat", True)])
  rows = benchmark.compare(small_config, 1, 8)
  assert made == [(2, False, "float32"), (0, False, "float32"), (2, True, "float32"), "floor"]
  assert small_config.train.remat is False  # the caller's config is left alone
  # Warm-up, then 8 timed steps in rounds of 5 (4 timed each): 2 rounds, the variants in turn.
  assert calls == [(name, 1) for name in made] + [(name, 5) for name in made] * 2
  assert benchmark.format_comparison(rows).splitlines() == [
      "| setting | s/step | vs as configured | vs floor | temp GiB/device | compile s |",
      "| --- | --- | --- | --- | --- | --- |",
      "| as configured | 0.2500 | 1.00× | 1.25× | 0.1250 | 3.0 |",
      "| train.prefetch_batches=0 | 0.2500 | 1.00× | 1.25× | 0.1250 | 3.0 |",
      "| train.remat=True | 0.5000 | 2.00× | 2.50× | 0.1250 | 3.0 |",
      "| floor: UNet forward + backward + optimizer | 0.2000 | 0.80× | 1.00× | 0.1250 | 3.0 |"]


def test_the_floor_runs_the_unet_and_the_optimizer_on_the_steps_rows(small_config):
  """The real FloorTimer on the small config: it compiles, trains and reports like a step."""
  step = benchmark.StepTimer(small_config)
  floor = benchmark.FloorTimer(small_config, step)
  before = jax.device_get(floor.params["conv_in"]["kernel"])
  seconds = floor.time_steps(3)
  assert len(seconds) == 2 and all(s > 0 for s in seconds)
  assert not np.array_equal(jax.device_get(floor.params["conv_in"]["kernel"]), before)
  figures = floor.figures(min(seconds))
  assert figures["devices"] == "8 × cpu" and figures["compile_seconds"] > 0
  # Less work than the step: no noise draws, masks or latent sampling.
  assert 0 < figures["flops_per_step"] < step.figures(1.0)["flops_per_step"]

  # Another UNet on the same weights (scripts/floor_vs_diffusers.py): here one that predicts
  # zeros, so the loss is the targets' mean square.
  zeros = benchmark.FloorTimer(small_config, step, lambda params, x, t, c, remat: (
      jnp.zeros_like(x) * params["conv_in"]["bias"][0]))
  _, loss = zeros._step()  # pylint: disable=protected-access
  target = np.asarray(jax.device_get(zeros.batch["target"]), np.float64)
  np.testing.assert_allclose(float(loss), np.mean(target ** 2), rtol=1e-6)
  assert zeros.figures(1.0)["flops_per_step"] < figures["flops_per_step"] / 2


def test_the_loop_is_train_py_over_the_timed_steps_with_random_class_images(small_config,
                                                                           monkeypatch):
  """--loop: train.train_and_evaluate itself, timed from its own metrics rows, next to the
  step alone; nothing is sampled and the temporary workdir is gone afterwards."""
  def no_sampling(*args, **kwargs):
    raise AssertionError("the loop timing must not generate class images or samples")
  monkeypatch.setattr(benchmark.sampling, "make_sampler", no_sampling)
  seen = {}
  real_train = benchmark.train.train_and_evaluate

  def spy(config, workdir):
    seen["config"], seen["workdir"] = config, workdir
    seen["class_images"] = sorted(os.listdir(config.data.class_dir))
    state = real_train(config, workdir)
    seen["rows"] = [row["step"] for row in conftest.metric_rows(workdir)]
    return state
  monkeypatch.setattr(benchmark.train, "train_and_evaluate", spy)
  small_config.log.every_steps = 2
  figures = benchmark.time_loop_and_step(small_config, warmup_steps=1, timed_steps=3)
  # Warm-up and timed steps rounded up to whole log intervals: 2 + 4 steps, rows every 2.
  assert seen["config"].train.steps == 6 and seen["rows"] == [2, 4, 6]
  assert seen["class_images"] == [f"class_{i:05d}.png" for i in range(2)]
  assert not os.path.exists(seen["workdir"])
  assert figures["loop_vs_step"] == figures["loop_seconds_per_step"] / figures["step_mean_seconds"]
  assert figures["loop_vs_step_each_round"] == f"{figures['loop_vs_step']:.3f}"
  # The same step in a loop that also prefetches, logs and checkpoints: within a few times it.
  assert 0.3 < figures["loop_vs_step"] < 5


def test_each_loop_is_set_against_the_steps_timed_around_it():
  """--loop_rounds: loop i against the mean of the step timings just before and after it."""
  steps = [[1.0, 3.0], [3.0, 3.0], [4.0, 6.0]]  # means 2, 3, 5
  brackets, ratios = benchmark.loop_ratios(steps, [2.75, 4.4])
  assert brackets == [2.5, 4.0]
  assert ratios == [1.1, 1.1]


def test_a_saves_cost_is_its_log_intervals_excess_over_the_others():
  """Rows every 5 steps, saves after steps 10 and 20: in the intervals logged at 15 and 25."""
  intervals = {10: 1.0, 15: 1.5, 20: 1.2, 25: 1.7, 30: 1.0}
  assert benchmark.checkpoint_seconds(intervals, 5, 10) == pytest.approx(1.6 - 1.0)
  # Saves after steps 12 and 24 (not log steps): in the intervals logged at 15 and 25.
  assert benchmark.checkpoint_seconds(intervals, 5, 12) == pytest.approx(1.6 - 1.0)
  assert benchmark.checkpoint_seconds(intervals, 5, 1000) is None


def test_time_in_turns_can_reverse_the_order_every_other_round():
  """scripts/floor_vs_diffusers.py: neither timer always runs after the other."""
  calls = []

  class Timer:
    def __init__(self, name):
      self.name = name

    def time_steps(self, count):
      calls.append((self.name, count))
      return [len(calls)] * (count - 1)

  a, b = Timer("a"), Timer("b")
  durations = benchmark.time_in_turns([a, b], 2, 3, alternate=True)
  steps = benchmark.ROUND_STEPS
  assert calls == [("a", 2), ("b", 2), ("a", steps), ("b", steps), ("b", steps), ("a", steps),
                   ("a", steps), ("b", steps)]
  assert durations == [[3] * (steps - 1) + [6] * (steps - 1) + [7] * (steps - 1),
                       [4] * (steps - 1) + [5] * (steps - 1) + [8] * (steps - 1)]


def test_loop_rounds_without_loop_is_refused_in_one_line():
  result = subprocess.run(
      [sys.executable, "-m", "dreambooth_jax.benchmark", "--config=configs/tiny.py",
       "--loop_rounds=3"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert "--loop_rounds counts loops: give it with --loop" in result.stderr
  assert "Traceback" not in result.stderr
