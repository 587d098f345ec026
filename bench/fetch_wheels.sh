#!/usr/bin/env bash
# Fills .whl/ with the wheels bench/gpu_check.sh installs on a GPU machine that lacks them (it
# has no network): the peer kernel benchmarked against, diffusers (the FLUX model and the
# whole-student tests) and the test harness's pure-Python pieces, for the GPU image's Python
# (3.12, manylinux x86_64). Run it on a machine with PyPI access before the GPU call, and carry
# .whl/ with the tree; gpu_check installs each wheel only where the machine has no version of
# that distribution, so the image's own packages are never replaced.
#
#     bash bench/fetch_wheels.sh            # PYVER=3.12 by default
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYVER="${PYVER:-3.12}"
ABI="cp${PYVER/./}"
mkdir -p .whl
python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any \
    "jvp-flash-attention==0.14.0" "diffusers==0.42.1" pytest-benchmark py-cpuinfo hypothesis sortedcontainers \
    safetensors pyyaml regex
ls -1 .whl
du -sh .whl
