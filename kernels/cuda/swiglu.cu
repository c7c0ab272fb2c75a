// SwiGLU: out[r, j] = silu(gu[r, j]) · gu[r, F + j], from the stacked gate|up product, as
// f16 (the down projection's input); GeGLU (Gemma's): gelu(gu[r, j]) · gu[r, F + j], GELU
// in its tanh form computed as x / (1 + e^(−2y)), y = √(2/π)(x + 0.044715 x³).
//
// Blocks tile (columns, rows): block (bx, by) covers columns bx·blockDim.x onwards of rows
// by, by + gridDim.y, ... (gridDim.y is capped at 65,535), so no thread divides to find its
// row. Launch: `swiglu_launch` (kernels::cuda).
namespace {
// Column j of rows blockIdx.y, blockIdx.y + gridDim.y, ...: gate(x) · u, by GELU's tanh
// form where `gelu`, else silu.
__device__ __forceinline__ void glu_rows(const float* __restrict__ gu, half_t* __restrict__ out,
                                         int n_rows, int ffn, bool gelu) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= ffn) return;
    for (int r = blockIdx.y; r < n_rows; r += gridDim.y) {
        const float* row = gu + (size_t)r * 2 * ffn;
        float x = row[j], u = row[ffn + j];
        float y = 0.7978846f * (x + 0.044715f * x * x * x);
        out[(size_t)r * ffn + j] = f2h(gelu ? x / (1.0f + expf(-2.0f * y)) * u : silu_mul(x, u));
    }
}
}  // namespace

extern "C" __global__ void swiglu(const float* __restrict__ gu, half_t* __restrict__ out,
                                  int n_rows, int ffn) {
    pdl_begin();
    glu_rows(gu, out, n_rows, ffn, false);
}

extern "C" __global__ void geglu(const float* __restrict__ gu, half_t* __restrict__ out,
                                 int n_rows, int ffn) {
    pdl_begin();
    glu_rows(gu, out, n_rows, ffn, true);
}

// Gemma 2's soft cap on the logits, in place: x = cap · tanh(x / cap) for n_rows rows of
// `width` (the same launch as swiglu's, `width` for ffn).
extern "C" __global__ void softcap(float* __restrict__ x, int n_rows, int width, float cap) {
    pdl_begin();
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    for (int r = blockIdx.y; r < n_rows; r += gridDim.y) {
        float* v = x + (size_t)r * width + j;
        *v = cap * tanhf(*v / cap);
    }
}
