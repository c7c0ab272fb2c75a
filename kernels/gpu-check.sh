#!/usr/bin/env bash
# The GPU checks of the CUDA kernels, in one script.
#
#   bash kernels/gpu-check.sh --build   # here (cargo, no GPU needed): release test and bench
#                                       # binaries into target/gpu-check/ (stripped)
#   bash kernels/gpu-check.sh           # on the GPU machine (no cargo there): runs them
#
# Carry `target/gpu-check` to the GPU machine. It runs every kernel's parity test against
# its CPU twin, the twin chain against the CPU engine, the NVRTC compile of every kernel
# for the device, the CUDA backend's tests (graphs vs direct launches, sampling on the
# device, the load-time self-check), the gateway's engine tests with `backend = "cuda"`,
# then the benchmarks: kernel bandwidth against the
# card's copy bandwidth (gpu_bench), decode step time at batch 1/16/64/256 against the
# weights floor (decode_bench, with the load-time choice for 1-16 rows among cuBLAS, gemv_f16 and
# the file's own blocks; and at batch 1 and 16 with 4,096 keys), and aggregate decode tokens/s through the engine at 1, 64
# and 256 streams (engine_bench; at 1 also speculating, at 256 also with no step planned ahead, in JSON mode at 64 and 256 (and at 256 with no step planned ahead), with penalties at 256, and embeddings at 64 and 256), then decode steps and the engine again with the
# tensor-core attention kernel (attention_tc), all on the synthetic SmolLM2-shaped model; then
# the qwen2/qwen3/qwen3moe-shaped files through the engine and decode steps over one of
# Qwen3-30B-A3B's layers (a mixture of 128 experts);
# decode steps of 1-16 rows over two of Llama-3-8B's layers (in the Q4_K_M mix, then the
# Q2_K one); last, in the
# time left, compute-sanitizer's memcheck and racecheck over the kernels' parity tests.
# Every part has its own time limit, and together they fit one device call (600 s): a part
# that hangs costs its limit, not the session's GPU time.
set -uo pipefail
cd "$(dirname "$0")/.."
# Where the device tool collects files (its $OUT), if set: the report is also written there.
RESULTS=${OUT:-}
BIN=target/gpu-check
if [ "${1:-}" = "--build" ]; then
  set -e
  # A fresh folder: a build before this one left its binaries gzipped there.
  rm -rf "$BIN"
  mkdir -p "$BIN"
  for t in cuda_parity cuda_compile cuda_twins cuda_backend; do
    bin=$(cargo test --release -p kernels --test "$t" --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$t" | tail -1)
    cp "$bin" "$BIN/$t"
  done
  # The gateway's integration tests: their engine tests run the GPU path on device 0 where
  # the driver sees a GPU (gateway/tests/suite/common: gpu_paths).
  bin=$(cargo test --release -p gateway --test suite --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="suite": print(m["executable"])' | tail -1)
  cp "$bin" "$BIN/suite"
  cargo build --release -q -p kernels --example gpu_bench --example decode_bench --example synth
  cargo build --release -q -p gateway --example engine_bench
  for e in gpu_bench decode_bench synth engine_bench; do cp "target/release/examples/$e" "$BIN/$e"; done
  # Debug info is not needed there; the carry limit is 64 MiB, which the binaries pass
  # unless compressed (79 MB stripped, 27 MB gzipped at session 69).
  command -v strip >/dev/null && strip --strip-debug "$BIN"/*
  gzip -9 "$BIN"/*
  du -sh "$BIN"
  exit 0
fi
# The binaries come gzipped (see --build): unpacked into a folder of their own here.
if ls "$BIN"/*.gz >/dev/null 2>&1; then
  unpacked=$(mktemp -d)
  for f in "$BIN"/*.gz; do
    out="$unpacked/$(basename "$f" .gz)"
    gzip -dc "$f" >"$out" 2>/dev/null \
      || python3 -c 'import gzip,shutil,sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$out"
    chmod +x "$out"
  done
  BIN=$unpacked
fi
# Where the CUDA libraries may be, first found first used: the toolkit, NVIDIA's Python
# wheels (nvidia-cuda-nvrtc, nvidia-cublas: `nvidia/cu13/lib` beside PyTorch), the
# driver's mount. cudarc opens libcuda.so.1, libnvrtc.so.13 and libcublas.so.13 by name.
libdirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for py in python3 /opt/torch/.venv/bin/python3; do
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) || continue
  libdirs+=("$site/nvidia/cu13/lib" "$site"/nvidia/*/lib)
done
libdirs+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu)
path=""
for d in "${libdirs[@]}"; do
  [ -d "$d" ] && case ":$path:" in *":$d:"*) ;; *) path="${path:+$path:}$d" ;; esac
done
export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Which file each library resolves to (a missing one turns every test below into a skip).
libs() {
  for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
    found=""
    IFS=: read -ra dirs <<<"$LD_LIBRARY_PATH"
    for d in "${dirs[@]}"; do
      [ -e "$d/$lib" ] && { found="$d/$lib"; break; }
    done
    [ -n "$found" ] || found=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l { print $NF; exit }')
    echo "$lib: ${found:-NOT FOUND}"
  done
}
[ -x /usr/local/cuda/bin/ptxas ] && export TOLLGATE_PTXAS=${TOLLGATE_PTXAS:-/usr/local/cuda/bin/ptxas}
export TOLLGATE_PTX_CACHE=${TOLLGATE_PTX_CACHE:-$(mktemp -d)}
# The CPU emulator runs the same tests in CI; here the device time goes to the GPU.
export TOLLGATE_EMU=${TOLLGATE_EMU:-0}
if [ -n "$RESULTS" ] && [ -d "$RESULTS" ]; then
  exec > >(tee "$RESULTS/gpu-check.txt") 2>&1
fi
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
libs
status=0
printf '\n| check | result |\n|---|---|\n'
for t in cuda_compile cuda_twins cuda_parity cuda_backend; do
  log=$(mktemp)
  if timeout 90 "$BIN/$t" --test-threads=1 --nocapture >"$log" 2>&1; then r="pass"; else r="FAIL"; status=1; fi
  # A GPU that was not used is what matters here (the emulator is off on purpose).
  if grep -v "on the emulator" "$log" | grep -q "SKIPPED"; then
    r="$r (skipped: $(grep -v "on the emulator" "$log" | grep -m1 SKIPPED | cut -c1-80))"
  fi
  printf '| %s | %s — %s |\n' "$t" "$r" "$(grep -m1 'test result' "$log")"
  [ "$r" = "pass" ] || tail -30 "$log"
done
# The engine's tests whose GPU path runs on device 0 here (each also on the CPU backend):
# batching, seeds and stops, steps planned ahead, rows drawn on the host, speculation and
# predictions, ignore_eos/min_tokens, windowed pools, a mixture of experts, embeddings,
# JSON mode, regular expressions and choices, log-probabilities, penalties, bad words.
# Those that start the gateway's binary are left out (it is not carried).
log=$(mktemp)
if timeout 120 "$BIN/suite" --test-threads=4 --nocapture gpu_path penalties:: \
  each_answer_is_exactly_one_of_the_choices a_mixture_of_experts_answers_alike \
  the_engine_reports_the_models_logprobs >"$log" 2>&1; then r="pass"; else r="FAIL"; status=1; fi
grep -q "the GPU path runs on device 0" "$log" || r="$r (no GPU seen: $(grep -m1 'no GPU (' "$log" | cut -c1-80))"
printf '| engine tests (suite) | %s — %s |\n' "$r" "$(grep -m1 'test result' "$log")"
[ "$r" = "pass" ] || grep -E "panicked|FAILED|failures:|^---- " "$log" | head -40
echo
timeout 60 "$BIN/gpu_bench" || status=1
model=$(mktemp -d)/smollm2-shape.gguf
"$BIN/synth" "$model" >/dev/null || status=1
echo
# Position 511: each row attends to 512 keys, as gpu_bench's decode attention and its
# "launched alone" sums, so that the step's time minus that sum is the launch gaps.
timeout 90 "$BIN/decode_bench" "$model" --ctx 511 || status=1
echo
# The same shape in llama.cpp's Q4_K_M mix: its ffn_down in Q6_K, read at 6 bits by gemv_q6h
# (a scale per 16, factored), its 576-wide matrices' Q5_0 at 5 bits (gemv_q5).
kq=$(dirname "$model")/smollm2-shape-q4_k_m.gguf
"$BIN/synth" "$kq" q4_k_m >/dev/null || status=1
timeout 60 "$BIN/decode_bench" "$kq" --ctx 511 --batches 1,4,16 || status=1
echo
# Long rows at small batch: each row's attention chunks spread over several blocks.
timeout 60 "$BIN/decode_bench" "$model" --ctx 4095 --batches 1,16 || status=1
echo
BACKEND=cuda STREAMS=1,64,256 TOKENS=256 timeout 120 "$BIN/engine_bench" "$model" || status=1
echo
# The same at 256 streams with each step waiting for the one before (no step planned
# ahead): what overlapping the host's work with the device's is worth.
OVERLAP=0 BACKEND=cuda STREAMS=256 TOKENS=256 timeout 60 "$BIN/engine_bench" "$model" || status=1
echo
# Speculative decoding by prompt lookup on one stream (the synthetic model's answers
# repeat themselves): drafts drawn on the device, each drafting step collected before the
# next is planned and launched rather than replayed; against the one-stream line above.
SPECULATE=4 BACKEND=cuda STREAMS=1 TOKENS=256 timeout 30 "$BIN/engine_bench" "$model" || status=1
echo
# The same with the tensor-core attention kernel (attention_tc): decode steps at 512 and
# 4,096 keys, and through the engine (its prefill row is a 512-token prompt).
timeout 60 "$BIN/decode_bench" "$model" --ctx 511 --batches 1,64,256 --tensor || status=1
echo
timeout 40 "$BIN/decode_bench" "$model" --ctx 4095 --batches 1,16 --tensor || status=1
echo
ATTENTION=tensor BACKEND=cuda STREAMS=1,256 TOKENS=256 timeout 90 "$BIN/engine_bench" "$model" || status=1
echo
# JSON mode: every row's mask goes to the device in the staging copy (no logits read back),
# after the step's forward pass is sent (the masks need the step before's tokens); and the
# same with each step waiting for the one before.
BACKEND=cuda FORMAT=json STREAMS=64,256 TOKENS=128 timeout 90 "$BIN/engine_bench" "$model" || status=1
OVERLAP=0 BACKEND=cuda FORMAT=json STREAMS=256 TOKENS=128 timeout 45 "$BIN/engine_bench" "$model" || status=1
# A regular expression (vLLM's guided_regex): its mask from the vocabulary's trie walk.
BACKEND=cuda FORMAT=regex STREAMS=256 TOKENS=128 timeout 45 "$BIN/engine_bench" "$model" || status=1
# A context-free grammar (vLLM's guided_grammar): its stacks followed on the host.
BACKEND=cuda FORMAT=grammar STREAMS=256 TOKENS=128 timeout 45 "$BIN/engine_bench" "$model" || status=1
echo
# Presence and frequency penalties on every stream: deltas on the device, steps still
# planned ahead (each counts the token the step before drew, on the device).
PENALTIES=1 BACKEND=cuda STREAMS=256 TOKENS=64 timeout 30 "$BIN/engine_bench" "$model" || status=1
# vLLM's repetition penalty (each row's seen tokens to the device as a list) and min_p on
# sampled streams.
REPETITION=1.1 SAMPLING=top_p MIN_P=0.05 BACKEND=cuda STREAMS=256 TOKENS=64 timeout 30 "$BIN/engine_bench" "$model" || status=1
# And with log-probabilities (the same 64 tokens: their cost is the ratio of the two
# lines): the `logprobs` kernel computes each row's from the model's logits (44 words back
# a row instead of 49,152 floats) while the device draws from its adjusted copy; steps
# still planned ahead.
LOGPROBS=2 PENALTIES=1 BACKEND=cuda STREAMS=256 TOKENS=64 timeout 30 "$BIN/engine_bench" "$model" || status=1
# Embeddings: inputs of about 130 tokens, 64 and 256 at once (the step that ends inputs is
# taken at once and their hidden rows read back: what that costs against prefill).
EMBED=1 BACKEND=cuda STREAMS=64,256 TOKENS=32 timeout 30 "$BIN/engine_bench" "$model" || status=1
echo
# engine_file NAME SPEC UNTIL: the synthetic model SPEC written beside the model as
# NAME.gguf and run through the engine at 1 and 256 streams, unless UNTIL seconds are gone.
engine_file() {
  if [ $SECONDS -lt "$3" ]; then
    f=$(dirname "$model")/$1.gguf
    if timeout 40 "$BIN/synth" "$f" "$2" >/dev/null; then
      BACKEND=cuda STREAMS=1,256 TOKENS=64 timeout 45 "$BIN/engine_bench" "$f" || status=1
    else
      echo "$1: synth failed"; status=1
    fi
  else
    echo "$1: not run ($SECONDS s gone)"
  fi
}
# Qwen2.5-0.5B's shape as a qwen2 file (biases on Q, K and V: the QKV product unfused,
# rope_kv_write adding them; 14 query heads on 2 KV heads).
engine_file qwen2-0.5b qwen2_0_5b 380
# Qwen3-0.6B's shape as a qwen3 file (16 query heads of 128 on 8 KV heads under a width of
# 1,024: Q's rows twice the width; head_rmsnorm before rope_kv_write, the QKV product
# unfused).
engine_file qwen3-0.6b qwen3_0_6b 390
# A mixture of experts: SmolLM2's shape as a qwen3moe file (4 experts half as wide, 2 a
# token) through the engine; then one of Qwen3-30B-A3B's layers (8 of 128 experts a
# token, 768 wide) in decode steps of 1-256 rows against the floor of reading the experts
# the rows choose (moe_route, moe_sort, the experts' products, moe_combine at a real
# mixture's widths): the experts in the file's blocks (moe_tc_q4, the default), then as
# Q8_0's values (moe_gemv_q8).
engine_file qwen3moe-smol qwen3moe_smol 395
# Gemma 3 (SmolLM2's width and depth, Gemma 3 1B's attention: 4 query heads of 256 on one
# KV head, five layers of six on a window of 512): GeGLU, the post-norms, the windowed
# layers' own RoPE table, the attention build for heads of 256, and the windowed layers'
# own KV pool (their caches that pool's blocks, build_batch's second table and slots);
# then the same file with every position on every layer (WINDOW_KV_TOKENS=0), for the A/B.
engine_file gemma3-smol gemma3_smol 398
g3=$(dirname "$model")/gemma3-smol.gguf
if [ $SECONDS -lt 398 ] && [ -f "$g3" ]; then
  WINDOW_KV_TOKENS=0 BACKEND=cuda STREAMS=1,256 TOKENS=64 timeout 45 "$BIN/engine_bench" "$g3" || status=1
fi
# SmolLM3 (SmolLM2's shape as a smollm3 file): every fourth layer turns no pair, so
# rope_kv_write takes each layer's turned pairs and the QKV product stays unfused.
engine_file smollm3-smol smollm3_smol 399
if [ $SECONDS -lt 400 ]; then
  q3m=$(dirname "$model")/qwen3moe-30b-layer.gguf
  if timeout 40 "$BIN/synth" "$q3m" qwen3moe_30b_layer >/dev/null; then
    timeout 60 "$BIN/decode_bench" "$q3m" --ctx 511 --batches 1,16,64,256 || status=1
    if [ $SECONDS -lt 410 ]; then
      echo "TOLLGATE_EXPERTS=q8"
      TOLLGATE_EXPERTS=q8 timeout 40 "$BIN/decode_bench" "$q3m" --ctx 511 --batches 1,16,256 || status=1
    fi
  else
    echo "qwen3moe layer: synth failed"; status=1
  fi
else
  echo "qwen3moe layer: not run ($SECONDS s gone)"
fi
echo
# Two of Llama-3-8B's layers in the Q4_K_M mix (4,096 wide, feed-forward 14,336, heads of
# 128 in groups of 4; a vocabulary of 4,096): decode steps of 1-256 rows at an 8B model's
# widths, where SmolLM2's do not go — its QKV a stack of Q4_K and Q6_K parts, its ffn_down
# read in runs of columns at 8-16 rows, fused or apart — with the load-time choice per
# bucket. Left out when the time is the sanitizer's.
if [ $SECONDS -lt 420 ]; then
  l8=$(dirname "$model")/llama8b-layers.gguf
  if timeout 60 "$BIN/synth" "$l8" llama8b >/dev/null; then
    timeout 90 "$BIN/decode_bench" "$l8" --ctx 511 --batches 1,4,8,16,64,256 || status=1
    # The K-quants' scales all as f32 pairs (1.4 bits a weight more, the tiles carrying
    # them; the default above stages the factored ones in shared memory): which to keep.
    for scales in f32; do
      if [ $SECONDS -lt 450 ]; then
        echo "TOLLGATE_KQUANT_SCALES=$scales"
        TOLLGATE_KQUANT_SCALES=$scales timeout 60 "$BIN/decode_bench" "$l8" --ctx 511 --batches 1,8,16 || status=1
      fi
    done
    # The same layers in llama.cpp's Q2_K mix: Q2_K's 2-bit integers under their scales
    # and offsets per 16 (gemv_q2h, 3.125 bits a weight) beside Q3_K's at 4 (gemv_q4h).
    if [ $SECONDS -lt 460 ]; then
      q2=$(dirname "$model")/llama8b-q2k.gguf
      if timeout 40 "$BIN/synth" "$q2" llama8b_q2_k >/dev/null; then
        timeout 45 "$BIN/decode_bench" "$q2" --ctx 511 --batches 1,8,16 || status=1
      else
        echo "llama8b layers (Q2_K mix): synth failed"; status=1
      fi
    fi
  else
    echo "llama8b layers: synth failed"; status=1
  fi
else
  echo "llama8b layers: not run ($SECONDS s gone)"
fi
# Last, in the time left of one device call: compute-sanitizer over the kernels' parity
# tests. memcheck: out-of-bounds and misaligned accesses on the device; racecheck, on the
# kernels that use shared memory: hazards that the emulator's thread orders did not show.
# A run cut short by its time limit is reported as such, not as a failure.
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
echo
printf '| sanitizer | result |\n|---|---|\n'
for run in "memcheck" "racecheck attention tensor_core build_batch sampling logprobs gemv qkv stack runs_of_columns moe"; do
  read -r tool filters <<<"$run"
  left=$((560 - SECONDS))
  if [ ! -x "$san" ]; then printf '| %s | not run: no compute-sanitizer |\n' "$tool"; continue; fi
  if [ $left -lt 45 ]; then printf '| %s | not run: %d s left |\n' "$tool" "$left"; continue; fi
  log=$(mktemp)
  # shellcheck disable=SC2086 # the filters are separate arguments
  timeout $((left - 15)) "$san" --tool "$tool" --error-exitcode 9 --print-limit 10 \
    "$BIN/cuda_parity" --test-threads=1 $filters >"$log" 2>&1
  rc=$?
  case $rc in
    0) r="pass — $(grep -m1 'ERROR SUMMARY' "$log" || echo 'no summary')" ;;
    124) r="cut short at $((left - 15)) s (not a failure)" ;;
    *) r="FAIL (exit $rc) — $(grep -m1 'ERROR SUMMARY' "$log")"; status=1 ;;
  esac
  printf '| %s | %s |\n' "$tool" "$r"
  [ $rc = 0 ] || [ $rc = 124 ] || grep -v '^ *$' "$log" | head -40
done
echo "total: $SECONDS s"
exit $status
