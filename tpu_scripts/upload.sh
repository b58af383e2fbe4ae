#!/usr/bin/env bash
# Copy a local directory of instance images to the bucket, or to every worker of a TPU VM.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

EXTRA_VALUE_FLAGS="local-dir data-name"

usage() {
  cat <<HELP
Usage: $PROG --local-dir DIR [--data-name NAME] --bucket BUCKET [--project PROJECT] [--dry-run]
       $PROG --local-dir DIR [--data-name NAME] --name TPU --zone ZONE [--project PROJECT] [--dry-run]

With --bucket, makes gs://BUCKET/data/NAME an exact copy of DIR (files that are no longer in
DIR are deleted there, so the run sees exactly your photos):
  gcloud storage rsync --recursive --delete-unmatched-destination-objects DIR gs://BUCKET/data/NAME
On workers where mount.sh mounted the bucket, train with
  --config.data.instance_dir=~/$REMOTE_BUCKET_DIR/data/NAME

Without --bucket, copies DIR to ~/$REMOTE_DATA_DIR/NAME on every worker of the TPU VM (replacing
what was there):
  gcloud compute tpus tpu-vm ssh TPU --zone=ZONE --worker=all --command='rm -rf ~/$REMOTE_DATA_DIR/NAME && mkdir -p ~/$REMOTE_DATA_DIR'
  gcloud compute tpus tpu-vm scp --recurse DIR TPU:$REMOTE_DATA_DIR/NAME --zone=ZONE --worker=all
and train with --config.data.instance_dir=~/$REMOTE_DATA_DIR/NAME. Every worker reads the images
from its own copy, which is fine on a pod slice too (only the workdir must be shared). A copy
on the VM's disk is lost with the VM; one in the bucket is not.

A third way needs no copy: images already in a bucket can be read directly with
--config.data.instance_dir=gs://BUCKET/PATH (install with setup.sh --extras tpu,gcs).

Flags of this script:
  --local-dir DIR           the directory of instance images (required)
  --data-name NAME          the name of the copy (default: the name of DIR)

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"

local_dir=${OPT_local_dir:-}
[[ -n "$local_dir" ]] || die "--local-dir is required (see --help)"
[[ -d "$local_dir" ]] || die "--local-dir $local_dir: not a directory"
local_dir=$(cd "$local_dir" && pwd)
data_name=${OPT_data_name:-$(basename "$local_dir")}
require_simple_name --data-name "$data_name"

if [[ -n "$TPU_BUCKET" ]]; then
  require_bucket
  with_project gcloud storage rsync --recursive --delete-unmatched-destination-objects \
    "$local_dir" "gs://$TPU_BUCKET/data/$data_name"
else
  require_name_zone
  dest="$REMOTE_DATA_DIR/$data_name"
  ssh_workers all "rm -rf ~/$dest && mkdir -p ~/$REMOTE_DATA_DIR"
  with_project gcloud compute tpus tpu-vm scp --recurse "$local_dir" "$TPU_NAME:$dest" \
    "--zone=$TPU_ZONE" --worker=all
fi
