#!/usr/bin/env bash
# GPU check of the fused elementwise / linear JVP ops (jvp_linear, jvp_activation, jvp_rope,
# jvp_gated_residual): their tests on CUDA (bf16 included; FLUX shapes printing error ratios),
# then their benchmarks at FLUX shapes. Logs and bench JSON under $OUT (default ./out).
#     bash bench/gpu_check_fused.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
if ! "$PY" -c 'import meanflow.kernels.jvp_rope' 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" 2>&1 | tail -2
fi
if ! "$PY" -c 'import meanflow.kernels.jvp_rope' 2>/dev/null; then
    shim=/tmp/meanflow_src; rm -rf "$shim"; mkdir -p "$shim/meanflow"
    for entry in "$ROOT"/meanflow/*; do ln -s "$entry" "$shim/meanflow/"; done
    ln -s "$ROOT/kernels" "$shim/meanflow/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
TESTS="tests/ops/test_jvp_linear.py tests/ops/test_jvp_activation.py tests/ops/test_jvp_rope.py tests/ops/test_jvp_gated_residual.py"
echo "===== tests (CUDA) ====="
timeout -s INT -k 10 "${TESTS_LIMIT_S:-110}" "$PY" -m pytest $TESTS -q -s -p no:cacheprovider \
    -k "not hypothesis and not gradcheck" 2>&1 | grep -Ev "^\s*$|DeprecationWarning|warnings.warn" | tail -40 | tee "$OUT/fused_tests.log"
echo "===== benchmarks ====="
timeout -s INT -k 10 "${BENCH_LIMIT_S:-230}" "$PY" -m pytest bench/bench_jvp_linear.py bench/bench_jvp_activation.py \
    bench/bench_jvp_rope.py bench/bench_jvp_gated_residual.py --benchmark-only -q -s -p no:cacheprovider \
    --benchmark-json="$OUT/fused_bench.json" --benchmark-columns=min,median,rounds 2>&1 \
    | grep -E " \| |passed|failed|Error|error" | tee "$OUT/fused_bench.log"
