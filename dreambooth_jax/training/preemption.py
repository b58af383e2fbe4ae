"""SIGTERM (a TPU VM maintenance event, `kill`, a scheduler) ends a run at a step boundary.

The handler only records the request; the training loop finishes the step it is in, saves a
checkpoint and raises errors.Preempted, so the same command resumes from that step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_CODE = 143  # 128 + SIGTERM: what schedulers expect from a terminated job


class SigtermWatcher:
  """Context manager: while active, SIGTERM sets `requested` instead of killing the process.

  enabled=False leaves SIGTERM to JAX: with several processes, jax.distributed's preemption
  service catches it and agrees with the other hosts on the step at which all of them stop
  (CheckpointManager.reached_preemption), so that no host waits for one that left.
  """

  def __init__(self, enabled: bool = True):
    self.requested = False
    self._enabled = enabled
    self._previous = None

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del signum, frame
    self.requested = True

  def __enter__(self) -> "SigtermWatcher":
    if self._enabled and threading.current_thread() is threading.main_thread():
      # (signals can only be handled on the main thread)
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
