#!/usr/bin/env bash
# Create a Cloud TPU VM, or a queued resource that creates one when capacity is free.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--accelerator-type TYPE] [--version VERSION] [--spot]
                 [--queued] [--project PROJECT] [--dry-run]

Creates the TPU VM (one host for v4-8, v5p-8, v5litepod-8, v6e-8; several for larger slices,
e.g. 4 for v4-32):
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=VERSION
         [--spot] [--project=PROJECT]
or with --queued a queued resource, which waits in line for capacity and then creates the TPU
VM (its node) under the same NAME:
  gcloud compute tpus queued-resources create NAME --node-id=NAME --zone=ZONE
         --accelerator-type=TYPE --runtime-version=VERSION [--spot] [--project=PROJECT]
A queued resource is ready when status.sh --queued prints ACTIVE.

Accelerator types and the runtime version used when --version is not given:
  v4-8, v4-16, v4-32, ...               (v4)   tpu-ubuntu2204-base
  v5litepod-1, v5litepod-8, ...         (v5e)  v2-alpha-tpuv5-lite
  v5p-8, v5p-16, ...                    (v5p)  v2-alpha-tpuv5
  v6e-1, v6e-8, ...                     (v6e)  v2-alpha-tpuv6e
Each family exists only in some zones (e.g. v4 in us-central2-b); see Google's TPU regions page.

Next: mount.sh (a pod slice, or any run you want to survive the VM), setup.sh, launch.sh.

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

# The family of an accelerator type, or nothing for an unknown one.
tpu_family() {
  if [[ "$1" =~ ^v4-[0-9]+$ ]]; then echo v4
  elif [[ "$1" =~ ^v5litepod-[0-9]+$ ]]; then echo v5e
  elif [[ "$1" =~ ^v5p-[0-9]+$ ]]; then echo v5p
  elif [[ "$1" =~ ^v6e-[0-9]+$ ]]; then echo v6e
  fi
}

family=$(tpu_family "$TPU_ACCELERATOR_TYPE")
[[ -n "$family" ]] || die "--accelerator-type $TPU_ACCELERATOR_TYPE: unknown TPU family;\
 use v4-N, v5litepod-N (v5e), v5p-N or v6e-N"
version=$TPU_VERSION
if [[ -z "$version" ]]; then
  case "$family" in
    v4) version=tpu-ubuntu2204-base ;;
    v5e) version=v2-alpha-tpuv5-lite ;;
    v5p) version=v2-alpha-tpuv5 ;;
    v6e) version=v2-alpha-tpuv6e ;;
  esac
fi

spot=()
[[ "$TPU_SPOT" == 0 ]] || spot=(--spot)

if [[ "$TPU_QUEUED" == 1 ]]; then
  queued_resource create "--node-id=$TPU_NAME" "--zone=$TPU_ZONE" \
    "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--runtime-version=$version" ${spot[@]+"${spot[@]}"}
else
  tpu_vm create "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--version=$version" \
    ${spot[@]+"${spot[@]}"}
fi
