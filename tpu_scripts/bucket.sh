#!/usr/bin/env bash
# Create the Cloud Storage bucket that holds the instance images and the run directories.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

EXTRA_VALUE_FLAGS="location"

usage() {
  cat <<HELP
Usage: $PROG --bucket BUCKET --location LOCATION [--project PROJECT] [--dry-run]

Creates the bucket with a hierarchical namespace (real folders), which mount.sh mounts on
every worker:
  gcloud storage buckets create gs://BUCKET --location=LOCATION --uniform-bucket-level-access
         --enable-hierarchical-namespace [--project=PROJECT]
The hierarchical namespace matters: the trainer renames directories (an Orbax checkpoint is
written as a temporary folder and renamed when complete; the export likewise), and through
gcsfuse only such a bucket renames a folder with everything in it, atomically. It cannot be
turned on for an existing bucket.

Bucket names are global: pick one nobody has taken (e.g. PROJECT-dreambooth). Choose the
TPU's region for LOCATION, or the nearest region that offers buckets (e.g. us-central1 for
a TPU in us-central2-b).

Layout used by the other scripts: gs://BUCKET/data/NAME (instance images, upload.sh),
gs://BUCKET/runs/NAME (the --workdir of launch.sh, as ~/$REMOTE_BUCKET_DIR/runs/NAME on the workers).

Flags of this script:
  --location LOCATION       bucket region, e.g. us-central1, europe-west4 (required)

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_bucket
location=${OPT_location:-}
[[ -n "$location" ]] || die "--location is required (see --help)"
[[ "$location" =~ ^[A-Za-z0-9-]+$ ]] || die "--location $location: expected a region such as us-central1"

with_project gcloud storage buckets create "gs://$TPU_BUCKET" "--location=$location" \
  --uniform-bucket-level-access --enable-hierarchical-namespace
