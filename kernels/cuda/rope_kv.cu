// RoPE and the KV-cache write, fused: one pass over each row's q, k and v.
//
// qkv: the QKV product, row-major with `stride` floats per row: the row's n_heads query
// heads, then n_kv_heads key heads, then n_kv_heads value heads, head_dim each. Each q and
// k head is rotated in place at the row's position, adjacent pairs (x[2i], x[2i+1]) by
// pos · base^(−2i/head_dim) (GGUF's Llama layout); then the rotated keys and the values go
// to the paged f16 cache (one layer: [block][kv_head][slot][dim]) at slot_mapping[r] =
// block × block_size + slot. One thread per (row, head, pair); heads [0, n_heads) are q's,
// then k's (a k thread also writes its pair of keys and the same pair of values).
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, int stride,
                                         const u32* __restrict__ positions,
                                         const int* __restrict__ slot_mapping,
                                         half_t* __restrict__ kc, half_t* __restrict__ vc,
                                         int n_rows, int n_heads, int n_kv_heads, int head_dim,
                                         int block_size, float base) {
    int half_dim = head_dim / 2;
    int per_row = (n_heads + n_kv_heads) * half_dim;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * per_row) return;
    int r = i / per_row, rest = i % per_row;
    int h = rest / half_dim, p = rest % half_dim;
    float* row = qkv + (size_t)r * stride;
    float* x = row + (size_t)h * head_dim;  // k heads follow the q heads in the row
    float inv_freq = 1.0f / powf(base, (2.0f * p) / head_dim);
    float s, c;
    sincosf((float)positions[r] * inv_freq, &s, &c);
    float a = x[2 * p], b = x[2 * p + 1];
    float ra = a * c - b * s, rb = a * s + b * c;
    x[2 * p] = ra;
    x[2 * p + 1] = rb;
    if (h < n_heads) return;
    int kvh = h - n_heads;
    int slot_all = slot_mapping[r];
    int blk = slot_all / block_size, slot = slot_all % block_size;
    size_t at = (((size_t)blk * n_kv_heads + kvh) * block_size + slot) * head_dim + 2 * p;
    const float* v = row + (size_t)(n_heads + n_kv_heads + kvh) * head_dim;
    kc[at] = f2h(ra);
    kc[at + 1] = f2h(rb);
    vc[at] = f2h(v[2 * p]);
    vc[at + 1] = f2h(v[2 * p + 1]);
}
