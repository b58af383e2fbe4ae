# shellcheck shell=bash
# Shared by the tpu_scripts/*.sh entry points (source it, do not run it): flag parsing, error
# handling and the `run` helper that prints (--dry-run) or executes one gcloud command.
#
# Written for bash >= 3.2 (the macOS /bin/bash too): no associative arrays, and empty arrays are
# only expanded as ${a[@]+"${a[@]}"} so that `set -u` accepts them.

set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "common.sh: source this file from the other tpu_scripts, do not run it" >&2
  exit 2
fi

PROG=$(basename "$0")
TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)

# Paths on every TPU VM worker, relative to the remote user's home directory.
REMOTE_DIR="dreambooth-jax"            # the checkout that setup.sh installs and launch.sh runs in
REMOTE_LOG_DIR="dreambooth_logs"       # launch.sh writes train.log and train.pid here
REMOTE_LOG="$REMOTE_LOG_DIR/train.log"
REMOTE_BUCKET_DIR="bucket"             # mount.sh mounts --bucket here on every worker (gcsfuse)
REMOTE_DATA_DIR="data"                 # upload.sh without --bucket copies instance images here

# Common flags (every script accepts all of them, so one set of flags can be reused for the whole
# create → setup → launch → logs → delete sequence; flags a script has no use for are ignored).
TPU_NAME=""
TPU_ZONE=""
TPU_PROJECT=""
TPU_ACCELERATOR_TYPE="v4-8"
TPU_VERSION=""                         # "" = create.sh picks the default of the TPU family
TPU_SPOT=0
TPU_QUEUED=0
TPU_BUCKET=""
DRY_RUN=0

# A script may set, before calling parse_args:
#   EXTRA_VALUE_FLAGS="repo local-dir"  its own flags that take a value; --local-dir=X sets OPT_local_dir=X
#   EXTRA_BOOL_FLAGS="..."              its own flags without a value; they set OPT_<name>=1
#   ALLOW_PASSTHROUGH=1                 accept `-- ARGS...`; they land in PASSTHROUGH
EXTRA_VALUE_FLAGS="${EXTRA_VALUE_FLAGS:-}"
EXTRA_BOOL_FLAGS="${EXTRA_BOOL_FLAGS:-}"
ALLOW_PASSTHROUGH="${ALLOW_PASSTHROUGH:-0}"
PASSTHROUGH=()

COMMON_FLAGS_HELP="Common flags (accepted by every script; ignored where they do not apply):
  --name NAME               TPU VM (or queued resource) name; required where a script acts on one
  --zone ZONE               its zone, e.g. us-central2-b; required with --name
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE   create.sh: v4-N, v5litepod-N (v5e), v5p-N or v6e-N (default: v4-8)
  --version VERSION         create.sh: TPU runtime version (default by family: v4 tpu-ubuntu2204-base,
                            v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                    create.sh: Spot capacity (cheaper, can be preempted at any time)
  --queued                  create.sh, delete.sh, status.sh: a queued resource named NAME (its one
                            node is also named NAME) instead of a plain TPU VM
  --bucket BUCKET           Cloud Storage bucket (name or gs://name) for bucket.sh, mount.sh,
                            upload.sh and download.sh
  --dry-run                 print the commands, one per line, instead of running them
  -h, --help                show this help
Flags take their value as --flag VALUE or --flag=VALUE."

# die MESSAGE: one line on stderr, exit 2 (usage error).
die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

_word_in() {  # _word_in WORD LIST...: is WORD one of LIST?
  local w=$1 x
  shift
  for x in "$@"; do
    [[ "$x" == "$w" ]] && return 0
  done
  return 1
}

# parse_args "$@": fills the TPU_* variables, OPT_* for the script's own flags, PASSTHROUGH.
parse_args() {
  local arg flag val has_val name
  while (($#)); do
    arg=$1
    shift
    has_val=0
    case "$arg" in
      --)
        [[ "$ALLOW_PASSTHROUGH" == 1 ]] || die "unexpected arguments after -- (see --help)"
        PASSTHROUGH=("$@")
        return 0
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --*=*)
        flag=${arg%%=*}
        val=${arg#*=}
        has_val=1
        ;;
      --?*) flag=$arg ;;
      *) die "unexpected argument: $arg (see --help)" ;;
    esac
    name=${flag#--}
    # shellcheck disable=SC2086  # the flag lists are space-separated words
    if _word_in "$name" name zone project accelerator-type version bucket $EXTRA_VALUE_FLAGS; then
      if [[ "$has_val" == 0 ]]; then
        [[ $# -gt 0 && "$1" != --* ]] || die "$flag needs a value"
        val=$1
        shift
      fi
      [[ -n "$val" ]] || die "$flag needs a non-empty value"
      case "$name" in
        name) TPU_NAME=$val ;;
        zone) TPU_ZONE=$val ;;
        project) TPU_PROJECT=$val ;;
        accelerator-type) TPU_ACCELERATOR_TYPE=$val ;;
        version) TPU_VERSION=$val ;;
        bucket) TPU_BUCKET=$val ;;
        *) printf -v "OPT_${name//-/_}" '%s' "$val" ;;
      esac
    elif _word_in "$name" spot queued dry-run $EXTRA_BOOL_FLAGS; then
      [[ "$has_val" == 0 ]] || die "$flag takes no value"
      case "$name" in
        spot) TPU_SPOT=1 ;;
        queued) TPU_QUEUED=1 ;;
        dry-run) DRY_RUN=1 ;;
        *) printf -v "OPT_${name//-/_}" '%s' 1 ;;
      esac
    else
      die "unknown flag: $flag (see --help)"
    fi
  done
}

# require_name_zone: --name and --zone must be given, and the name must be a valid TPU name.
require_name_zone() {
  if [[ -z "$TPU_NAME" && -z "$TPU_ZONE" ]]; then
    die "--name and --zone are required (see --help)"
  fi
  [[ -n "$TPU_NAME" ]] || die "--name is required (see --help)"
  [[ -n "$TPU_ZONE" ]] || die "--zone is required (see --help)"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name $TPU_NAME: use lowercase letters, digits and hyphens, starting with a letter"
}

# require_bucket: --bucket must be given; a gs:// prefix and trailing slashes are dropped.
require_bucket() {
  [[ -n "$TPU_BUCKET" ]] || die "--bucket is required (see --help)"
  local b=${TPU_BUCKET#gs://}
  while [[ "$b" == */ ]]; do b=${b%/}; done
  [[ "$b" =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] ||
    die "--bucket $TPU_BUCKET: not a bucket name (lowercase letters, digits, -, _ and ., e.g. my-bucket)"
  TPU_BUCKET=$b
}

# require_simple_name FLAG VALUE: VALUE is one path component (letters, digits, -, _, .).
require_simple_name() {
  [[ "$2" =~ ^[A-Za-z0-9][-A-Za-z0-9_.]*$ ]] ||
    die "$1 $2: use one name of letters, digits, -, _ and . (no slashes)"
}

# with_project CMD...: run CMD... [--project=P].
with_project() {
  local cmd=("$@")
  [[ -z "$TPU_PROJECT" ]] || cmd+=("--project=$TPU_PROJECT")
  run "${cmd[@]}"
}

# quote WORD: WORD as one shell word, as readable as possible (bare, 'single-quoted', or
# printf %q's $'...' form when it holds control characters such as newlines, so that every
# command stays on one line). --flag=VALUE keeps --flag= outside the quotes.
quote() {
  local s=$1 q="'" sq="'\\''"
  if [[ "$s" =~ ^(--[A-Za-z0-9][-A-Za-z0-9_.]*=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  elif [[ -z "$s" ]]; then
    printf "''"
  elif [[ "$s" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "$s"
  elif [[ "$s" == *[[:cntrl:]]* ]]; then
    printf '%q' "$s"
  else
    printf "'%s'" "${s//$q/$sq}"
  fi
}

# quote_all WORDS...: the words quoted and joined by spaces.
quote_all() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: with --dry-run print the command on one line of stdout, shell-quoted so that it
# can be pasted into a shell; otherwise echo it on stderr and run it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote_all "$@")"
    return 0
  fi
  if [[ "$1" == gcloud ]] && ! command -v gcloud >/dev/null 2>&1; then
    echo "$PROG: error: gcloud not found on PATH (install the Google Cloud CLI, or use --dry-run)" >&2
    exit 1
  fi
  echo "+ $(quote_all "$@")" >&2
  "$@"
}

# tpu_vm SUBCOMMAND ARGS...: run `gcloud compute tpus tpu-vm SUBCOMMAND NAME --zone=Z ARGS...
# [--project=P]`.
tpu_vm() {
  local sub=$1
  shift
  with_project gcloud compute tpus tpu-vm "$sub" "$TPU_NAME" "--zone=$TPU_ZONE" "$@"
}

# queued_resource SUBCOMMAND ARGS...: run `gcloud compute tpus queued-resources SUBCOMMAND NAME
# ARGS... [--project=P]` (ARGS include --zone, whose place differs between subcommands).
queued_resource() {
  local sub=$1
  shift
  with_project gcloud compute tpus queued-resources "$sub" "$TPU_NAME" "$@"
}

# ssh_workers WORKER REMOTE_COMMAND: run REMOTE_COMMAND (a shell command line) on WORKER ("all"
# or a worker index) with `gcloud compute tpus tpu-vm ssh`.
ssh_workers() {
  tpu_vm ssh "--worker=$1" "--command=$2"
}
