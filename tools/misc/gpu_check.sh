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
#                                     GPU_CHECK_BUDGET seconds (560)
#   tools/misc/gpu_check.sh cpu       every stage that needs no GPU, on a
#                                     CPU machine (GPU_CHECK_SKIP_COMPILE=1
#                                     skips the two nvcc compile checks)
#
# Each stage writes <stage>.log into the output folder and a line into
# summary.txt: ok, SKIPPED or FAILED (or TIMEOUT) with the reason. A stage
# is ok only if it did what its name says: the tests stage if the CUDA
# tests ran and passed (on a CPU machine they cannot run: SKIPPED), the
# benchmark if every plugin row timed a compiled kernel (tools/misc/
# gpu_check/stage_verdict.py reads their outputs). The exit status is 0
# only if no stage FAILED or ran out of time, and, on the GPU machine, none
# was SKIPPED. GPU_CHECK_PAYLOAD overrides the payload folder, PYTHON the
# interpreter.
#
# Time budget on the GPU machine (a loan of 15 minutes of device time, of
# which starting the machine takes a few): each stage's limit is cut to
# what is left of GPU_CHECK_BUDGET, in this order. Not measured on a GPU
# yet; assumed: the two builds about 2 minutes on 16 cores (nvcc for sm_90
# only; 2 minutes for two architectures on 2 cores here); the tests up to
# 210 s from cold: CUDA initialisation and lazy kernel loading (seconds),
# opcheck's tracing (its CPU half, measured here, is the same on a GPU:
# docs/benchmarks.md), the 17 GB int64-offset test (allocating and filling
# about 4 times 4.3 GB) and about 90 other small cases; then the self-check
# 60 s and the benchmark whatever is left (at least 80 s).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
MODE="${1:-gpu}"
PAYLOAD="${GPU_CHECK_PAYLOAD:-$ROOT/.gpu_check_payload}"
OUT="${OUT:-$ROOT/work_dirs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
JOBS="$(nproc)"
# Seconds the whole run may take: the GPU machine is lent for minutes.
if [ "$MODE" = gpu ]; then
  BUDGET="${GPU_CHECK_BUDGET:-560}"
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
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# run_stage NAME SECONDS COMMAND...: run COMMAND with a time limit (cut to
# what is left of the whole run's budget), its output in $OUT/NAME.log, one
# line of verdict in $OUT/summary.txt. COMMAND may leave its own verdict
# line ("ok (...)", "SKIPPED (...)", "FAILED (...)") in $OUT/NAME.verdict;
# otherwise exit 0 is ok and anything else FAILED.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS status verdict
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    summary_line "$name" 0 "SKIPPED (not started: no time left of the" \
      "$BUDGET s budget)"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  rm -f "$OUT/$name.verdict"
  # Through bash -c, so that COMMAND may be one of the functions below.
  timeout --kill-after=10 "$limit" bash -c '"$@"' run_stage "$@" \
    >"$OUT/$name.log" 2>&1
  status=$?
  verdict="$(head -n 1 "$OUT/$name.verdict" 2>/dev/null)"
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    verdict="TIMEOUT (after $limit s)"
  elif [ $status -eq 0 ]; then
    verdict="${verdict:-ok}"
  elif [ "${verdict%% *}" != FAILED ]; then
    verdict="FAILED (exit $status)"
  fi
  summary_line "$name" "$((SECONDS - start))" "$verdict"
  return $status
}

# summary_line NAME SECONDS VERDICT...: "name  verdict  seconds  log" into
# the summary; the verdict's word first, its reason last.
summary_line() {
  local name="$1" seconds="$2"
  shift 2
  local verdict="$*"
  local log="$name.log"
  [ -f "$OUT/$name.log" ] || log=-
  printf '%-16s %-8s %5d s  %-20s %s\n' "$name" "${verdict%% *}" \
    "$seconds" "$log" "$(reason_of "$verdict")" | tee -a "$OUT/summary.txt"
}

# The "(...)" after the verdict's word, if any.
reason_of() {
  case "$1" in
    *" "*) echo "${1#* }" ;;
    *) echo "" ;;
  esac
}

# Stages whose exit status alone does not say whether they did their job
# write their verdict (tools/misc/gpu_check/stage_verdict.py).
run_tests() {
  "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/ops/test_ms_deform_attn_cuda.py tests/ops/test_cuda_runtime.py \
    tests/ops/test_cuda_deterministic.py tests/ops/test_level_bounds.py \
    -k 'not emulat' --junitxml="$OUT/tests.xml"
  local status=$?
  "$PYTHON" "$HELPERS/stage_verdict.py" tests "$OUT/tests.xml" \
    --mode "$MODE" --pytest-status $status | tee "$OUT/tests.verdict"
  return "${PIPESTATUS[0]}"
}

run_benchmark() {
  "$PYTHON" tools/analysis_tools/benchmark_msda.py "$@" \
    --json "$OUT/benchmark.json"
  local status=$?
  "$PYTHON" "$HELPERS/stage_verdict.py" benchmark "$OUT/benchmark.json" |
    tee "$OUT/benchmark.verdict"
  local verdict=${PIPESTATUS[0]}
  [ $status -ne 0 ] && return $status
  return "$verdict"
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
  # Without a GPU the CUDA tests skip (SKIPPED, with the reason): this
  # checks that they collect and skip cleanly, and that the rest pass.
  run_stage tests 300 run_tests
  run_stage check 300 "$PYTHON" -m ddetr_plugin.ops.check --device cpu \
    --cases small --dtypes fp32
  run_stage benchmark 300 run_benchmark \
    --device cpu --shapes decoder-bs1 --dtypes fp32 --repeat 1 --warmup 0 \
    --baselines mmcv-cuda deformops-triton deformops-eager
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
  run_stage tests 210 run_tests
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
  run_stage benchmark 400 run_benchmark \
    --device cuda --dtypes fp32 fp16 bf16 --repeat 10 \
    --shapes encoder-bs1 decoder-bs1 encoder-bs2 decoder-bs2 \
    --baselines mmcv-cuda deformops-triton deformops-eager \
    "${library[@]}"
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
export PYTHON PAYLOAD SITE HELPERS OUT BUDGET MODE
export -f environment unpack_wheels run_tests run_benchmark
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
# The verdict is each stage line's second word.
count() { awk -v word="$1" '$2 == word' "$OUT/summary.txt" | wc -l; }
ok=$(count ok) skipped=$(count SKIPPED)
failed=$(($(count FAILED) + $(count TIMEOUT)))
echo "gpu_check: $ok ok, $skipped SKIPPED, $failed FAILED or TIMEOUT" |
  tee -a "$OUT/summary.txt"
if [ "$failed" -gt 0 ] || { [ "$MODE" = gpu ] && [ "$skipped" -gt 0 ]; }; then
  echo "gpu_check: not every stage did its job, see $OUT/summary.txt"
  exit 1
fi
if [ "$skipped" -gt 0 ]; then
  echo "gpu_check: every stage that can run here passed"
else
  echo "gpu_check: all stages passed"
fi
