"""tpu_scripts/*.sh: the exact gcloud commands of --dry-run, usage errors, and (run locally in a fake
home directory) the remote shell commands that setup.sh, mount.sh, upload.sh and launch.sh send to
the workers.

No gcloud, no network, no jax: a fake `gcloud` on PATH records any call, a fake `python3` stands in
for pip and the trainer on the "worker", and fake gcsfuse/findmnt/mountpoint/sudo/curl/lsb_release
stand in for the bucket mount.
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
# Scripts that act on a TPU VM (--name and --zone required), and the bucket-only ones.
VM_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh", "status.sh",
              "mount.sh"]
ENTRY_POINTS = VM_SCRIPTS + ["bucket.sh", "upload.sh", "download.sh"]
TPU = ["--name", "my-tpu", "--zone", "us-central2-b"]
TRAIN_FLAGS = [
    "--config=configs/sd15.py",
    "--workdir=/tmp/run",
    "--config.data.instance_dir=/data/dog",
    "--config.data.instance_prompt=a photo of sks dog",  # spaces survive both shells
    "--config.data.class_prompt=it's a \"dog\" $HOME",  # quotes and $ stay literal
]
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
BUCKET_FLAGS = [
    "--config=configs/sd15.py",
    "--workdir=~/bucket/runs/dog",
    "--config.data.instance_dir=~/bucket/data/my dog",
    "--config.data.class_name=dog",
]
# Fakes of what mount.sh and launch.sh use on a worker. Mounts are lines "MOUNTPOINT SOURCE" in
# $HOME/mounts; gcsfuse adds one, findmnt and mountpoint read them.
FAKE_GCSFUSE = (
    '#!/bin/bash\n'
    'printf "%s\\0" "$@" >> "$HOME/gcsfuse.calls"; printf "\\n" >> "$HOME/gcsfuse.calls"\n'
    'args=("$@"); n=${#args[@]}\n'
    'echo "${args[n-1]} ${args[n-2]}" >> "$HOME/mounts"\n')
FAKE_WORKER_TOOLS = {
    "findmnt": '#!/bin/bash\nawk -v m="${@: -1}" \'$1 == m {print $2}\' "$HOME/mounts" 2>/dev/null\n',
    "mountpoint": '#!/bin/bash\ngrep -qs "^${@: -1} " "$HOME/mounts"\n',
    # sudo records its arguments (one call per line), keeps what tee is given, and "installs"
    # gcsfuse when apt-get install runs.
    "sudo": ('#!/bin/bash\n'
             'echo "$*" >> "$HOME/sudo.calls"\n'
             'if [ "$1" = tee ]; then cat > "$HOME/tee.$(basename "$2")"; fi\n'
             'case " $* " in *" install "*) cp "$FAKE_GCSFUSE" "$(dirname "$0")/gcsfuse";; esac\n'),
    "curl": '#!/bin/bash\necho FAKE-APT-KEY\n',
    "lsb_release": '#!/bin/bash\necho jammy\n',
}


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
  for name, text in FAKE_WORKER_TOOLS.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  fake_gcsfuse = tmp_path / "fake_gcsfuse"  # sudo apt-get install copies it into bin/
  fake_gcsfuse.write_text(FAKE_GCSFUSE)
  fake_gcsfuse.chmod(0o755)
  return bin_dir


def _env(tmp_path, **extra):
  env = dict(os.environ)
  env["PATH"] = f"{_fake_bin(tmp_path)}{os.pathsep}{env['PATH']}"
  env["GCLOUD_CALLS"] = str(tmp_path / "gcloud_calls")
  env["FAKE_GCSFUSE"] = str(tmp_path / "fake_gcsfuse")
  env.update(extra)
  return env


def run_script(tmp_path, script, *args, env=None, cwd=None):
  return subprocess.run([str(SCRIPTS / script), *args], capture_output=True, text=True,
                        timeout=10, env=env or _env(tmp_path), cwd=cwd)


def dry_run(tmp_path, script, *args):
  """The printed commands, each split into argv the way a shell would; nothing else on stdout
  or stderr, and gcloud never ran."""
  proc = run_script(tmp_path, script, "--dry-run", *args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  assert proc.stdout.endswith("\n")
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith(("gcloud ", "mkdir -p ")) for line in lines), lines
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


def gcloud_calls(tmp_path):
  """The argv of each call of the fake gcloud."""
  path = tmp_path / "gcloud_calls"
  return path.read_text().split("\0")[:-1] if path.exists() else []


def mounts(home, **bucket_of_mountpoint):
  (home / "mounts").write_text("".join(f"{home / m} {b}\n" for m, b in
                                       bucket_of_mountpoint.items()))


def test_scripts_are_executable_strict_bash():
  assert sorted(ENTRY_POINTS) == sorted(p.name for p in SCRIPTS.glob("*.sh")
                                        if p.name != "common.sh")
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


# --- create / delete / status: TPU families, Spot, queued resources ----------------------------

@pytest.mark.parametrize("accelerator_type,version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_picks_the_runtime_version_of_the_family(tmp_path, accelerator_type, version):
  args = [*TPU, f"--accelerator-type={accelerator_type}"]
  assert dry_run(tmp_path, "create.sh", *args) == [GCLOUD + [
      "create", "my-tpu", "--zone=us-central2-b", f"--accelerator-type={accelerator_type}",
      f"--version={version}"]]
  assert dry_run(tmp_path, "create.sh", *args, "--queued", "--spot", "--project=p") == [QUEUED + [
      "create", "my-tpu", "--node-id=my-tpu", "--zone=us-central2-b",
      f"--accelerator-type={accelerator_type}", f"--runtime-version={version}", "--spot",
      "--project=p"]]


def test_create_queued_with_explicit_version(tmp_path):
  assert dry_run(tmp_path, "create.sh", *TPU, "--queued", "--version", "v2-alpha-tpuv4") == [
      QUEUED + ["create", "my-tpu", "--node-id=my-tpu", "--zone=us-central2-b",
                "--accelerator-type=v4-8", "--runtime-version=v2-alpha-tpuv4"]]


@pytest.mark.parametrize("accelerator_type", ["v3-8", "v2-32", "v5e-8", "v4", "v4-", "v4-8x",
                                              "tpu-v4-8", "V4-8", "v6e-8 --spot"])
def test_create_rejects_an_unknown_family(tmp_path, accelerator_type):
  for extra in ([], ["--queued"], ["--version=v2-alpha"]):
    proc = run_script(tmp_path, "create.sh", "--dry-run", *TPU, *extra,
                      "--accelerator-type", accelerator_type)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"create.sh: error: --accelerator-type {accelerator_type}: unknown TPU "
                           "family; use v4-N, v5litepod-N (v5e), v5p-N or v6e-N\n")
  assert not gcloud_calls(tmp_path)


def test_delete_and_status_of_a_queued_resource(tmp_path):
  assert dry_run(tmp_path, "delete.sh", *TPU, "--queued") == [QUEUED + [
      "delete", "my-tpu", "--zone=us-central2-b", "--quiet", "--force"]]
  assert dry_run(tmp_path, "delete.sh", *TPU, "--queued", "--project=p") == [QUEUED + [
      "delete", "my-tpu", "--zone=us-central2-b", "--quiet", "--force", "--project=p"]]
  assert dry_run(tmp_path, "status.sh", *TPU, "--queued") == [QUEUED + [
      "describe", "my-tpu", "--zone=us-central2-b", "--format=value(state.state)"]]
  assert dry_run(tmp_path, "status.sh", *TPU, "--project=p") == [GCLOUD + [
      "describe", "my-tpu", "--zone=us-central2-b", "--format=value(state)", "--project=p"]]


def test_queued_create_without_dry_run_runs_the_printed_command(tmp_path):
  args = [*TPU, "--queued", "--spot", "--accelerator-type=v4-32"]
  (printed,) = dry_run(tmp_path, "create.sh", *args)
  proc = run_script(tmp_path, "create.sh", *args)
  assert proc.returncode == 0, proc.stderr
  assert gcloud_calls(tmp_path) == printed[1:]
  assert proc.stderr == "+ " + shlex.join(printed) + "\n"


# --- the bucket: create, mount on every worker, upload images, download the export --------------

def test_bucket_creates_a_hierarchical_namespace_bucket(tmp_path):
  expected = ["gcloud", "storage", "buckets", "create", "gs://my-bucket",
              "--location=us-central1", "--uniform-bucket-level-access",
              "--enable-hierarchical-namespace"]
  for bucket in ("my-bucket", "gs://my-bucket", "gs://my-bucket/"):
    assert dry_run(tmp_path, "bucket.sh", "--bucket", bucket, "--location=us-central1") == [
        expected]
  assert dry_run(tmp_path, "bucket.sh", "--bucket=my-bucket", "--location", "us-central1",
                 "--project", "p") == [expected + ["--project=p"]]


def test_mount_runs_one_command_on_all_workers(tmp_path):
  (argv,) = dry_run(tmp_path, "mount.sh", *TPU, "--bucket", "gs://my-bucket", "--project=p")
  assert argv[:8] == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
  assert argv[-1] == "--project=p"
  command = remote_command(argv)
  assert "gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 my-bucket ~/bucket" in command


@pytest.mark.skipif(shutil.which("gcsfuse") is not None, reason="a real gcsfuse is installed")
def test_mount_on_a_fake_worker_installs_gcsfuse_mounts_once_and_refuses_another_bucket(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  env = _env(tmp_path)
  (argv,) = dry_run(tmp_path, "mount.sh", *TPU, "--bucket", "my-bucket")
  command = remote_command(argv)

  first = run_on_fake_worker(command, home, env)  # no gcsfuse yet: installed, then mounted
  assert first.returncode == 0, first.stderr
  assert first.stdout.endswith(": mounted gs://my-bucket on ~/bucket\n"), first.stdout
  sudo = (home / "sudo.calls").read_text().splitlines()
  assert sudo[:3] == ["tee /etc/apt/sources.list.d/gcsfuse.list",
                      "tee /usr/share/keyrings/cloud.google.asc", "apt-get update -qq"]
  assert sudo[3].endswith("apt-get -o DPkg::Lock::Timeout=300 install -y -qq gcsfuse")
  assert (home / "tee.gcsfuse.list").read_text() == (
      "deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
      "https://packages.cloud.google.com/apt gcsfuse-jammy main\n")
  assert (home / "tee.cloud.google.asc").read_text() == "FAKE-APT-KEY\n"
  assert (home / "gcsfuse.calls").read_text() == "\0".join([
      "--implicit-dirs", "--metadata-cache-ttl-secs=0", "my-bucket", str(home / "bucket"), "\n"])
  assert (home / "bucket").is_dir()

  second = run_on_fake_worker(command, home, env)  # installed and mounted: nothing to do
  assert second.returncode == 0, second.stderr
  assert second.stdout.endswith(": gs://my-bucket is already mounted on ~/bucket\n")
  assert len((home / "sudo.calls").read_text().splitlines()) == 4
  assert (home / "gcsfuse.calls").read_text().count("\n") == 1

  mounts(home, bucket="other-bucket")
  third = run_on_fake_worker(command, home, env)
  assert third.returncode == 1
  assert third.stderr.endswith(": ~/bucket already has other-bucket mounted; unmount it first "
                               "(fusermount -u ~/bucket)\n")
  assert (home / "gcsfuse.calls").read_text().count("\n") == 1


def test_mount_reports_a_failed_install(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  (argv,) = dry_run(tmp_path, "mount.sh", *TPU, "--bucket", "my-bucket")
  env = _env(tmp_path)
  (tmp_path / "bin" / "curl").write_text("#!/bin/bash\nexit 22\n")  # the key download fails
  env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
  if shutil.which("gcsfuse", path=env["PATH"]):
    pytest.skip("a real gcsfuse is installed")
  proc = run_on_fake_worker(remote_command(argv), home, env)
  assert proc.returncode == 1
  assert proc.stderr.endswith(": installing gcsfuse failed\n"), proc.stderr
  assert (home / "sudo.calls").read_text() == "tee /etc/apt/sources.list.d/gcsfuse.list\n"
  assert not (home / "gcsfuse.calls").exists()


def test_upload_to_the_bucket(tmp_path):
  photos = tmp_path / "dog"
  photos.mkdir()
  assert dry_run(tmp_path, "upload.sh", "--local-dir", str(photos), "--bucket", "gs://b-1") == [[
      "gcloud", "storage", "rsync", "--recursive", "--delete-unmatched-destination-objects",
      str(photos), "gs://b-1/data/dog"]]
  assert dry_run(tmp_path, "upload.sh", f"--local-dir={photos}/", "--bucket=b-1",
                 "--data-name=rex", "--project=p") == [[
      "gcloud", "storage", "rsync", "--recursive", "--delete-unmatched-destination-objects",
      str(photos), "gs://b-1/data/rex", "--project=p"]]


def test_upload_to_every_worker_replaces_the_old_copy(tmp_path):
  photos = tmp_path / "my photos"
  photos.mkdir()
  (photos / "1.jpg").write_text("new 1")
  home = tmp_path / "home"
  (home / "data" / "dog").mkdir(parents=True)
  (home / "data" / "dog" / "old.jpg").write_text("an old photo")
  (home / "data" / "cat").mkdir()
  rm, scp = dry_run(tmp_path, "upload.sh", *TPU, "--local-dir", str(photos), "--data-name=dog")
  assert rm[:8] == GCLOUD + ["ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
  assert remote_command(rm) == "rm -rf ~/data/dog && mkdir -p ~/data"
  assert scp == GCLOUD + ["scp", "--recurse", str(photos), "my-tpu:data/dog",
                          "--zone=us-central2-b", "--worker=all"]
  proc = run_on_fake_worker(remote_command(rm), home, _env(tmp_path))
  assert proc.returncode == 0, proc.stderr
  shutil.copytree(scp[6], home / scp[7].split(":", 1)[1])  # what scp -r does
  assert sorted(p.name for p in (home / "data" / "dog").iterdir()) == ["1.jpg"]
  assert (home / "data" / "cat").is_dir()


def test_download_the_export(tmp_path):
  assert dry_run(tmp_path, "download.sh", "--bucket", "gs://b-1", "--run", "dog") == [
      ["mkdir", "-p", "runs/dog/export"],
      ["gcloud", "storage", "rsync", "--recursive", "gs://b-1/runs/dog/export",
       "runs/dog/export"]]
  assert dry_run(tmp_path, "download.sh", "--bucket=b-1", "--run=dog", "--to", "/x/my export",
                 "--project=p") == [
      ["mkdir", "-p", "/x/my export"],
      ["gcloud", "storage", "rsync", "--recursive", "gs://b-1/runs/dog/export", "/x/my export",
       "--project=p"]]
  work = tmp_path / "work"
  work.mkdir()
  proc = run_script(tmp_path, "download.sh", "--bucket=b-1", "--run=dog", cwd=work)
  assert proc.returncode == 0, proc.stderr
  assert (work / "runs" / "dog" / "export").is_dir()
  assert gcloud_calls(tmp_path) == ["storage", "rsync", "--recursive", "gs://b-1/runs/dog/export",
                                    "runs/dog/export"]


# --- launch with the workdir in the bucket; logs of all workers -------------------------------

def test_launch_sends_home_relative_flags_for_the_worker_to_expand(tmp_path):
  (argv,) = dry_run(tmp_path, "launch.sh", *TPU, "--", *BUCKET_FLAGS, "--config.x=~",
                    "--config.y=a~/b", "~/z")
  command = remote_command(argv)
  assert ('--workdir="$HOME"/bucket/runs/dog '
          '--config.data.instance_dir="$HOME"\'/bucket/data/my dog\' --config.data.class_name=dog'
          ' --config.x="$HOME" --config.y=\'a~/b\' "$HOME"/z') in command
  assert command.startswith("mountpoint -q ~/bucket || ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_launch_on_a_fake_worker_needs_the_bucket_mounted(tmp_path):
  home = tmp_path / "home"
  (home / "dreambooth-jax").mkdir(parents=True)
  (home / "bucket").mkdir()  # the mount point exists, but nothing is mounted on it
  (home / "stop").touch()  # the fake python3 returns at once
  env = _env(tmp_path)
  (argv,) = dry_run(tmp_path, "launch.sh", *TPU, "--", *BUCKET_FLAGS)
  command = remote_command(argv)

  refused = run_on_fake_worker(command, home, env)
  assert refused.returncode == 1
  assert refused.stderr.endswith(": ~/bucket is not a mounted bucket; run mount.sh first\n")
  assert not (home / "dreambooth_logs").exists() and not (home / "python3.argv").exists()

  mounts(home, bucket="my-bucket")
  started = run_on_fake_worker(command, home, env)
  assert started.returncode == 0, started.stderr
  argv_file = home / "python3.argv"
  for _ in range(50):
    if argv_file.exists() and argv_file.read_text().endswith("\0"):
      break
    time.sleep(0.1)
  assert argv_file.read_text().split("\0")[:-1] == [
      "-m", "dreambooth_jax.main", "--config=configs/sd15.py", f"--workdir={home}/bucket/runs/dog",
      f"--config.data.instance_dir={home}/bucket/data/my dog", "--config.data.class_name=dog"]


def test_launch_without_bucket_paths_checks_no_mount(tmp_path):
  (argv,) = dry_run(tmp_path, "launch.sh", *TPU, "--", *TRAIN_FLAGS, "--config.z=~/bucketx")
  assert "mountpoint" not in remote_command(argv)


def test_logs_follows_all_workers(tmp_path):
  (argv,) = dry_run(tmp_path, "logs.sh", *TPU, "--worker=all", "--lines=20")
  assert argv == GCLOUD + [
      "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all",
      '--command=tail -n 20 -f ~/dreambooth_logs/train.log | sed -u "s/^/$(hostname): /"']
  # The prefixing part, on a finished log instead of a followed one:
  log = tmp_path / "train.log"
  log.write_text("step 1\nstep 2\n")
  pipe = remote_command(argv).replace("tail -n 20 -f ~/dreambooth_logs/train.log", f"cat {log}")
  proc = subprocess.run(["bash", "-c", pipe], capture_output=True, text=True, timeout=10)
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  assert proc.stdout == f"{host}: step 1\n{host}: step 2\n"


def test_setup_installs_the_extras_asked_for(tmp_path):
  (argv,) = dry_run(tmp_path, "setup.sh", *TPU, "--repo=https://example.com/db.git",
                    "--extras", "tpu,gcs")
  assert remote_command(argv).endswith('python3 -m pip install -e ".[tpu,gcs]"')


def test_readme_walks_through_every_script():
  text = (SCRIPTS / "README.md").read_text()
  assert "## Running on a TPU VM / pod slice" in text
  for name in ENTRY_POINTS:
    assert f"tpu_scripts/{name}" in text, name
  for needle in ("gcloud services enable tpu.googleapis.com", "v4-32", "--worker=all",
                 "jax.distributed", "~/bucket/runs/dog", "download.sh"):
    assert needle in text, needle


@pytest.mark.parametrize("script", VM_SCRIPTS + ["upload.sh"])
def test_missing_zone_is_a_one_line_usage_error(tmp_path, script):
  args = ["--name", "my-tpu", "--dry-run"]
  if script == "launch.sh":
    args += ["--", *TRAIN_FLAGS]
  elif script == "mount.sh":
    args += ["--bucket", "b-1"]
  elif script == "upload.sh":
    args += ["--local-dir", str(tmp_path)]
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
    ("logs.sh", [*TPU, "--worker", "al"], "--worker al: expected a worker index"),
    ("create.sh", [*TPU, "--queued", "--accelerator-type", "v3-8"], "v3-8: unknown TPU family"),
    ("mount.sh", TPU, "--bucket is required"),
    ("mount.sh", [*TPU, "--bucket", "My_Bucket"], "--bucket My_Bucket: not a bucket name"),
    ("bucket.sh", ["--bucket", "b-1"], "--location is required"),
    ("bucket.sh", ["--location", "us-central1"], "--bucket is required"),
    ("upload.sh", ["--bucket", "b-1"], "--local-dir is required"),
    ("upload.sh", ["--bucket", "b-1", "--local-dir", "/nonexistent"], "not a directory"),
    ("upload.sh", ["--bucket", "b-1", "--local-dir", "/tmp", "--data-name", "a/b"],
     "--data-name a/b: use one name"),
    ("upload.sh", ["--local-dir", "/tmp"], "--name and --zone are required"),
    ("download.sh", ["--bucket", "b-1"], "--run is required"),
    ("download.sh", ["--run", "dog"], "--bucket is required"),
    ("download.sh", ["--bucket", "b-1", "--run", "../dog"], "--run ../dog: use one name"),
    ("setup.sh", [*TPU, "--extras", "tpu gcs"], "--extras tpu gcs: expected a list"),
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
  if script in VM_SCRIPTS:
    assert proc.stdout.startswith(f"Usage: {script} --name NAME --zone ZONE")
  else:
    assert proc.stdout.startswith(f"Usage: {script} --")
  assert "--dry-run" in proc.stdout and "--queued" in proc.stdout and "--bucket" in proc.stdout
  if script == "launch.sh":
    assert "resumes the run" in proc.stdout and "resumes from the newest checkpoint in the bucket" \
        in proc.stdout


def test_without_dry_run_gcloud_gets_exactly_the_printed_command(tmp_path):
  args = [*TPU, "--spot", "--project=p", "--accelerator-type=v4-32"]
  (printed,) = dry_run(tmp_path, "create.sh", *args)
  proc = run_script(tmp_path, "create.sh", *args)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "gcloud_calls").read_text().split("\0")[:-1] == printed[1:]
