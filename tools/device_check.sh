#!/usr/bin/env bash
# Device check: the bf16/f32 decoding tests and the decode benchmark at the
# paper's small dims, on whatever JAX backend is present (GPU, TPU or CPU).
#
#   bash tools/device_check.sh           # full run (planned: < 8 min on a GPU)
#   bash tools/device_check.sh --quick   # dry run: tiny sizes, for CPU
#
# Writes runs/device/bench.json (and runs/device/pytest.txt); prints the
# markdown table. Expects the package installed (make install, or a JAX
# with the accelerator's plugin: pip install -e . 'jax[cuda12]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=runs/device
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=3

if [ "${1:-}" = "--quick" ]; then
  BATCHES="[1,2]"; LENGTH=8; REPEATS=1; TESTS="tests/test_bf16.py -k disabled"
else
  BATCHES="[1,16,64]"; LENGTH=64; REPEATS=5
  TESTS="tests/test_bf16.py tests/test_decoding.py"
fi

"$PY" -c 'import jax; print("backend:", jax.default_backend(), jax.devices())'
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/pytest.txt" | tail -3
"$PY" -m calm_jax.bench --gin.MODELS="['paper_small']" \
  --gin.DTYPES="['float32','bfloat16']" --gin.BATCH_SIZES="$BATCHES" \
  --gin.calm_jax.bench.length="$LENGTH" --gin.REPEATS="$REPEATS" \
  --gin.MEASURES="['softmax','state']" \
  --gin.PATTERNS="['exit@1','exit@2','mixed','disabled']" \
  --gin.calm_jax.bench.compare_buckets=False --gin.OUTPUT="'$OUT/bench.json'"
"$PY" -m calm_jax.bench --gin.TABLE="'$OUT/bench.json'"
