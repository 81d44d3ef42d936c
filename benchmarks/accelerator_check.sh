#!/usr/bin/env bash
# The accelerator checks, as one prepared script for a session lent a GPU or TPU for minutes.
#
#   bash benchmarks/accelerator_check.sh prepare      # here, with pip: wheels into .whl/
#   bash benchmarks/accelerator_check.sh run [DIR]    # on the accelerator machine
#
# `prepare` downloads (Python 3.12, manylinux x86-64, no dependencies) the wheels of what a
# stock JAX image lacks for the train path: grain, array_record, portpicker, ml_collections.
# `run` uses the machine's own jax (built for its CUDA or TPU runtime; not this project's CPU
# pin), installs the wheels of .whl/ into /tmp/site when they are there, and then
#   1. the platform kernel's tests: tests/test_kernels.py -k cudnn (GPU) or -k splash (TPU):
#      values and gradients against dense attention, per op and through a bf16 model;
#   2. the performance table's small size at L 1024 (AR, MDLM, BD3-LM; bf16, batch 16; xla and
#      the platform kernel interleaved) with the MFU targets: train_<platform>.json / .md;
#   3. attention fwd+bwd at L 1024 and 4096 per backend (on a GPU also cudnn_mask, the patterns
#      as a dense mask for cuDNN): attention_<platform>.json / .md;
# into DIR (default $OUT, else /tmp/accelerator_check), beside kernel_tests.log and
# versions.txt. Each step has its own time limit (CHECK_TEST_S, CHECK_TRAIN_S,
# CHECK_ATTENTION_S seconds; 120 + 240 + 120 at most, under 9 minutes with the setup).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"   # the device image's python3 holds its jax
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0)

case "${1:-run}" in
prepare)
  mkdir -p .whl
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  ;;
run) ;;
*) echo "usage: $0 prepare | run [DIR]" >&2; exit 2 ;;
esac

DIR="${2:-${OUT:-/tmp/accelerator_check}}"
mkdir -p "$DIR"
export PYTHONPATH="$PWD"
# the platform first: a machine without an accelerator is refused before anything installs
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
platform=$("$PY" -c "import jax; print(jax.default_backend())") || exit 1
case "$platform" in
  gpu) export JAX_PLATFORMS=cuda; kernel=cudnn ;;
  tpu) export JAX_PLATFORMS=tpu; kernel=splash ;;
  *) echo "no accelerator here: jax's default backend is '$platform'" >&2; exit 2 ;;
esac
WHEEL_DIR="${CHECK_WHEELS:-.whl}"
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEEL_DIR"/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
{ "$PY" -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__,
  'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} | tee "$DIR/versions.txt"

echo "== 1. $kernel kernel tests"
timeout "${CHECK_TEST_S:-120}" "$PY" -m pytest -p no:xdist -p no:cacheprovider -o addopts="" \
  -q -rs tests/test_kernels.py -k "$kernel" 2>&1 | tee "$DIR/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}

# Training and attention in two processes: a step killed at its limit keeps the other's table
# (and its log lines, one per pass, are in the output either way).
echo "== 2. training, small size, L 1024: $kernel against xla"
timeout "${CHECK_TRAIN_S:-240}" "$PY" benchmarks/perf_table.py --parts train \
  --groups small-L1024 --families ar,mdlm,bd3lm --steps 5 --passes 2 --readme '' \
  --out "$DIR/train_$platform.json" 2>&1 | tee "$DIR/train_$platform.md"
train_rc=${PIPESTATUS[0]}

echo "== 3. attention fwd+bwd, L 1024 and 4096: $kernel and xla against dense"
timeout "${CHECK_ATTENTION_S:-120}" "$PY" benchmarks/perf_table.py --parts attention \
  --attention_lengths 1024,4096 --readme '' --out "$DIR/attention_$platform.json" 2>&1 \
  | tee "$DIR/attention_$platform.md"
attention_rc=${PIPESTATUS[0]}
echo "rc: kernel tests $tests_rc, training $train_rc, attention $attention_rc"
exit $(( tests_rc || train_rc || attention_rc ))
