"""The trainer end to end: files on disk, exact resume, offline export (the demo and sample
CLIs: tests/test_demo.py)."""

import io
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from dreambooth_jax import models, train
from dreambooth_jax.data import input_pipeline
from dreambooth_jax.training import checkpoints, step as train_step
from tests import conftest

_rows = conftest.metric_rows


def test_run_writes_metrics_checkpoints_export_and_samples(straight_run):
  workdir, state = straight_run
  assert int(state.step) == 6
  rows = _rows(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "instance_loss", "prior_loss", "learning_rate", "steps_per_sec",
              "grad_norm"):
    assert all(np.isfinite(row[key]) for row in rows), key
  for row in rows:  # λ = 1
    assert row["loss"] == pytest.approx(row["instance_loss"] + row["prior_loss"], rel=1e-5)
  # warmup 2 then linear decay over 4 steps: lr at steps 0..5.
  np.testing.assert_allclose([row["learning_rate"] for row in rows],
                             [0, 5e-5, 1e-4, 7.5e-5, 5e-5, 2.5e-5], atol=1e-10)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert len(os.listdir(os.path.join(workdir, "class_images"))) == 2
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 6
  export = os.path.join(workdir, "export")
  assert sorted(os.listdir(export)) == ["model_index.json", "scheduler", "text_encoder",
                                        "tokenizer", "unet", "vae"]
  assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["step_000003.png",
                                                               "step_000006.png"]
  assert Image.open(os.path.join(workdir, "eval", "step_000006.png")).size == (2 * 32, 32)
  # eval.prompts = () samples sample.prompts: the last validation grid (the final weights, the
  # same seed and a sampler of the same settings) is the samples' grid, pixel for pixel.
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["eval"]["prompts"] == [] and len(recorded["sample"]["prompts"]) == 1
  np.testing.assert_array_equal(
      np.asarray(Image.open(os.path.join(workdir, "eval", "step_000006.png"))),
      np.asarray(Image.open(os.path.join(workdir, "samples", "grid.png"))))
  with open(os.path.join(workdir, "prompts.json")) as f:
    assert json.load(f) == {"identifier": "sks", "instance_prompt": "a photo of sks toy",
                            "class_prompt": "a photo of toy"}
  grid = Image.open(os.path.join(workdir, "samples", "grid.png"))
  assert grid.size == (2 * 32, 32)
  assert sorted(n for n in os.listdir(os.path.join(workdir, "samples")) if "_" in n) == [
      "prompt0_000.png", "prompt0_001.png"]


def _tensorboard_events(workdir: str) -> tuple[dict, dict]:
  """(images {(tag, step): HWC uint8}, scalars {(tag, step): value}) of the workdir's event
  files, read as TFRecords of Event protos (tensorboardX's own protos, no TensorFlow)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  images, scalars = {}, {}
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(workdir, name), "rb") as f:
      data = f.read()
    position = 0
    while position < len(data):  # length (8 bytes), its CRC (4), the record, its CRC (4)
      (length,) = struct.unpack("<Q", data[position:position + 8])
      event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("image"):
          images[(value.tag, event.step)] = np.asarray(
              Image.open(io.BytesIO(value.image.encoded_image_string)))
        elif value.HasField("simple_value"):
          scalars[(value.tag, event.step)] = value.simple_value
  return images, scalars


def test_validation_grids_samples_and_metrics_are_in_tensorboard(straight_run):
  """eval.every_steps=3: the grids of steps 3 and 6 are TensorBoard images "eval", pixel for
  pixel the PNGs in workdir/eval; the samples' grid is "samples"; the scalars are the rows of
  metrics.jsonl (as float32)."""
  workdir, _ = straight_run
  images, scalars = _tensorboard_events(workdir)
  assert sorted(images) == [("eval", 3), ("eval", 6), ("samples", 6)]
  for step in (3, 6):
    np.testing.assert_array_equal(
        images[("eval", step)],
        np.asarray(Image.open(os.path.join(workdir, "eval", f"step_{step:06d}.png"))))
  np.testing.assert_array_equal(images[("samples", 6)],
                                np.asarray(Image.open(os.path.join(workdir, "samples",
                                                                   "grid.png"))))
  assert not np.array_equal(images[("eval", 3)], images[("eval", 6)])  # the weights moved
  for row in _rows(workdir):
    for key in ("loss", "learning_rate", "grad_norm"):
      assert scalars[(key, row["step"])] == np.float32(row[key]), (key, row["step"])


class _Crash(Exception):
  pass


def _count_metric_pulls(monkeypatch) -> list[tuple[int, int]]:
  """Records (run, step of that run) of each jax.device_get given a step's metrics (or some
  of them): the step function's outputs are kept, so their leaves are known by identity."""
  runs, pulls = [], []
  real_jit_on_mesh, real_device_get = train_step.jit_on_mesh, jax.device_get

  def counting_jit_on_mesh(*args, **kwargs):
    step_fn, outputs = real_jit_on_mesh(*args, **kwargs), []
    runs.append(outputs)

    def counted_step(state, frozen, batch):
      state, metrics = step_fn(state, frozen, batch)
      # The metrics are kept alive, so that their leaves' ids stay theirs.
      outputs.append(({id(leaf) for leaf in jax.tree.leaves(metrics)}, metrics))
      return state, metrics
    return counted_step

  def counting_device_get(x):
    ids = {id(leaf) for leaf in jax.tree.leaves(x)}
    for run, outputs in enumerate(runs):
      for index, (leaf_ids, _) in enumerate(outputs):
        if ids & leaf_ids:
          pulls.append((run, index + 1))
    return real_device_get(x)

  monkeypatch.setattr(train_step, "jit_on_mesh", counting_jit_on_mesh)
  monkeypatch.setattr(jax, "device_get", counting_device_get)
  return pulls


@pytest.mark.parametrize("crash_at", [1, 3, 5])
def test_interrupted_run_resumes_to_identical_state(straight_run, small_config, tmp_path,
                                                    monkeypatch, crash_at):
  """Crash while building the batch of step index `crash_at`, rerun: the same end state.

  1: before any checkpoint (starts over); 3: just after checkpoint 3; 5: between checkpoints
  (steps 4 and 5 are redone). Folded in, as each needs a run: crash_at=1 trains on a class
  folder of one's own, crash_at=5 logs every 2 steps (which changes no number).
  """
  workdir = str(tmp_path / "resumed")
  # Export-only (the training must not see it); its files are checked once, below.
  small_config.export.fp16_variant = crash_at == 5
  if crash_at == 5:
    small_config.log.every_steps = 2
  log_every = small_config.log.every_steps
  straight_class_dir = os.path.join(straight_run[0], "class_images")
  if crash_at == 1:  # data.class_dir holding class image 0 already (the straight run's)
    class_dir = tmp_path / "my_class_images"
    class_dir.mkdir()
    shutil.copyfile(os.path.join(straight_class_dir, "class_00000.png"),
                    class_dir / "class_00000.png")
    kept = os.stat(class_dir / "class_00000.png")
    small_config.data.class_dir = str(class_dir)
  pulls = _count_metric_pulls(monkeypatch)
  original_batch = input_pipeline.DreamBoothData.batch
  calls = []

  def crashing_batch(self, step, rows=slice(None)):
    calls.append(step)
    if step == crash_at and len(calls) == crash_at + 1:  # first run only
      raise _Crash()
    return original_batch(self, step, rows)

  monkeypatch.setattr(input_pipeline.DreamBoothData, "batch", crashing_batch)
  with pytest.raises(_Crash):
    train.train_and_evaluate(small_config, workdir)
  # Batches are built train.prefetch_batches steps ahead: the crash surfaces at its own step.
  first_run_calls = len(calls)
  assert calls[:crash_at + 1] == list(range(crash_at + 1))
  assert first_run_calls <= crash_at + 1 + small_config.train.prefetch_batches
  logged = lambda first, last: [s for s in range(first, last + 1) if s % log_every == 0 or s == 6]
  assert [row["step"] for row in _rows(workdir)] == logged(1, crash_at)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  expected_checkpoints = ["3"] if crash_at >= 3 else []
  assert sorted(os.listdir(checkpoint_dir)) == expected_checkpoints
  assert not os.path.exists(os.path.join(workdir, "export"))
  if crash_at == 1:  # the missing image 1 was generated into it, image 0 left as it was
    assert sorted(os.listdir(class_dir)) == ["class_00000.png", "class_00001.png"]
    now = os.stat(class_dir / "class_00000.png")
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    with open(class_dir / "class_00001.png", "rb") as mine, open(
        os.path.join(straight_class_dir, "class_00001.png"), "rb") as straight:
      assert mine.read() == straight.read()
    assert not os.path.exists(os.path.join(workdir, "class_images"))

  state = jax.device_get(train.train_and_evaluate(small_config, workdir))
  resumed_from = 3 if crash_at >= 3 else 0
  assert calls[first_run_calls:] == list(range(resumed_from, 6))
  # Metrics reach the host only at the logged steps, once each: no other pull of them.
  assert pulls == [(0, s) for s in logged(1, crash_at)] + [
      (1, s - resumed_from) for s in logged(resumed_from + 1, 6)]
  _, straight_state = straight_run
  assert int(state.step) == 6
  jax.tree.map(np.testing.assert_array_equal, state, straight_state)
  rows, straight_rows = _rows(workdir), {row["step"]: row for row in _rows(straight_run[0])}
  assert [row["step"] for row in rows] == logged(1, 6)
  for row in rows:
    for key in ("loss", "instance_loss", "prior_loss", "learning_rate", "grad_norm"):
      assert row[key] == straight_rows[row["step"]][key], (row["step"], key)
  if crash_at != 5:
    return
  # export.fp16_variant=true: float16 copies beside the float32 files, which load (as every
  # stored dtype does) into float32 parameters and a float32 TrainState.
  export = os.path.join(workdir, "export")
  for name, file in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
    for variant, dtype in (("", "float32"), (".fp16", "float16")):
      path = os.path.join(export, name, f"{file}{variant}.safetensors")
      tensors = safetensors.numpy.load_file(path)
      assert {v.dtype.name for v in tensors.values() if v.dtype.kind == "f"} == {dtype}
  _, half = models.load_pretrained(export, variant="fp16")
  as_half = lambda x: np.asarray(x).astype(np.float16).astype(np.float32)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, as_half(b), strict=True),
               half["unet"], state.params["unet"])
  optimizer = train_step.make_optimizer(small_config.train)
  fresh = train_step.create_train_state(half, optimizer, 0, False, "float32")
  assert {leaf.dtype.name for leaf in jax.tree.leaves((fresh.params, fresh.opt_state))
          if jnp.issubdtype(leaf.dtype, jnp.floating)} == {"float32"}


def test_checkpoint_restores_exactly(straight_run):
  """From the arrays alone: no per-array sharding file is written (README, the loop's
  checkpoints); the restore takes the target's shardings."""
  workdir, state = straight_run
  manager = checkpoints.make_manager(workdir, max_to_keep=2)
  assert manager.latest_step() == 6
  item = os.path.join(workdir, "checkpoints", "6", "default")
  assert "_METADATA" in os.listdir(item) and "_sharding" not in os.listdir(item)
  restored = jax.device_get(checkpoints.restore_latest(manager, state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_export_loads_back_with_the_trained_weights(straight_run):
  """The export is re-read by our loader exactly (diffusers' PyTorch loading of the same
  folder is tests/models/test_export.py's)."""
  workdir, state = straight_run
  _, params = models.load_pretrained(os.path.join(workdir, "export"))
  jax.tree.map(np.testing.assert_array_equal, params["unet"], state.params["unet"])

