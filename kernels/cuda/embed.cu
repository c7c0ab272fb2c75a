// Embedding gather: x[r, :] = table[tokens[r], :] · scale (f16 table, f32 activations;
// scale is Gemma's √dim, else 1).
extern "C" __global__ void embed(const half_t* __restrict__ table, const u32* __restrict__ tokens,
                                 float* __restrict__ x, int dim, float scale) {
    pdl_begin();
    int r = blockIdx.x;
    const half_t* row = table + (size_t)tokens[r] * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        x[(size_t)r * dim + d] = h2f(row[d]) * scale;
}
