#!/usr/bin/env bash
# Delete a Cloud TPU VM (without asking for confirmation).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--project PROJECT] [--dry-run]

Deletes the TPU VM, its disk and everything on it (logs, and checkpoints in a local --workdir),
without asking:
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet [--project=PROJECT]

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

tpu_vm delete --quiet
