"""Our UNet's floor against diffusers 0.39's Flax UNet on the same weights (issue 22).

  python scripts/floor_vs_diffusers.py [--devices=4] [--rounds=40]

The floor (benchmark.FloorTimer: the UNet's forward and backward pass and AdamW on the step's
rows, mesh, dtypes and donation) of configs/tiny.py on N simulated CPU devices, once with our
UNet and once with diffusers' FlaxUNet2DConditionModel reading the same parameter tree (ours is
its layout), timed in interleaved rounds of 5 steps, the order alternating; medians, XLA's
FLOPs and the entry computation's fused kernels. Needs the test extra (diffusers 0.39, the
last release with Flax classes).
"""

import os
import re
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreambooth_jax import quiet  # noqa: E402,F401  pylint: disable=unused-import,g-import-not-at-top

flags.DEFINE_integer("devices", 4, "Simulated CPU devices.")
flags.DEFINE_integer("rounds", 40, "Rounds of 5 steps per UNet.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from dreambooth_jax import sharding  # pylint: disable=g-import-not-at-top
  devices = sharding.use_devices(FLAGS.devices)
  import diffusers  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import benchmark  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.models import pipeline  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  step = benchmark.StepTimer(config, devices)
  theirs = diffusers.FlaxUNet2DConditionModel.from_config(
      pipeline.torch_config("unet", step.components.configs["unet"]))

  def diffusers_predict(params, noisy_latents, timesteps, encoder_hidden_states, remat=False):
    del remat  # off in configs/tiny.py
    return theirs.apply({"params": params}, noisy_latents, timesteps,
                        encoder_hidden_states).sample

  timers = {"ours": benchmark.FloorTimer(config, step),
            "diffusers 0.39 Flax": benchmark.FloorTimer(config, step, diffusers_predict)}
  # Each goes first in every other round, so that neither always runs after the other.
  seconds = dict(zip(timers, benchmark.time_in_turns(list(timers.values()), 3, FLAGS.rounds,
                                                     alternate=True)))
  ours = statistics.median(seconds["ours"])
  timed = FLAGS.rounds * (benchmark.ROUND_STEPS - 1)
  print(f"{FLAGS.devices} devices, {timed} timed steps per UNet")
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
