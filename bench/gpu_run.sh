#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install the wheels carried in .whl/ (OpenBLAS and
# POT; see bench/results/gpu_pending.md), build curvkit with CUDA for the local card, run the
# tests, the benchmarks and bench/gpu_timings.py, and leave logs in $OUT (each phase stamped with
# its seconds; at most 8 files come back: device.txt, phases.txt, build.log, tests.log,
# bench.log, timings.log, cpu_kind.log).
# Usage: bash bench/gpu_run.sh [--no-build] [--no-tests] [--no-timings] [--cpu-kind] [family ...]
# (TEST_K="cuda or cupy" narrows the tests to the CUDA backends; the CPU ones also run in CI.)
# (runs bench/bench_<family>.py -k cuda; every family when none is named, none with "none").
# --cpu-kind: the host's CPU benchmarks of issue 16 on 2 pinned cores (bench/results/README.md).
# Tests and each benchmark phase are killed after TEST_LIMIT / BENCH_LIMIT seconds (300 / 200).
# A device command may run 600 s at most: split a long session into calls, e.g.
#   TEST_K="cuda or cupy" bash bench/gpu_run.sh --no-timings newton_schulz   then
#   bash bench/gpu_run.sh --no-tests matrix_sqrt inverse_root mfac sinkhorn
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
build=1 tests=1 timings=1 cpu_kind=0 families=()
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --no-tests) tests=0 ;;
    --no-timings) timings=0 ;;
    --cpu-kind) cpu_kind=1 ;;
    *) families+=("$arg") ;;
  esac
done
stamp() { echo "== $1 at ${SECONDS} s" | tee -a "$OUT/phases.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
if [ $build -eq 1 ]; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl || exit 1
  arch=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
  CURVKIT_CUDA=ON CURVKIT_CUDA_ARCHITECTURES=$arch python3 -m pip install -q --no-build-isolation --no-deps \
    -Cbuild-dir=build/gpu . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  stamp built
fi
python3 -c "import curvkit; curvkit.show_config()" | tee -a "$OUT/device.txt"
if [ $tests -eq 1 ]; then
  # A hung kernel must not eat the whole call: the tests get TEST_LIMIT seconds (default 300),
  # each at most 120 (pytest-timeout), names streamed (-v) so that a killed run still says what
  # failed. One BLAS and OpenMP thread per worker: 8 workers of 16 spinning OpenBLAS threads
  # each made CPU-side references take minutes (2026-12-04).
  OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 CURVKIT_NUM_THREADS=2 timeout -s KILL "${TEST_LIMIT:-300}" \
    python3 -m pytest tests -v -p no:cacheprovider -n 8 --timeout=120 --tb=short -rfE --durations=20 ${TEST_K:+-k "$TEST_K"} \
    > "$OUT/tests.log" 2>&1 || echo "pytest exit status $?" >> "$OUT/tests.log"
  grep -E "(FAILED|ERROR|Timeout)" "$OUT/tests.log" | head -40; tail -25 "$OUT/tests.log"
  stamp tested
fi
[ ${#families[@]} -eq 0 ] && families=(hutchinson newton_schulz matrix_sqrt inverse_root mfac sinkhorn)
for b in "${families[@]}"; do
  [ "$b" = none ] && continue
  echo "######## bench_$b" >> "$OUT/bench.log"
  timeout -s KILL "${BENCH_LIMIT:-200}" python3 -m pytest "bench/bench_$b.py" --benchmark-only --benchmark-max-time=0.5 -p no:cacheprovider -k cuda \
    > /tmp/bench_$b.log 2>&1
  cat /tmp/bench_$b.log >> "$OUT/bench.log"
  sed -n "/curvkit vs anchors/,/^---/p" /tmp/bench_$b.log
  stamp "bench_$b"
done
if [ $timings -eq 1 ]; then
  timeout -s KILL "${BENCH_LIMIT:-200}" python3 bench/gpu_timings.py > "$OUT/timings.log" 2>&1; cat "$OUT/timings.log"
  stamp timings
fi
if [ $cpu_kind -eq 1 ]; then
  # The 2-core CI kind on this host's CPU (an Intel Xeon with AVX-512 on 2026-12-04).
  log="$OUT/cpu_kind.log"
  lscpu | grep -E "Model name|^Flags" > "$log"
  python3 -c "import curvkit; curvkit.show_config()" >> "$log"
  pin=""; command -v taskset > /dev/null && pin="taskset -c 0,1"
  for spec in "bench_newton_schulz.py|not cuda and not equal and not in_turn" "bench_inverse_root.py|8x1024 and not cuda" \
              "bench_newton_schulz.py|in_turn" "bench_inverse_root.py|in_turn" "bench_optimizers.py|not cuda"; do
    file=${spec%%|*} expr=${spec#*|}
    echo "######## $file -k \"$expr\" ($pin)" >> "$log"
    CURVKIT_NUM_THREADS=2 OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 timeout -s KILL "${BENCH_LIMIT:-200}" \
      $pin python3 -m pytest "bench/$file" --benchmark-only -p no:cacheprovider -k "$expr" > /tmp/cpu.log 2>&1
    sed -n "/curvkit vs anchors/,/^---/p" /tmp/cpu.log >> "$log"
    stamp "cpu $file"
  done
  # each kernel's rate against this host's own GEMM, copy and read rates, and the probes
  echo "######## python -m curvkit.bench newton_schulz inverse_root hutchinson ($pin)" >> "$log"
  CURVKIT_NUM_THREADS=2 OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 timeout -s KILL "${BENCH_LIMIT:-200}" \
    $pin python3 -m curvkit.bench newton_schulz inverse_root hutchinson --no-plots --out /tmp/cpu_kind > /dev/null 2>&1
  sed -n "/^- cpu/,\$p" /tmp/cpu_kind/bench.md | grep -v "^!\[" >> "$log"
  stamp "cpu curvkit.bench"
  cat "$log"
fi
