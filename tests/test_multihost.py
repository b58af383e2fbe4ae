"""Two processes (2 CPU devices each, jax.distributed on 127.0.0.1) train like one process with
the same 4 devices, write each class image once, and leave a checkpoint one process resumes.

The two-process run is traced (failpoints.TRACE_ENV): every file write and every batch's rows
are logged with the process that did them, so the tests see who did what, not only the result.
"""

import fnmatch
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax import failpoints
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(tiny_dir, instance_dir, steps):
  return ["--config=configs/tiny.py", f"--config.model.pretrained={tiny_dir}",
          f"--config.data.instance_dir={instance_dir}", "--config.data.num_class_images=3",
          "--config.class_images.num_inference_steps=2", "--config.class_images.batch_size=4",
          f"--config.train.steps={steps}", "--config.eval.every_steps=4",
          "--config.eval.num_inference_steps=2",
          "--config.train.batch_size=2", "--config.train.warmup_steps=0",
          "--config.checkpoint.every_steps=2", "--config.log.every_steps=1",
          "--config.sample.num_images=2", "--config.sample.num_inference_steps=2"]


def _cache(role):
  """A persistent jit cache per role (one per process of the two-process run, so that the
  two never write one file at once), kept across sessions like the suite's own."""
  return os.path.join(os.environ["DREAMBOOTH_JAX_CACHE"], f"jax_cache_multihost_{role}")


def _env(devices, cache, trace=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + conftest.TEST_XLA_FLAGS)
  env.pop(failpoints.TRACE_ENV, None)
  if trace:
    env[failpoints.TRACE_ENV] = trace
  return env


def _command(workdir, flags):
  return [sys.executable, "-m", "dreambooth_jax.main", f"--workdir={workdir}", *flags]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  return [(row["step"], row["loss"], row["instance_loss"], row["prior_loss"])
          for row in conftest.metric_rows(workdir)]


@pytest.fixture(scope="module")
def runs(tiny_dir, instance_dir, tmp_path_factory):
  """(one-process workdir of 6 steps, two-process workdir of 4 steps then 1 process to 6)."""
  root = tmp_path_factory.mktemp("multihost")
  single, multi = str(root / "single"), str(root / "multi")
  trace = str(root / "trace.txt")
  result = subprocess.run(_command(single, _flags(tiny_dir, instance_dir, 6)), cwd=REPO,
                          env=_env(4, _cache("single")), capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  port = _free_port()
  processes = []
  for process_id in range(2):
    flags = _flags(tiny_dir, instance_dir, 4) + [
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}"]
    processes.append(subprocess.Popen(
        _command(multi, flags), cwd=REPO, env=_env(2, _cache(process_id), trace),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=900) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  two_process_rows = _losses(multi)
  two_process_checkpoints = sorted(os.listdir(os.path.join(multi, "checkpoints")))
  two_process_export = os.path.isfile(os.path.join(multi, "export", "model_index.json"))
  two_process_files = sorted(
      os.path.relpath(os.path.join(folder, name), multi)
      for folder, _, names in os.walk(multi) for name in names
      if not os.path.relpath(folder, multi).startswith("checkpoints"))
  with open(trace) as f:
    traced = [line.split(" ", 2) for line in f.read().splitlines()]

  resumed = subprocess.run(_command(multi, _flags(tiny_dir, instance_dir, 6)), cwd=REPO,
                           env=_env(4, _cache("single")), capture_output=True,
                           text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return {"single": single, "multi": multi, "two_process_rows": two_process_rows,
          "two_process_checkpoints": two_process_checkpoints,
          "two_process_export": two_process_export, "outputs": outputs,
          "two_process_files": two_process_files,
          "traced": [(int(process), point, fields) for process, point, fields in traced],
          "resumed_stderr": resumed.stderr}


def test_two_processes_have_the_loss_curve_of_one_process_with_the_same_devices(runs):
  single = _losses(runs["single"])
  two_process = runs["two_process_rows"]
  assert [row[0] for row in two_process] == [1, 2, 3, 4]  # process 0 alone wrote the rows
  print("step | 1 process loss (instance, prior) | 2 processes loss (instance, prior)")
  for one, two in zip(single, two_process):  # shown by `pytest -rP`
    print(f"{one[0]} | {one[1]:.7f} ({one[2]:.7f}, {one[3]:.7f}) | "
          f"{two[1]:.7f} ({two[2]:.7f}, {two[3]:.7f})")
  np.testing.assert_allclose(np.asarray(two_process)[:, 1:], np.asarray(single[:4])[:, 1:],
                             rtol=1e-5)
  for _, stderr in runs["outputs"]:
    assert "Process " in stderr and " of 2;" in stderr  # both joined one distributed run


def _written(runs, process):
  """The files (relative to the workdir; `*` for a folder or name written whole) it wrote."""
  return [os.path.relpath(fields, runs["multi"]) for who, point, fields in runs["traced"]
          if who == process and point == "write"]


def test_each_class_image_is_written_once_and_equals_the_single_process_one(runs):
  names = sorted(os.listdir(os.path.join(runs["multi"], "class_images")))
  assert names == ["class_00000.png", "class_00001.png", "class_00002.png"]
  # 3 images in one batch of 4 rows over 4 devices: process 0's devices make rows 0 and 1,
  # process 1's row 2 (and the padding row 3, which nobody writes).
  by_process = [[name for name in _written(runs, process) if name.startswith("class_images/")]
                for process in (0, 1)]
  assert by_process == [["class_images/class_00000.png", "class_images/class_00001.png"],
                        ["class_images/class_00002.png"]]
  for name in names:
    two = np.asarray(Image.open(os.path.join(runs["multi"], "class_images", name)), np.int16)
    one = np.asarray(Image.open(os.path.join(runs["single"], "class_images", name)), np.int16)
    assert np.abs(two - one).max() <= 1


def test_process_0_alone_writes_the_workdir_files(runs):
  """Every file of the workdir but the checkpoints and class images is process 0's."""
  assert [name for name in _written(runs, 1) if not name.startswith("class_images/")] == []
  written = set(_written(runs, 0))
  assert {"config.json", "prompts.json", "metrics.jsonl", "events.out.tfevents.*",
          "eval/step_000004.png", "export/*", "samples/grid.png"} <= written
  assert "eval/step_000002.png" not in runs["two_process_files"]  # eval.every_steps=4
  unaccounted = [name for name in runs["two_process_files"]
                 if not any(fnmatch.fnmatch(name, pattern) for pattern in written)
                 and not name.startswith("class_images/")]
  assert unaccounted == []  # no file written behind the trace's back


def test_each_process_builds_only_its_own_rows(runs):
  """A batch of 4 rows (2 instance, 2 class) on 2 processes of 2 devices: each builds its 2."""
  built = {(who, int(fields.split()[0])): [int(i) for i in re.findall(r"\d+", fields)[1:]]
           for who, point, fields in runs["traced"] if point == "rows"}
  assert len(built) == sum(point == "rows" for _, point, _ in runs["traced"])  # none twice
  assert built == {**{(0, step): [0, 1] for step in range(1, 5)},
                   **{(1, step): [2, 3] for step in range(1, 5)}}


def test_a_two_process_checkpoint_resumes_in_one_process_on_the_same_curve(runs):
  assert runs["two_process_checkpoints"] == ["2", "4"] and runs["two_process_export"]
  assert "Resumed from" in runs["resumed_stderr"]
  rows, single = _losses(runs["multi"]), _losses(runs["single"])
  assert [row[0] for row in rows] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(np.asarray(rows)[:, 1:], np.asarray(single)[:, 1:], rtol=1e-5)
