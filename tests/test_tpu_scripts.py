"""tpu_scripts/*.sh: the exact gcloud commands of --dry-run, usage errors, and (run locally in a fake
home directory) the remote shell commands that setup.sh and launch.sh send to the workers.

No gcloud, no network, no jax: a fake `gcloud` on PATH records any call, and a fake `python3`
stands in for pip and the trainer on the "worker".
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
ENTRY_POINTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh"]
TPU = ["--name", "my-tpu", "--zone", "us-central2-b"]
TRAIN_FLAGS = [
    "--config=configs/sd15.py",
    "--workdir=/tmp/run",
    "--config.data.instance_dir=/data/dog",
    "--config.data.instance_prompt=a photo of sks dog",  # spaces survive both shells
    "--config.data.class_prompt=it's a \"dog\" $HOME",  # quotes and $ stay literal
]
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


def _fake_bin(tmp_path):
  """A bin/ dir with a gcloud that records its argv (it must never run in a dry run) and a
  python3 that records argv/cwd, prints a line, and stays alive until $HOME/stop (5 s at most)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text('#!/bin/bash\nprintf "%s\\0" "$@" >> "$GCLOUD_CALLS"\n')
  python3 = bin_dir / "python3"
  python3.write_text('#!/bin/bash\n'
                     'printf "%s\\n" "$PWD" > "$HOME/python3.cwd"\n'
                     'printf "%s\\0" "$@" > "$HOME/python3.argv"\n'
                     'echo "fake python3 output"\n'
                     'for _ in $(seq 50); do [ -e "$HOME/stop" ] && exit 0; sleep 0.1; done\n')
  for f in (gcloud, python3):
    f.chmod(0o755)
  return bin_dir


def _env(tmp_path, **extra):
  env = dict(os.environ)
  env["PATH"] = f"{_fake_bin(tmp_path)}{os.pathsep}{env['PATH']}"
  env["GCLOUD_CALLS"] = str(tmp_path / "gcloud_calls")
  env.update(extra)
  return env


def run_script(tmp_path, script, *args, env=None):
  return subprocess.run([str(SCRIPTS / script), *args], capture_output=True, text=True,
                        timeout=10, env=env or _env(tmp_path))


def dry_run(tmp_path, script, *args):
  """The printed commands, each split into argv the way a shell would; nothing else on stdout
  or stderr, and gcloud never ran."""
  proc = run_script(tmp_path, script, "--dry-run", *args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  assert proc.stdout.endswith("\n")
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("gcloud compute tpus tpu-vm ") for line in lines), lines
  assert not (tmp_path / "gcloud_calls").exists(), "--dry-run called gcloud"
  return [shlex.split(line) for line in lines]


def remote_command(argv):
  commands = [a for a in argv if a.startswith("--command=")]
  assert len(commands) == 1, argv
  return commands[0][len("--command="):]


def run_on_fake_worker(command, home, env):
  """Runs a --command string the way the worker's login shell would, with HOME=home."""
  return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=10,
                        env=dict(env, HOME=str(home)))


def test_scripts_are_executable_strict_bash():
  for name in ENTRY_POINTS:
    path = SCRIPTS / name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), name
    assert "set -euo pipefail" in text, name
  assert "set -euo pipefail" in (SCRIPTS / "common.sh").read_text()


def test_create_defaults(tmp_path):
  assert dry_run(tmp_path, "create.sh", *TPU) == [GCLOUD + [
      "create", "my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-8",
      "--version=tpu-ubuntu2204-base"]]


def test_create_spot_type_version_project(tmp_path):
  assert dry_run(tmp_path, "create.sh", "--name=my-tpu", "--zone=europe-west4-a", "--spot",
                 "--accelerator-type", "v5litepod-8", "--version=v2-alpha-tpuv5-lite",
                 "--project", "my-proj") == [GCLOUD + [
      "create", "my-tpu", "--zone=europe-west4-a", "--accelerator-type=v5litepod-8",
      "--version=v2-alpha-tpuv5-lite", "--spot", "--project=my-proj"]]


def test_delete(tmp_path):
  assert dry_run(tmp_path, "delete.sh", *TPU) == [GCLOUD + [
      "delete", "my-tpu", "--zone=us-central2-b", "--quiet"]]
  assert dry_run(tmp_path, "delete.sh", *TPU, "--project=p") == [GCLOUD + [
      "delete", "my-tpu", "--zone=us-central2-b", "--quiet", "--project=p"]]


def test_setup_copies_this_checkout_to_all_workers(tmp_path):
  rm, scp, install = dry_run(tmp_path, "setup.sh", *TPU, "--project=p")
  assert rm[:7] == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b"]
  assert scp == GCLOUD + ["scp", "--recurse", str(REPO), "my-tpu:dreambooth-jax.upload",
                          "--zone=us-central2-b", "--worker=all", "--project=p"]
  assert install[:7] == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b"]
  for argv in (rm, install):
    assert "--worker=all" in argv and argv[-1] == "--project=p"
  assert remote_command(rm) == "rm -rf ~/dreambooth-jax.upload"
  assert remote_command(install).endswith(
      'cd ~/dreambooth-jax && python3 -m pip install -e ".[tpu]"')


def test_setup_clones_repo(tmp_path):
  (argv,) = dry_run(tmp_path, "setup.sh", *TPU, "--repo", "https://example.com/me/db.git")
  assert argv[:8] == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
  cmd = remote_command(argv)
  assert "git clone https://example.com/me/db.git ~/dreambooth-jax" in cmd
  assert cmd.endswith('python3 -m pip install -e ".[tpu]"')


def test_setup_remote_commands_on_a_fake_worker(tmp_path):
  """Runs setup's three commands (scp done by a local copy) in a fake home: the code is merged
  into ~/dreambooth-jax without deleting what was there, and pip runs in it."""
  src = tmp_path / "src"
  (src / "pkg").mkdir(parents=True)
  (src / "pyproject.toml").write_text("[project]\n")
  (src / "pkg" / "mod.py").write_text("x = 1\n")
  home = tmp_path / "home"
  (home / "dreambooth-jax" / "runs").mkdir(parents=True)
  (home / "dreambooth-jax" / "runs" / "ckpt").write_text("keep me")
  (home / "stop").touch()  # the fake python3 returns at once
  env = _env(tmp_path)
  rm, scp, install = dry_run(tmp_path, "setup.sh", *TPU, "--local-dir", str(src))
  for _ in range(2):  # running setup again works the same
    assert run_on_fake_worker(remote_command(rm), home, env).returncode == 0
    assert scp[6] == str(src) and scp[7] == "my-tpu:dreambooth-jax.upload"
    shutil.copytree(scp[6], home / scp[7].split(":", 1)[1])  # what scp -r does
    proc = run_on_fake_worker(remote_command(install), home, env)
    assert proc.returncode == 0, proc.stderr
  assert (home / "dreambooth-jax" / "pkg" / "mod.py").read_text() == "x = 1\n"
  assert (home / "dreambooth-jax" / "runs" / "ckpt").read_text() == "keep me"
  assert not (home / "dreambooth-jax.upload").exists()
  assert (home / "python3.cwd").read_text().strip() == str(home / "dreambooth-jax")
  assert (home / "python3.argv").read_text().split("\0")[:-1] == [
      "-m", "pip", "install", "-e", ".[tpu]"]


def test_launch_passes_training_flags_to_all_workers(tmp_path):
  (argv,) = dry_run(tmp_path, "launch.sh", *TPU, "--", *TRAIN_FLAGS)
  assert argv[:8] == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
  words = shlex.split(remote_command(argv))
  start = words.index("nohup")
  end = words.index(">>", start)
  assert words[start + 1:end] == ["python3", "-m", "dreambooth_jax.main", *TRAIN_FLAGS]
  assert words[end + 1] == "~/dreambooth_logs/train.log"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_launch_on_a_fake_worker_detaches_refuses_a_second_run_and_resumes(tmp_path):
  home = tmp_path / "home"
  (home / "dreambooth-jax").mkdir(parents=True)
  env = _env(tmp_path)
  (argv,) = dry_run(tmp_path, "launch.sh", *TPU, "--", *TRAIN_FLAGS)
  command = remote_command(argv)

  start = time.monotonic()
  first = run_on_fake_worker(command, home, env)
  assert first.returncode == 0, first.stderr
  assert time.monotonic() - start < 3, "the ssh command waited for the training"
  assert "training started" in first.stdout
  pid = int((home / "dreambooth_logs" / "train.pid").read_text())
  argv_file = home / "python3.argv"
  for _ in range(50):
    if argv_file.exists() and argv_file.read_text().endswith("\0"):
      break
    time.sleep(0.1)
  assert argv_file.read_text().split("\0")[:-1] == ["-m", "dreambooth_jax.main", *TRAIN_FLAGS]
  assert (home / "python3.cwd").read_text().strip() == str(home / "dreambooth-jax")

  second = run_on_fake_worker(command, home, env)  # the first one is still running
  assert second.returncode == 1
  assert "already running" in second.stderr

  (home / "stop").touch()
  for _ in range(50):
    if not os.path.exists(f"/proc/{pid}"):
      break
    time.sleep(0.1)
  third = run_on_fake_worker(command, home, env)  # the relaunch that resumes
  assert third.returncode == 0, third.stderr
  for _ in range(50):
    log = (home / "dreambooth_logs" / "train.log").read_text()
    if log.count("fake python3 output") == 2:
      break
    time.sleep(0.1)
  assert log.count("launch: python3 -m dreambooth_jax.main --config=configs/sd15.py") == 2
  assert log.count("fake python3 output") == 2


def test_logs_follows_one_worker(tmp_path):
  (argv,) = dry_run(tmp_path, "logs.sh", *TPU)
  assert argv == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=0",
                           "--command=tail -n 100 -f ~/dreambooth_logs/train.log"]
  (argv,) = dry_run(tmp_path, "logs.sh", *TPU, "--worker=3")
  assert "--worker=3" in argv and "--worker=0" not in argv


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_missing_zone_is_a_one_line_usage_error(tmp_path, script):
  args = ["--name", "my-tpu", "--dry-run"] + (["--", *TRAIN_FLAGS] if script == "launch.sh" else [])
  proc = run_script(tmp_path, script, *args)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert proc.stderr == f"{script}: error: --zone is required (see --help)\n"


@pytest.mark.parametrize("script,args,message", [
    ("delete.sh", ["--zone", "z"], "--name is required"),
    ("delete.sh", [], "--name and --zone are required"),
    ("create.sh", [*TPU, "--bogus"], "unknown flag: --bogus"),
    ("create.sh", [*TPU, "--spot=yes"], "--spot takes no value"),
    ("create.sh", ["--name", "--zone", "z"], "--name needs a value"),
    ("create.sh", ["--name", "My_TPU", "--zone", "z"], "--name My_TPU: use lowercase"),
    ("logs.sh", [*TPU, "--worker", "x"], "--worker x: expected a worker index"),
    ("delete.sh", [*TPU, "--", "x"], "unexpected arguments after --"),
    ("launch.sh", TPU, "no training flags"),
    ("launch.sh", [*TPU, "--", "--config=configs/sd15.py"], "lack --workdir"),
    ("setup.sh", [*TPU, "--local-dir", "/"], "no pyproject.toml"),
])
def test_usage_errors(tmp_path, script, args, message):
  proc = run_script(tmp_path, script, "--dry-run", *args)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help(tmp_path, script):
  proc = run_script(tmp_path, script, "--help")
  assert proc.returncode == 0 and proc.stderr == ""
  assert proc.stdout.startswith(f"Usage: {script} --name NAME --zone ZONE")
  assert "--dry-run" in proc.stdout
  if script == "launch.sh":
    assert "resumes the run" in proc.stdout


def test_without_dry_run_gcloud_gets_exactly_the_printed_command(tmp_path):
  args = [*TPU, "--spot", "--project=p", "--accelerator-type=v4-32"]
  (printed,) = dry_run(tmp_path, "create.sh", *args)
  proc = run_script(tmp_path, "create.sh", *args)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "gcloud_calls").read_text().split("\0")[:-1] == printed[1:]
