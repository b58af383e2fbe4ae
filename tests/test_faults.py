"""Faults done for real: SIGKILL and SIGTERM at chosen points, a second run on a held workdir,
a full disk, NaN losses and config changes on resume. Every interrupted run must end where the
uninterrupted one (conftest's straight_run) does, bit for bit.

The subprocess runs share one workdir timeline (the module fixture), one fault per run:
  1. kill -9 while class image 1 is being written (image 0 is complete)
  2. a run hangs at step 5 (holding the lock); a second run is refused; kill -9 the first
  3. kill -9 after checkpoint 6's files are written, before Orbax commits it
  4. the disk is full when checkpoint 6 commits (checkpoint.max_to_keep=1): exit status 1,
     checkpoint 3 kept
  5. SIGTERM at step 4
  6. step 5's batch is NaN, step 5 a checkpoint step but no log step: the check before the
     checkpoint stops the run with exit status 1, keeping checkpoint 4
  7. kill -9 while export/ is being written
  8. a clean run finishes the job
After each, metrics.jsonl and the TensorBoard events (as TensorBoard reads them) hold the same
steps. Beside them, on a copy of the straight run, a resume with changed math is refused.
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from dreambooth_jax import cli_errors, errors, failpoints, models, train
from dreambooth_jax.data import input_pipeline
from dreambooth_jax.training import (checkpoints, config_check, preemption, step as train_step,
                                     workdir_lock)
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_rows = conftest.metric_rows


def _small_flags(tiny_dir, instance_dir):
  """The CLI flags giving conftest.make_small_config."""
  return ["--config=configs/tiny.py", f"--config.model.pretrained={tiny_dir}",
          f"--config.data.instance_dir={instance_dir}", "--config.data.num_class_images=2",
          "--config.class_images.num_inference_steps=2", "--config.train.steps=6",
          "--config.train.batch_size=1", "--config.train.warmup_steps=2",
          "--config.train.lr_schedule=linear", "--config.checkpoint.every_steps=3",
          "--config.log.every_steps=1", "--config.sample.num_images=2",
          "--config.sample.num_inference_steps=2", "--config.eval.every_steps=3",
          "--config.eval.num_inference_steps=2"]


def _command(workdir, flags):
  return [sys.executable, "-m", "dreambooth_jax.main", f"--workdir={workdir}", *flags]


def _env(fault=None):
  env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
  if fault:
    env[failpoints.ENV] = fault
  return env


def _run(workdir, flags, fault=None, **env):
  return subprocess.run(_command(workdir, flags), cwd=REPO, env=dict(_env(fault), **env),
                        capture_output=True, text=True, timeout=600, check=False)


def _assert_ended_with(run, returncode, last_line):
  """The run's exit status and the whole last line of its stderr (the `error:` line)."""
  assert run["returncode"] == returncode, run["stderr"][-3000:]
  assert run["stderr"].strip().splitlines()[-1] == last_line


def _listing(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else None


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _events(path):
  """The Event protos of one TensorBoard event file: TFRecords of (length, its masked CRC32C,
  data, its masked CRC32C); a torn last record, as a killed writer may leave, ends the file."""
  data, offset, events = _read(path), 0, []
  crc = masked_crc32c
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == crc(header), path
    (length,) = struct.unpack("<Q", header)
    end = offset + 12 + length + 4
    if end > len(data):
      break
    body = data[offset + 12:end - 4]
    assert struct.unpack("<I", data[end - 4:end])[0] == crc(body), path
    events.append(event_pb2.Event.FromString(body))
    offset = end
  return events


def _tensorboard_view(workdir):
  """{tag: [(step, scalar value or None for an image)]} as TensorBoard shows the workdir: its
  event files read in name (= start time) order, a SessionLog.START at step s (a resumed run's
  first event) hiding what earlier files logged at steps >= s (TensorBoard's
  purge_orphaned_data, on by default, for files of version brain.Event:2)."""
  view = {}
  for name in sorted(n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")):
    for event in _events(os.path.join(workdir, name)):
      if event.HasField("file_version"):
        assert event.file_version == "brain.Event:2"
      if event.session_log.status == event_pb2.SessionLog.START:
        view = {tag: [(step, value) for step, value in points if step < event.step]
                for tag, points in view.items()}
      for value in event.summary.value:
        view.setdefault(value.tag, []).append(
            (event.step, value.simple_value if value.HasField("simple_value") else None))
  return view


def _tensorboard_steps(workdir):
  return [step for step, _ in _tensorboard_view(workdir).get("loss", [])]


@pytest.fixture(scope="module")
def timeline(tmp_path_factory, tiny_dir, instance_dir, straight_run):
  """Runs the eight faulty/clean runs on one workdir and records what each left behind."""
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  flags = _small_flags(tiny_dir, instance_dir)
  class_dir = os.path.join(workdir, "class_images")
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  seen = {}

  # Beside the timeline (its own workdir, a copy of the straight run: it fails before any work,
  # so it runs while run 1 does): the same command with changed math on a finished run.
  changed_workdir = str(tmp_path_factory.mktemp("changed") / "run")
  shutil.copytree(straight_run[0], changed_workdir)
  changed_before = {name: os.stat(os.path.join(changed_workdir, name)).st_mtime_ns
                    for name in ("config.json", "metrics.jsonl")}
  changed_log = open(os.path.join(os.path.dirname(changed_workdir), "stderr"), "w+")
  changed = subprocess.Popen(
      _command(changed_workdir, flags + ["--config.data.resolution=64",
                                         "--config.train.learning_rate=0.0002"]),
      cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=changed_log, text=True)

  # 1. kill -9 inside class-image generation.
  result = _run(workdir, flags, fault="class_image:1:kill")
  seen["class_kill"] = dict(returncode=result.returncode, class_files=_listing(class_dir),
                            checkpoints=_listing(checkpoint_dir))
  image0 = os.path.join(class_dir, "class_00000.png")
  seen["class_kill"]["image0"] = (_read(image0), os.stat(image0).st_mtime_ns)

  # 2. a live run holds the workdir; a second run is refused; then kill -9 mid-step.
  with open(os.path.join(workdir, "hang.log"), "w") as log:
    holder = subprocess.Popen(_command(workdir, flags), cwd=REPO, env=_env("step:5:hang"),
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
      line = holder.stdout.readline()  # blocks until the fault hook reports it is hanging
      seen["hang_line"] = line.strip()
      second = _run(workdir, flags)  # the same command, while the first one holds the lock
      seen["second_run"] = dict(returncode=second.returncode, stderr=second.stderr)
      seen["holder_pid"] = holder.pid
      # Checkpoint 3's asynchronous save commits in the background while step 5 runs; kill
      # only once it has, so that the kill lands mid-step with exactly one checkpoint.
      deadline = time.monotonic() + 300
      while not os.path.isdir(os.path.join(checkpoint_dir, "3")) and time.monotonic() < deadline:
        time.sleep(0.2)
    finally:
      holder.send_signal(signal.SIGKILL)
      holder.wait(timeout=60)
  seen["step_kill"] = dict(returncode=holder.returncode, checkpoints=_listing(checkpoint_dir),
                           rows=[row["step"] for row in _rows(workdir)],
                           tensorboard=_tensorboard_steps(workdir),
                           class_files=_listing(class_dir),
                           image0=(_read(image0), os.stat(image0).st_mtime_ns),
                           image1=_read(os.path.join(class_dir, "class_00001.png")))

  # 3. kill -9 during the asynchronous save of checkpoint 6, before its commit.
  result = _run(workdir, flags, fault="checkpoint_commit:6:kill")
  seen["commit_kill"] = dict(returncode=result.returncode, stderr=result.stderr,
                             checkpoints=_listing(checkpoint_dir),
                             rows=[row["step"] for row in _rows(workdir)],
                             tensorboard=_tensorboard_steps(workdir))

  # 4. the disk full when checkpoint 6 commits; checkpoint.max_to_keep=1 (checkpoint.* may
  # change on resume), so that checkpoint 3 would be gone if it were deleted before the commit.
  result = _run(workdir, flags + ["--config.checkpoint.max_to_keep=1"],
                fault="checkpoint_commit:6:enospc")
  seen["disk_full"] = dict(returncode=result.returncode, stderr=result.stderr,
                           workdir=_listing(workdir), checkpoints=_listing(checkpoint_dir),
                           rows=[row["step"] for row in _rows(workdir)],
                           tensorboard=_tensorboard_steps(workdir))

  # 5. SIGTERM at step 4.
  result = _run(workdir, flags, fault="step:4:term")
  seen["sigterm"] = dict(returncode=result.returncode, stderr=result.stderr,
                         checkpoints=_listing(checkpoint_dir),
                         rows=[row["step"] for row in _rows(workdir)],
                         tensorboard=_tensorboard_steps(workdir),
                         cached_steps=[name for name in os.listdir(
                             os.environ["JAX_COMPILATION_CACHE_DIR"])
                                       if name.startswith("jit_train_step")])

  # 6. a non-finite loss at step 5 (its batch made NaN), caught before checkpoint 5 (log.* and
  # checkpoint.* may change on resume; the next run's config is the timeline's again).
  nan_flags = flags + ["--config.log.every_steps=6", "--config.checkpoint.every_steps=5"]
  # It is also the resumed run of a preempted one: JAX_LOG_COMPILES shows where its train step
  # came from.
  result = _run(workdir, nan_flags, fault="batch:5:nan", JAX_LOG_COMPILES="1")
  seen["nan"] = dict(returncode=result.returncode, stderr=result.stderr,
                     workdir=_listing(workdir), checkpoints=_listing(checkpoint_dir),
                     rows=[row["step"] for row in _rows(workdir)],
                     tensorboard=_tensorboard_steps(workdir))

  # 7. kill -9 while export/ is being written.
  result = _run(workdir, flags, fault="export:0:kill")
  seen["export_kill"] = dict(returncode=result.returncode, workdir=_listing(workdir),
                             checkpoints=_listing(checkpoint_dir),
                             rows=[row["step"] for row in _rows(workdir)],
                             tensorboard=_tensorboard_steps(workdir))

  # 8. the same command, no fault.
  result = _run(workdir, flags)
  seen["final"] = dict(returncode=result.returncode, stderr=result.stderr,
                       workdir=_listing(workdir), checkpoints=_listing(checkpoint_dir))

  changed.wait(timeout=600)
  changed_log.seek(0)
  seen["changed_math"] = dict(
      returncode=changed.returncode, stderr=changed_log.read(), workdir=changed_workdir,
      unchanged=changed_before == {name: os.stat(os.path.join(changed_workdir, name)).st_mtime_ns
                                   for name in changed_before})
  changed_log.close()
  return workdir, seen


def test_kill_during_class_images_regenerates_only_the_missing_one(timeline, straight_run):
  workdir, seen = timeline
  killed = seen["class_kill"]
  assert killed["returncode"] == -signal.SIGKILL
  assert killed["checkpoints"] is None  # killed before training
  assert killed["class_files"][0] == "class_00000.png"
  assert len(killed["class_files"]) == 2 and killed["class_files"][1].startswith(
      "class_00001.png.tmp")  # the half-written file, never under its final name
  after = seen["step_kill"]
  assert after["class_files"] == ["class_00000.png", "class_00001.png"]  # .tmp cleaned
  assert after["image0"] == killed["image0"]  # untouched: same bytes, same mtime
  straight_class_dir = os.path.join(straight_run[0], "class_images")
  assert after["image1"] == _read(os.path.join(straight_class_dir, "class_00001.png"))
  assert after["image0"][0] == _read(os.path.join(straight_class_dir, "class_00000.png"))


def test_second_run_on_a_held_workdir_fails_naming_the_holder(timeline):
  """The CLI's own behaviour: exit status 1 and one error line, before any work."""
  workdir, seen = timeline
  assert seen["hang_line"] == "fault: hanging at step:5"
  second = seen["second_run"]
  assert second["returncode"] == 1, second["stderr"][-3000:]
  last_line = second["stderr"].strip().splitlines()[-1]
  holder = f"pid {seen['holder_pid']} on {socket.gethostname()} (started "
  assert last_line.startswith(f"error: --workdir: {workdir} is in use by {holder}"), last_line
  assert "train:" not in second["stderr"]  # refused at once: no step, no progress bar


def test_kill_during_a_step_keeps_the_last_checkpoint(timeline):
  _, seen = timeline
  killed = seen["step_kill"]
  assert killed["returncode"] == -signal.SIGKILL
  assert killed["checkpoints"] == ["3"]
  assert killed["rows"] == [1, 2, 3, 4]  # step 5 was in flight when killed
  # The next run found the dead holder's lock file and took it over.
  assert "Taking over the lock of pid " in seen["commit_kill"]["stderr"]


def test_kill_during_checkpoint_commit_leaves_only_a_temporary_folder(timeline):
  workdir, seen = timeline
  killed = seen["commit_kill"]
  assert killed["returncode"] == -signal.SIGKILL
  assert killed["checkpoints"][0] == "3"
  assert [name for name in killed["checkpoints"] if name != "3"] == [
      "6.orbax-checkpoint-tmp"]  # written, not committed: never listed as step 6
  assert killed["rows"] == [1, 2, 3, 4, 5, 6]
  # The next run resumed from 3 (not from the uncommitted 6); the temporary folders are removed.
  assert f"Resumed from {workdir}/checkpoints at step 3" in seen["disk_full"]["stderr"]
  assert seen["sigterm"]["checkpoints"] == ["3", "4"]


def test_disk_full_during_a_checkpoint_fails_in_one_line_keeping_the_previous_one(timeline):
  """README "Disk full", through the CLI: the whole line, exit status 1; checkpoint 3, the only
  one kept (checkpoint.max_to_keep=1), is not deleted before a newer one commits. The runs
  after it resume from it and end bitwise-equal to the straight run (the last test here)."""
  workdir, seen = timeline
  full = seen["disk_full"]
  _assert_ended_with(
      full, 1, f"error: saving a checkpoint in {workdir}/checkpoints failed ([Errno 28] No space "
      "left on device); the newest complete checkpoint is kept: step 3")
  assert [name for name in full["checkpoints"] if not name.endswith("-tmp")] == ["3"]
  assert full["rows"] == [1, 2, 3, 4, 5, 6]
  assert "export" not in full["workdir"] and "export.tmp" not in full["workdir"]


def test_sigterm_finishes_the_step_saves_and_exits_clearly(timeline):
  _, seen = timeline
  stopped = seen["sigterm"]
  assert stopped["returncode"] == 143
  last_line = stopped["stderr"].strip().splitlines()[-1]
  assert last_line.startswith("preempted: stopped at step 4 of 6 on SIGTERM; checkpoint saved")
  assert stopped["checkpoints"] == ["3", "4"]
  assert stopped["rows"] == [1, 2, 3, 4]  # rows 5 and 6 of the killed run 3 were dropped


def test_a_non_finite_loss_ends_the_cli_with_one_line_and_exit_status_1(timeline):
  """README "Non-finite loss" and the exit-status table, through the CLI."""
  _, seen = timeline
  stopped = seen["nan"]
  _assert_ended_with(
      stopped, 1, "error: non-finite loss or gradient at step 5; stopped without saving it. "
      "Newest good checkpoint: step 4. Lower train.learning_rate, or set "
      "train.skip_nonfinite_steps=true to skip such steps")
  # Step 5 logs nothing (log.every_steps=6): the check before checkpoint 5 stopped the run.
  assert stopped["checkpoints"] == ["3", "4"] and stopped["rows"] == [1, 2, 3, 4]
  assert "export" not in stopped["workdir"] and "samples" not in stopped["workdir"]


def test_kill_during_export_is_rewritten_by_the_next_run(timeline, straight_run):
  workdir, seen = timeline
  killed = seen["export_kill"]
  assert killed["returncode"] == -signal.SIGKILL
  assert "export.tmp" in killed["workdir"] and "export" not in killed["workdir"]
  assert killed["checkpoints"] == ["4", "6"]
  final = seen["final"]
  assert final["returncode"] == 0, final["stderr"][-3000:]
  assert "export" in final["workdir"] and "export.tmp" not in final["workdir"]
  assert "lock" not in final["workdir"] or os.path.getsize(os.path.join(workdir, "lock")) == 0
  _, params = models.load_pretrained(os.path.join(workdir, "export"))
  jax.tree.map(np.testing.assert_array_equal, params["unet"], straight_run[1].params["unet"])


def test_after_every_fault_the_run_ends_bitwise_equal_to_a_straight_run(timeline, straight_run):
  workdir, seen = timeline
  straight_workdir, straight_state = straight_run
  assert seen["final"]["checkpoints"] == ["4", "6"]
  manager = checkpoints.make_manager(workdir, max_to_keep=2)
  restored = jax.device_get(checkpoints.restore_latest(manager, straight_state))
  jax.tree.map(np.testing.assert_array_equal, restored, straight_state)
  rows, straight_rows = _rows(workdir), _rows(straight_workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
  for row, straight_row in zip(rows, straight_rows):
    row.pop("steps_per_sec"), straight_row.pop("steps_per_sec")
    assert row == straight_row


def test_tensorboard_shows_each_step_once_after_every_fault(timeline):
  """README "Exact resume": metrics.jsonl rows "(and TensorBoard events)" after the checkpoint
  are dropped, so no step is missing or doubled. After each run of the timeline, TensorBoard's
  view of the event files holds the steps metrics.jsonl holds; at the end, the same values."""
  workdir, seen = timeline
  for run in ("step_kill", "commit_kill", "disk_full", "sigterm", "nan", "export_kill"):
    assert seen[run]["tensorboard"] == seen[run]["rows"], run
  view, rows = _tensorboard_view(workdir), _rows(workdir)
  assert sorted(view) == sorted(["eval", "samples"] + [key for key in rows[0] if key != "step"])
  for key in rows[0]:
    if key != "step":
      assert view[key] == [(row["step"], float(np.float32(row[key]))) for row in rows], key
  assert view["eval"] == [(3, None), (6, None)] and view["samples"] == [(6, None)]


def test_resume_with_changed_math_is_refused_naming_old_and_new_values(timeline):
  """README "Config change on resume", through the CLI: the whole line of the README's example,
  exit status 2 (an input to fix), the workdir's config and metrics untouched."""
  _, seen = timeline
  changed = seen["changed_math"]
  _assert_ended_with(
      changed, 2, "error: config differs from the run this workdir holds (data.resolution: "
      "32 → 64; train.learning_rate: 0.0001 → 0.0002); use the old values, another --workdir, "
      "or --config.resume_ignore_changes=true")
  assert "train:" not in changed["stderr"]  # refused before any step
  assert changed["unchanged"]


# ------------------------------------------------------------------------------------------
# In-process faults: NaN/Inf losses, config changes on resume.

def _nan_at_step(monkeypatch, nan_step, inf_loss_step=None):
  """Makes the batch of step `nan_step` (1-based) all NaN latents, as a broken input would, and
  that of `inf_loss_step` weigh its instance row by 3e38: its loss overflows to +Inf (its
  gradient with it; an Inf loss of a finite gradient: training/test_step.py)."""
  original_batch = input_pipeline.DreamBoothData.batch

  def batch(self, step, rows=slice(None)):
    result = original_batch(self, step, rows)
    if step + 1 == nan_step:
      result = dict(result, latent_mean=np.full_like(result["latent_mean"], np.nan))
    if step + 1 == inf_loss_step:
      result = dict(result, instance_mask=result["instance_mask"] * np.float32(3e38),
                    instance_count=np.ones_like(result["instance_count"]))
    return result

  monkeypatch.setattr(input_pipeline.DreamBoothData, "batch", batch)


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_good_checkpoint(
    small_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "nan")
  _nan_at_step(monkeypatch, 5)
  with pytest.raises(errors.NonFiniteLossError, match=r"non-finite loss or gradient at step "
                     r"5; stopped without saving it\. Newest good checkpoint: step 3\."):
    train.train_and_evaluate(small_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  rows = _rows(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
  assert np.isnan(rows[-1]["loss"]) and rows[-1]["nonfinite_steps"] == 1
  assert not os.path.exists(os.path.join(workdir, "export"))


def test_nan_steps_can_be_skipped_and_counted(small_config, tmp_path, monkeypatch):
  """README "Non-finite loss": a step whose loss is +Inf (step 2) or NaN (step 5) is never
  applied; with skip_nonfinite_steps the run counts and skips it."""
  workdir = str(tmp_path / "skip")
  small_config.train.skip_nonfinite_steps = True
  small_config.checkpoint.every_steps = 1
  small_config.checkpoint.max_to_keep = 6
  _nan_at_step(monkeypatch, 5, inf_loss_step=2)
  final_state = train.train_and_evaluate(small_config, workdir)
  state = jax.device_get(final_state)
  assert int(state.step) == 6 and int(state.nonfinite_steps) == 2
  assert int(state.first_nonfinite_step) == 2
  rows = _rows(workdir)
  assert [row["nonfinite_steps"] for row in rows] == [0, 1, 1, 1, 2, 2]
  assert rows[1]["loss"] == np.inf
  assert np.isnan(rows[4]["loss"])
  manager = checkpoints.make_manager(workdir, max_to_keep=6)
  after = {step: jax.device_get(checkpoints.restore(manager, step, final_state))
           for step in range(1, 7)}
  # Steps 2 and 5 changed nothing but the counters; steps 3 and 6 trained again.
  for bad in (2, 5):
    jax.tree.map(np.testing.assert_array_equal, after[bad].params, after[bad - 1].params)
    jax.tree.map(np.testing.assert_array_equal, after[bad].opt_state,
                 after[bad - 1].opt_state)
    assert not np.array_equal(after[bad + 1].params["unet"]["conv_in"]["kernel"],
                              after[bad].params["unet"]["conv_in"]["kernel"])


def test_more_steps_extend_a_finished_run(straight_run, small_config, tmp_path):
  """README "Config change on resume": raising train.steps continues a finished run (the decaying
  LR schedule re-evaluated for the new length); a changed learning rate is refused, and with
  resume_ignore_changes=true applies from the restored step on and is recorded in config.json."""
  workdir = str(tmp_path / "extended")
  shutil.copytree(straight_run[0], workdir)
  small_config.train.steps = 7
  small_config.train.learning_rate = 2e-4
  with pytest.raises(config_check.ConfigError) as error:  # train.steps may change: not named
    train.train_and_evaluate(small_config, workdir)
  assert str(error.value) == (
      "config differs from the run this workdir holds (train.learning_rate: 0.0001 → 0.0002); "
      "use the old values, another --workdir, or --config.resume_ignore_changes=true")
  small_config.resume_ignore_changes = True
  state = jax.device_get(train.train_and_evaluate(small_config, workdir))
  assert int(state.step) == 7
  rows, straight_rows = _rows(workdir), _rows(straight_run[0])
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
  assert rows[:6] == straight_rows  # the finished steps, as the old config ran them
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "7"]
  # Step 7 runs on the new 7-step linear decay of the new peak: a fifth of 2e-4, where the old
  # 6-step schedule had already reached 0 (and the old peak's 7-step one would give 2e-5).
  expected = float(train_step.make_schedule(small_config.train)(6))
  assert expected == pytest.approx(2e-4 / 5, rel=1e-6)
  assert rows[-1]["learning_rate"] == pytest.approx(expected, rel=1e-6)
  # And the optimizer applied it: step 7 moved the weights by that rate times AdamW's direction
  # (from the moments it saved at step 7 and the weights of step 6).
  adam = next(leaf for leaf in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(leaf, optax.ScaleByAdamState))
  train_config = small_config.train
  before = straight_run[1].params["unet"]["conv_in"]["kernel"]
  moved = before - state.params["unet"]["conv_in"]["kernel"]
  mu, nu = adam.mu["unet"]["conv_in"]["kernel"], adam.nu["unet"]["conv_in"]["kernel"]
  direction = (mu / (1 - train_config.adam_b1 ** 7) /
               (np.sqrt(nu / (1 - train_config.adam_b2 ** 7)) + train_config.adam_eps) +
               train_config.weight_decay * before)
  rate = float(np.sum(moved * direction) / np.sum(direction * direction))
  assert rate == pytest.approx(expected, rel=1e-3)
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["train"]["learning_rate"] == 2e-4 and recorded["train"]["steps"] == 7
  # The recorded config is the reference now: the same values resume without the flag, and a
  # step count below the checkpoint is refused.
  small_config.resume_ignore_changes = False
  small_config.train.steps = 5
  with pytest.raises(config_check.ConfigError, match=r"config.train.steps: 5 is below step 7"):
    train.train_and_evaluate(small_config, workdir)


def test_lock_is_exclusive_and_released(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"in use by pid {os.getpid()} "):
      with workdir_lock.hold(str(tmp_path)):
        pass
  with workdir_lock.hold(str(tmp_path)):  # released on exit
    assert os.path.getsize(tmp_path / "lock") > 0
  assert os.path.getsize(tmp_path / "lock") == 0


def test_sigterm_during_class_images_stops_after_the_batch_in_flight(small_config, tmp_path,
                                                                    monkeypatch, capsys):
  """A real SIGTERM while image 3 of the first batch of 8 is written: the run (with the handler
  train.py installs, ended as `main` ends it) finishes and keeps that batch, makes no other
  image, and exits 143 with one line."""
  workdir = str(tmp_path / "run")
  small_config.data.num_class_images = 10  # two batches of 8 on the suite's 8 devices
  monkeypatch.setenv(failpoints.ENV, "class_image:3:term")
  with pytest.raises(SystemExit) as exit_status, cli_errors.one_line_errors():
    train.train_and_evaluate(small_config, workdir)
  assert exit_status.value.code == preemption.EXIT_CODE
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "preempted: stopped generating class images with 2 still missing; rerun the same command "
      "to make the rest")
  assert sorted(os.listdir(os.path.join(workdir, "class_images"))) == [
      f"class_{i:05d}.png" for i in range(8)]
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_a_preempted_run_resumes_without_compiling_its_train_step_again(timeline):
  """The persistent jit cache is on: the run after the SIGTERM (the timeline's NaN run, whose
  log.* and checkpoint.* changes leave the step's program as it was) loads the step from disk.

  The timeline's runs use the suite's cache (conftest's $JAX_COMPILATION_CACHE_DIR); folded in
  here from a test of its own that made two more CLI runs (issue 20).
  """
  _, seen = timeline
  assert seen["sigterm"]["cached_steps"]  # the preempted run found or left its step there
  resumed = seen["nan"]["stderr"]
  assert "Resumed from" in resumed
  assert "Persistent compilation cache hit for 'jit_train_step'" in resumed
  assert "PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'" not in resumed


def test_a_workdir_on_a_filesystem_without_locks_is_used_with_a_warning(tmp_path, monkeypatch):
  def unsupported(fd, operation):
    raise OSError(38, "Function not implemented")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", unsupported)
  with mock.patch.object(workdir_lock.logging, "warning") as warning:
    with workdir_lock.hold(str(tmp_path)):
      holder = json.loads((tmp_path / "lock").read_text())
  assert holder["pid"] == os.getpid()
  assert "cannot be locked" in warning.call_args_list[0].args[0]
