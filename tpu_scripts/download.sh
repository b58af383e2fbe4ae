#!/usr/bin/env bash
# Download the exported pipeline of a run from the bucket.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

EXTRA_VALUE_FLAGS="run to"

usage() {
  cat <<HELP
Usage: $PROG --bucket BUCKET --run RUN [--to DIR] [--project PROJECT] [--dry-run]

Copies the exported diffusers pipeline of the run whose --workdir was ~/$REMOTE_BUCKET_DIR/runs/RUN
(gs://BUCKET/runs/RUN/export) to DIR (default: runs/RUN/export here), fetching only what is
missing or changed:
  mkdir -p DIR
  gcloud storage rsync --recursive gs://BUCKET/runs/RUN/export DIR [--project=PROJECT]
The trainer writes the export at the end of the run (as export.tmp, renamed when complete), so
it exists once the log says "Done.". Then, e.g.:
  python -m dreambooth_jax.sample --pipeline=DIR --prompt="a photo of sks dog on the beach" --out=beach

Flags of this script:
  --run RUN                 the run's name: its workdir is gs://BUCKET/runs/RUN (required)
  --to DIR                  local destination (default: runs/RUN/export)

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_bucket
run_name=${OPT_run:-}
[[ -n "$run_name" ]] || die "--run is required (see --help)"
require_simple_name --run "$run_name"
to=${OPT_to:-runs/$run_name/export}

run mkdir -p "$to"
with_project gcloud storage rsync --recursive "gs://$TPU_BUCKET/runs/$run_name/export" "$to"
