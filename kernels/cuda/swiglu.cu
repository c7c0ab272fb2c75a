// SwiGLU: out[r, j] = silu(gu[r, j]) · gu[r, F + j], from the stacked gate|up product, as
// f16 (the down projection's input).
extern "C" __global__ void swiglu(const float* __restrict__ gu, half_t* __restrict__ out,
                                  int n_rows, int ffn) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * ffn) return;
    int r = i / ffn, j = i % ffn;
    float g = gu[(size_t)r * 2 * ffn + j], u = gu[(size_t)r * 2 * ffn + ffn + j];
    out[i] = f2h(g / (1.0f + expf(-g)) * u);
}
