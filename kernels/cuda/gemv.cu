// Products for a few rows: y[r, j] = x[r, :] · w[j, :] for r < m, f16 inputs, f32
// accumulation and output — the step's product (`y = x · wᵀ`, as cuBLAS computes it) for
// decode steps of few sequences, where reading the weights once is all the work. A
// candidate against cuBLAS: at load the backend times whole decode steps both ways and
// keeps the faster per row count (`gpu_bench` also times each product both ways).
//
// One warp per output column (grid-stride over columns), each lane reading 16 bytes (8
// weights) at a time; x is staged once per block in shared memory as f32. Needs
// m <= GEMV_MAX_ROWS, k <= GEMV_MAX_K, k a multiple of 8 and w 16-byte aligned.
//
// Two entry points fuse the kernel that makes the product's input into the staging, so
// that a decode step of few rows launches 6 kernels per layer instead of 9:
// `gemv_f16_norm` (add_rmsnorm, then the product) and `gemv_f16_swiglu` (swiglu, then the
// product). Each block computes the input rows itself (a few thousand floats, from L2),
// with the unfused kernel's arithmetic (the helpers in common.cuh), so the product's
// result has the same bits as the two kernels launched one after the other.
#define GEMV_MAX_ROWS 4
#define GEMV_MAX_K 2048

// The product of the staged rows xs[m × k] (every thread of the block).
__device__ __forceinline__ void gemv_columns(const float* xs, const half_t* __restrict__ w,
                                             float* __restrict__ y, int m, int k, int n) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = blockIdx.x * warps + warp; j < n; j += gridDim.x * warps) {
        const uint4* row = reinterpret_cast<const uint4*>(w + (size_t)j * k);
        float acc[GEMV_MAX_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
        for (int c = lane; c < k / 8; c += 32) {
            uint4 q = row[c];
            u32 words[4] = {q.x, q.y, q.z, q.w};
            float wv[8];
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                wv[2 * h] = h2f((half_t)(words[h] & 0xffffu));
                wv[2 * h + 1] = h2f((half_t)(words[h] >> 16));
            }
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                if (r >= m) break;
                const float* xr = xs + r * k + c * 8;
#pragma unroll
                for (int h = 0; h < 8; ++h) acc[r] += wv[h] * xr[h];
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r >= m) break;
            float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + j] = s;
        }
    }
}

extern "C" __global__ void gemv_f16(const half_t* __restrict__ x, const half_t* __restrict__ w,
                                    float* __restrict__ y, int m, int k, int n) {
    pdl_begin_prefetch_row(w, k * 2, n);
    __shared__ float xs[GEMV_MAX_ROWS * GEMV_MAX_K];
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) xs[e] = h2f(x[e]);
    __syncthreads();
    gemv_columns(xs, w, y, m, k, n);
}

// add_rmsnorm fused with the product: input row i is row rows[i] of x (row i when rows
// is null) plus the same row of delta (when not null), normalized and scaled by nw, then
// rounded to f16 as add_rmsnorm writes it; rows[i] < 0 is a row of zeros. Block 0 writes
// the sums x + delta to x_out (when not null), which must not be x: the other blocks
// still read x. Warp i of each block prepares input row i (blockDim.x / 32 >= m).
extern "C" __global__ void gemv_f16_norm(const float* __restrict__ x,
                                         const float* __restrict__ delta,
                                         const float* __restrict__ nw, float* __restrict__ x_out,
                                         const int* __restrict__ rows, float eps,
                                         const half_t* __restrict__ w, float* __restrict__ y,
                                         int m, int k, int n) {
    pdl_begin_prefetch_row(w, k * 2, n);
    __shared__ float xs[GEMV_MAX_ROWS * GEMV_MAX_K];
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
    gemv_columns(xs, w, y, m, k, n);
}

// swiglu fused with the product: input row r is silu(gu[r, j]) · gu[r, k + j] over
// j < k, rounded to f16 as swiglu writes it (gu holds rows of 2k: gate, then up).
extern "C" __global__ void gemv_f16_swiglu(const float* __restrict__ gu,
                                           const half_t* __restrict__ w, float* __restrict__ y,
                                           int m, int k, int n) {
    pdl_begin_prefetch_row(w, k * 2, n);
    __shared__ float xs[GEMV_MAX_ROWS * GEMV_MAX_K];
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) {
        const float* row = gu + (size_t)(e / k) * 2 * k;
        int j = e % k;
        xs[e] = h2f(f2h(silu_mul(row[j], row[k + j])));
    }
    __syncthreads();
    gemv_columns(xs, w, y, m, k, n);
}
