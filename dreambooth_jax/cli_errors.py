"""How the CLIs end on an error: one line on stderr and an exit status that says what happened.

2: an input to fix (config field, data file, model path). 1: the run failed (non-finite loss,
checkpoint write, workdir held by another run). 143: stopped on SIGTERM with its state saved.
"""

import contextlib
import sys

from dreambooth_jax import errors
from dreambooth_jax.training import preemption

INPUT_ERRORS = (errors.ConfigError, errors.DataError, errors.ModelLoadError, errors.MeshError)
RUN_ERRORS = (errors.NonFiniteLossError, errors.CheckpointError, errors.WorkdirLockedError)


@contextlib.contextmanager
def one_line_errors():
  try:
    yield
  except INPUT_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RUN_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except errors.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)
