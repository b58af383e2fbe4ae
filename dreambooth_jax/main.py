"""Command line: python -m dreambooth_jax.main --config=configs/demo.py --workdir=/tmp/run."""

from dreambooth_jax import quiet  # noqa: F401  pylint: disable=unused-import

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dreambooth_jax import cli_errors, compilation_cache, distributed, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, export, samples.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad --config.* override reported in one line (exit 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    name = str(e).strip("\"'")
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and name in a]
    print(f"error: {', '.join(bad) or name}: unknown config field "
          "(the fields are listed in configs/common.py)", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  distributed.initialize(FLAGS.config.distributed)  # before anything touches a device
  compilation_cache.enable()
  with cli_errors.one_line_errors():
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  workdir = os.path.abspath(FLAGS.workdir)
  print(f"Done. Metrics: {workdir}/metrics.jsonl  checkpoints: {workdir}/checkpoints  "
        f"pipeline: {workdir}/export  samples: {workdir}/samples", file=sys.stderr)
  logging.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
