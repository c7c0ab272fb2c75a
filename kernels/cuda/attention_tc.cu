// Causal grouped-query attention on tensor cores (mma.sync m16n8k16, f16 inputs, f32
// accumulation), over the paged KV cache (f16, one layer [block][kv_head][slot][dim]):
// the same inputs, outputs and launch as `attention_prefill` (attention.cu), an
// alternative to it (`attention = "tensor"` in the CUDA backend).
//
// Why: the SIMT kernel runs one block per (row, KV head), so a prompt's keys are read
// again for every one of its rows. Here a block takes a *tile*: up to TC_ROWS / group
// consecutive rows of one sequence, all the group's query heads of each (tile row p,
// head g as matrix row m = p·group + g; 4 warps × 16 rows). Each 64-key block of the
// cache is staged once in shared memory for the whole tile, S = Q·Kᵀ and O += P·V run on
// tensor cores, and the softmax runs online in registers (FlashAttention-2's layout: a
// warp owns whole rows of S, so a row's max and sum need two shuffles).
//
// Tiles: row r leads a tile unless row r − 1 is the same sequence at the position before
// and r's position is not a multiple of the tile's positions; a leader's tile runs to the
// next leader. Other rows' blocks return at once. A decode step's rows (one per sequence)
// are tiles of one row.
//
// A row's bits do not depend on its tile: each element of S and of P·V is a dot product
// of that row's operands alone (a tile's other rows, and padding rows, are other rows of
// the same products), the key blocks are fixed (multiples of 64 from key 0) and walked in
// order, a row's max and sum are its own, and keys past a row's last are masked to
// p = 0 (a product of exact zero). So a prompt's row has the same bits as the same row
// in a decode step, whatever the batch around it. Chunks (CHUNK_KEYS keys) and the split
// over gridDim.z work as in attention.cu: each chunk's state is made from scratch and the
// chunks are merged in chunk order, by one block or by the last of several, with the
// same arithmetic; a tile's chunks are those of its last row (a chunk past a row's keys
// is an empty state, which merging leaves unchanged).
//
// A sliding window (window > 0) masks each row's keys below its own lo = position + 1 −
// window as it masks those past its last; the tile's key blocks and chunks start at its
// first row's lo (a block or chunk below a row's lo leaves its state as it is, so each
// row's bits are still its own). A soft cap (softcap > 0) makes each scaled score
// cap · tanh(score / cap), as attention.cu.
//
// Precision: queries are rounded to f16 (unscaled; S is scaled in f32) and the softmax
// weights p are rounded to f16 for P·V (their sum is kept in f32), as FlashAttention
// does. head_dim must be a multiple of 16 and at most MAX_DPL · 32.
#ifndef MAX_GROUP
#define MAX_GROUP 8
#endif
#ifndef MAX_DPL
#define MAX_DPL 4
#endif
#ifndef CHUNK_KEYS
#define CHUNK_KEYS 512
#endif

#define TC_KEYS 64                // keys per staged block (a divisor of CHUNK_KEYS)
#define TC_ROWS 64                // matrix rows per block: 4 warps × 16
// The largest head_dim: at most 128, whose staged keys and values fit the 48 KB of static
// shared memory (the loader refuses this kernel for wider heads; a build for them, whose
// MAX_DPL is larger, compiles it at 128 and it writes nothing for wider heads).
#define TC_DPL (MAX_DPL > 4 ? 4 : MAX_DPL)
#define TC_HD (TC_DPL * 32)
#define TC_KS (TC_HD + 8)         // shared key row stride (halves): no bank conflicts
#define TC_VS (TC_KEYS + 8)       // shared transposed value row stride (halves)

__device__ __forceinline__ u32 tc_pack(float lo, float hi) {
    return (u32)f2h(lo) | ((u32)f2h(hi) << 16);
}

// Whether packed row i leads a tile (see the top).
__device__ __forceinline__ bool tc_leads(const int* __restrict__ seq_of_row,
                                         const u32* __restrict__ positions, int i,
                                         int tile_pos) {
    return i == 0 || seq_of_row[i - 1] != seq_of_row[i] ||
           positions[i - 1] + 1 != positions[i] || positions[i] % tile_pos == 0;
}

extern "C" __global__ void attention_tc(const float* __restrict__ q, int q_stride,
                                        const half_t* __restrict__ kc,
                                        const half_t* __restrict__ vc,
                                        const int* __restrict__ block_tables,
                                        const int* __restrict__ seq_of_row,
                                        const u32* __restrict__ positions,
                                        half_t* __restrict__ out, int max_blocks, int n_heads,
                                        int n_kv_heads, int head_dim, int block_size,
                                        float scale, int window, float softcap,
                                        float* __restrict__ part, int* __restrict__ arrive,
                                        int part_rows, int part_chunks) {
    pdl_begin();
    // As uint4, for 16-byte alignment (the keys are stored 16 bytes at a time).
    __shared__ uint4 ks4[TC_KEYS * TC_KS / 8];
    __shared__ uint4 vt4[TC_HD * TC_VS / 8];
    half_t* ks = reinterpret_cast<half_t*>(ks4);
    half_t* vt = reinterpret_cast<half_t*>(vt4);
    __shared__ int last;
    int r = blockIdx.x, kvh = blockIdx.y, n_rows = gridDim.x;
    if (head_dim > TC_HD) return;  // refused by the loader (see TC_HD)
    int group = n_heads / n_kv_heads;
    int tile_pos = TC_ROWS / group;
    if (!tc_leads(seq_of_row, positions, r, tile_pos)) return;  // the whole block
    int np = 1;
    while (r + np < n_rows && !tc_leads(seq_of_row, positions, r + np, tile_pos)) ++np;
    int pos0 = (int)positions[r];
    int n_keys = pos0 + np;  // the tile's last row's keys
    int chunks = (n_keys + CHUNK_KEYS - 1) / CHUNK_KEYS;
    int lo0 = window > 0 ? max(0, pos0 + 1 - window) : 0;  // the tile's first row's lo
    int c0 = lo0 / CHUNK_KEYS;
    int parts = 1;
    if (gridDim.z > 1 && r + np - 1 < part_rows && chunks <= part_chunks)
        parts = min((int)gridDim.z, chunks - c0);
    int z = blockIdx.z;
    if (z >= parts) return;
    const int* table = block_tables + (size_t)seq_of_row[r] * max_blocks;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g8 = lane >> 2, t4 = lane & 3;
    int rows_m = np * group;                // the tile's matrix rows
    bool active = warp < 4 && warp * 16 < rows_m;  // warp-uniform
    int width = group * head_dim;
    int ksteps = head_dim >> 4, ntiles = head_dim >> 3;

    // This lane's two matrix rows (g8 and g8 + 8 of the warp's 16), their keys, and
    // their queries as A fragments (k = head dimension).
    int mr[2] = {warp * 16 + g8, warp * 16 + g8 + 8};
    int row_keys[2], row_lo[2];
    u32 qa[TC_HD / 16][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_keys[h] = mr[h] < rows_m ? pos0 + mr[h] / group + 1 : 0;
        row_lo[h] = window > 0 ? max(0, row_keys[h] - window) : 0;
    }
#pragma unroll
    for (int s = 0; s < TC_HD / 16; ++s) {
        float v[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float* qr = nullptr;
            if (active && s < ksteps && mr[h] < rows_m) {
                int p = mr[h] / group, g = mr[h] % group;
                qr = q + (size_t)(r + p) * q_stride + (kvh * group + g) * head_dim + s * 16;
            }
            v[h][0] = qr ? qr[2 * t4] : 0.0f;
            v[h][1] = qr ? qr[2 * t4 + 1] : 0.0f;
            v[h][2] = qr ? qr[2 * t4 + 8] : 0.0f;
            v[h][3] = qr ? qr[2 * t4 + 9] : 0.0f;
        }
        qa[s][0] = tc_pack(v[0][0], v[0][1]);
        qa[s][1] = tc_pack(v[1][0], v[1][1]);
        qa[s][2] = tc_pack(v[0][2], v[0][3]);
        qa[s][3] = tc_pack(v[1][2], v[1][3]);
    }

    // The running state of the chunks merged so far (this lane's two rows; its output
    // elements: dims 8·n + 2·t4 + {0, 1}, in o[n][0..1] for row 0, o[n][2..3] for row 1).
    float run_m[2] = {-INFINITY, -INFINITY}, run_l[2] = {0.0f, 0.0f};
    float run_a[TC_HD / 8][4];
#pragma unroll
    for (int n = 0; n < TC_HD / 8; ++n)
        for (int e = 0; e < 4; ++e) run_a[n][e] = 0.0f;
    // Tile row p's element (head g, dimension d): in the output, and in chunk c's partial
    // state (m, l, a) in `part` (its row's slot: [chunk][element][3]).
    auto out_at = [&](int p, int g, int d) {
        return out + (size_t)(r + p) * n_heads * head_dim + (kvh * group + g) * head_dim + d;
    };
    auto part_at = [&](int p, int c, int g, int d) {
        return part + ((((size_t)(r + p) * n_kv_heads + kvh) * part_chunks + c) * width +
                       g * head_dim + d) * 3;
    };

    for (int c = c0 + z; c < chunks; c += parts) {
        int k0 = c * CHUNK_KEYS, k1 = min(n_keys, k0 + CHUNK_KEYS);
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
        float o[TC_HD / 8][4];
#pragma unroll
        for (int n = 0; n < TC_HD / 8; ++n)
            for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
        for (int kb = max(k0, lo0 / TC_KEYS * TC_KEYS); kb < k1; kb += TC_KEYS) {
            // Stage keys [kb, kb + 64) (zeros past the tile's keys): K row-major, V
            // transposed, so that both B operands are pairs of consecutive halves.
            __syncthreads();  // the previous block's reads are done
            int per_key = head_dim >> 3;
            for (int i = threadIdx.x; i < TC_KEYS * per_key; i += blockDim.x) {
                int kk = i / per_key, d0 = (i - kk * per_key) * 8, j = kb + kk;
                uint4 kv4, vv4;
                if (j >= lo0 && j < k1) {
                    int blk = table[j / block_size];
                    size_t at =
                        (((size_t)blk * n_kv_heads + kvh) * block_size + j % block_size) *
                            head_dim + d0;
                    kv4 = *reinterpret_cast<const uint4*>(kc + at);
                    vv4 = *reinterpret_cast<const uint4*>(vc + at);
                } else {
                    kv4.x = kv4.y = kv4.z = kv4.w = 0u;
                    vv4 = kv4;
                }
                *reinterpret_cast<uint4*>(ks + kk * TC_KS + d0) = kv4;
                u32 w[4] = {vv4.x, vv4.y, vv4.z, vv4.w};
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    vt[(d0 + 2 * h) * TC_VS + kk] = (half_t)(w[h] & 0xffffu);
                    vt[(d0 + 2 * h + 1) * TC_VS + kk] = (half_t)(w[h] >> 16);
                }
            }
            __syncthreads();
            if (!active) continue;
            // S = Q·Kᵀ for the warp's 16 rows and the block's 64 keys (8 tiles of 8).
            float sc[TC_KEYS / 8][4];
#pragma unroll
            for (int n = 0; n < TC_KEYS / 8; ++n) {
                for (int e = 0; e < 4; ++e) sc[n][e] = 0.0f;
                const half_t* krow = ks + (n * 8 + g8) * TC_KS + 2 * t4;
#pragma unroll
                for (int s = 0; s < TC_HD / 16; ++s) {
                    if (s >= ksteps) break;
                    u32 b0 = *reinterpret_cast<const u32*>(krow + s * 16);
                    u32 b1 = *reinterpret_cast<const u32*>(krow + s * 16 + 8);
                    mma_16816(sc[n], qa[s], b0, b1);
                }
            }
            // Online softmax per row (h: this lane's row g8, then g8 + 8).
            float corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < TC_KEYS / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        int j = kb + n * 8 + 2 * t4 + e;
                        float x = j >= row_lo[h] && j < row_keys[h] ? sc[n][2 * h + e] * scale
                                                                    : -INFINITY;
                        if (softcap > 0.0f && x != -INFINITY) x = softcap * tanhf(x / softcap);
                        sc[n][2 * h + e] = x;
                        mx = fmaxf(mx, x);
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float mnew = fmaxf(m[h], mx);
                float sum = 0.0f;
                if (mnew == -INFINITY) {  // no key of this row yet: p = 0, state kept
                    corr[h] = 1.0f;
#pragma unroll
                    for (int n = 0; n < TC_KEYS / 8; ++n)
                        for (int e = 0; e < 2; ++e) sc[n][2 * h + e] = 0.0f;
                } else {
                    corr[h] = expf(m[h] - mnew);
#pragma unroll
                    for (int n = 0; n < TC_KEYS / 8; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            float x = sc[n][2 * h + e];
                            float p = x == -INFINITY ? 0.0f : expf(x - mnew);
                            sc[n][2 * h + e] = p;
                            sum += p;
                        }
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                l[h] = fmaf(l[h], corr[h], sum);
                m[h] = mnew;
            }
#pragma unroll
            for (int n = 0; n < TC_HD / 8; ++n) {
                o[n][0] *= corr[0];
                o[n][1] *= corr[0];
                o[n][2] *= corr[1];
                o[n][3] *= corr[1];
            }
            // O += P·V: P's C fragments are, two key tiles at a time, A fragments.
#pragma unroll
            for (int s = 0; s < TC_KEYS / 16; ++s) {
                u32 pa[4] = {tc_pack(sc[2 * s][0], sc[2 * s][1]),
                             tc_pack(sc[2 * s][2], sc[2 * s][3]),
                             tc_pack(sc[2 * s + 1][0], sc[2 * s + 1][1]),
                             tc_pack(sc[2 * s + 1][2], sc[2 * s + 1][3])};
#pragma unroll
                for (int n = 0; n < TC_HD / 8; ++n) {
                    if (n >= ntiles) break;
                    const half_t* vrow = vt + (n * 8 + g8) * TC_VS + s * 16 + 2 * t4;
                    u32 b0 = *reinterpret_cast<const u32*>(vrow);
                    u32 b1 = *reinterpret_cast<const u32*>(vrow + 8);
                    mma_16816(o[n], pa, b0, b1);
                }
            }
        }
        if (!active) continue;
        // The chunk's state: merged now, or left for the last block of the row's split.
#pragma unroll
        for (int n = 0; n < TC_HD / 8; ++n) {
            if (n >= ntiles) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int h = e >> 1;
                if (mr[h] >= rows_m) continue;
                if (parts == 1) {
                    float M = run_m[h], L = run_l[h];
                    merge(M, L, run_a[n][e], m[h], l[h], o[n][e]);  // M, L: below
                } else {
                    float* at = part_at(mr[h] / group, c, mr[h] % group, n * 8 + 2 * t4 + (e & 1));
                    at[0] = m[h];
                    at[1] = l[h];
                    at[2] = o[n][e];
                }
            }
        }
        if (parts == 1) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float a = 0.0f;
                merge(run_m[h], run_l[h], a, m[h], l[h], 0.0f);
            }
        }
    }
    if (parts > 1) {
        if (!last_to_arrive(arrive + r * n_kv_heads + kvh, parts, &last)) return;
        // Every element of the tile's rows, its chunks merged in chunk order.
        for (int e = threadIdx.x; e < rows_m * head_dim; e += blockDim.x) {
            int mrow = e / head_dim, d = e - mrow * head_dim;
            int p = mrow / group, g = mrow % group;
            float M = -INFINITY, L = 0.0f, A = 0.0f;
            for (int c = c0; c < chunks; ++c) {
                const float* at = part_at(p, c, g, d);
                merge(M, L, A, __ldcg(at), __ldcg(at + 1), __ldcg(at + 2));
            }
            *out_at(p, g, d) = f2h(L > 0.0f ? A / L : 0.0f);
        }
        return;
    }
    if (!active) return;
#pragma unroll
    for (int n = 0; n < TC_HD / 8; ++n) {
        if (n >= ntiles) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int h = e >> 1;
            if (mr[h] >= rows_m) continue;
            *out_at(mr[h] / group, mr[h] % group, n * 8 + 2 * t4 + (e & 1)) =
                f2h(run_l[h] > 0.0f ? run_a[n][e] / run_l[h] : 0.0f);
        }
    }
}
