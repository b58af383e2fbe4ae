"""Our UNet's floor against diffusers 0.39's Flax UNet on the same weights (issue 22).

  python scripts/floor_vs_diffusers.py [--devices=4] [--rounds=40] [--config=configs/tiny.py]
      [--config.train.batch_size=4 ...] [--unet_channels=64,128,128]

The floor (benchmark.FloorTimer: the UNet's forward and backward pass and AdamW on the step's
rows, mesh, dtypes and donation) of a config (configs/tiny.py unless --config names another,
with any --config.x=y overrides) on N simulated CPU devices, once with our
UNet and once with diffusers' FlaxUNet2DConditionModel reading the same parameter tree (ours is
its layout), timed in interleaved rounds of 5 steps, the order alternating; medians, XLA's
FLOPs and the entry computation's fused kernels. Needs the test extra (diffusers 0.39, the
last release with Flax classes).
"""

import os
import re
import statistics
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dreambooth_jax import quiet  # noqa: E402,F401  pylint: disable=unused-import,g-import-not-at-top

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "tiny.py"),
                                "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_integer("devices", 4, "Simulated CPU devices.")
flags.DEFINE_integer("rounds", 40, "Rounds of 5 steps per UNet.")
flags.DEFINE_list("unet_channels", [], "Block channels of a random UNet to time instead of the "
                  "config's model (in the tiny pipeline, cross-attention in every block but the "
                  "deepest), e.g. 64,128,128: issue 22's 5.8 M-parameter UNet.")
FLAGS = flags.FLAGS


def unet_pipeline(channels: list[int], out_dir: str) -> str:
  """The tiny pipeline with a UNet of these block channels, written to out_dir."""
  from dreambooth_jax.models import builtin  # pylint: disable=g-import-not-at-top
  attention_blocks = len(channels) - 1
  unet = dict(block_out_channels=channels,
              down_block_types=["CrossAttnDownBlock2D"] * attention_blocks + ["DownBlock2D"],
              up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * attention_blocks)
  return builtin.build_tiny_pipeline(out_dir, unet_overrides=unet)


def main(argv):
  del argv
  from dreambooth_jax import sharding  # pylint: disable=g-import-not-at-top
  devices = sharding.use_devices(FLAGS.devices)
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import benchmark  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.models import pipeline  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  with tempfile.TemporaryDirectory() as scratch:  # read once, when the step timer loads it
    if FLAGS.unet_channels:
      config.unlock().model.pretrained = unet_pipeline([int(c) for c in FLAGS.unet_channels],
                                                       os.path.join(scratch, "pipeline"))
    step = benchmark.StepTimer(config, devices)
  theirs = diffusers.FlaxUNet2DConditionModel.from_config(
      pipeline.torch_config("unet", step.components.configs["unet"]))

  def diffusers_predict(params, noisy_latents, timesteps, encoder_hidden_states, remat=False):
    if remat:
      raise ValueError("train.remat: diffusers' Flax UNet has no per-block remat; leave it off")
    return theirs.apply({"params": params}, noisy_latents, timesteps,
                        encoder_hidden_states).sample

  timers = {"ours": benchmark.FloorTimer(config, step),
            "diffusers 0.39 Flax": benchmark.FloorTimer(config, step, diffusers_predict)}
  # Each goes first in every other round, so that neither always runs after the other.
  seconds = dict(zip(timers, benchmark.time_in_turns(list(timers.values()), 3, FLAGS.rounds,
                                                     alternate=True)))
  ours = statistics.median(seconds["ours"])
  timed = FLAGS.rounds * (benchmark.ROUND_STEPS - 1)
  unet_size = sum(leaf.size for leaf in jax.tree.leaves(step.state.params["unet"]))
  print(f"{FLAGS.devices} devices, {config.train.batch_size} + {config.train.batch_size} rows, "
        f"UNet of {unet_size / 1e6:.2f} M parameters, {timed} timed steps per UNet")
  print("| floor with | s/step | vs ours | GFLOP/step/device | fused kernels |")
  print("| --- | --- | --- | --- | --- |")
  for name, timer in timers.items():
    median = statistics.median(seconds[name])
    flops = timer.figures(median)["flops_per_step"]
    text = timer.compiled.as_text()
    fusions = len(re.findall(r" fusion\(", text[text.index("ENTRY"):]))
    print(f"| {name} | {median:.4f} | {median / ours:.3f}× | {flops / 1e9:.3f} | {fusions} |")


if __name__ == "__main__":
  app.run(main)
