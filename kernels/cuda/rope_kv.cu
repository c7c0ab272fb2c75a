// RoPE and the KV-cache write, fused: one pass over each row's q, k and v.
//
// qkv: the QKV product, row-major with `stride` floats per row: the row's n_heads query
// heads, then n_kv_heads key heads, then n_kv_heads value heads, head_dim each. Where the
// model has biases on Q, K and V (Qwen2's; `bias`, one row's worth, else null), they are
// added in place first. Each q and k head is rotated in place at the row's position, adjacent pairs (x[2i], x[2i+1]) by
// pos · inv_freq[i] (the model's frequencies: base^(−2i/head_dim), over the file's RoPE
// factors where it has them; GGUF's Llama layout) — but the pairs from `turned` on (partial
// RoPE's, whose heads turn their first dimensions only), which are multiplied by
// pass_scale instead (the model's attention factor undone on them: LlamaConfig::rope_pass;
// turned = head_dim / 2 where every pair turns); then the rotated keys and the values go
// to the paged f16 cache (one layer: [block][kv_head][slot][dim]) at slot_mapping[r] =
// block × block_size + slot (nowhere where it is −1: a padded row's).
//
// One thread per (row, pair): its angle's sine and cosine are computed once and serve
// every q and k head of the row (the same pair of each head turns by the same angle), so
// the transcendental work is n_heads + n_kv_heads times smaller than per (row, head,
// pair), and the kernel is bound by memory. A warp's lanes take adjacent pairs: each
// head's loads and stores are contiguous across the warp, and a pair of f16 cache
// entries goes out as one 32-bit store. Launch: n_rows · head_dim / 2 threads.
// (The rotation's arithmetic, rope_sincos and rotate, is in common.cuh: the QKV product
// of few rows does the same in its own epilogue, gemv.cu's gemv_f16_norm_rope.)

extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, int stride,
                                         const u32* __restrict__ positions,
                                         const int* __restrict__ slot_mapping,
                                         half_t* __restrict__ kc, half_t* __restrict__ vc,
                                         int n_rows, int n_heads, int n_kv_heads, int head_dim,
                                         int block_size,
                                         const float* __restrict__ inv_freq, int turned,
                                         float pass_scale, const float* __restrict__ bias) {
    pdl_begin();
    int half_dim = head_dim / 2;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * half_dim) return;
    int r = i / half_dim, p = i - r * half_dim;
    float s = 0.0f, c = pass_scale;
    if (p < turned) rope_sincos(positions[r], inv_freq[p], &s, &c);
    float* row = qkv + (size_t)r * stride + 2 * p;
    if (bias) {
        const float* b = bias + 2 * p;
        for (int h = 0; h < n_heads + 2 * n_kv_heads; ++h) {
            row[(size_t)h * head_dim] += b[(size_t)h * head_dim];
            row[(size_t)h * head_dim + 1] += b[(size_t)h * head_dim + 1];
        }
    }
#pragma unroll 4
    for (int h = 0; h < n_heads; ++h) rotate(row + (size_t)h * head_dim, c, s);
    int slot_all = slot_mapping[r];
    int blk = slot_all / block_size, slot = slot_all - blk * block_size;
    // Entry 2p of (block, kv head 0, slot); each further KV head is block_size rows on.
    size_t at = (((size_t)blk * n_kv_heads) * block_size + slot) * head_dim + 2 * p;
    size_t head_step = (size_t)block_size * head_dim;
#pragma unroll 4
    for (int kvh = 0; kvh < n_kv_heads; ++kvh) {
        float* x = row + (size_t)(n_heads + kvh) * head_dim;
        const float* v = row + (size_t)(n_heads + n_kv_heads + kvh) * head_dim;
        rotate(x, c, s);
        if (slot_all < 0) continue;
        // Two f16 entries at an even index: one aligned 32-bit word, the lower one first.
        size_t e = at + kvh * head_step;
        *(u32*)(kc + e) = (u32)f2h(x[0]) | ((u32)f2h(x[1]) << 16);
        *(u32*)(vc + e) = (u32)f2h(v[0]) | ((u32)f2h(v[1]) << 16);
    }
}
