// Rotary embedding of q and k in place at each row's position, rotating adjacent pairs
// (x[2i], x[2i+1]) by pos · base^(−2i/head_dim) (GGUF's Llama layout). One thread per
// (row, head, pair); heads [0, n_heads) are q's, then k's.
extern "C" __global__ void rope(float* __restrict__ q, float* __restrict__ k,
                                const u32* __restrict__ positions, int n_rows, int n_heads,
                                int n_kv_heads, int head_dim, float base) {
    int half_dim = head_dim / 2;
    int per_row = (n_heads + n_kv_heads) * half_dim;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * per_row) return;
    int r = i / per_row, rest = i % per_row;
    int h = rest / half_dim, p = rest % half_dim;
    float* v = h < n_heads ? q + ((size_t)r * n_heads + h) * head_dim
                           : k + ((size_t)r * n_kv_heads + (h - n_heads)) * head_dim;
    float inv_freq = 1.0f / powf(base, (2.0f * p) / head_dim);
    float s, c;
    sincosf((float)positions[r] * inv_freq, &s, &c);
    float a = v[2 * p], b = v[2 * p + 1];
    v[2 * p] = a * c - b * s;
    v[2 * p + 1] = a * s + b * c;
}
