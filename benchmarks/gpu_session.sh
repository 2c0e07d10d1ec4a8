#!/usr/bin/env bash
# A GPU session's work, in stages that each fit one 10-minute device command.
# Run from the repository root on an H100/H200 with jax 0.11.2 preinstalled:
#
#   bash benchmarks/gpu_session.sh check    # every kernel vs XLA on the GPU
#   bash benchmarks/gpu_session.sh kernels  # spmm (both decodes), quant_matmul, attention
#   bash benchmarks/gpu_session.sh models   # opt shapes for spmm, generation, train
#
# Each benchmark gets its own time limit so a slow one cannot starve the rest;
# logs go to ${OUT:-benchmarks/logs}/<stage>/, headed by the device, jax
# version and date that benchmarks/RESULTS.md asks for.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh check|kernels|models}
logs=${OUT:-benchmarks/logs}/$stage
mkdir -p "$logs"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
PY=${PY:-python3}

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
    echo "unknown stage $stage (check|kernels|models)" >&2
    exit 2
    ;;
esac
