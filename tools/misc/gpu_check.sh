#!/usr/bin/env bash
# One-shot check of the op on a fresh GPU machine, everything written to
# one folder ($OUT when set, else work_dirs/gpu_check/<date>).
#
#   tools/misc/gpu_check.sh prepare   on a machine with the package registry:
#                                     fill the ignored payload folder
#                                     (.gpu_check_payload/) that travels with
#                                     the checkout (mmcv 2.1.0's kernel
#                                     sources and LICENSE, deformops and
#                                     ninja wheels)
#   tools/misc/gpu_check.sh gpu       on the GPU machine (no network, no
#                                     mmcv): build the plugin with CUDA and
#                                     mmcv's kernel, run the CUDA tests, the
#                                     self-check and the benchmark against
#                                     mmcv and deformops, within
#                                     GPU_CHECK_BUDGET seconds (470)
#   tools/misc/gpu_check.sh cpu       every stage that needs no GPU, on a
#                                     CPU machine (GPU_CHECK_SKIP_COMPILE=1
#                                     skips the two nvcc compile checks)
#
# Each stage writes <stage>.log into the output folder and a line into
# summary.txt; the exit status is 0 only if every stage passed.
# GPU_CHECK_PAYLOAD overrides the payload folder, PYTHON the interpreter.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
MODE="${1:-gpu}"
PAYLOAD="${GPU_CHECK_PAYLOAD:-$ROOT/.gpu_check_payload}"
OUT="${OUT:-$ROOT/work_dirs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
JOBS="$(nproc)"
# Seconds the whole run may take: the GPU machine is lent for minutes.
if [ "$MODE" = gpu ]; then
  BUDGET="${GPU_CHECK_BUDGET:-470}"
else
  BUDGET="${GPU_CHECK_BUDGET:-3600}"
fi
HELPERS="$ROOT/tools/misc/gpu_check"
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ "$MODE" != gpu ] && [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHON="$ROOT/.venv/bin/python"
  fi
fi

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# run_stage NAME SECONDS COMMAND...: run COMMAND with a time limit (cut to
# what is left of the whole run's budget), its output in $OUT/NAME.log, one
# line of verdict in $OUT/summary.txt.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS status verdict
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    printf '%-16s %-24s\n' "$name" "TIMEOUT (no time left)" |
      tee -a "$OUT/summary.txt"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  # Through bash -c, so that COMMAND may be one of the functions below.
  timeout --kill-after=10 "$limit" bash -c '"$@"' run_stage "$@" \
    >"$OUT/$name.log" 2>&1
  status=$?
  case $status in
    0) verdict=ok ;;
    124 | 137) verdict="TIMEOUT after ${limit} s" ;;
    *) verdict="FAILED (exit $status)" ;;
  esac
  printf '%-16s %-24s %5d s  %s\n' "$name" "$verdict" \
    "$((SECONDS - start))" "$name.log" | tee -a "$OUT/summary.txt"
  return $status
}

environment() {
  echo "date: $(date -u)"
  echo "host: $(hostname), $(nproc) cores"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v nvidia-smi >/dev/null && nvidia-smi
  return 0
}

unpack_wheels() {
  "$PYTHON" "$HELPERS/unpack_wheels.py" "$PAYLOAD/wheels" "$SITE"
}

stage_prepare() {
  "$PYTHON" "$HELPERS/prepare_payload.py" "$PAYLOAD" &&
    du -sh "$PAYLOAD"
}

stage_cpu() {
  run_stage environment 60 environment
  run_stage payload 60 "$PYTHON" "$HELPERS/prepare_payload.py" "$PAYLOAD" \
    --verify
  run_stage wheels 60 unpack_wheels
  if [ "${GPU_CHECK_SKIP_COMPILE:-0}" != 1 ]; then
    run_stage compile_plugin 600 "$PYTHON" tools/misc/cuda_compile_check.py \
      --archs 90
    run_stage compile_mmcv 600 "$PYTHON" "$HELPERS/build_mmcv_msda.py" \
      --payload "$PAYLOAD" --build-dir "$OUT/mmcv_build" --compile-only
  fi
  # Without a GPU the CUDA tests skip: this checks that they collect and
  # skip cleanly.
  run_stage tests 300 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/ops/test_ms_deform_attn_cuda.py tests/ops/test_cuda_runtime.py \
    tests/ops/test_cuda_deterministic.py tests/ops/test_level_bounds.py \
    -k 'not emulat'
  run_stage check 300 "$PYTHON" -m ddetr_plugin.ops.check --device cpu \
    --cases small --dtypes fp32
  run_stage benchmark 300 "$PYTHON" tools/analysis_tools/benchmark_msda.py \
    --device cpu --shapes decoder-bs1 --dtypes fp32 --repeat 1 --warmup 0 \
    --baselines mmcv-cuda deformops-triton deformops-eager \
    --json "$OUT/benchmark.json"
}

stage_gpu() {
  run_stage environment 20 environment
  run_stage payload 20 "$PYTHON" "$HELPERS/prepare_payload.py" "$PAYLOAD" \
    --verify
  run_stage wheels 20 unpack_wheels
  export PATH="$SITE/bin:$PATH"
  # Both builds at once: nvcc is the long part of each.
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    run_stage build_plugin 200 "$PYTHON" setup.py build_ext --inplace &
  local plugin_build=$!
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    run_stage build_mmcv 200 "$PYTHON" "$HELPERS/build_mmcv_msda.py" \
    --payload "$PAYLOAD" --build-dir "$OUT/mmcv_build" \
    --library-path-file "$OUT/mmcv_library.txt" &
  local mmcv_build=$!
  wait $plugin_build
  run_stage tests 90 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/ops/test_ms_deform_attn_cuda.py tests/ops/test_cuda_runtime.py \
    tests/ops/test_cuda_deterministic.py tests/ops/test_level_bounds.py \
    -k 'not emulat' --junitxml="$OUT/tests.xml"
  run_stage check 60 "$PYTHON" -m ddetr_plugin.ops.check --device cuda \
    --benchmark --repeat 5
  wait $mmcv_build
  local library=()
  if [ -s "$OUT/mmcv_library.txt" ]; then
    library=(--mmcv-library "$(cat "$OUT/mmcv_library.txt")")
  fi
  # --- mmcv models (issue 19): the sampling core at the shapes DINO R50
  # and Mask2Former R50 give mmcv's attention, mmcv's CUDA kernel against
  # the plugin's op. This machine has no mmdet to build the models.
  run_stage mmcv_models 60 "$PYTHON" \
    tools/analysis_tools/benchmark_mmcv_models.py --attention-only \
    --device cuda --dtypes fp32 fp16 --runs 10 "${library[@]}" \
    --json "$OUT/benchmark_mmcv_models.json"
  # --- end of mmcv models
  # Whatever time is left; batch 1 first, and the rows are written as they
  # come, so a cut run still reports them.
  run_stage benchmark 400 "$PYTHON" tools/analysis_tools/benchmark_msda.py \
    --device cuda --dtypes fp32 fp16 bf16 --repeat 10 \
    --shapes encoder-bs1 decoder-bs1 encoder-bs2 decoder-bs2 \
    --baselines mmcv-cuda deformops-triton deformops-eager \
    "${library[@]}" --json "$OUT/benchmark.json"
}

case "$MODE" in
  prepare)
    stage_prepare
    exit $?
    ;;
  cpu | gpu) ;;
  *) usage ;;
esac

mkdir -p "$OUT"
: >"$OUT/summary.txt"
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON PAYLOAD SITE HELPERS OUT BUDGET
export -f environment unpack_wheels
echo "gpu_check ($MODE): output in $OUT"
start=$SECONDS
"stage_$MODE"
echo "total: $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
for name in check benchmark; do
  if [ -f "$OUT/$name.log" ]; then
    echo "--- $name.log (last lines)"
    tail -n 40 "$OUT/$name.log"
  fi
done
if grep -q -E 'FAILED|TIMEOUT' "$OUT/summary.txt"; then
  echo "gpu_check: some stages failed, see $OUT/summary.txt"
  exit 1
fi
echo "gpu_check: all stages passed"
