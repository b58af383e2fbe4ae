"""Where training metrics go: workdir/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files (tensorboardX's protos, so no TensorFlow is needed)."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Mapping

import numpy as np

from dreambooth_jax import atomic_files, failpoints


def _import_tensorboardx() -> tuple:
  """tensorboardX imports torch, where it is installed, only to accept torch tensors, and we
  log numpy: hiding torch during that import saves ~1.5 s of every run's start and keeps
  torch's CUDA libraries out of a JAX process."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    # pylint: disable=import-outside-toplevel
    from tensorboardX import summary
    from tensorboardX.proto import event_pb2, summary_pb2
    from tensorboardX.record_writer import masked_crc32c
  finally:
    if hide:
      del sys.modules["torch"]
  return summary, event_pb2, summary_pb2, masked_crc32c


summary, event_pb2, summary_pb2, masked_crc32c = _import_tensorboardx()


class _EventFile:
  """One TensorBoard event file, each event written at once, as metrics.jsonl's rows are.

  tensorboardX's SummaryWriter hands events to a writer thread that flushes every few seconds,
  so a killed run lost the events of the steps its checkpoint holds, which the resumed run does
  not redo; here each event is one unbuffered write of its TFRecord (length, CRC, data, CRC).
  """

  def __init__(self, workdir: str):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"  # tensorboardX's
    self.path = os.path.join(workdir, name)
    self._file = open(self.path, "ab", buffering=0)  # pylint: disable=consider-using-with
    self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data +
                     struct.pack("<I", masked_crc32c(data)))

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Appends rows to metrics.jsonl and scalars/images to TensorBoard."""

  def __init__(self, workdir: str, start_step: int = 0):
    """Rows and events after start_step (work a resumed run redoes) are dropped first."""
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._truncate_after(start_step)
    self._events = _EventFile(workdir)
    if start_step:  # TensorBoard then hides what earlier runs logged at steps > start_step
      self._events.write(event_pb2.Event(
          wall_time=time.time(), step=start_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    failpoints.trace("write", os.path.join(workdir, "events.out.tfevents.*"))

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.jsonl_path):
      return
    with open(self.jsonl_path) as f:
      rows = [line for line in f if line.strip()]
    kept = []
    for line in rows:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        break  # a torn last line from a killed run
    atomic_files.write_text(self.jsonl_path, "".join(kept))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    failpoints.trace("write", self.jsonl_path)
    self._events.write(event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary_pb2.Summary(value=[summary.scalar(name, float(value)).value[0]
                                           for name, value in scalars.items()])))

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    self._events.write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary.image(name, image, dataformats="HWC")))

  def close(self) -> None:
    self._events.close()


class NullWriter:
  """What processes other than 0 write to: nothing."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    pass

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    pass

  def close(self) -> None:
    pass
