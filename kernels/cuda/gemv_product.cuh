// The `gemv` kernels' product (after gemv.cuh and gemv_blocks.cuh, whose weights types it
// reads): the tiles over a launch's columns, the inputs staged (as rows, through the norm,
// or through SwiGLU), the column groups' tensor-core sums and their epilogue, and the four
// forms the entry points (gemv.cu) call.

// Tiles W over q and s (the whole rows' tiles and scales, kt long) for the product's
// columns k0 .. k0 + k.
template <typename W>
__device__ __forceinline__ W tiles_from(const u32* q, const u32* s, int k, int n, int k0, int kt) {
    W w;
    w.q = q + (size_t)(k0 / 32) * W::TILE_WORDS;
    w.s = s;
    w.k = k, w.n = n, w.kt = kt, w.kb0 = k0 / 32;
    return w;
}

// The scales of a tile as rows_block applies them: (d, m) of columns g and g + 8, m plus
// W::CENTER · d; with a scale per 16, the halves' of each.
template <typename W>
__device__ __forceinline__ void centered(float (&sc)[4]) {
    if constexpr (!W::HALVES) {
        if (W::CENTER != 0.0f) {
            sc[1] = fmaf(W::CENTER, sc[0], sc[1]);
            sc[3] = fmaf(W::CENTER, sc[2], sc[3]);
        }
    }
}

// The lane's tile's (block b's) scales, made once for both of its calls to rows_block:
// read from shared memory where they are staged, else made from the pairs the tile
// holds; none for f16 rows. With an offset per 16, the halves' scales in sc and their
// offsets (centered) in om: columns g's two, then g + 8's.
template <typename W>
__device__ __forceinline__ void tile_scales(const GemvShared& sh, const typename W::Tile& v,
                                            int b, int lane, float (&sc)[4], float (&om)[4]) {
    if constexpr (W::HALVES && W::OFFSETS) {
        float4 f = sh.sc[(b * 8 + (lane >> 2)) * 2], o = sh.sc[(b * 8 + (lane >> 2)) * 2 + 1];
        sc[0] = f.x, sc[1] = f.y, sc[2] = f.z, sc[3] = f.w;
        om[0] = o.x, om[1] = o.y, om[2] = o.z, om[3] = o.w;
    } else if constexpr (W::STAGED) {
        float4 f = sh.sc[b * 8 + (lane >> 2)];
        sc[0] = f.x, sc[1] = f.y, sc[2] = f.z, sc[3] = f.w;
    } else if constexpr (W::SCALED) {
        W::Scales::pairs(v.s, sc[0], sc[1], sc[2], sc[3]);
        centered<W>(sc);
    }
}

// With factored scales, column group G's (tile_scales' four floats a block and column
// pair, centered) staged in shared memory by the block's threads; nothing otherwise.
template <typename W>
__device__ __forceinline__ void stage_scales(const GemvShared& sh, const W& w, int G) {
    if constexpr (W::STAGED) {
        if (16 * G >= w.n) return;
        // A thread a column pair g and super-block of the blocks the product takes (kb0 ..
        // kb1 of the rows': a run of columns may start or end inside a super-block).
        unsigned kb0 = w.kb0, kb1 = kb0 + w.k / 32, first = kb0 / 8;
        unsigned items = ((kb1 + 7) / 8 - first) * 8;
        for (unsigned e = threadIdx.x; e < items; e += blockDim.x) {
            unsigned g = e % 8;
            if constexpr (W::HALVES && W::OFFSETS) {
                // The halves' offsets plus CENTER times their scales.
                W::Scales::super_block(w.s, w.kt / 32, G, (first + e / 8) * 8, g, kb0, kb1,
                                       [&](unsigned b, float4 d, float4 m) {
                                           m.x = fmaf(W::CENTER, d.x, m.x);
                                           m.y = fmaf(W::CENTER, d.y, m.y);
                                           m.z = fmaf(W::CENTER, d.z, m.z);
                                           m.w = fmaf(W::CENTER, d.w, m.w);
                                           sh.sc[(b * 8 + g) * 2] = d;
                                           sh.sc[(b * 8 + g) * 2 + 1] = m;
                                       });
            } else {
                W::Scales::super_block(w.s, w.kt / 32, G, (first + e / 8) * 8, g, kb0, kb1,
                                       [&](unsigned b, float d0, float m0, float d1, float m1) {
                                           float sc[4] = {d0, m0, d1, m1};
                                           centered<W>(sc);
                                           sh.sc[b * 8 + g] = float4{sc[0], sc[1], sc[2], sc[3]};
                                       });
            }
        }
    }
}

// Block b's products for the 8 input rows r0 .. r0 + 7 (two mma, the A fragments a0, a1 of
// the lane's tile) added to the lane's four sums (columns g, g + 8 by rows r0 + 2t,
// r0 + 2t + 1): with the blocks' scales sc (tile_scales), d times the block's sums plus m
// times the inputs' block sums (without offsets, IQ4's, d times the sums; with a scale per
// 16, each half's sums times its scale, and with an offset per 16 too, om's times the
// inputs' sums over each half).
template <typename W>
__device__ __forceinline__ void rows_block(const GemvShared& sh, const W&, const float (&sc)[4],
                                           const float (&om)[4], const u32 (&a0)[4],
                                           const u32 (&a1)[4], int stride, int nb, int b,
                                           int lane, int r0, float (&acc)[4]) {
    uint4 xb = input_piece<W::HALVES>(sh, stride, b, lane, r0);
    if constexpr (W::HALVES) {
        float lo[4] = {0.0f, 0.0f, 0.0f, 0.0f}, hi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_16816(lo, a0, xb.x, xb.y);
        mma_16816(hi, a1, xb.z, xb.w);
        if constexpr (W::OFFSETS) {
            // Input rows r, r + 1's sums over the block's halves (past the m rows, row
            // m − 1's: see input_piece).
            int r = r0 + 2 * (lane & 3);
            float2 s0 = reinterpret_cast<const float2*>(sh.xsum)[min(r, sh.m - 1) * nb + b];
            float2 s1 = reinterpret_cast<const float2*>(sh.xsum)[min(r + 1, sh.m - 1) * nb + b];
            acc[0] = fmaf(om[1], s0.y, fmaf(om[0], s0.x, acc[0]));
            acc[1] = fmaf(om[1], s1.y, fmaf(om[0], s1.x, acc[1]));
            acc[2] = fmaf(om[3], s0.y, fmaf(om[2], s0.x, acc[2]));
            acc[3] = fmaf(om[3], s1.y, fmaf(om[2], s1.x, acc[3]));
        }
        scale_halves(lo, hi, sc, acc);
    } else if constexpr (!W::SCALED) {
        mma_16816(acc, a0, xb.x, xb.y);
        mma_16816(acc, a1, xb.z, xb.w);
    } else {
        float blk[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_16816(blk, a0, xb.x, xb.y);
        mma_16816(blk, a1, xb.z, xb.w);
        if constexpr (W::OFFSETS) {
            // Input rows r, r + 1's sums (past the m rows, row m − 1's: see input_piece).
            int r = r0 + 2 * (lane & 3);
            float xs0 = sh.xsum[min(r, sh.m - 1) * nb + b];
            float xs1 = sh.xsum[min(r + 1, sh.m - 1) * nb + b];
            scale_block(blk, sc, xs0, xs1, acc);
        } else {
            acc[0] = fmaf(sc[0], blk[0], acc[0]);
            acc[1] = fmaf(sc[0], blk[1], acc[1]);
            acc[2] = fmaf(sc[2], blk[2], acc[2]);
            acc[3] = fmaf(sc[2], blk[3], acc[3]);
        }
    }
}

// A warp's batch of tiles: blocks b0, b0 + 8, ... (those below k / 32) of column group G,
// loaded together so that the warp has its loads in flight at once (one batch covers a
// row of 1,536 at 4 bits, 1,024 at 8 and f16: within the registers of 3 blocks an SM).
template <typename W>
struct TileBatch {
    typename W::Tile v[W::BATCH];
    __device__ __forceinline__ void load(const W& w, int G, int b0, int lane) {
        if (16 * G >= w.n) return;
#pragma unroll
        for (int i = 0; i < W::BATCH; ++i) {
            int b = b0 + GEMV_WARPS * i;
            if (b < w.k / 32) v[i] = w.load(G, b, lane);
        }
    }
};

// The warp's first batch of the block's first column group: loaded before the inputs are
// staged, so that the weights' latency and the staging's overlap.
template <typename W>
__device__ __forceinline__ TileBatch<W> first_batch(const W& w) {
    TileBatch<W> v;
    v.load(w, blockIdx.x, threadIdx.x >> 5, threadIdx.x & 31);
    return v;
}

// After the input rows are staged (sh.x): the block's first column group's factored
// scales (stage_scales), and the rows' sums over each block of 32 (with an offset per 16,
// each 16), where the weights have offsets. A thread adds a piece of 8 (16 bytes: a warp
// reads 512 contiguous bytes, no bank conflicts), four lanes a block (two a 16); every
// lane of a warp takes part in each round's shuffles (the rounds' bound is the block's).
template <typename W>
__device__ __forceinline__ void stage_sums(const GemvShared& sh, const W& w, int k) {
    stage_scales(sh, w, blockIdx.x);
    __syncthreads();
    if (W::OFFSETS) {
        int pieces = k / 8, stride = gemv_stride(k), all = sh.m * pieces;
        for (int base = 0; base < all; base += blockDim.x) {
            int e = base + threadIdx.x, r = e / pieces, c = e % pieces;
            float sum = 0.0f;
            if (e < all) {
                uint4 v = *reinterpret_cast<const uint4*>(sh.x + r * stride + c * 8);
                u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int h = 0; h < 4; ++h)
                    sum += h2f((half_t)(w[h] & 0xffffu)) + h2f((half_t)(w[h] >> 16));
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            if constexpr (W::HALVES) {
                // Offsets per 16 (ScalesHalfPairs): a sum a half, two lanes each.
                if (e < all && c % 2 == 0) sh.xsum[r * (k / 16) + c / 2] = sum;
            } else {
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                if (e < all && c % 4 == 0) sh.xsum[r * (k / 32) + c / 4] = sum;
            }
        }
        __syncthreads();
    }
}

// The product of the staged rows and the weights W, for each column group of the block
// (grid-stride): for each row r < m (sh.m, the staged rows), one thread calls out(r, j, sums) with the sums of
// columns j .. j + COLS − 1 (COLS 1 or 2, j a multiple of COLS, j < n). `v` holds the
// warp's first batch of the first group (first_batch); each group's first batch of the
// next is loaded before the group's sums are added up and written.
template <int COLS, typename W, typename Out>
__device__ __forceinline__ void gemv_columns(const GemvShared& sh, const W& w, TileBatch<W> v,
                                             int k, int n, Out out) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, m = sh.m;
    int nb = k / 32, stride = gemv_stride(k), groups = (n + 15) / 16;
    for (int G = blockIdx.x; G < groups; G += gridDim.x) {
        w.prefetch(G + gridDim.x);
        // Rows 0 .. 7, and 8 .. 15 where m > 8 (the same A fragments, a second B).
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        for (int b0 = warp; b0 < nb; b0 += GEMV_WARPS * W::BATCH) {
            if (b0 != warp) v.load(w, G, b0, lane);
#pragma unroll
            for (int i = 0; i < W::BATCH; ++i) {
                int b = b0 + GEMV_WARPS * i;
                if (b >= nb) break;
                u32 a0[4], a1[4];
                w.frags(v.v[i], a0, a1);
                float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, om[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                tile_scales<W>(sh, v.v[i], b, lane, sc, om);
                rows_block(sh, w, sc, om, a0, a1, stride, nb, b, lane, 0, acc[0]);
                if (m > 8) rows_block(sh, w, sc, om, a0, a1, stride, nb, b, lane, 8, acc[1]);
            }
        }
        v.load(w, G + gridDim.x, warp, lane);
#pragma unroll
        for (int c = 0; c < 8; ++c) sh.part[warp][c][lane] = acc[c / 4][c % 4];
        __syncthreads();
        // Every warp is past this group's scales: the next group's, while the sums are added.
        stage_scales(sh, w, G + gridDim.x);
        // Output (column q, row r) is sum c = 4(r / 8) + 2(q / 8) + r % 2 of lane
        // 4(q % 8) + (r % 8) / 2.
        for (int e = threadIdx.x; e < 16 / COLS * GEMV_MAX_ROWS; e += blockDim.x) {
            int q = e / GEMV_MAX_ROWS * COLS, r = e % GEMV_MAX_ROWS, j = 16 * G + q;
            if (r >= m || j >= n) continue;
            float sums[COLS];
#pragma unroll
            for (int h = 0; h < COLS; ++h) {
                int c = 4 * (r / 8) + 2 * ((q + h) / 8) + r % 2, l = 4 * ((q + h) % 8) + r % 8 / 2;
                float sum = 0.0f;
                for (int p = 0; p < GEMV_WARPS; ++p) sum += sh.part[p][c][l];
                sums[h] = sum;
            }
            out(r, j, sums);
        }
        __syncthreads();
    }
}

// Where a product's n columns go: column j of row r to y[r · ldy + j0 + j] — a matrix of
// its own (ldy = n, j0 = 0), or a part of a stack whose parts the kernels read apart
// (`gemv::QuantRows::stack`: e.g. the V rows of a QKV stack in another layout than Q and
// K's), its columns j0 .. j0 + n of the stack's ldy.
struct GemvOut {
    float* __restrict__ y;
    int ldy, j0;
    bool add;  // adds the sums to y's (a later run of the rows' columns) instead
    __device__ __forceinline__ float* at(int r, int j) const {
        return y + (size_t)r * ldy + j0 + j;
    }
};

// The plain product's output: y[r, j] = the sum.
template <typename W>
__device__ __forceinline__ void gemv_store(const GemvShared& sh, const W& w, const TileBatch<W>& v,
                                           GemvOut y, int k, int n) {
    gemv_columns<1>(sh, w, v, k, n, [=](int r, int j, const float* sums) {
        float* p = y.at(r, j);
        *p = y.add ? *p + sums[0] : sums[0];
    });
}

// The f16 rows of x (m × k), staged.
__device__ __forceinline__ void stage_rows(const GemvShared& sh, const half_t* __restrict__ x, int m,
                                           int k) {
    int stride = gemv_stride(k), pieces = k / 8;
    for (int e = threadIdx.x; e < m * pieces; e += blockDim.x) {
        int r = e / pieces, c = e % pieces;
        *reinterpret_cast<uint4*>(sh.x + r * stride + c * 8) =
            reinterpret_cast<const uint4*>(x + (size_t)r * sh.kt + sh.k0)[c];
    }
}

// add_rmsnorm's rows staged (warp i of the block makes rows i and i + 8; see gemv_f16_norm).
__device__ __forceinline__ void stage_norm(const GemvShared& sh, const float* __restrict__ x,
                                           const float* __restrict__ delta,
                                           const float* __restrict__ nw, float* __restrict__ x_out,
                                           const int* __restrict__ rows, float eps, int m, int k) {
    int lane = threadIdx.x & 31;
    for (int i = threadIdx.x >> 5; i < m; i += blockDim.x >> 5) {
        int r = rows ? rows[i] : i;
        half_t* xr = sh.x + i * gemv_stride(k);
        if (r < 0) {
            for (int d = lane; d < k; d += 32) xr[d] = 0;
        } else {
            // The norm is the whole row's; the product's columns k0 .. k0 + k are staged.
            int kt = sh.kt, k0 = sh.k0;
            size_t at = (size_t)r * kt;
            const float* src = x + at;
            const float* dr = delta ? delta + at : nullptr;
            float inv = add_rms_row(src, dr, nullptr, kt, eps);
            if (x_out && blockIdx.x == 0) {
                for (int d = lane; d < kt; d += 32) x_out[at + d] = dr ? src[d] + dr[d] : src[d];
            }
            for (int d = lane; d < k; d += 32) {
                float v = src[k0 + d];
                if (dr) v += dr[k0 + d];
                xr[d] = f2h(v * inv * nw[k0 + d]);
            }
        }
    }
}

// The products' bodies, which gemv.cu's entry points call for each weights type W: the
// input rows staged by the kernel that would otherwise run before the product, then the
// product.

// The plain product of f16 rows x.
template <typename W>
__device__ __forceinline__ void rows_product(const GemvShared& sh, const half_t* __restrict__ x,
                                             const W& w, GemvOut y, int m, int k,
                                             int n) {
    const TileBatch<W> v = first_batch(w);
    stage_rows(sh, x, m, k);
    stage_sums(sh, w, k);
    gemv_store(sh, w, v, y, k, n);
}

// add_rmsnorm fused with the product: input row i is row rows[i] of x (row i when rows
// is null) plus the same row of delta (when not null), normalized and scaled by nw, then
// rounded to f16 as add_rmsnorm writes it; rows[i] < 0 is a row of zeros. Block 0 writes
// the sums x + delta to x_out (when not null), which must not be x: the other blocks
// still read x. Warp i of each block prepares input rows i and i + 8.
template <typename W>
__device__ __forceinline__ void norm_product(const GemvShared& sh, const float* __restrict__ x,
                                             const float* __restrict__ delta,
                                             const float* __restrict__ nw,
                                             float* __restrict__ x_out,
                                             const int* __restrict__ rows, float eps, const W& w,
                                             GemvOut y, int m, int k, int n) {
    const TileBatch<W> v = first_batch(w);
    stage_norm(sh, x, delta, nw, x_out, rows, eps, m, k);
    stage_sums(sh, w, k);
    gemv_store(sh, w, v, y, k, n);
}

// The norm's product for the QKV rows, with rope_kv_write in its epilogue: y is the QKV
// rows ((n_heads + 2 · n_kv_heads) · head_dim columns: q heads, k heads, v heads; the
// product's n columns are those from y.j0, an even column: all of them, or a part of the
// stack), each q and k pair of output row i rotated at positions[i], and the rotated keys and the
// values written to the paged f16 cache at slot_mapping[i], as rope_kv_write does (the
// helpers in common.cuh). A thread of the epilogue takes a rotation pair, two adjacent
// columns. In runs of the rows' columns, the runs before the last are gemv_*_norm
// launches; this one, the last, adds their sums before it rotates.
template <typename W>
__device__ __forceinline__ void norm_rope_product(
    const GemvShared& sh, const float* __restrict__ x, const float* __restrict__ delta,
    const float* __restrict__ nw, float* __restrict__ x_out, const int* __restrict__ rows,
    float eps, const W& w, GemvOut y, int m, int k, int n,
    const u32* __restrict__ positions, const int* __restrict__ slot_mapping,
    half_t* __restrict__ kc, half_t* __restrict__ vc, int n_heads, int n_kv_heads, int head_dim,
    int block_size, float base) {
    const TileBatch<W> v = first_batch(w);
    stage_norm(sh, x, delta, nw, x_out, rows, eps, m, k);
    stage_sums(sh, w, k);
    int qd = n_heads * head_dim, kvd = n_kv_heads * head_dim;
    gemv_columns<2>(sh, w, v, k, n, [=](int r, int jp, const float* sums) {
        float* out = y.at(r, jp);
        // The last run of columns adds the earlier runs' sums (gemv_*_norm wrote them).
        float pair[2] = {sums[0], sums[1]};
        if (y.add) {
            pair[0] = out[0] + pair[0];
            pair[1] = out[1] + pair[1];
        }
        int j = y.j0 + jp, in_head = j % head_dim;  // the column of the QKV rows
        if (j < qd + kvd) {
            float s, c;
            rope_sincos(positions[r], in_head / 2, head_dim, base, &s, &c);
            rotate(pair, c, s);
        }
        out[0] = pair[0];
        out[1] = pair[1];
        if (j < qd) return;
        int slot_all = slot_mapping[r];
        if (slot_all < 0) return;  // a padded row's: written nowhere
        // A key or a value pair: entry in_head of (block, kv head, slot).
        bool key = j < qd + kvd;
        int kvh = (j - qd - (key ? 0 : kvd)) / head_dim;
        int blk = slot_all / block_size, slot = slot_all - blk * block_size;
        size_t e = (((size_t)blk * n_kv_heads + kvh) * block_size + slot) * head_dim + in_head;
        *(u32*)((key ? kc : vc) + e) = (u32)f2h(pair[0]) | ((u32)f2h(pair[1]) << 16);
    });
}

// swiglu's output over m rows of gu (rows of 2·kt: gate, then up), staged: input row r is
// silu(gu[r, j]) · gu[r, kt + j] over the product's columns j = k0 .. k0 + k, rounded to
// f16 as swiglu writes it.
__device__ __forceinline__ void stage_swiglu(const GemvShared& sh, const float* __restrict__ gu,
                                             int m, int k) {
    int stride = gemv_stride(k);
    // Columns k0 .. k0 + k of the rows' kt: gate at k0 + j, up at kt + k0 + j.
    int kt = sh.kt;
    const float* gate = gu + sh.k0;
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) {
        const float* row = gate + (size_t)(e / k) * 2 * kt;
        int j = e % k;
        sh.x[(e / k) * stride + j] = f2h(silu_mul(row[j], row[kt + j]));
    }
}

// swiglu fused with the product: input row r is silu(gu[r, j]) · gu[r, k + j] over
// j < k, rounded to f16 as swiglu writes it (gu holds rows of 2k: gate, then up).
template <typename W>
__device__ __forceinline__ void swiglu_product(const GemvShared& sh, const float* __restrict__ gu,
                                               const W& w, GemvOut y, int m, int k,
                                               int n) {
    const TileBatch<W> v = first_batch(w);
    stage_swiglu(sh, gu, m, k);
    stage_sums(sh, w, k);
    gemv_store(sh, w, v, y, k, n);
}
