#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice.
#   launch/tpu_pod.sh NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# WORKDIR must be shared by all hosts (e.g. gs://bucket/run); data must be readable by all hosts.
# Installs the checkout on each worker, then runs the same command everywhere; jax.distributed
# discovers the pod topology by itself (--multihost).
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: $0 NAME ZONE CONFIG WORKDIR [overrides...]" >&2; exit 2; fi
NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$REPO" "$NAME":~/dlm_jax
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command "
  set -e; cd ~/dlm_jax
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -m dlm_jax.train --multihost --config=$CONFIG --workdir=$WORKDIR $*"
