"""The trainer end to end: files on disk, exact resume, offline export (the demo and sample
CLIs: tests/test_demo.py)."""

import json
import os

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


class _Crash(Exception):
  pass


@pytest.mark.parametrize("crash_at", [1, 3, 5])
def test_interrupted_run_resumes_to_identical_state(straight_run, small_config, tmp_path,
                                                    monkeypatch, crash_at):
  """Crash while building the batch of step index `crash_at`, rerun: the same end state.

  1: before any checkpoint (starts over); 3: just after checkpoint 3; 5: between checkpoints
  (steps 4 and 5 are redone).
  """
  workdir = str(tmp_path / "resumed")
  # Export-only (the training must not see it); its files are checked once, below.
  small_config.export.fp16_variant = crash_at == 5
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
  assert [row["step"] for row in _rows(workdir)] == list(range(1, crash_at + 1))
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  expected_checkpoints = ["3"] if crash_at >= 3 else []
  assert sorted(os.listdir(checkpoint_dir)) == expected_checkpoints
  assert not os.path.exists(os.path.join(workdir, "export"))

  state = jax.device_get(train.train_and_evaluate(small_config, workdir))
  resumed_from = 3 if crash_at >= 3 else 0
  assert calls[first_run_calls:] == list(range(resumed_from, 6))
  _, straight_state = straight_run
  assert int(state.step) == 6
  jax.tree.map(np.testing.assert_array_equal, state, straight_state)
  rows, straight_rows = _rows(workdir), _rows(straight_run[0])
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
  for row, straight_row in zip(rows, straight_rows):
    for key in ("loss", "instance_loss", "prior_loss", "learning_rate", "grad_norm"):
      assert row[key] == straight_row[key], (row["step"], key)
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
  workdir, state = straight_run
  manager = checkpoints.make_manager(workdir, max_to_keep=2)
  assert manager.latest_step() == 6
  restored = jax.device_get(checkpoints.restore_latest(manager, state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_export_loads_back_with_the_trained_weights(straight_run):
  """The export is re-read by our loader exactly (diffusers' PyTorch loading of the same
  folder is tests/models/test_export.py's)."""
  workdir, state = straight_run
  _, params = models.load_pretrained(os.path.join(workdir, "export"))
  jax.tree.map(np.testing.assert_array_equal, params["unet"], state.params["unet"])
