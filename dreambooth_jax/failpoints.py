"""Failpoints: test-only hooks that kill or fail a run at an exact point, not by timing.

Set DREAMBOOTH_JAX_FAILPOINTS to comma-separated `<point>:<index>:<action>` items, e.g.
`step:4:kill` (SIGKILL right after step 4 is dispatched). The points, and where they are:
  step                train.py: after the step that brings the state to <index> is dispatched
  checkpoint_commit   training/checkpoints.py: when the checkpoint of step <index> is written
                      but not yet committed
  export              models/pipeline.py (export_pipeline): when export/ is written to its
                      temporary folder but not yet renamed (index 0)
  class_image         data/class_images.py: when class image <index> is written to its .tmp
                      file but not yet renamed
  batch               train.py: the batch of step <index> (1-based), as built on the host
Actions: kill (SIGKILL), term (SIGTERM), hang (sleep until killed), enospc (raise "No space
left on device"); at `batch` only, nan (every image or latent of the batch is NaN, as a broken
input would make it). Unset in normal runs, where `at` and `corrupt` cost one dictionary lookup.

DREAMBOOTH_JAX_TRACE=<file> makes `trace` append one line `<process index> <point> <fields>`
per call to that file, so that a test of a multi-host run can see which process wrote which
file ("write <path>") and built which batch rows ("rows <step> <example ids>"). Unset, `trace`
too costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time

import numpy as np

ENV = "DREAMBOOTH_JAX_FAILPOINTS"
TRACE_ENV = "DREAMBOOTH_JAX_TRACE"


@functools.cache
def _faults(spec: str) -> dict[tuple[str, int], str]:
  faults = {}
  for item in filter(None, spec.split(",")):
    point, index, action = item.split(":")
    faults[(point, int(index))] = action
  return faults


def at(point: str, index: int) -> None:
  """Does the fault configured for (point, index), if any."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  action = _faults(spec).get((point, int(index)))
  if action is None:
    return
  if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  elif action == "term":
    os.kill(os.getpid(), signal.SIGTERM)
  elif action == "hang":
    print(f"fault: hanging at {point}:{index}", flush=True)
    while True:
      time.sleep(1)
  elif action == "enospc":
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a real full disk words it
  else:
    raise ValueError(f"{ENV}: unknown action {action!r}")


def corrupt(point: str, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch, with its float arrays but the row masks all NaN under `<point>:<index>:nan`."""
  spec = os.environ.get(ENV)
  if not spec or _faults(spec).get((point, int(index))) != "nan":
    return batch
  return {name: np.full_like(value, np.nan)
          if np.issubdtype(value.dtype, np.floating) and not name.endswith("_mask") else value
          for name, value in batch.items()}


def enabled() -> bool:
  return bool(os.environ.get(ENV))


def trace(point: str, *fields) -> None:
  """Appends `<process index> <point> <fields>` to $DREAMBOOTH_JAX_TRACE, when it is set."""
  path = os.environ.get(TRACE_ENV)
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top  (only a traced run pays for it here)
  line = " ".join(str(field) for field in (jax.process_index(), point, *fields))
  with open(path, "a") as f:  # one short O_APPEND write: processes never tear each other's
    f.write(line + "\n")
