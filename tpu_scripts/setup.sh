#!/usr/bin/env bash
# Put the repository on every worker of a TPU VM and install it with pip install -e ".[tpu]".
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

EXTRA_VALUE_FLAGS="repo local-dir extras"
STAGING_DIR="$REMOTE_DIR.upload"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE [--repo URL | --local-dir DIR] [--extras LIST]
                [--project PROJECT] [--dry-run]

Puts the code in ~/$REMOTE_DIR on every worker (--worker=all) and installs it there with
  python3 -m pip install -e ".[tpu]"          (".[tpu,gcs]" with --extras tpu,gcs)

Default: copies this checkout ($REPO_ROOT), as it is on disk (uncommitted and untracked
files included), with three commands:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='rm -rf ~/$STAGING_DIR'
  gcloud compute tpus tpu-vm scp --recurse LOCAL_DIR NAME:$STAGING_DIR --zone=ZONE --worker=all
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='mkdir -p ~/$REMOTE_DIR
         && cp -a ~/$STAGING_DIR/. ~/$REMOTE_DIR/ && rm -rf ~/$STAGING_DIR && cd ~/$REMOTE_DIR
         && python3 -m pip install -e ".[tpu]"'
The copy goes through a staging directory and is merged into ~/$REMOTE_DIR, so nothing already
there (e.g. a relative --workdir of an earlier run) is deleted. Keep large files (datasets,
run directories, virtual environments) out of the directory you copy, or use --local-dir.

With --repo URL, one command clones it instead (or, when ~/$REMOTE_DIR is already a git
checkout, runs git pull --ff-only there) and installs it.

Run it again after changing the code. Next: launch.sh.

Flags of this script:
  --repo URL                git URL to clone on the workers instead of copying a local directory
  --local-dir DIR           local directory to copy (default: $REPO_ROOT)
  --extras LIST             the package extras to install (default: tpu; add gcs to read
                            --config.data.instance_dir=gs://... directly)

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone

repo=${OPT_repo:-}
local_dir=${OPT_local_dir:-$REPO_ROOT}
[[ -z "$repo" || -z "${OPT_local_dir:-}" ]] || die "--repo and --local-dir exclude each other"

extras=${OPT_extras:-tpu}
[[ "$extras" =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] || die "--extras $extras: expected a list such as tpu,gcs"

install="cd ~/$REMOTE_DIR && python3 -m pip install -e \".[$extras]\""

if [[ -n "$repo" ]]; then
  q_repo=$(quote "$repo")
  ssh_workers all "if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR pull --ff-only;\
 else git clone $q_repo ~/$REMOTE_DIR; fi && $install"
else
  [[ -f "$local_dir/pyproject.toml" ]] || die "--local-dir $local_dir: no pyproject.toml there"
  local_dir=$(cd "$local_dir" && pwd)
  ssh_workers all "rm -rf ~/$STAGING_DIR"
  tpu_vm_scp=(gcloud compute tpus tpu-vm scp --recurse "$local_dir" "$TPU_NAME:$STAGING_DIR"
    "--zone=$TPU_ZONE" --worker=all)
  [[ -z "$TPU_PROJECT" ]] || tpu_vm_scp+=("--project=$TPU_PROJECT")
  run "${tpu_vm_scp[@]}"
  ssh_workers all "mkdir -p ~/$REMOTE_DIR && cp -a ~/$STAGING_DIR/. ~/$REMOTE_DIR/\
 && rm -rf ~/$STAGING_DIR && $install"
fi
