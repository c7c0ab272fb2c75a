// Causal grouped-query attention over the paged KV cache (f16, layout of one layer
// [block][kv_head][slot][dim]), written for this step before it runs.
//
// One block per (query row, KV head). A key is read by a group of lanes, each lane
// holding 8 consecutive dimensions (one 16-byte load of the key and one of the value):
// lpk = head_dim / 8 lanes per key (rounded up to a power of two), so a warp works on
// kpw = 32 / lpk keys at once (4 for head_dim 64), and a key's score for each query head of
// the group needs log2(lpk) shuffles. Each lane group keeps an online-softmax state per
// query head (max, sum, its 8 dimensions of the output), rescaled only when a key raises
// the max, so the group's heads read each key and value once.
//
// The keys are dealt to MAX_WARPS × kpw fixed streams (key j to stream j % streams); a
// slice is one warp's kpw streams, and a launch's warps take the slices in turn (warp w:
// slices w, w + nw, ...). A slice's streams are merged by shuffles in a fixed order, the
// slices through shared memory in slice order. The partition does not depend on how many
// warps a launch has, so a row's output has the same bits whatever the batch around it.
//
// Long rows are cut into chunks of CHUNK_KEYS keys (keys [c·CHUNK_KEYS, (c+1)·CHUNK_KEYS)):
// each chunk is attended as above (its own streams and slices) to a partial state per
// output element (max, sum, unnormalized output), and the chunks' states are merged in
// chunk order, always by the same `merge`. A launch with gridDim.z = Z > 1 spreads a row's
// chunks over min(Z, chunks) blocks (block z: chunks z, z + Z, ...), which write their
// partial states to `part`; the last of them to finish (an arrival count per row and KV
// head in `arrive`, set back to 0 by that block) merges them all in chunk order. With
// Z = 1 a block merges its chunks as it goes, in the same order with the same arithmetic,
// so a row's output has the same bits for any Z too: the step chooses Z by its rows alone
// (decode at small batch spreads a long row over many SMs, flash-decoding style). Rows at
// or past `part_rows`, or with more chunks than `part` holds per row, keep Z = 1.
// Output: f16 [rows, n_heads·head_dim] (the output projection's input). Query row r starts
// at q + r · q_stride (the QKV product's rows, whose first n_heads · head_dim floats are
// the queries). The cache and head_dim · 2 bytes are 16-byte aligned.
//
// attention_prefill: any packed batch (prefill chunks and decodes); row r attends to
// positions 0..=positions[r] of its sequence seq_of_row[r].
// attention_decode: one row per sequence (row r is sequence r), as in decode steps.
//
// A sliding window (window > 0: Gemma 2's and 3's windowed layers) leaves row r the
// positions lo..=positions[r], lo = positions[r] + 1 − window (from 0): keys below lo are
// neither read nor counted, and chunks wholly below lo are not attended (an empty chunk's
// state would leave the merge as it is, so the bits are those of attending them). A soft
// cap (softcap > 0: Gemma 2's) makes each scaled score cap · tanh(score / cap).
//
// MAX_GROUP (query heads per KV head) and MAX_DPL (head_dim / 32) size the per-thread
// state and the merge; the loader sets them to the model's values (-D) so that no
// register is unused, else these general limits apply.
#ifndef MAX_GROUP
#define MAX_GROUP 8
#endif
#ifndef MAX_DPL
#define MAX_DPL 4   // head_dim <= 128 (the loader's builds: up to 8, head_dim 256)
#endif
// Slices per row, and the most warps per block (a launch with more leaves the extra idle;
// one with fewer runs several slices per warp); the loader raises it where the model's
// state fits in registers and shared memory, and launches more warps when the step has few
// rows (decode at small batch).
#ifndef MAX_WARPS
#define MAX_WARPS 4
#endif

// Keys per chunk (a multiple of every build's streams: MAX_WARPS · kpw).
#ifndef CHUNK_KEYS
#define CHUNK_KEYS 512
#endif

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ uint4 make_zero4() {
    uint4 z;
    z.x = z.y = z.z = z.w = 0u;
    return z;
}

// Eight f16 values (one 16-byte load) as floats.
__device__ __forceinline__ void unpack8(uint4 q, float* f) {
    u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        f[2 * h] = h2f((half_t)(w[h] & 0xffffu));
        f[2 * h + 1] = h2f((half_t)(w[h] >> 16));
    }
}

// Key j's and value j's 8 dimensions from d0 for this lane (zeros outside the keys
// lo..n_keys, or for lanes past head_dim), at table entry jb, slot js.
__device__ __forceinline__ void fetch(const half_t* __restrict__ kc, const half_t* __restrict__ vc,
                                      const int* __restrict__ table, int j, int lo, int n_keys,
                                      bool dims, int kvh, int n_kv_heads, int block_size,
                                      int head_dim, int d0, int jb, int js, uint4& k, uint4& v) {
    if (j >= lo && j < n_keys && dims) {
        int blk = table[jb];
        size_t at = (((size_t)blk * n_kv_heads + kvh) * block_size + js) * head_dim + d0;
        k = *reinterpret_cast<const uint4*>(kc + at);
        v = *reinterpret_cast<const uint4*>(vc + at);
    } else {
        k = make_zero4();
        v = make_zero4();
    }
}

// One chunk, keys [k0, k1) (those from lo): every slice's online-softmax state into the
// shared arrays (slices in turn over the block's warps), then a barrier.
__device__ __forceinline__ void attend_chunk(
    const float (&qv)[MAX_GROUP][8], const half_t* __restrict__ kc,
    const half_t* __restrict__ vc, const int* __restrict__ table, int k0, int lo, int n_keys,
    int kvh, int n_kv_heads, int head_dim, int block_size, int group, float softcap,
    float (*sm_m)[MAX_GROUP],
    float (*sm_l)[MAX_GROUP], float (*sm_acc)[MAX_GROUP][MAX_DPL * 32]) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nw = min((int)(blockDim.x >> 5), MAX_WARPS);
    int lpk = 1;
    while (lpk * 8 < head_dim) lpk <<= 1;
    int kpw = 32 / lpk, streams = MAX_WARPS * kpw;
    int kg = lane / lpk, d0 = (lane % lpk) * 8;
    bool dims = d0 < head_dim;  // lanes past head_dim (head_dim 96) only join the shuffles
    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][8];
    for (int slice = warp; slice < MAX_WARPS; slice += nw) {
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
#pragma unroll
            for (int t = 0; t < 8; ++t) acc[g][t] = 0.0f;
        }
        // Every lane runs the same iterations (the shuffles need the whole warp); lane
        // group kg takes key j = `first + kg` of each, at table entry jb, slot js (kept by
        // adding, not dividing, as j moves on by `streams`). The next iteration's key and
        // value are loaded before this one's are used, so that a warp has two iterations'
        // loads in flight (the order of the arithmetic, and so the bits, is unchanged).
        int j = k0 + slice * kpw + kg, jb = j / block_size, js = j - jb * block_size;
        int step_b = streams / block_size, step_s = streams - step_b * block_size;
        uint4 kn = make_zero4(), vn = make_zero4();
        fetch(kc, vc, table, j, lo, n_keys, dims, kvh, n_kv_heads, block_size, head_dim, d0, jb,
              js, kn, vn);
        for (int first = k0 + slice * kpw; first < n_keys; first += streams) {
            bool live = first + kg >= lo && first + kg < n_keys;
            uint4 kq = kn, vq = vn;
            j += streams;
            jb += step_b;
            js += step_s;
            if (js >= block_size) {
                js -= block_size;
                ++jb;
            }
            fetch(kc, vc, table, j, lo, n_keys, dims, kvh, n_kv_heads, block_size, head_dim, d0,
                  jb, js, kn, vn);
            float kk[8], vv[8];
            unpack8(kq, kk);
            unpack8(vq, vv);
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) {
                if (g >= group) break;
                float s = 0.0f;
#pragma unroll
                for (int t = 0; t < 8; ++t) s += qv[g][t] * kk[t];
                // A butterfly within the lane group: every lane of it ends with the same sum.
#pragma unroll
                for (int o = 1; o < 32; o <<= 1)
                    if (o < lpk) s += __shfl_xor_sync(FULL_MASK, s, o);
                if (!live) continue;
                if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                if (s > m[g]) {
                    float c = expf(m[g] - s);
                    l[g] *= c;
#pragma unroll
                    for (int t = 0; t < 8; ++t) acc[g][t] *= c;
                    m[g] = s;
                }
                float p = expf(s - m[g]);
                l[g] += p;
#pragma unroll
                for (int t = 0; t < 8; ++t) acc[g][t] += p * vv[t];
            }
        }
        // The slice's kpw streams, merged pairwise (lane groups o apart), into lane group 0.
        for (int o = lpk; o < 32; o <<= 1) {
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) {
                if (g >= group) break;
                float mo = __shfl_xor_sync(FULL_MASK, m[g], o);
                float lo = __shfl_xor_sync(FULL_MASK, l[g], o);
                float mx = fmaxf(m[g], mo);
                float c1 = l[g] > 0.0f ? expf(m[g] - mx) : 0.0f;
                float c2 = lo > 0.0f ? expf(mo - mx) : 0.0f;
                l[g] = l[g] * c1 + lo * c2;
#pragma unroll
                for (int t = 0; t < 8; ++t) {
                    float ao = __shfl_xor_sync(FULL_MASK, acc[g][t], o);
                    acc[g][t] = acc[g][t] * c1 + ao * c2;
                }
                m[g] = mx;
            }
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            if (g >= group) break;
            if (lane == 0) {
                sm_m[slice][g] = m[g];
                sm_l[slice][g] = l[g];
            }
            if (kg == 0 && dims) {
#pragma unroll
                for (int t = 0; t < 8; ++t) sm_acc[slice][g][d0 + t] = acc[g][t];
            }
        }
    }
    __syncthreads();
}

// Row `row`'s attention for KV head kvh over its n_keys keys (the last `window` of them,
// where window > 0), into out_row; `part` and `arrive` are the split launches' partial
// states and arrival counts (see the top).
__device__ void attend(const float* __restrict__ q_row, const half_t* __restrict__ kc,
                       const half_t* __restrict__ vc, const int* __restrict__ table, int n_keys,
                       int kvh, int n_kv_heads, int head_dim, int block_size, int group,
                       float scale, int window, float softcap, half_t* __restrict__ out_row,
                       int row, float* __restrict__ part, int* __restrict__ arrive,
                       int part_rows, int part_chunks) {
    __shared__ float sm_m[MAX_WARPS][MAX_GROUP];
    __shared__ float sm_l[MAX_WARPS][MAX_GROUP];
    __shared__ float sm_acc[MAX_WARPS][MAX_GROUP][MAX_DPL * 32];
    // The running state of the chunks merged so far, per output element (each element
    // belongs to one thread).
    __shared__ float run_m[MAX_GROUP * MAX_DPL * 32];
    __shared__ float run_l[MAX_GROUP * MAX_DPL * 32];
    __shared__ float run_a[MAX_GROUP * MAX_DPL * 32];
    __shared__ int last;
    int width = group * head_dim;
    int chunks = (n_keys + CHUNK_KEYS - 1) / CHUNK_KEYS;
    int lo = window > 0 ? max(0, n_keys - window) : 0;
    int c0 = lo / CHUNK_KEYS;  // the first chunk with a key seen
    int parts = 1;
    if (gridDim.z > 1 && row < part_rows && chunks <= part_chunks)
        parts = min((int)gridDim.z, chunks - c0);
    int z = blockIdx.z;
    if (z >= parts) return;  // the whole block: no barrier is left waiting
    int lane = threadIdx.x & 31;
    int lpk = 1;
    while (lpk * 8 < head_dim) lpk <<= 1;
    int d0 = (lane % lpk) * 8;
    bool dims = d0 < head_dim;
    float qv[MAX_GROUP][8];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
        for (int t = 0; t < 8; ++t)
            qv[g][t] = (g < group && dims) ? q_row[(kvh * group + g) * head_dim + d0 + t] * scale
                                           : 0.0f;
    }
    for (int e = threadIdx.x; e < width; e += blockDim.x) {
        run_m[e] = -INFINITY;
        run_l[e] = 0.0f;
        run_a[e] = 0.0f;
    }
    // This (row, KV head)'s partial states: [chunk][element][m, l, a].
    float* mine =
        parts > 1 ? part + ((size_t)row * n_kv_heads + kvh) * part_chunks * width * 3 : nullptr;
    for (int c = c0 + z; c < chunks; c += parts) {
        int k0 = c * CHUNK_KEYS;
        attend_chunk(qv, kc, vc, table, k0, lo, min(n_keys, k0 + CHUNK_KEYS), kvh, n_kv_heads,
                     head_dim, block_size, group, softcap, sm_m, sm_l, sm_acc);
        // The chunk's slices merged in slice order: thread i takes elements i, i +
        // blockDim.x, ...
        for (int e = threadIdx.x; e < width; e += blockDim.x) {
            int g = e / head_dim, d = e % head_dim;
            float mx = -INFINITY;
            for (int w = 0; w < MAX_WARPS; ++w)
                if (sm_l[w][g] > 0.0f) mx = fmaxf(mx, sm_m[w][g]);
            float num = 0.0f, den = 0.0f;
            for (int w = 0; w < MAX_WARPS; ++w) {
                if (sm_l[w][g] == 0.0f) continue;
                float cw = expf(sm_m[w][g] - mx);
                num += sm_acc[w][g][d] * cw;
                den += sm_l[w][g] * cw;
            }
            if (parts == 1) {
                merge(run_m[e], run_l[e], run_a[e], mx, den, num);
            } else {
                float* at = mine + ((size_t)c * width + e) * 3;
                at[0] = mx;
                at[1] = den;
                at[2] = num;
            }
        }
        __syncthreads();  // the next chunk writes the slice states again
    }
    if (parts > 1) {
        // The last block to publish its partial states merges them all.
        if (!last_to_arrive(arrive + row * n_kv_heads + kvh, parts, &last)) return;
        for (int e = threadIdx.x; e < width; e += blockDim.x) {
            float M = -INFINITY, L = 0.0f, A = 0.0f;
            for (int c = c0; c < chunks; ++c) {
                const float* at = mine + ((size_t)c * width + e) * 3;
                merge(M, L, A, __ldcg(at), __ldcg(at + 1), __ldcg(at + 2));
            }
            run_l[e] = L;
            run_a[e] = A;
        }
    }
    for (int e = threadIdx.x; e < width; e += blockDim.x) {
        int g = e / head_dim, d = e % head_dim;
        out_row[(kvh * group + g) * head_dim + d] =
            f2h(run_l[e] > 0.0f ? run_a[e] / run_l[e] : 0.0f);
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
                                             int block_size, float scale, int window,
                                             float softcap, float* __restrict__ part,
                                             int* __restrict__ arrive, int part_rows,
                                             int part_chunks) {
    pdl_begin();
    int r = blockIdx.x, kvh = blockIdx.y;
    int group = n_heads / n_kv_heads;
    attend(q + (size_t)r * q_stride, kc, vc,
           block_tables + (size_t)seq_of_row[r] * max_blocks, (int)positions[r] + 1, kvh,
           n_kv_heads, head_dim, block_size, group, scale, window, softcap,
           out + (size_t)r * n_heads * head_dim, r, part, arrive, part_rows, part_chunks);
}

extern "C" __global__ void attention_decode(const float* __restrict__ q, int q_stride,
                                            const half_t* __restrict__ kc,
                                            const half_t* __restrict__ vc,
                                            const int* __restrict__ block_tables,
                                            const u32* __restrict__ positions,
                                            half_t* __restrict__ out, int max_blocks,
                                            int n_heads, int n_kv_heads, int head_dim,
                                            int block_size, float scale, int window,
                                            float softcap, float* __restrict__ part,
                                            int* __restrict__ arrive, int part_rows,
                                            int part_chunks) {
    pdl_begin();
    int r = blockIdx.x, kvh = blockIdx.y;
    int group = n_heads / n_kv_heads;
    attend(q + (size_t)r * q_stride, kc, vc, block_tables + (size_t)r * max_blocks,
           (int)positions[r] + 1, kvh, n_kv_heads, head_dim, block_size, group, scale, window,
           softcap, out + (size_t)r * n_heads * head_dim, r, part, arrive, part_rows,
           part_chunks);
}
