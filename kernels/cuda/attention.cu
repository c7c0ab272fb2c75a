// Causal grouped-query attention over the paged KV cache (f16, layout of one layer
// [block][kv_head][slot][dim]), written for this step before it runs.
//
// One block per (query row, KV head): the row's keys fall into MAX_WARPS fixed slices (key
// j in slice j % MAX_WARPS), its warps take the slices in turn (warp w: slices w, w + nw,
// ...), its lanes split head_dim (dims lane, lane+32, ...), and a warp keeps an
// online-softmax state per query head of the group, so the group's heads read each key and
// value once. The slices' states are merged through shared memory at the end, in slice
// order. The partition does not depend on how many warps a launch has, so a row's output
// has the same bits whatever the batch around it. Output: f16 [rows, n_heads·head_dim]
// (the output projection's input). Query row r starts at q + r · q_stride (the QKV
// product's rows, whose first n_heads · head_dim floats are the queries).
//
// attention_prefill: any packed batch (prefill chunks and decodes); row r attends to
// positions 0..=positions[r] of its sequence seq_of_row[r].
// attention_decode: one row per sequence (row r is sequence r), as in decode steps.
//
// MAX_GROUP (query heads per KV head) and MAX_DPL (head_dim / 32) size the per-thread
// state; the loader sets them to the model's values (-D) so that no register is unused,
// else these general limits apply.
#ifndef MAX_GROUP
#define MAX_GROUP 8
#endif
#ifndef MAX_DPL
#define MAX_DPL 4   // head_dim <= 128
#endif
// Key slices per row, and the most warps per block (a launch with more leaves the extra
// idle; one with fewer runs several slices per warp); the loader raises it where the
// model's state fits in shared memory, and launches more warps when the step has few rows
// (decode at small batch).
#ifndef MAX_WARPS
#define MAX_WARPS 4
#endif

__device__ void attend(const float* __restrict__ q_row, const half_t* __restrict__ kc,
                       const half_t* __restrict__ vc, const int* __restrict__ table, int n_keys,
                       int kvh, int n_kv_heads, int head_dim, int block_size, int group,
                       float scale, half_t* __restrict__ out_row) {
    __shared__ float sm_m[MAX_WARPS][MAX_GROUP];
    __shared__ float sm_l[MAX_WARPS][MAX_GROUP];
    __shared__ float sm_acc[MAX_WARPS][MAX_GROUP][MAX_DPL * 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nw = min((int)(blockDim.x >> 5), MAX_WARPS);
    int dpl = head_dim / 32;
    float qv[MAX_GROUP][MAX_DPL], m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][MAX_DPL];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
        for (int t = 0; t < MAX_DPL; ++t)
            qv[g][t] = (g < group && t < dpl)
                           ? q_row[(kvh * group + g) * head_dim + t * 32 + lane] * scale
                           : 0.0f;
    }
    for (int slice = warp; slice < MAX_WARPS; slice += nw) {
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
#pragma unroll
            for (int t = 0; t < MAX_DPL; ++t) acc[g][t] = 0.0f;
        }
        for (int j = slice; j < n_keys; j += MAX_WARPS) {
            int blk = table[j / block_size], slot = j % block_size;
            size_t base = (((size_t)blk * n_kv_heads + kvh) * block_size + slot) * head_dim;
            float kk[MAX_DPL], vv[MAX_DPL];
#pragma unroll
            for (int t = 0; t < MAX_DPL; ++t) {
                kk[t] = t < dpl ? h2f(kc[base + t * 32 + lane]) : 0.0f;
                vv[t] = t < dpl ? h2f(vc[base + t * 32 + lane]) : 0.0f;
            }
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) {
                if (g >= group) break;
                float s = 0.0f;
#pragma unroll
                for (int t = 0; t < MAX_DPL; ++t) s += qv[g][t] * kk[t];
                s = warp_sum(s);
                float mn = fmaxf(m[g], s);
                float corr = expf(m[g] - mn), p = expf(s - mn);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int t = 0; t < MAX_DPL; ++t) acc[g][t] = acc[g][t] * corr + p * vv[t];
                m[g] = mn;
            }
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            if (g >= group) break;
            if (lane == 0) {
                sm_m[slice][g] = m[g];
                sm_l[slice][g] = l[g];
            }
#pragma unroll
            for (int t = 0; t < MAX_DPL; ++t)
                if (t < dpl) sm_acc[slice][g][t * 32 + lane] = acc[g][t];
        }
    }
    __syncthreads();
    // Merge: thread i of the block produces output elements i, i + blockDim.x, ...
    int width = group * head_dim;
    for (int e = threadIdx.x; e < width; e += blockDim.x) {
        int g = e / head_dim, d = e % head_dim;
        float mx = -INFINITY;
        for (int w = 0; w < MAX_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < MAX_WARPS; ++w) {
            if (sm_l[w][g] == 0.0f) continue;
            float c = expf(sm_m[w][g] - mx);
            num += sm_acc[w][g][d] * c;
            den += sm_l[w][g] * c;
        }
        out_row[(kvh * group + g) * head_dim + d] = f2h(den > 0.0f ? num / den : 0.0f);
    }
}

extern "C" __global__ void attention_prefill(const float* __restrict__ q, int q_stride,
                                             const half_t* __restrict__ kc,
                                             const half_t* __restrict__ vc,
                                             const int* __restrict__ block_tables,
                                             const int* __restrict__ seq_of_row,
                                             const u32* __restrict__ positions,
                                             half_t* __restrict__ out, int max_blocks,
                                             int n_heads, int n_kv_heads, int head_dim,
                                             int block_size, float scale) {
    int r = blockIdx.x, kvh = blockIdx.y;
    int group = n_heads / n_kv_heads;
    attend(q + (size_t)r * q_stride, kc, vc,
           block_tables + (size_t)seq_of_row[r] * max_blocks, (int)positions[r] + 1, kvh,
           n_kv_heads, head_dim, block_size, group, scale, out + (size_t)r * n_heads * head_dim);
}

extern "C" __global__ void attention_decode(const float* __restrict__ q, int q_stride,
                                            const half_t* __restrict__ kc,
                                            const half_t* __restrict__ vc,
                                            const int* __restrict__ block_tables,
                                            const u32* __restrict__ positions,
                                            half_t* __restrict__ out, int max_blocks,
                                            int n_heads, int n_kv_heads, int head_dim,
                                            int block_size, float scale) {
    int r = blockIdx.x, kvh = blockIdx.y;
    int group = n_heads / n_kv_heads;
    attend(q + (size_t)r * q_stride, kc, vc, block_tables + (size_t)r * max_blocks,
           (int)positions[r] + 1, kvh, n_kv_heads, head_dim, block_size, group, scale,
           out + (size_t)r * n_heads * head_dim);
}
