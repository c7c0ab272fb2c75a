#!/usr/bin/env bash
# The CPU kernels on aarch64 (ARM servers: Graviton, Ampere, Grace), on an x86-64 machine:
# lints the kernels crate for aarch64-unknown-linux-gnu, cross-compiles its tests and runs them
# under qemu-user, twice: as a CPU with the dot-product extension (`-cpu max`: every
# packed kernel, NEON with `sdot` and plain NEON, against the scalar twins, bit for bit)
# and as one without it (`-cpu cortex-a72`: the choice of kernel falls back, nothing
# illegal runs).
#
#   bash scripts/aarch64.sh            # with the tools below in place
#   bash scripts/aarch64.sh --install  # (what .ci/run runs) first installs the target
#                                      # (rustup), the cross linker and qemu-user (Debian);
#                                      # without the target, says SKIPPED and exits 0
#
# Needs: `rustup target add aarch64-unknown-linux-gnu`, Debian's crossbuild-essential-arm64
# and qemu-user. Speed under qemu says nothing of an ARM CPU's: this checks results only.
set -euo pipefail
cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
if [ "${1:-}" = "--install" ]; then
  if ! rustup target add "$T" >/dev/null 2>&1; then
    echo "SKIPPED: the aarch64 check (rustup could not install $T)"
    exit 0
  fi
  if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq crossbuild-essential-arm64 qemu-user >/dev/null
  fi
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
# Lints as on x86-64: code under `cfg(target_arch)` is only seen when built for it.
cargo clippy --locked --profile cross-test --target "$T" -p kernels --all-targets -- -D warnings
log=$(mktemp)
for cpu in max cortex-a72; do
  echo "== aarch64 under qemu -cpu $cpu"
  if ! CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L /usr/aarch64-linux-gnu" \
    cargo test --locked --profile cross-test --target "$T" -p kernels --lib --test forward_batches \
    -- --nocapture >"$log" 2>&1; then
    tail -60 "$log"
    echo "aarch64 tests failed under qemu -cpu $cpu"
    exit 1
  fi
  grep -E "packed kernels on this CPU|^test result" "$log"
done
rm -f "$log"
