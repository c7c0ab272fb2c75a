// SwiGLU: out[r, j] = silu(gu[r, j]) · gu[r, F + j], from the stacked gate|up product, as
// f16 (the down projection's input).
//
// Blocks tile (columns, rows): block (bx, by) covers columns bx·blockDim.x onwards of rows
// by, by + gridDim.y, ... (gridDim.y is capped at 65,535), so no thread divides to find its
// row. Launch: `swiglu_launch` (kernels::cuda).
extern "C" __global__ void swiglu(const float* __restrict__ gu, half_t* __restrict__ out,
                                  int n_rows, int ffn) {
    pdl_begin();
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= ffn) return;
    for (int r = blockIdx.y; r < n_rows; r += gridDim.y) {
        const float* row = gu + (size_t)r * 2 * ffn;
        out[(size_t)r * ffn + j] = f2h(silu_mul(row[j], row[ffn + j]));
    }
}
