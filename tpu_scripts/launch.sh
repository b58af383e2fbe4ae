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
worker. A value that starts with ~/ (--workdir=~/$REMOTE_BUCKET_DIR/runs/dog, or a lone ~/... argument) is
the worker's home directory: it is sent as "\$HOME"/... for the worker's shell to expand.
Write such flags as --flag=~/..., never --flag ~/..., which your own shell would expand to
your local home directory.

On a pod slice (v4-32: 4 hosts) the same command runs on every worker and JAX finds the other
workers by itself; the --workdir must then be one directory that every worker sees: the bucket
that mount.sh mounted at ~/$REMOTE_BUCKET_DIR. When a flag names ~/$REMOTE_BUCKET_DIR, every worker first checks that
the bucket is mounted there and refuses to start otherwise (a run in an unmounted, empty
~/$REMOTE_BUCKET_DIR would write its checkpoints to that worker's own disk).

Each worker appends its output to its own ~/$REMOTE_LOG (follow it with logs.sh) and
records the process id in ~/$PID_FILE; a worker where that process is still running
refuses to start a second one. To stop the training:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='kill \$(cat ~/$PID_FILE)'

Resuming: running the same launch.sh command again (after a crash, a stop, or a restart of the
VM) resumes the run, because the trainer continues from the newest checkpoint in its
--workdir. Use the same --workdir. A --workdir on the VM's own disk is lost when the VM is
deleted or a Spot VM is preempted; one in the bucket is not: after a preemption, create the
VM again (create.sh, or delete.sh --queued then create.sh --queued), run mount.sh and setup.sh,
and the same launch.sh line resumes from the newest checkpoint in the bucket.

Example (one host, or a pod slice, with the bucket mounted by mount.sh):
  $PROG --name my-tpu --zone us-central2-b -- --config=configs/sd15.py \\
      --workdir=~/$REMOTE_BUCKET_DIR/runs/dog --config.data.instance_dir=~/$REMOTE_BUCKET_DIR/data/dog \\
      --config.data.class_name=dog

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

# remote_word ARG: ARG as one word for the worker's shell; a leading ~ or ~/ of the argument or
# of its --flag= value becomes "$HOME", which that shell expands to the worker's home.
FLAG_PREFIX_RE='^(--[A-Za-z0-9][-A-Za-z0-9_.]*=)?'
HOME_RE="$FLAG_PREFIX_RE~(/.*)?\$"
BUCKET_RE="$FLAG_PREFIX_RE~/$REMOTE_BUCKET_DIR(/.*)?\$"
remote_word() {
  if [[ "$1" =~ $HOME_RE ]]; then
    local prefix=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
    printf '%s"$HOME"' "$prefix"
    [[ -z "$rest" ]] || quote "$rest"
  else
    quote "$1"
  fi
}
train_cmd="python3 -m dreambooth_jax.main"
uses_bucket=0
for a in "${PASSTHROUGH[@]}"; do
  train_cmd+=" $(remote_word "$a")"
  [[ ! "$a" =~ $BUCKET_RE ]] || uses_bucket=1
done
log="~/$REMOTE_LOG"
pid_file="~/$PID_FILE"

# One shell command line for the worker's login shell. Every step that can fail ends that
# worker's command with exit 1 and a message naming the host.
remote=""
if [[ "$uses_bucket" == 1 ]]; then
  remote="mountpoint -q ~/$REMOTE_BUCKET_DIR || { echo \"\$(hostname): ~/$REMOTE_BUCKET_DIR is not a mounted bucket;\
 run mount.sh first\" >&2; exit 1; }; "
fi
remote+="mkdir -p ~/$REMOTE_LOG_DIR || exit 1;\
 cd ~/$REMOTE_DIR 2>/dev/null || { echo \"\$(hostname): no ~/$REMOTE_DIR, run setup.sh first\" >&2; exit 1; };\
 pid=\$(cat $pid_file 2>/dev/null);\
 if [ -n \"\$pid\" ] && grep -qs dreambooth_jax.main /proc/\$pid/cmdline; then\
 echo \"\$(hostname): training already running (pid \$pid), not starting another\" >&2; exit 1; fi;\
 echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname) launch:\" $train_cmd >> $log;\
 nohup $train_cmd >> $log 2>&1 < /dev/null &\
 echo \$! > $pid_file && echo \"\$(hostname): training started, pid \$!, log $log\""

ssh_workers all "$remote"
