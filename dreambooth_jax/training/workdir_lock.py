"""One run per workdir: an exclusive flock on workdir/lock, held for the whole run.

The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run
is never stale: the next run takes it over. The file records who holds it, for the message a
second run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from absl import logging

from dreambooth_jax import failpoints
from dreambooth_jax.errors import WorkdirLockedError

LOCK_NAME = "lock"


def _describe(holder: str) -> str:
  try:
    info = json.loads(holder)
    return f"pid {info['pid']} on {info['host']} (started {info['started']})"
  except (ValueError, KeyError, TypeError):
    return "another process"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds workdir/lock for the duration; raises WorkdirLockedError if a live run holds it."""
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace")
      raise WorkdirLockedError(
          f"--workdir: {workdir} is in use by {_describe(holder)}; wait for it to finish, stop "
          f"it, or use another --workdir") from None
    except OSError as e:  # a filesystem without locks (some FUSE mounts): warn and go on
      logging.warning("--workdir: %s cannot be locked (%s); make sure no other run uses it",
                      workdir, e)
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    if previous.strip():
      logging.warning("Taking over the lock of %s, which is no longer running",
                      _describe(previous))
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    os.fsync(fd)
    failpoints.trace("write", path)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a clean exit leaves no holder to report
  finally:
    os.close(fd)
