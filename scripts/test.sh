#!/usr/bin/env bash
# The whole test suite. Makes .venv on first run (the official openai Python SDK for the
# SDK test; numpy, gguf, tokenizers and jinja2 for the independent model reference in
# tools/reference; NVRTC from nvidia-cuda-nvrtc, so that every CUDA kernel compiles to
# PTX without a GPU; ptxas from nvidia-cuda-nvcc, so that every kernel is assembled for
# sm_90 and checked to fit its launch), then runs every Rust test in the workspace. Tests that need the
# real model fetch it through `gateway`'s own fetch code into the model cache.
set -euo pipefail
cd "$(dirname "$0")/.."
NVRTC_LIB=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)
if ! .venv/bin/python -c "import openai, numpy, gguf, tokenizers, jinja2" 2>/dev/null \
   || [ -z "$NVRTC_LIB" ] || [ ! -e "$NVRTC_LIB/libnvrtc.so.13" ] \
   || [ ! -x "$NVRTC_LIB/../bin/ptxas" ]; then
  python3 -m venv .venv
  # nvidia-cuda-nvrtc: NVRTC without a GPU, so that every CUDA kernel is compiled to PTX.
  .venv/bin/pip install --quiet --disable-pip-version-check \
    "openai>=1.40,<3" "numpy>=1.26,<3" "gguf>=0.10,<1" "tokenizers>=0.20,<1" "jinja2>=3,<4" \
    "nvidia-cuda-nvrtc>=13.0,<13.1" "nvidia-cuda-nvcc>=13.0,<13.1"
  NVRTC_LIB=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13/lib | head -1)
fi
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TOLLGATE_PTXAS="$NVRTC_LIB/../bin/ptxas"
export TOLLGATE_PYTHON="$PWD/.venv/bin/python"
export TOLLGATE_REQUIRE_TOOLS=1
# The CUDA emulator (kernels/emu, built with the host C++ compiler) runs every kernel and
# the CUDA backend against their CPU twins: a build without it fails the suite.
export TOLLGATE_REQUIRE_EMU=1
cargo test --workspace --locked "$@"
# Racecheck: every kernel's parity tests again on an emulator built to check each access
# to shared memory (as compute-sanitizer's racecheck on a GPU) and to global memory for a
# race between a block's threads or a launch's blocks (kernels/emu/runtime.cpp), then the
# backend's padded graph steps and its attention split over blocks; in its own build
# (target/racecheck, so that the suite's build above stays as it is). Only for the whole
# suite (no arguments); TOLLGATE_RACECHECK=0 leaves it out.
if [ $# -eq 0 ] && [ "${TOLLGATE_RACECHECK:-1}" != 0 ]; then
  export TOLLGATE_EMU_RACECHECK=1 CARGO_TARGET_DIR=target/racecheck
  # The three test binaries in one build (their crates compile side by side).
  cargo test --locked -p kernels --lib --test cuda_parity --test cuda_backend --no-run
  cargo test --locked -p kernels --lib emu::tests   # its own check first: it finds races
  cargo test --locked -p kernels --test cuda_parity
  cargo test --locked -p kernels --test cuda_backend -- \
    graph_decode_steps_match_direct_launches_for_every_padding \
    steps::long_rows_at_small_batch_split_their_attention
fi
