#!/usr/bin/env bash
# The GPU check, run on a machine with CUDA from the repository root (CI has no GPU):
#   1. the engine's tests on the GPU (RANKONE_TEST_DEVICE=cuda: the same exactness assertions
#      as on the CPU: fused forward = HF forward, mixed batch = alone = HF generate);
#   2. bench.gpu_decode (decode tok/s by rows on SmolLM2-135M's shape).
# Wheels the machine lacks may sit in .whl/ (installed into /tmp/site first). Logs and results
# go to $OUT (default: .rankone/gpu-check).
set -uo pipefail
OUT=${OUT:-.rankone/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# test_compiled_step: inductor's C++ steps are the CPU's path (a GPU replays CUDA graphs), so
# on a GPU machine they would only re-test the CPU path under that machine's torch.
RANKONE_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" $PY -m pytest tests/engine -q --no-header \
    -p no:cacheprovider -o addopts="-ra --strict-markers" --durations=10 \
    --ignore=tests/engine/test_compiled_step.py ${PYTEST_ARGS:-} 2>&1 |
    tee "$OUT/engine-tests.log" | tail -40
tests=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-240}" $PY -m bench.gpu_decode ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_decode.log" | tail -20
bench=${PIPESTATUS[0]}
cp bench/results/gpu_decode.md bench/results/gpu_decode.json "$OUT/" 2>/dev/null
echo "engine tests rc $tests, gpu_decode rc $bench"
