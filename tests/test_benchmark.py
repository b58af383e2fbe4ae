"""The benchmark measures the real train step: figures present, consistent and positive."""

import pytest

from dreambooth_jax import benchmark


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
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, flops):
  assert benchmark.peak_flops(kind) == flops
