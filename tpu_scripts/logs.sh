#!/usr/bin/env bash
# Follow the training log of one TPU VM worker, or of all of them.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

EXTRA_VALUE_FLAGS="worker lines"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--worker N|all] [--lines N] [--project PROJECT] [--dry-run]

Follows ~/$REMOTE_LOG (written by launch.sh) on one worker until you press Ctrl-C; the
training keeps running:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=N
         --command='tail -n LINES -f ~/$REMOTE_LOG' [--project=PROJECT]
With --worker=all, follows every worker's log at once, each line prefixed by its host name:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all
         --command='tail -n LINES -f ~/$REMOTE_LOG | sed -u "s/^/\$(hostname): /"'

Flags of this script:
  --worker N|all            worker index, or all (default: 0; on a pod slice each host has its
                            own log; the metrics go to metrics.jsonl in the workdir)
  --lines N                 show the last N lines first (default: 100)

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

worker=${OPT_worker:-0}
lines=${OPT_lines:-100}
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker $worker: expected a worker index (0, 1, ...) or all"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines $lines: expected a number"

if [[ "$worker" == all ]]; then
  ssh_workers all "tail -n $lines -f ~/$REMOTE_LOG | sed -u \"s/^/\$(hostname): /\""
else
  ssh_workers "$worker" "tail -n $lines -f ~/$REMOTE_LOG"
fi
