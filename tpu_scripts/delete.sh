#!/usr/bin/env bash
# Delete a Cloud TPU VM, or a queued resource and its TPU VM (without asking for confirmation).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--queued] [--project PROJECT] [--dry-run]

Deletes the TPU VM, its disk and everything on it (logs, the code, and checkpoints in a
--workdir on its disk; a --workdir in the mounted bucket is kept), without asking:
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet [--project=PROJECT]
With --queued, deletes the queued resource NAME and (--force) its TPU VM, whatever its state
(waiting, active, suspended after a preemption, failed):
  gcloud compute tpus queued-resources delete NAME --zone=ZONE --quiet --force [--project=PROJECT]

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

if [[ "$TPU_QUEUED" == 1 ]]; then
  queued_resource delete "--zone=$TPU_ZONE" --quiet --force
else
  tpu_vm delete --quiet
fi
