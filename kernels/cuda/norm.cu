// RMSNorm fused with the residual add: x += delta (when delta is not null), then
// out = x / rms(x) · w, as f16 (the next matrix product's input).
// With `rows` not null, output row i normalizes x row rows[i] (after adding delta's row
// rows[i], when delta is not null): the last residual add and final norm of just the rows
// that want logits. rows[i] < 0 writes zeros; the entries >= 0 must be distinct.
//
// One warp per output row (n_out rows; blockDim.x / 32 rows per block): a row of a few
// hundred to a few thousand floats is a few dozen independent loads per lane, reduced by
// shuffles alone, with no block barrier between a row's loads and its stores. The second
// pass reads the row again from L1. A row's sum runs in the same order in any launch.
extern "C" __global__ void add_rmsnorm(float* __restrict__ x, const float* __restrict__ delta,
                                       const float* __restrict__ w, half_t* __restrict__ out,
                                       const int* __restrict__ rows, int n_out, int dim,
                                       float eps) {
    pdl_begin();
    int lane = threadIdx.x & 31;
    int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= n_out) return;
    int r = rows ? rows[i] : i;
    half_t* o = out + (size_t)i * dim;
    if (r < 0) {
        for (int d = lane; d < dim; d += 32) o[d] = 0;
        return;
    }
    float* xr = x + (size_t)r * dim;
    float inv = add_rms_row(xr, delta ? delta + (size_t)r * dim : nullptr, xr, dim, eps);
#pragma unroll 4
    for (int d = lane; d < dim; d += 32) o[d] = f2h(xr[d] * inv * w[d]);
}

// The RMSNorm of each Q and K head in place, after the QKV product and before RoPE
// (Qwen3's): row r's n_heads query heads (by the weights q_w) and n_kv_heads key heads
// (k_w), head_dim floats each, at the start of its row of the product (`stride` floats a
// row). The value heads after them are left as they are.
//
// Also a block's output rows in place (Gemma 2's and 3's post-norms): one "head" of the
// row's width, n_kv_heads 0 (k_w is then not read).
//
// One warp per (row, head), as add_rmsnorm's rows: the head's sum of squares by shuffles
// (add_rms_row), then a second pass from L1 scales it. Launch: n_rows · (n_heads +
// n_kv_heads) warps, blockDim.x / 32 a block.
extern "C" __global__ void head_rmsnorm(float* __restrict__ qkv, int stride, int n_rows,
                                        int n_heads, int n_kv_heads, int head_dim,
                                        const float* __restrict__ q_w,
                                        const float* __restrict__ k_w, float eps) {
    pdl_begin();
    int lane = threadIdx.x & 31;
    int heads = n_heads + n_kv_heads;
    int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= n_rows * heads) return;
    int r = i / heads, h = i - r * heads;
    float* x = qkv + (size_t)r * stride + (size_t)h * head_dim;
    const float* w = h < n_heads ? q_w : k_w;
    float inv = add_rms_row(x, nullptr, nullptr, head_dim, eps);
#pragma unroll 4
    for (int d = lane; d < head_dim; d += 32) x[d] = x[d] * inv * w[d];
}
