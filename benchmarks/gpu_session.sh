#!/usr/bin/env bash
# A GPU session's work. FIRST, one device command of under 9 minutes:
#
#   bash benchmarks/gpu_session.sh proof      # = python3 -m benchmarks.gpu_proof
#   bash benchmarks/gpu_session.sh optional   # second command, < 5 min: generation, train MFU
#
# The proof checks every kernel against XLA on the device, times the headline
# ratios on the device and sweeps config variants with the time left; its last
# lines are a compact table, and $OUT gets proof.log, results.json,
# summary.txt and the tuned configs (<device kind>.json). Record every figure
# in benchmarks/RESULTS.md before using the GPU for anything else.
#
# Longer stages for sessions with more device time (each ~10 minutes):
#
#   bash benchmarks/gpu_session.sh check    # tests/test_on_gpu.py (74 cases)
#   bash benchmarks/gpu_session.sh kernels  # full spmm, quant_matmul, attention tables
#   bash benchmarks/gpu_session.sh models   # opt shapes for spmm, generation, train
#
# Each benchmark gets its own time limit so a slow one cannot starve the rest;
# logs go to ${OUT:-benchmarks/logs}/<stage>/, headed by the device, jax
# version and date that benchmarks/RESULTS.md asks for.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh proof|optional|check|kernels|models}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

case $stage in
  proof)
    exec $PY -m benchmarks.gpu_proof
    ;;
  optional)
    exec $PY -m benchmarks.gpu_proof --optional
    ;;
esac

logs=${OUT:-benchmarks/logs}/$stage
mkdir -p "$logs"

run() {  # run NAME SECONDS COMMAND...: one log per step, limit in seconds
  local name=$1 limit=$2
  shift 2
  {
    date -u +"# %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
    $PY -c 'import jax; print("# jax", jax.__version__, jax.devices()[0].device_kind)'
    echo "# $*"
  } >"$logs/$name.log" 2>&1
  timeout "$limit" "$@" >>"$logs/$name.log" 2>&1
  echo "$name: exit $? ($(tail -n 1 "$logs/$name.log"))"
}

case $stage in
  check)
    run self_check 120 $PY -c 'from pallax.pallas_kernels import sparse; print(sparse._mosaic_self_check())'
    run test_on_gpu 420 $PY -m pytest -q -rf tests/test_on_gpu.py
    ;;
  kernels)
    run spmm_llama 150 $PY -m benchmarks.spmm --models llama
    run spmm_llama_dense_decode 90 $PY -m benchmarks.spmm --models llama --decode dense
    run quant_matmul 150 $PY -m benchmarks.quant_matmul
    run attention 170 $PY -m benchmarks.attention
    ;;
  models)
    run spmm_opt30b 150 $PY -m benchmarks.spmm --models opt30b
    run generation 200 $PY -m benchmarks.generation
    run train 220 $PY -m benchmarks.train
    ;;
  *)
    echo "unknown stage $stage (proof|optional|check|kernels|models)" >&2
    exit 2
    ;;
esac
