#!/usr/bin/env bash
# Mount a Cloud Storage bucket with gcsfuse on every worker of a TPU VM, at ~/bucket.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

MOUNT="~/$REMOTE_BUCKET_DIR"
GCSFUSE_FLAGS="--implicit-dirs --metadata-cache-ttl-secs=0"

usage() {
  cat <<HELP
Usage: $PROG --name NAME --zone ZONE --bucket BUCKET [--project PROJECT] [--dry-run]

On every worker (--worker=all), one command that installs gcsfuse (Cloud Storage FUSE, from
Google's apt repository) if it is missing and mounts the bucket at $MOUNT:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='...
         gcsfuse $GCSFUSE_FLAGS BUCKET $MOUNT ...'
so that one path names the same files on every worker: use --workdir=$MOUNT/runs/RUN and
--config.data.instance_dir=$MOUNT/data/NAME in launch.sh. On a pod slice (several hosts)
the workdir must be such a shared directory: every process writes its part of each checkpoint
there, and process 0 writes the rest. The bucket should have a hierarchical namespace
(bucket.sh makes one; see there why).

--metadata-cache-ttl-secs=0 turns gcsfuse's metadata cache off, so that each worker sees the
files the others have just written; --implicit-dirs shows folders that exist only as object
name prefixes (e.g. uploaded with gcloud storage).

A worker where the bucket is already mounted is left alone; one where $MOUNT holds another
mount fails. Mounts do not survive a restart of the VM: run this again after one. The VM's
service account needs read/write access to the bucket (see README.md). To unmount:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='fusermount -u $MOUNT'

$COMMON_FLAGS_HELP
HELP
}

parse_args "$@"
require_name_zone
require_bucket

b=$(quote "$TPU_BUCKET")
host='$(hostname)'
apt_repo="deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main"

# One shell command line for the worker's login shell (POSIX sh: no pipefail, so the key is
# fetched into a variable, where a failed download is seen); every failure ends it with exit 1
# and a message naming the host.
remote="if ! command -v gcsfuse >/dev/null 2>&1; then echo \"$host: installing gcsfuse\";\
 { echo \"$apt_repo\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null\
 && key=\$(curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg)\
 && echo \"\$key\" | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null\
 && sudo apt-get update -qq\
 && sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq gcsfuse; }\
 || { echo \"$host: installing gcsfuse failed\" >&2; exit 1; }; fi;\
 mkdir -p $MOUNT || exit 1;\
 src=\$(findmnt -n -o SOURCE --mountpoint $MOUNT);\
 if [ \"\$src\" = $b ]; then echo \"$host: gs://$b is already mounted on $MOUNT\";\
 elif [ -n \"\$src\" ]; then echo \"$host: $MOUNT already has \$src mounted; unmount it first (fusermount -u $MOUNT)\" >&2; exit 1;\
 else gcsfuse $GCSFUSE_FLAGS $b $MOUNT\
 || { echo \"$host: gcsfuse could not mount gs://$b on $MOUNT\" >&2; exit 1; };\
 echo \"$host: mounted gs://$b on $MOUNT\"; fi"

ssh_workers all "$remote"
