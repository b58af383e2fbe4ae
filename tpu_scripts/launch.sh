#!/usr/bin/env bash
# Start (or resume) DreamBooth training in the background on every worker of a TPU VM.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

ALLOW_PASSTHROUGH=1
PID_FILE="$REMOTE_LOG_DIR/train.pid"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--project PROJECT] [--dry-run] -- TRAINING_FLAGS...

Starts the training on every worker (--worker=all) in the background, detached with nohup, so
that it survives the ssh session:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='...
         cd ~/$REMOTE_DIR && nohup python3 -m dreambooth_jax.main TRAINING_FLAGS...
         >> ~/$REMOTE_LOG 2>&1 < /dev/null & ...'
Every argument after -- is passed unchanged to python3 -m dreambooth_jax.main; --config and
--workdir are required. Relative paths are relative to ~/$REMOTE_DIR on the worker (the
checkout setup.sh made), and data paths such as --config.data.instance_dir must exist on every
worker.

Each worker appends its output to its own ~/$REMOTE_LOG (follow it with logs.sh) and
records the process id in ~/$PID_FILE; a worker where that process is still running
refuses to start a second one. To stop the training:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='kill \$(cat ~/$PID_FILE)'

Resuming: running the same launch.sh command again (after a crash, a stop, or a restart of the
VM) resumes the run, because the trainer continues from the newest checkpoint in its
--workdir. Use the same --workdir, and note that a VM that was deleted (or a Spot VM that was
preempted and recreated) has lost a --workdir that lived on its disk.

Example:
  $PROG --name my-tpu --zone us-central2-b -- --config=configs/sd15.py --workdir=runs/dog \\
      --config.data.instance_dir=/data/dog --config.data.instance_prompt="a photo of sks dog" \\
      --config.data.class_prompt="a photo of dog"

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

# The trainer needs --config and --workdir (absl also accepts -flag and "--flag VALUE").
has_flag() {
  local a
  for a in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
    case "$a" in "--$1" | "--$1="* | "-$1" | "-$1="*) return 0 ;; esac
  done
  return 1
}
((${#PASSTHROUGH[@]})) ||
  die "no training flags: put them after --, e.g. -- --config=configs/sd15.py --workdir=DIR"
has_flag config || die "training flags lack --config (e.g. -- --config=configs/sd15.py ...)"
has_flag workdir || die "training flags lack --workdir (the run directory that a relaunch resumes)"

train_cmd="python3 -m dreambooth_jax.main $(quote_all "${PASSTHROUGH[@]}")"
log="~/$REMOTE_LOG"
pid_file="~/$PID_FILE"

# One shell command line for the worker's login shell. Every step that can fail ends that
# worker's command with exit 1 and a message naming the host.
remote="mkdir -p ~/$REMOTE_LOG_DIR || exit 1;\
 cd ~/$REMOTE_DIR 2>/dev/null || { echo \"\$(hostname): no ~/$REMOTE_DIR, run setup.sh first\" >&2; exit 1; };\
 pid=\$(cat $pid_file 2>/dev/null);\
 if [ -n \"\$pid\" ] && grep -qs dreambooth_jax.main /proc/\$pid/cmdline; then\
 echo \"\$(hostname): training already running (pid \$pid), not starting another\" >&2; exit 1; fi;\
 echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) launch:\" $train_cmd >> $log;\
 nohup $train_cmd >> $log 2>&1 < /dev/null &\
 echo \$! > $pid_file && echo \"\$(hostname): training started, pid \$!, log $log\""

ssh_workers all "$remote"
