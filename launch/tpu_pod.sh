#!/usr/bin/env bash
# Cloud TPU pod jobs: create a TPU VM slice, copy this repo to every worker, install, and run the
# trainer on all workers at once (multi-host: each worker runs one process; jax.distributed
# discovers the others on TPU).
#
#   launch/tpu_pod.sh create  NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-pod us-central2-b v4-32
#   launch/tpu_pod.sh copy    NAME ZONE                         # rsync the repo to all workers
#   launch/tpu_pod.sh install NAME ZONE                         # pip install -e ".[tpu]" everywhere
#   launch/tpu_pod.sh run     NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh delete  NAME ZONE
#
# WORKDIR must be a filesystem path every worker sees (e.g. a bucket mounted with gcsfuse, or
# Filestore), so all workers read and write the same checkpoints; each worker computes the rewards of its own rows (host-local), process 0 writes
# metrics. Preemption: the trainer saves on SIGTERM; re-running `run` resumes from the latest step.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
cmd="${1:-}"; shift || true
case "$cmd" in  # argument counts after the command: min max (-1: any number of extra flags)
  create) count=(3 4) ;;
  copy|install|delete) count=(2 2) ;;
  run) count=(4 -1) ;;
  -h|--help|help) usage; exit 0 ;;
  *) [ -n "$cmd" ] && echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
if [ $# -lt "${count[0]}" ] || { [ "${count[1]}" -ge 0 ] && [ $# -gt "${count[1]}" ]; }; then
  echo "error: '$cmd' takes $([ "${count[0]}" = "${count[1]}" ] && echo "${count[0]}" || echo "at least ${count[0]}") argument(s), got $#" >&2
  usage >&2; exit 2
fi
name="$1"; zone="$2"; shift 2
repo_dir="dmpo_jax"

ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

case "$cmd" in
  create)
    accelerator="$1"
    runtime="${2:-tpu-ubuntu2204-base}"
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
      --accelerator-type="$accelerator" --version="$runtime"
    ;;
  copy)
    root="$(cd "$(dirname "$0")/.." && pwd)"
    tar -C "$root" --exclude=.git --exclude='runs' -czf /tmp/dmpo_jax_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/dmpo_jax_src.tgz "$name":/tmp/ --zone="$zone" --worker=all
    ssh_all "mkdir -p ~/$repo_dir && tar -C ~/$repo_dir -xzf /tmp/dmpo_jax_src.tgz"
    ;;
  install)
    ssh_all "cd ~/$repo_dir && python3 -m pip install -q -e '.[tpu]'"
    ;;
  run)
    config="$1"; workdir="$2"; shift 2
    extra="$*"
    ssh_all "cd ~/$repo_dir && python3 launch/train.py --distributed --config=$config --workdir=$workdir $extra"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
esac
