#!/usr/bin/env bash
# Print the state of a Cloud TPU VM or of a queued resource (one word).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--queued] [--project PROJECT] [--dry-run]

Prints the state of the TPU VM (READY, CREATING, PREEMPTED, ...):
  gcloud compute tpus tpu-vm describe NAME --zone=ZONE --format='value(state)' [--project=PROJECT]
or with --queued of the queued resource (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
SUSPENDED after a preemption, FAILED, ...):
  gcloud compute tpus queued-resources describe NAME --zone=ZONE --format='value(state.state)'
         [--project=PROJECT]

To wait until a queued resource is ready:
  until [ "\$($PROG --name NAME --zone ZONE --queued)" = ACTIVE ]; do sleep 60; done

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

if [[ "$TPU_QUEUED" == 1 ]]; then
  queued_resource describe "--zone=$TPU_ZONE" "--format=value(state.state)"
else
  tpu_vm describe "--format=value(state)"
fi
