// Products for a few rows: y[r, j] = x[r, :] · w[j, :] for r < m, f16 inputs, f32
// accumulation and output — the step's product (`y = x · wᵀ`, as cuBLAS computes it) for
// decode steps of few sequences, where reading the weights once is all the work. A
// candidate against cuBLAS: at load the backend times whole decode steps each way (cuBLAS,
// f16 rows, the file's blocks) and keeps the fastest per row count (`gpu_bench` also
// times each product each way).
//
// One warp per output column (grid-stride over columns), each lane reading a piece of 8
// weights at a time (16 bytes of f16, or 4 or 8 bytes of the file's blocks and their
// block's scale); x is staged once per block in shared memory as f32. Needs
// m <= GEMV_MAX_ROWS, k <= GEMV_MAX_K, m · k <= GEMV_MAX_ELEMS (48 KB of staged rows), k a
// multiple of 8 (32 for the blocks) and w 16-byte aligned.
//
// Three entry points fuse the kernels around the product into it, so that a decode step
// of few rows launches 5 kernels per layer instead of 9: `gemv_f16_norm` (add_rmsnorm,
// then the product), `gemv_f16_norm_rope` (the same, then rope_kv_write: the QKV
// product) and `gemv_f16_swiglu` (swiglu, then the product). Each block computes the
// input rows itself (a few thousand floats, from L2), and the epilogue its pairs, with the
// unfused kernels' arithmetic (the helpers in common.cuh), so the results have the same
// bits as the kernels launched one after the other.
//
// Each of the four reads its weights as f16 rows (`gemv_f16*`) or as the file's own 4- or
// 8-bit blocks (`gemv_q4*`, `gemv_q8*`: WeightsQ4, WeightsQ8 below), one template.
//
// The entry points cap their registers (`__launch_bounds__`: 3 blocks of 256 threads an
// SM, 2 for the QKV product's pair of columns), which ptxas otherwise spends on hoisting
// every staged input of a column's pieces, at one block an SM.
#define GEMV_MAX_ROWS 8
#define GEMV_MAX_K 2048
#define GEMV_MAX_ELEMS 12288

// 16 bytes of shared memory at p, loaded as written: the compiler may not merge or
// reorder these loads (it would take the two halves below in one order for every lane),
// nor move them above the barrier after the staging (the memory clobber).
__device__ __forceinline__ float4 lds4(const float4* p) {
#ifdef TOLLGATE_EMU
    return *p;
#else
    float4 v;
    asm volatile(
        "{ .reg .u64 s; cvta.to.shared.u64 s, %4; ld.shared.v4.f32 {%0, %1, %2, %3}, [s]; }"
        : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
        : "l"(p)
        : "memory");
    return v;
#endif
}

// The 8 staged inputs at p (32-byte aligned) for a lane whose piece is p, as two 16-byte
// loads from shared memory. The pieces of lanes l and l + 4 lie 128 bytes apart, in the
// same banks: lanes 4–7 of each quarter warp load the second half first, so that a
// quarter warp's loads fall in 32 distinct banks (8 wavefronts a row for a warp's 32
// pieces, where 8 scalar loads each took 8).
__device__ __forceinline__ void stage_piece(const float* p, int lane, float (&x)[8]) {
    const float4* p4 = reinterpret_cast<const float4*>(p);
    int s = (lane >> 2) & 1;
    float4 first = lds4(p4 + s), second = lds4(p4 + (s ^ 1));
    float4 lo = s ? second : first, hi = s ? first : second;
    x[0] = lo.x, x[1] = lo.y, x[2] = lo.z, x[3] = lo.w;
    x[4] = hi.x, x[5] = hi.y, x[6] = hi.z, x[7] = hi.w;
}

// A matrix's weights as the product reads them, a lane's 16-byte or smaller piece (8
// weights of a row) at a time: `load(j, c)` reads piece c of row j, `expand` makes its 8
// weights. f16 rows (the default, dequantized at load) here; the file's own 4- and 8-bit
// blocks below (WeightsQ4, WeightsQ8).
struct WeightsF16 {
    const half_t* __restrict__ w;
    int k;
    typedef uint4 Piece;
    __device__ __forceinline__ Piece load(int j, int c) const {
        return reinterpret_cast<const uint4*>(w + (size_t)j * k)[c];
    }
    __device__ __forceinline__ void expand(const Piece& v, float (&wv)[8]) const {
        u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            wv[2 * h] = h2f((half_t)(words[h] & 0xffffu));
            wv[2 * h + 1] = h2f((half_t)(words[h] >> 16));
        }
    }
};

// The product of the staged rows xs[m × k] (every thread of the block) and the weights W
// (rows of k), COLS adjacent columns per warp at a time (grid-stride over groups of COLS;
// n a multiple of COLS): for each row r < m, lane 0 calls out(r, j, sums) with the sums
// of columns j .. j + COLS − 1. Each column's sum runs in the same order whatever COLS.
template <int COLS, typename W, typename Out>
__device__ __forceinline__ void gemv_columns(const float* xs, const W& w, int m, int k, int n,
                                             Out out) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int chunks = k / 8;  // pieces of 8 weights in a row; lane l takes l, l + 32, ...
    for (int g = blockIdx.x * warps + warp; g * COLS < n; g += gridDim.x * warps) {
        int j = g * COLS;
        // Every piece of the lane's columns is loaded before the first is used, so that
        // a warp has all of its loads in flight at once rather than one round at a time.
        typename W::Piece v[COLS][GEMV_MAX_K / 256];
#pragma unroll
        for (int q = 0; q < COLS; ++q) {
#pragma unroll
            for (int i = 0; i < GEMV_MAX_K / 256; ++i)
                if (lane + 32 * i < chunks) v[q][i] = w.load(j + q, lane + 32 * i);
        }
        float acc[COLS][GEMV_MAX_ROWS];
#pragma unroll
        for (int q = 0; q < COLS; ++q)
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[q][r] = 0.0f;
#pragma unroll
        for (int i = 0; i < GEMV_MAX_K / 256; ++i) {
            int c = lane + 32 * i;
            if (c >= chunks) break;
#pragma unroll
            for (int q = 0; q < COLS; ++q) {
                float wv[8];
                w.expand(v[q][i], wv);
#pragma unroll
                for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                    if (r >= m) break;
                    float xr[8];
                    stage_piece(xs + r * k + c * 8, lane, xr);
#pragma unroll
                    for (int h = 0; h < 8; ++h) acc[q][r] += wv[h] * xr[h];
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r >= m) break;
            float sums[COLS];
#pragma unroll
            for (int q = 0; q < COLS; ++q) sums[q] = warp_sum(acc[q][r]);
            if (lane == 0) out(r, j, sums);
        }
    }
}

// The plain product's output: y[r, j] = the sum.
template <typename W>
__device__ __forceinline__ void gemv_store(const float* xs, const W& w, float* __restrict__ y,
                                           int m, int k, int n) {
    gemv_columns<1>(xs, w, m, k, n,
                    [=](int r, int j, const float* sums) { y[(size_t)r * n + j] = sums[0]; });
}

// The f16 rows of x (m × k) staged as f32 for the block's product.
__device__ __forceinline__ void stage_rows(float* xs, const half_t* __restrict__ x, int m, int k) {
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) xs[e] = h2f(x[e]);
    __syncthreads();
}

// add_rmsnorm's rows staged into xs (warp i of the block makes row i; see gemv_f16_norm).
__device__ __forceinline__ void stage_norm(float* xs, const float* __restrict__ x,
                                           const float* __restrict__ delta,
                                           const float* __restrict__ nw, float* __restrict__ x_out,
                                           const int* __restrict__ rows, float eps, int m, int k) {
    int lane = threadIdx.x & 31, i = threadIdx.x >> 5;
    if (i < m) {
        int r = rows ? rows[i] : i;
        float* xr = xs + i * k;
        if (r < 0) {
            for (int d = lane; d < k; d += 32) xr[d] = 0.0f;
        } else {
            size_t at = (size_t)r * k;
            float inv = add_rms_row(x + at, delta ? delta + at : nullptr, xr, k, eps);
            if (x_out && blockIdx.x == 0)
                for (int d = lane; d < k; d += 32) x_out[at + d] = xr[d];
            for (int d = lane; d < k; d += 32) xr[d] = h2f(f2h(xr[d] * inv * nw[d]));
        }
    }
    __syncthreads();
}

// The file's own quantized blocks, for the same products (`gemv_q4*`, `gemv_q8*`): a
// decode step of few rows is the reading of its weights, and these are 5 or 9 bits a
// weight where f16 is 16 (the load-time timing chooses between them). Laid out at load
// (`gemv::QuantRows`): q holds each row's pieces of 8 weights, s each block of 32 its
// scale d and offset m as an f16 pair (low half d), and a weight is d · q + m — the value
// the file's block dequantizes to, in f32 (d · q is exact there).
//
// 4-bit (Q4_0 with m = −8d, Q4_1): a piece is one word, weight h of it in bits 4h .. 4h + 3.
struct WeightsQ4 {
    const u32* __restrict__ q;
    const u32* __restrict__ s;
    int k;
    struct Piece {
        u32 nibbles, scale;
    };
    __device__ __forceinline__ Piece load(int j, int c) const {
        return Piece{q[(size_t)j * (k / 8) + c], s[(size_t)j * (k / 32) + c / 4]};
    }
    __device__ __forceinline__ void expand(const Piece& v, float (&wv)[8]) const {
        float d = h2f((half_t)(v.scale & 0xffffu)), m = h2f((half_t)(v.scale >> 16));
#pragma unroll
        for (int h = 0; h < 8; ++h) wv[h] = fmaf(d, (float)((v.nibbles >> (4 * h)) & 15u), m);
    }
};

// 8-bit (Q8_0, m = 0): a piece is two words, weight h of it the signed byte h.
struct WeightsQ8 {
    const u32* __restrict__ q;
    const u32* __restrict__ s;
    int k;
    struct Piece {
        uint2 bytes;
        u32 scale;
    };
    __device__ __forceinline__ Piece load(int j, int c) const {
        const uint2* rows = reinterpret_cast<const uint2*>(q);
        return Piece{rows[(size_t)j * (k / 8) + c], s[(size_t)j * (k / 32) + c / 4]};
    }
    __device__ __forceinline__ void expand(const Piece& v, float (&wv)[8]) const {
        float d = h2f((half_t)(v.scale & 0xffffu)), m = h2f((half_t)(v.scale >> 16));
#pragma unroll
        for (int h = 0; h < 8; ++h) {
            u32 word = h < 4 ? v.bytes.x : v.bytes.y;
            wv[h] = fmaf(d, (float)(signed char)((word >> (8 * (h & 3))) & 0xffu), m);
        }
    }
};

// The products' bodies, for each weights type W (the entry points below): the input rows
// staged in xs (shared memory, GEMV_MAX_ELEMS floats) by the kernel that would otherwise
// run before the product, then the product.

// The plain product of f16 rows x.
template <typename W>
__device__ __forceinline__ void rows_product(float* xs, const half_t* __restrict__ x, const W& w,
                                             float* __restrict__ y, int m, int k, int n) {
    stage_rows(xs, x, m, k);
    gemv_store(xs, w, y, m, k, n);
}

// add_rmsnorm fused with the product: input row i is row rows[i] of x (row i when rows
// is null) plus the same row of delta (when not null), normalized and scaled by nw, then
// rounded to f16 as add_rmsnorm writes it; rows[i] < 0 is a row of zeros. Block 0 writes
// the sums x + delta to x_out (when not null), which must not be x: the other blocks
// still read x. Warp i of each block prepares input row i (blockDim.x / 32 >= m).
template <typename W>
__device__ __forceinline__ void norm_product(float* xs, const float* __restrict__ x,
                                             const float* __restrict__ delta,
                                             const float* __restrict__ nw,
                                             float* __restrict__ x_out,
                                             const int* __restrict__ rows, float eps, const W& w,
                                             float* __restrict__ y, int m, int k, int n) {
    stage_norm(xs, x, delta, nw, x_out, rows, eps, m, k);
    gemv_store(xs, w, y, m, k, n);
}

// The norm's product for the QKV rows, with rope_kv_write in its epilogue: y is the QKV
// rows (n = (n_heads + 2 · n_kv_heads) · head_dim columns: q heads, k heads, v heads),
// each q and k pair of output row i rotated at positions[i], and the rotated keys and the
// values written to the paged f16 cache at slot_mapping[i], as rope_kv_write does (the
// helpers in common.cuh). A warp takes a rotation pair, two adjacent columns, at a time.
template <typename W>
__device__ __forceinline__ void norm_rope_product(
    float* xs, const float* __restrict__ x, const float* __restrict__ delta,
    const float* __restrict__ nw, float* __restrict__ x_out, const int* __restrict__ rows,
    float eps, const W& w, float* __restrict__ y, int m, int k, int n,
    const u32* __restrict__ positions, const int* __restrict__ slot_mapping,
    half_t* __restrict__ kc, half_t* __restrict__ vc, int n_heads, int n_kv_heads, int head_dim,
    int block_size, float base) {
    stage_norm(xs, x, delta, nw, x_out, rows, eps, m, k);
    int qd = n_heads * head_dim, kvd = n_kv_heads * head_dim;
    gemv_columns<2>(xs, w, m, k, n, [=](int r, int j, const float* sums) {
        float pair[2] = {sums[0], sums[1]};
        int in_head = j % head_dim;
        if (j < qd + kvd) {
            float s, c;
            rope_sincos(positions[r], in_head / 2, head_dim, base, &s, &c);
            rotate(pair, c, s);
        }
        y[(size_t)r * n + j] = pair[0];
        y[(size_t)r * n + j + 1] = pair[1];
        if (j < qd) return;
        // A key or a value pair: entry in_head of (block, kv head, slot).
        bool key = j < qd + kvd;
        int kvh = (j - qd - (key ? 0 : kvd)) / head_dim;
        int slot_all = slot_mapping[r];
        int blk = slot_all / block_size, slot = slot_all - blk * block_size;
        size_t e = (((size_t)blk * n_kv_heads + kvh) * block_size + slot) * head_dim + in_head;
        *(u32*)((key ? kc : vc) + e) = (u32)f2h(pair[0]) | ((u32)f2h(pair[1]) << 16);
    });
}

// swiglu fused with the product: input row r is silu(gu[r, j]) · gu[r, k + j] over
// j < k, rounded to f16 as swiglu writes it (gu holds rows of 2k: gate, then up).
template <typename W>
__device__ __forceinline__ void swiglu_product(float* xs, const float* __restrict__ gu,
                                               const W& w, float* __restrict__ y, int m, int k,
                                               int n) {
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) {
        const float* row = gu + (size_t)(e / k) * 2 * k;
        int j = e % k;
        xs[e] = h2f(f2h(silu_mul(row[j], row[k + j])));
    }
    __syncthreads();
    gemv_store(xs, w, y, m, k, n);
}

// The entry points, one set per weights type: gemv_<weights> (f16 rows x),
// gemv_<weights>_norm, gemv_<weights>_norm_rope (its pair of columns a warp) and
// gemv_<weights>_swiglu. Each first asks L2 for its warp's first row of weights (a pair
// with RoPE), then waits (pdl_begin).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16(
    const half_t* __restrict__ x, const half_t* __restrict__ w, float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(w, k * 2, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    rows_product(xs, x, WeightsF16{w, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const half_t* __restrict__ w,
    float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(w, k * 2, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    norm_product(xs, x, delta, nw, x_out, rows, eps, WeightsF16{w, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemv_f16_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const half_t* __restrict__ w,
    float* __restrict__ y, int m, int k, int n, const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    pdl_begin_prefetch_row(w, k * 4, n / 2);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    norm_rope_product(xs, x, delta, nw, x_out, rows, eps, WeightsF16{w, k}, y, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16_swiglu(
    const float* __restrict__ gu, const half_t* __restrict__ w, float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(w, k * 2, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    swiglu_product(xs, gu, WeightsF16{w, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(q, k / 2, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    rows_product(xs, x, WeightsQ4{q, s, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(q, k / 2, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    norm_product(xs, x, delta, nw, x_out, rows, eps, WeightsQ4{q, s, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemv_q4_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    pdl_begin_prefetch_row(q, k, n / 2);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    norm_rope_product(xs, x, delta, nw, x_out, rows, eps, WeightsQ4{q, s, k}, y, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(q, k / 2, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    swiglu_product(xs, gu, WeightsQ4{q, s, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(q, k, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    rows_product(xs, x, WeightsQ8{q, s, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(q, k, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    norm_product(xs, x, delta, nw, x_out, rows, eps, WeightsQ8{q, s, k}, y, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemv_q8_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    pdl_begin_prefetch_row(q, k * 2, n / 2);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    norm_rope_product(xs, x, delta, nw, x_out, rows, eps, WeightsQ8{q, s, k}, y, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(q, k, n);
    __shared__ __align__(16) float xs[GEMV_MAX_ELEMS];
    swiglu_product(xs, gu, WeightsQ8{q, s, k}, y, m, k, n);
}
