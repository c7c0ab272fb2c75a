// KV-cache write into paged blocks. Cache layout of one layer: [block][kv_head][slot][dim]
// in f16. Row r's keys and values go to slot_mapping[r] = block × block_size + slot.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v,
                                    half_t* __restrict__ kc, half_t* __restrict__ vc,
                                    const int* __restrict__ slot_mapping, int n_rows,
                                    int n_kv_heads, int head_dim, int block_size) {
    int kv_dim = n_kv_heads * head_dim;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * kv_dim) return;
    int r = i / kv_dim, rest = i % kv_dim;
    int h = rest / head_dim, d = rest % head_dim;
    int slot_all = slot_mapping[r];
    int blk = slot_all / block_size, slot = slot_all % block_size;
    size_t at = (((size_t)blk * n_kv_heads + h) * block_size + slot) * head_dim + d;
    kc[at] = f2h(k[i]);
    vc[at] = f2h(v[i]);
}
