#!/usr/bin/env bash
# Expert parallelism on a multi-GPU machine, in one go: build the ep targets, run the smoke steps
# of the multi-GPU suite (ep = 2, layout then dispatch of a few tokens), then the whole suite
# (ep = 2, 4, ..., all GPUs), memcheck at 2 ranks, then the dispatch/combine benchmark and the
# PyTorch comparison at 2, 4 and all GPUs. Runs unchanged at 8 GPUs. Logs and JSON go to $OUT.
#
# A hang burns device time, so every test stage has a short limit: the suite's watchdog reports
# each stuck rank (the moekit call it is in, the last one it returned from, NCCL's async error)
# and ends the process after $MOEKIT_EP_TEST_TIMEOUT seconds of one problem, well inside the
# stage's `timeout`. When the smoke steps fail, the suite and memcheck are skipped (they would only
# hang the same way) and the benchmark still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUILD=${MOEKIT_BUILD_DIR:-build-gpu}
case $BUILD in /*) ;; *) BUILD=$PWD/$BUILD ;; esac
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
LOG="$OUT/ep-log.txt"
summary=()
run() {
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== $name: $*" | tee -a "$LOG"
  "$@" >>"$LOG" 2>&1
  local rc=$?
  summary+=("$(printf '%-28s %s (%ss)' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" "$(( $(date +%s) - t0 ))")")
  [ $rc -eq 0 ] || tail -n 60 "$LOG"
  return $rc
}
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi topo -m >>"$LOG" 2>&1
[ -f "$BUILD/build.ninja" ] || run configure meson setup "$BUILD" -Dgpu_archs="${MOEKIT_GPU_ARCHS:-90}" --buildtype=release
run build ninja -C "$BUILD" -j "$(nproc)" tests/ep/test_ep_gpu bench/ep/moekit-bench-ep || exit 1
smoke_ok=1
run "ep smoke (2 GPUs)" env MOEKIT_EP_TEST_TIMEOUT=30 timeout -k 10 60 \
  "$BUILD/tests/ep/test_ep_gpu" "[smoke]" --durations yes || smoke_ok=0
if [ $smoke_ok -eq 1 ]; then
  run "ep tests ($gpus GPUs)" env MOEKIT_EP_TEST_TIMEOUT=40 timeout -k 10 "${EP_TEST_TIMEOUT:-150}" \
    "$BUILD/tests/ep/test_ep_gpu" "~[smoke]" --durations yes
  run "ep memcheck (2 ranks)" env MOEKIT_EP_TEST_MAX_RANKS=2 MOEKIT_EP_TEST_TIMEOUT=60 \
    timeout -k 10 "${EP_MEMCHECK_TIMEOUT:-120}" compute-sanitizer --tool memcheck --error-exitcode 99 \
    --leak-check no --report-api-errors no "$BUILD/tests/ep/test_ep_gpu" "~[large]" --durations yes
else
  summary+=("$(printf '%-28s %s' "ep tests, memcheck" "SKIPPED (the smoke steps failed)")")
fi
n=2
while [ $n -le "$gpus" ]; do
  devices=$(seq -s, 0 $((n - 1)))
  run "bench ep $n GPUs" env CUDA_VISIBLE_DEVICES=$devices "$BUILD/bench/ep/moekit-bench-ep" --preset=deepseek-v3 --json="$OUT/bench-ep-${n}gpu.json"
  run "torch ep $n GPUs" env CUDA_VISIBLE_DEVICES=$devices MOEKIT_LIB="$BUILD/libmoekit.so" python3 bench/ep/compare_torch.py --moekit="$OUT/bench-ep-${n}gpu.json" --out="$OUT/"
  n=$((n * 2))
done
echo
echo "================ ep summary ($gpus x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)) ================"
printf '%s\n' "${summary[@]}"
