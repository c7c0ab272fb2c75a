#!/usr/bin/env bash
# The CPU engine on each kernel path this machine has, in one sitting: the real
# SmolLM2-135M Q4_1 through the engine (`engine_bench`: a 512-token prefill, then 1, 16
# and 64 concurrent streams), each path's run alternating with the others' RUNS times.
# Paths (environment variables the kernels read, `config/README.md` → `activations`):
#
#   rows      TOLLGATE_SIMD=avx2 TOLLGATE_PACKED=0    the file's layout, AVX2 (before the
#                                                     AVX2 packed kernels)
#   avx2      TOLLGATE_SIMD=avx2 TOLLGATE_NO_VNNI=1   packed, vpmaddwd (any AVX2 CPU)
#   avxvnni   TOLLGATE_SIMD=avx2                      packed, 256-bit VNNI (where present)
#   avx512    (nothing set)                           packed, AVX-512 VNNI (where present)
#
# On aarch64 (the default PATHS there):
#
#   file      TOLLGATE_PACKED=0                       the file's layout (portable loops)
#   neon      TOLLGATE_NO_VNNI=1                      packed, NEON smlal (any aarch64 CPU)
#   neondot   (nothing set)                           packed, NEON + sdot for q8 (where present)
#
#   bash bench/cpu_kernels.sh
#   RUNS=1 PATHS="rows avx2" STREAMS=1,64 bash bench/cpu_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-2}
if [ "$(uname -m)" = aarch64 ]; then
  PATHS=${PATHS:-file neon neondot}
else
  PATHS=${PATHS:-rows avx2 avxvnni avx512}
fi
STREAMS=${STREAMS:-1,16,64}
TOKENS=${TOKENS:-128}
cargo build --release -q -p gateway --example engine_bench
env_of() {
  case "$1" in
    rows) echo "TOLLGATE_SIMD=avx2 TOLLGATE_PACKED=0" ;;
    avx2) echo "TOLLGATE_SIMD=avx2 TOLLGATE_NO_VNNI=1" ;;
    avxvnni) echo "TOLLGATE_SIMD=avx2" ;;
    avx512 | neondot) echo "" ;;
    file) echo "TOLLGATE_PACKED=0" ;;
    neon) echo "TOLLGATE_NO_VNNI=1" ;;
    *) echo "unknown path $1" >&2; exit 2 ;;
  esac
}
grep -m1 "model name" /proc/cpuinfo || true
for run in $(seq "$RUNS"); do
  for p in $PATHS; do
    echo "== run $run, $p ($(env_of "$p"))"
    # shellcheck disable=SC2046 # the variables are separate words
    env $(env_of "$p") STREAMS="$STREAMS" TOKENS="$TOKENS" RUST_LOG=warn \
      target/release/examples/engine_bench 2>&1 | grep -E "^prefill|^ +[0-9]+ +[0-9]+ "
  done
done
