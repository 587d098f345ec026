#!/usr/bin/env bash
# The one command for a GPU machine with no network (DESIGN.md §5):
#
#     bash bench/gpu_check.sh            # logs, junit, bench.json and summary.md under ./out
#     OUT=/some/dir bash bench/gpu_check.sh
#
# 1. prints the GPU, driver, python, torch and triton versions;
# 2. installs the wheels in .whl/ (if any: e.g. jvp-flash-attention) into /tmp/site, no network
#    (bench/fetch_wheels.sh fills .whl/ beforehand, on a machine with PyPI);
# 3. makes `meanflow` importable from the repo root without an install, and fails loudly if it
#    is not;
# 4. runs the GPU tests (`pytest tests -m gpu`), then the benchmarks (`pytest bench
#    --benchmark-only`), each under a wall-clock cap; with step 5 the caps add up to 10 min, more
#    than one device call may run, so run it in two calls: STEPS=tests,flux (at most 5.5 min),
#    then STEPS=bench (at most 4.5 min);
# 5. times a MeanFlow step on a FLUX-width stack (bench/flux_memory.py; needs diffusers, which
#    the GPU image lacks: carry its wheel in .whl/);
# 6. opt-in (STEPS=...,compile; its own call, at most COMPILE_LIMIT_S): the same FLUX-width
#    step in pair mode eager beside torch.compile (inductor), checkpointed or not;
# 7. prints the markdown table of bench/summary.py last (also in $OUT/summary.md).
#
# Environment: OUT (default ./out), PYTHON (default python3), TESTS_LIMIT_S (default 180),
# BENCH_LIMIT_S (default 270), FLUX_LIMIT_S (default 150), MEANFLOW_BENCH_N (sequence lengths, default 1024,4608,16384),
# COMPILE_LIMIT_S (default 240), STEPS (which of tests,bench,flux,compile to run; default the first
# three).
# Exit status: non-zero if the import check, the GPU tests or the benchmarks failed (the
# benchmarks and the table still run after failing tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
SITE=/tmp/site
export PYTHONUNBUFFERED=1

section() { printf '\n===== %s (%s) =====\n' "$1" "$(date -u +%H:%M:%S)"; }

setup_environment() {
    section "machine"
    date -u
    nvidia-smi --query-gpu=name,driver_version --format=csv || echo "WARNING: nvidia-smi failed"
    "$PY" - <<'EOF'
import platform, sys
import torch, triton
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible")
else:
    print("WARNING: torch.cuda.is_available() is False: GPU tests skip, benchmarks take the CPU path")
EOF

    section "wheels from .whl/"
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        # A carried wheel fills a gap: skipped where the machine already has that distribution at
        # any version (a newer huggingface_hub over the image's broke its transformers, and
        # with it diffusers' import).
        mapfile -t wheels < <("$PY" - "${wheels[@]}" <<'EOF'
import re, sys
from importlib import metadata
for path in sys.argv[1:]:
    name, version = re.match(r"(?:.*/)?([^-]+)-([^-]+)-", path).groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is not None:
        print(f"  skip {name} {version}: have {have}", file=sys.stderr)
    else:
        print(f"  install {name} {version} (have {have})", file=sys.stderr)
        print(path)
EOF
)
    fi
    if ((${#wheels[@]})); then
        mkdir -p "$SITE"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"; then
            echo "pip --target failed; unpacking the wheels (pure Python) into $SITE instead"
            "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
                "$SITE" "${wheels[@]}"
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "  none"
    fi

    section "meanflow import"
    # meanflow (kernels included, in meanflow/kernels/) imports from the repo root: no install.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if ! import_check; then
        echo "FATAL: cannot import meanflow.kernels.jvp_attention (PYTHONPATH=$PYTHONPATH)" >&2
        exit 2
    fi
}

import_check() {
    # Run from the repo root, as pytest is: `python -c` and `python -m` put the cwd first.
    "$PY" - <<'EOF'
import torch
import meanflow, meanflow.kernels.jvp_attention as kernels, meanflow.ops
from meanflow.ops.dispatch import resolve_backend
print(f"meanflow from {meanflow.__file__}; kernels from {kernels.__file__}")
if torch.cuda.is_available():
    print(f"backend for CUDA tensors: {resolve_backend(torch.device('cuda'))}")
try:
    import jvp_flash_attention.jvp_attention as peer
    print(f"jvp_flash_attention from {peer.__file__}")
except Exception as exc:
    print(f"jvp_flash_attention unavailable: {type(exc).__name__}: {exc}")
EOF
}

run_capped() {
    # run_capped SECONDS LOGFILE CMD...: SIGINT at the cap (pytest then reports and writes its
    # files), SIGKILL 30 s later; returns the command's status (124 on timeout).
    local limit=$1 log=$2
    shift 2
    local rc=0
    timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    return "$rc"
}

main() {
    local start=$SECONDS status=0
    setup_environment

    local steps=",${STEPS:-tests,bench,flux},"
    if [[ $steps == *,tests,* ]]; then
        section "GPU tests: pytest tests -m gpu"
        local timeout_opt=()
        if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
            timeout_opt=(--timeout 240)
        fi
        local tests_rc=0
        # Tests pin each kernel to its default tile (no autotuning): correctness, not speed.
        run_capped "${TESTS_LIMIT_S:-180}" "$OUT/gpu_tests.log" \
            env MEANFLOW_AUTOTUNE=0 "$PY" -m pytest tests -m gpu -q -rA ${timeout_opt[@]+"${timeout_opt[@]}"} \
            --junitxml="$OUT/gpu_tests.xml" || tests_rc=$?
        case $tests_rc in
            0) echo "GPU tests passed" ;;
            5) echo "no GPU tests collected" ;;
            124) echo "GPU tests: TIMED OUT after ${TESTS_LIMIT_S:-180} s"; status=1 ;;
            *) echo "GPU tests: FAILED (pytest exit $tests_rc)"; status=1 ;;
        esac
    fi

    if [[ $steps == *,bench,* ]]; then
        section "benchmarks: pytest bench --benchmark-only"
        local bench_rc=0
        rm -f "$OUT/bench.json"
        run_capped "${BENCH_LIMIT_S:-270}" "$OUT/bench.log" \
            env TRITON_PRINT_AUTOTUNING=1 "$PY" -m pytest bench --benchmark-only -q -s --benchmark-json="$OUT/bench.json" \
            --benchmark-columns=min,median,max,rounds --junitxml="$OUT/bench.xml" || bench_rc=$?
        case $bench_rc in
            0) echo "benchmarks done" ;;
            124) echo "benchmarks: TIMED OUT after ${BENCH_LIMIT_S:-270} s (partial results)"; status=1 ;;
            *) echo "benchmarks: FAILED (pytest exit $bench_rc)"; status=1 ;;
        esac
    fi

    if [[ $steps == *,flux,* ]]; then
        section "FLUX-width stack: MeanFlow step in pair mode against the baselines"
        # hidden 3072, 24 heads of 128, 1 double + 1 single block, 4096 image + 512 text tokens:
        # peak memory and step time of plain / pair / torch.func.jvp + math SDPA / two-pass schemes,
        # float32 parameters under bf16 autocast as the trainer runs one process. (With bf16
        # parameters the torch.func.jvp baselines failed on an H100 with "expected mat1 and mat2 to
        # have the same dtype, float != BFloat16"; the probe below shows whether stock forward AD
        # through a bf16 LayerNorm on CUDA returns a float32 tangent, the suspected cause.)
        "$PY" - <<'EOF' || true
import torch
x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
_, tangent = torch.func.jvp(lambda x: torch.nn.functional.layer_norm(x, (64,)), (x,), (torch.randn_like(x),))
print(f"probe: torch.func.jvp of a bf16 layer_norm on CUDA gives a {tangent.dtype} tangent")
EOF
        local flux_rc=0
        if "$PY" -c 'from diffusers import FluxTransformer2DModel' >/dev/null 2>&1; then
            run_capped "${FLUX_LIMIT_S:-150}" "$OUT/flux_block.md" \
                "$PY" bench/flux_memory.py --device cuda --autocast bfloat16 --hidden 3072 --head-dim 128 \
                --double 1 --single 1 --image-tokens 4096 --text-tokens 512 --batch 1 --repeat 3 \
                --modes plain,pair,jvp,two_pass,two_pass_fused,pair+ckpt || flux_rc=$?
            [[ $flux_rc == 0 ]] || { echo "FLUX-width stack: FAILED or timed out ($flux_rc)"; status=1; }
        else
            echo "diffusers' FluxTransformer2DModel not importable: carry diffusers' wheel (and its missing dependencies) in .whl/"
        fi
    fi

    if [[ $steps == *,compile,* ]]; then
        section "FLUX-width stack: the pair-mode step eager and under torch.compile"
        local compile_rc=0
        run_capped "${COMPILE_LIMIT_S:-240}" "$OUT/flux_compiled.md" \
            "$PY" bench/flux_memory.py --device cuda --autocast bfloat16 --hidden 3072 --head-dim 128 \
            --double 1 --single 1 --image-tokens 4096 --text-tokens 512 --batch 1 --repeat 3 \
            --modes plain,pair,pair_compiled,pair+ckpt,pair_compiled+ckpt || compile_rc=$?
        [[ $compile_rc == 0 ]] || { echo "compiled step: FAILED or timed out ($compile_rc)"; status=1; }
    fi

    section "summary"
    echo "total $((SECONDS - start)) s; status $status; files in $OUT"
    echo "command: bash bench/gpu_check.sh"
    echo
    if [[ -s "$OUT/bench.json" ]]; then
        "$PY" bench/summary.py "$OUT/bench.json" | tee "$OUT/summary.md" || status=1
    elif [[ $steps == *,bench,* ]]; then
        echo "no $OUT/bench.json: no benchmark ran"
        status=1
    fi
    return "$status"
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
