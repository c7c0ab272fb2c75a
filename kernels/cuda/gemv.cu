// Products for a few rows: y[r, j] = x[r, :] · w[j, :] for r < m, f16 inputs, f32
// accumulation and output — the step's product (`y = x · wᵀ`, as cuBLAS computes it) for
// decode steps of few sequences, where reading the weights once is all the work. A
// candidate against cuBLAS: at load the backend times whole decode steps both ways and
// keeps the faster per row count (`gpu_bench` also times each product both ways).
//
// One warp per output column (grid-stride over columns), each lane reading 16 bytes (8
// weights) at a time; x is staged once per block in shared memory as f32. Needs
// m <= GEMV_MAX_ROWS, k <= GEMV_MAX_K, k a multiple of 8 and w 16-byte aligned.
#define GEMV_MAX_ROWS 4
#define GEMV_MAX_K 2048

extern "C" __global__ void gemv_f16(const half_t* __restrict__ x, const half_t* __restrict__ w,
                                    float* __restrict__ y, int m, int k, int n) {
    __shared__ float xs[GEMV_MAX_ROWS * GEMV_MAX_K];
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) xs[e] = h2f(x[e]);
    __syncthreads();
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
