// RMSNorm fused with the residual add: x += delta (when delta is not null), then
// out = x / rms(x) · w, as f16 (the next matrix product's input).
// With `rows` not null, output row i normalizes x row rows[i] (after adding delta's row
// rows[i], when delta is not null): the last residual add and final norm of just the rows
// that want logits. rows[i] < 0 writes zeros; the entries >= 0 must be distinct.
extern "C" __global__ void add_rmsnorm(float* __restrict__ x, const float* __restrict__ delta,
                                       const float* __restrict__ w, half_t* __restrict__ out,
                                       const int* __restrict__ rows, int dim, float eps) {
    __shared__ float red[32];
    int i = blockIdx.x;
    int r = rows ? rows[i] : i;
    half_t* o = out + (size_t)i * dim;
    if (r < 0) {
        for (int d = threadIdx.x; d < dim; d += blockDim.x) o[d] = 0;
        return;
    }
    float* xr = x + (size_t)r * dim;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float v = xr[d];
        if (delta) {
            v += delta[(size_t)r * dim + d];
            xr[d] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, red);
    float inv = rsqrtf(ss / dim + eps);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) o[d] = f2h(xr[d] * inv * w[d]);
}
