"""Where training metrics go: workdir/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files (tensorboardX, so no TensorFlow is needed)."""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping

import numpy as np

from dreambooth_jax import atomic_files, failpoints


def _import_summary_writer() -> type:
  """tensorboardX imports torch, where it is installed, only to accept torch tensors, and we
  log numpy: hiding torch during that import saves ~1.5 s of every run's start and keeps
  torch's CUDA libraries out of a JAX process."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _import_summary_writer()


class MetricWriter:
  """Appends rows to metrics.jsonl and scalars/images to TensorBoard."""

  def __init__(self, workdir: str, start_step: int = 0):
    """Rows and events after start_step (work a resumed run redoes) are dropped first."""
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._truncate_after(start_step)
    self._tensorboard = SummaryWriter(logdir=workdir, flush_secs=30,
                                      purge_step=start_step + 1 if start_step else None)
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
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), global_step=step)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    self._tensorboard.add_image(name, image, global_step=step, dataformats="HWC")

  def flush(self) -> None:
    self._tensorboard.flush()

  def close(self) -> None:
    self._tensorboard.close()


class NullWriter:
  """What processes other than 0 write to: nothing."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    pass

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass
