// The `gemv` kernels' entry points, one set per weights type: gemv_<weights> (f16 rows x),
// gemv_<weights>_norm, gemv_<weights>_norm_rope and gemv_<weights>_swiglu. Each first asks
// L2 for its block's first group of weights, then waits (pdl_begin). What they do, and
// how, is gemv.cuh's device code (its opening comment), which the Rust side compiles
// before this file as one program.
extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16(
    const half_t* __restrict__ x, const half_t* __restrict__ w, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsF16 ws = pdl_begin_prefetch(WeightsF16{w + k0, k, n, kt});
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const half_t* __restrict__ w,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsF16 ws = pdl_begin_prefetch(WeightsF16{w + k0, k, n, kt});
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const half_t* __restrict__ w,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsF16 ws = pdl_begin_prefetch(WeightsF16{w + k0, k, n, kt});
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_f16_swiglu(
    const float* __restrict__ gu, const half_t* __restrict__ w, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsF16 ws = pdl_begin_prefetch(WeightsF16{w + k0, k, n, kt});
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4 ws = pdl_begin_prefetch(tiles_from<WeightsQ4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4 ws = pdl_begin_prefetch(tiles_from<WeightsQ4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ4 ws = pdl_begin_prefetch(tiles_from<WeightsQ4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4 ws = pdl_begin_prefetch(tiles_from<WeightsQ4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8 ws = pdl_begin_prefetch(tiles_from<WeightsQ8>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8 ws = pdl_begin_prefetch(tiles_from<WeightsQ8>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ8 ws = pdl_begin_prefetch(tiles_from<WeightsQ8>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8 ws = pdl_begin_prefetch(tiles_from<WeightsQ8>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4F ws = pdl_begin_prefetch(tiles_from<WeightsQ4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4F ws = pdl_begin_prefetch(tiles_from<WeightsQ4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ4F ws = pdl_begin_prefetch(tiles_from<WeightsQ4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4F ws = pdl_begin_prefetch(tiles_from<WeightsQ4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8F ws = pdl_begin_prefetch(tiles_from<WeightsQ8F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8F ws = pdl_begin_prefetch(tiles_from<WeightsQ8F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ8F ws = pdl_begin_prefetch(tiles_from<WeightsQ8F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8F ws = pdl_begin_prefetch(tiles_from<WeightsQ8F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8H ws = pdl_begin_prefetch(tiles_from<WeightsQ8H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8H ws = pdl_begin_prefetch(tiles_from<WeightsQ8H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ8H ws = pdl_begin_prefetch(tiles_from<WeightsQ8H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8H ws = pdl_begin_prefetch(tiles_from<WeightsQ8H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// The K-quant layouts' scales as f32 pairs (ScalesF32), to be timed against the factored.
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f32(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ4F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f32_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ4F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f32_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ4F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ4F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4f32_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ4F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f32(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f32_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f32_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ8F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8f32_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8F32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8F32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h32(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8H32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8H32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h32_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8H32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8H32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h32_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ8H32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8H32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8h32_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8H32 ws = pdl_begin_prefetch(tiles_from<WeightsQ8H32>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// IQ4's levels from 4-bit indices: under f16 pairs (IQ4_NL), under factored scales (IQ4_XS).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4 ws = pdl_begin_prefetch(tiles_from<WeightsIq4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4 ws = pdl_begin_prefetch(tiles_from<WeightsIq4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsIq4 ws = pdl_begin_prefetch(tiles_from<WeightsIq4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4 ws = pdl_begin_prefetch(tiles_from<WeightsIq4>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4f(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4F ws = pdl_begin_prefetch(tiles_from<WeightsIq4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4f_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4F ws = pdl_begin_prefetch(tiles_from<WeightsIq4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4f_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsIq4F ws = pdl_begin_prefetch(tiles_from<WeightsIq4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4f_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4F ws = pdl_begin_prefetch(tiles_from<WeightsIq4F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 5-bit integers: under f16 pairs (Q5_1), under factored scales (Q5_K).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5 ws = pdl_begin_prefetch(tiles_from<WeightsQ5>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5 ws = pdl_begin_prefetch(tiles_from<WeightsQ5>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ5 ws = pdl_begin_prefetch(tiles_from<WeightsQ5>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5 ws = pdl_begin_prefetch(tiles_from<WeightsQ5>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5f(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5F ws = pdl_begin_prefetch(tiles_from<WeightsQ5F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5f_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5F ws = pdl_begin_prefetch(tiles_from<WeightsQ5F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5f_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ5F ws = pdl_begin_prefetch(tiles_from<WeightsQ5F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5f_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5F ws = pdl_begin_prefetch(tiles_from<WeightsQ5F>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 6-bit integers under factored scales per 16 (Q6_K).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q6h(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ6H ws = pdl_begin_prefetch(tiles_from<WeightsQ6H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q6h_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ6H ws = pdl_begin_prefetch(tiles_from<WeightsQ6H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q6h_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ6H ws = pdl_begin_prefetch(tiles_from<WeightsQ6H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q6h_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ6H ws = pdl_begin_prefetch(tiles_from<WeightsQ6H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 4-bit integers under a scale alone (Q4_0: m = −8d).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4s(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4S ws = pdl_begin_prefetch(tiles_from<WeightsQ4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4s_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4S ws = pdl_begin_prefetch(tiles_from<WeightsQ4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4s_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ4S ws = pdl_begin_prefetch(tiles_from<WeightsQ4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4s_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4S ws = pdl_begin_prefetch(tiles_from<WeightsQ4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 5-bit integers under a scale alone (Q5_0: m = −16d).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5s(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5S ws = pdl_begin_prefetch(tiles_from<WeightsQ5S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5s_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5S ws = pdl_begin_prefetch(tiles_from<WeightsQ5S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5s_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ5S ws = pdl_begin_prefetch(tiles_from<WeightsQ5S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q5s_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ5S ws = pdl_begin_prefetch(tiles_from<WeightsQ5S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 8-bit integers under a scale alone (Q8_0).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8s(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8S ws = pdl_begin_prefetch(tiles_from<WeightsQ8S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8s_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8S ws = pdl_begin_prefetch(tiles_from<WeightsQ8S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8s_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ8S ws = pdl_begin_prefetch(tiles_from<WeightsQ8S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q8s_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ8S ws = pdl_begin_prefetch(tiles_from<WeightsQ8S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// IQ4's levels under a scale alone (IQ4_NL).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4s(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4S ws = pdl_begin_prefetch(tiles_from<WeightsIq4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4s_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4S ws = pdl_begin_prefetch(tiles_from<WeightsIq4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4s_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsIq4S ws = pdl_begin_prefetch(tiles_from<WeightsIq4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_iq4s_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsIq4S ws = pdl_begin_prefetch(tiles_from<WeightsIq4S>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 4-bit integers under factored scales per 16 (Q3_K).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4h(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4H ws = pdl_begin_prefetch(tiles_from<WeightsQ4H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4h_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4H ws = pdl_begin_prefetch(tiles_from<WeightsQ4H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4h_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ4H ws = pdl_begin_prefetch(tiles_from<WeightsQ4H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q4h_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ4H ws = pdl_begin_prefetch(tiles_from<WeightsQ4H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

// 2-bit integers under factored scales and offsets per 16 (Q2_K).
extern "C" __global__ void __launch_bounds__(256, 3) gemv_q2h(
    const half_t* __restrict__ x, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ2H ws = pdl_begin_prefetch(tiles_from<WeightsQ2H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    rows_product(sh, x, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q2h_norm(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ2H ws = pdl_begin_prefetch(tiles_from<WeightsQ2H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q2h_norm_rope(
    const float* __restrict__ x, const float* __restrict__ delta, const float* __restrict__ nw,
    float* __restrict__ x_out, const int* __restrict__ rows, float eps, const u32* __restrict__ q, const u32* __restrict__ s,
    float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt,
    const u32* __restrict__ positions,
    const int* __restrict__ slot_mapping, half_t* __restrict__ kc, half_t* __restrict__ vc,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float base) {
    const WeightsQ2H ws = pdl_begin_prefetch(tiles_from<WeightsQ2H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    norm_rope_product(sh, x, delta, nw, x_out, rows, eps, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n, positions,
                      slot_mapping, kc, vc, n_heads, n_kv_heads, head_dim, block_size, base);
}

extern "C" __global__ void __launch_bounds__(256, 3) gemv_q2h_swiglu(
    const float* __restrict__ gu, const u32* __restrict__ q, const u32* __restrict__ s, float* __restrict__ y, int m, int k, int n, int ldy, int j0, int k0, int kt) {
    const WeightsQ2H ws = pdl_begin_prefetch(tiles_from<WeightsQ2H>(q, s, k, n, k0, kt));
    const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
    swiglu_product(sh, gu, ws, GemvOut{y, ldy, j0, k0 > 0}, m, k, n);
}
