#!/usr/bin/env bash
# Simulate a multi-host run on one machine: N processes, each with its own CPU devices,
# coordinated through jax.distributed on localhost.
#   launch/local_multiprocess.sh 2 configs/tiny.py:bd3lm,block=8 /tmp/mp_run
set -euo pipefail
N=${1:?processes} CONFIG=${2:?config} WORKDIR=${3:?workdir}; shift 3
PORT=${PORT:-12355}
PY=${PY:-.venv/bin/python}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    "$PY" -m dlm_jax.train --multihost --config="$CONFIG" --workdir="$WORKDIR" "$@" &
  pids+=($!)
done
# Forward SIGTERM/SIGINT to every worker (they save and exit together) and never orphan them.
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM INT
trap 'kill -KILL "${pids[@]}" 2>/dev/null || true' EXIT
rc=0
for p in "${pids[@]}"; do
  while true; do
    wait "$p" && break || st=$?
    kill -0 "$p" 2>/dev/null || { rc=$((rc > st ? rc : st)); break; }  # exited (else: a trap)
  done
done
trap - EXIT
exit "$rc"
