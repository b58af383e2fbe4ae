#!/usr/bin/env bash
# Create a Cloud TPU VM.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--accelerator-type TYPE] [--version VERSION] [--spot]
                 [--project PROJECT] [--dry-run]

Creates the TPU VM:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=VERSION
         [--spot] [--project=PROJECT]
Next: setup.sh with the same --name/--zone.

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

args=("--accelerator-type=$TPU_ACCELERATOR_TYPE" "--version=$TPU_VERSION")
[[ "$TPU_SPOT" == 0 ]] || args+=(--spot)
tpu_vm create "${args[@]}"
