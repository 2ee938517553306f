#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install the OpenBLAS wheel carried in .whl/,
# build curvkit with CUDA for the local card, run the tests, the benchmarks and
# bench/gpu_timings.py, and leave logs in $OUT (each phase stamped with its seconds).
# Usage: bash bench/gpu_run.sh [family ...]  (runs bench/bench_<family>.py -k cuda; every
# family when none is named)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -m pip install -q --no-index --no-deps .whl/scipy_openblas32-*.whl || exit 1
arch=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
CURVKIT_CUDA=ON CURVKIT_CUDA_ARCHITECTURES=$arch python3 -m pip install -q --no-build-isolation --no-deps \
  -Cbuild-dir=build/gpu . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import curvkit; curvkit.show_config()" | tee -a "$OUT/device.txt"
stamp() { echo "== $1 at ${SECONDS} s" | tee -a "$OUT/phases.txt"; }
stamp built
python3 -m pytest tests -q -p no:cacheprovider -n 8 > "$OUT/tests.log" 2>&1; tail -25 "$OUT/tests.log"
stamp tested
families=("$@")
[ ${#families[@]} -eq 0 ] && families=(hutchinson newton_schulz matrix_sqrt inverse_root)
for b in "${families[@]}"; do
  python3 -m pytest "bench/bench_$b.py" --benchmark-only --benchmark-max-time=0.5 -p no:cacheprovider -k cuda \
    > "$OUT/bench_$b.log" 2>&1
  sed -n "/curvkit vs anchors/,\$p" "$OUT/bench_$b.log"
  stamp "bench_$b"
done
python3 bench/gpu_timings.py > "$OUT/timings.log" 2>&1; cat "$OUT/timings.log"
stamp timings
