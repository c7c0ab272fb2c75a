#!/usr/bin/env bash
# Instructions one CPU product executes on aarch64, counted under qemu-user (no ARM machine
# here, and qemu's speed says nothing of an ARM CPU's): SmolLM2's FFN product (1536 × 576,
# Q4_1) at 1 and 16 activation rows, on the file's layout (the portable row-wise loops, all
# aarch64 had before its packed kernels), the packed NEON kernel (`smlal`) and, for 8-bit
# activations, the packed kernel with `sdot`.
#
#   bash bench/aarch64_instructions.sh     # needs what `scripts/aarch64.sh --install` installs
#   ROWS=16 bash bench/aarch64_instructions.sh   # other activation row counts
#
# qemu logs every translated block (`-d in_asm`) and every block it runs (`-d exec,nochain`);
# the blocks' instructions are added up as they run, through a pipe. A product's count is
# (3 calls − 1 call) / 2: the weights' packing and the program's start cancel out. One
# thread (RAYON_NUM_THREADS=1). Counts, not time: an instruction's cost differs by kind.
set -euo pipefail
cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
cargo build --locked --release -q --target "$T" -p kernels --example matmul_calls
BIN=target/$T/release/examples/matmul_calls
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# count ENV... -- ARGS: guest instructions the run executes.
count() {
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  mkfifo "$dir/log"
  awk '
    /^IN:/ { inb = 1; pc = ""; c = 0; next }
    inb && /^0x[0-9a-f]+:/ { if (pc == "") { pc = $1; sub(/:$/, "", pc); sub(/^0x0*/, "", pc) } c++; next }
    inb && /^$/ { if (pc != "") n[pc] = c; inb = 0; next }
    /^Trace/ { split($4, f, "/"); p = f[2]; sub(/^\[?0*/, "", p); t += n[p] }
    END { printf "%d\n", t }' "$dir/log" >"$dir/count" &
  env RAYON_NUM_THREADS=1 "${envs[@]}" qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu \
    -d in_asm,exec,nochain -D "$dir/log" "$BIN" "$@" >"$dir/out"
  wait
  rm -f "$dir/log"
  cat "$dir/count"
}
printf '| path | activations | rows | instructions a product | per multiply-add | checksum |\n|---|---|---:|---:|---:|---|\n'
for rows in ${ROWS:-1 16}; do
  for cfg in "file layout|i16|TOLLGATE_PACKED=0" "packed NEON (smlal)|i16|TOLLGATE_NO_VNNI=1" \
    "file layout|q8|TOLLGATE_PACKED=0" "packed NEON (smlal)|q8|TOLLGATE_NO_VNNI=1" \
    "packed NEON + sdot|q8|TOLLGATE_NO_VNNI=0"; do
    IFS='|' read -r name prec envv <<<"$cfg"
    one=$(count "$envv" -- "$rows" "$prec" 1)
    three=$(count "$envv" -- "$rows" "$prec" 3)
    sum=$(awk '{print $NF}' "$dir/out")
    per=$(((three - one) / 2))
    printf '| %s | %s | %d | %d | %.2f | %s |\n' "$name" "$prec" "$rows" "$per" \
      "$(awk -v p="$per" -v r="$rows" 'BEGIN { print p / (r * 1536 * 576) }')" "$sum"
  done
done
