"""What issue 22's findings were worth: the step with and without each, against the floor.

  python scripts/step_findings.py [--devices=4] [--rounds=25]

configs/tiny.py on N simulated CPU devices, timed as `benchmark --compare` times (rounds of 5
steps per variant, taking turns, medians): the step as configured; the step fed batches without
their row counts, so that its loss sums the masks over the devices between the forward and the
backward pass (the step before the counts existed, its all-reduces counted); the floor. Then the
CPU seconds of one checkpoint save of the tiny training state: every leaf an array of its own,
with Orbax's per-array sharding file (its default) and without; the leaves below
sharding.MIN_FSDP_SIZE elements packed into one array per dtype (the first packing); and as we
save it, every leaf whole on each device and below checkpoints.PACK_MAX_SIZE elements packed.
"""

import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreambooth_jax import quiet  # noqa: E402,F401  pylint: disable=unused-import,g-import-not-at-top

flags.DEFINE_integer("devices", 4, "Simulated CPU devices.")
flags.DEFINE_integer("rounds", 25, "Rounds of 5 steps per variant.")
flags.DEFINE_integer("saves", 5, "Checkpoint saves timed per handler.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import statistics  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import sharding  # pylint: disable=g-import-not-at-top
  devices = sharding.use_devices(FLAGS.devices)
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from dreambooth_jax import benchmark  # pylint: disable=g-import-not-at-top
  from dreambooth_jax.training import checkpoints  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  timers = {
      "as configured": benchmark.StepTimer(config, devices),
      "masks summed over the devices (no row counts in the batch)": benchmark.StepTimer(
          config, devices, left_out=("instance_count", "prior_count")),
  }
  timers[benchmark.FLOOR] = benchmark.FloorTimer(config, timers["as configured"])
  all_reduces = {name: timer.compiled.as_text().count(" all-reduce(")
                 for name, timer in timers.items()}
  seconds = dict(zip(timers, benchmark.time_in_turns(list(timers.values()), 3, FLAGS.rounds)))
  floor = statistics.median(seconds[benchmark.FLOOR])
  timed = FLAGS.rounds * (benchmark.ROUND_STEPS - 1)
  print(f"{FLAGS.devices} devices, {timed} timed steps per variant")
  print("| step | s/step | vs floor | all-reduces |\n| --- | --- | --- | --- |")
  for name, values in seconds.items():
    median = statistics.median(values)
    print(f"| {name} | {median:.4f} | {median / floor:.3f}× | {all_reduces[name]} |")

  state = timers["as configured"].state
  print(f"\ncheckpoint of the tiny training state ({len(jax.tree.leaves(state))} arrays, "
        f"{sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6:.1f} MB)")
  print("| save | CPU s per save (median) |\n| --- | --- |")
  ours = checkpoints._is_packed  # pylint: disable=protected-access

  def below_fsdp_size(leaf):  # the rule of commits d09c094 to 761dc0c
    return (leaf.size < sharding.MIN_FSDP_SIZE
            and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))

  for name, sharding_file, packed in (
      ("every leaf an array, with the sharding file (Orbax's default)", True, None),
      ("every leaf an array, no sharding file", False, None),
      ("leaves below MIN_FSDP_SIZE elements packed", False, below_fsdp_size),
      ("whole leaves below PACK_MAX_SIZE elements packed (ours)", False, ours)):
    checkpoints._is_packed = packed or ours  # pylint: disable=protected-access
    with tempfile.TemporaryDirectory() as workdir:
      manager = checkpoints.make_manager(workdir, 2)
      if sharding_file:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
      cpu = []
      for _ in range(FLAGS.saves):
        state = state.replace(step=state.step + 1)  # a new step each save
        start = time.process_time()
        if packed:
          checkpoints.save(manager, state)
        else:  # the TrainState's own tree, as saved before the packing
          manager.save(int(state.step), args=ocp.args.StandardSave(state))
        checkpoints.wait(manager)
        cpu.append(time.process_time() - start)
      print(f"| {name} | {statistics.median(cpu):.3f} |")


if __name__ == "__main__":
  app.run(main)
