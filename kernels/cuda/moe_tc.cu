// A mixture of experts' products on the tensor cores, over the experts' weights in their
// file's own blocks (gemv's layouts: gemv_blocks.cuh; each expert's tiles and scales one
// after the other, q_stride and s_stride words apart): moe.cu's two products
//
//   gu[place, :] = h[order[place] / gather] · W_gate|up[e]ᵀ     (moe_tc_<weights>)
//   y[place, :]  = swiglu(gu[place]) · W_down[e]ᵀ               (moe_tc_<weights>_swiglu)
//
// for the places of each expert e, as gemv's product: the block stages up to 16 of the
// expert's rows at a time (gathered from h, or made by swiglu from the place's own gate|up
// row) and runs gemv_columns over the expert's tiles, a column group of 16 at a time
// (grid-stride over blockIdx.x), writing columns j0 .. j0 + n of output rows ldy apart
// (the gate and up parts of a stack whose layouts differ: a launch each). Rows too wide to
// stage whole are read in runs of their columns (k0, kt), a launch a run adding its sums,
// as gemv's are. Slot blockIdx.y takes the expert active[blockIdx.y] (moe_sort: the
// experts with places, then −1s), so the grid — min(E, k·T) slots — depends on the step's
// rows alone and a decode step launches blocks for the experts it chose only.
//
// Each output element is gemv's sum for that row and column: the same bits as the dense
// product over the expert's rows (mma columns are independent; a row's place among the 16
// changes nothing), so a row's results do not depend on which rows share its expert.

// Places of expert c0 .. c0 + m's rows staged: a token's row of x (f16, kt long) where
// gather > 0 (row order[p] / gather), else the place's own row p.
__device__ __forceinline__ void stage_places(const GemvShared& sh, const half_t* __restrict__ x,
                                             const int* __restrict__ order, int gather, int c0,
                                             int m, int k) {
    int stride = gemv_stride(k), pieces = k / 8;
    for (int e = threadIdx.x; e < m * pieces; e += blockDim.x) {
        int r = e / pieces, c = e % pieces, p = c0 + r;
        int row = gather > 0 ? order[p] / gather : p;
        *reinterpret_cast<uint4*>(sh.x + r * stride + c * 8) =
            reinterpret_cast<const uint4*>(x + (size_t)row * sh.kt + sh.k0)[c];
    }
}

// The product for the slot's expert (after pdl_begin: active is moe_sort's): `in` is f16
// rows of h (SWIGLU false) or f32 gate|up rows of 2·kt a place (SWIGLU true; order and
// gather unused).
template <typename W, bool SWIGLU>
__device__ __forceinline__ void moe_tc(const void* __restrict__ in, const int* __restrict__ order,
                                       const int* __restrict__ offsets,
                                       const int* __restrict__ active, int gather,
                                       const u32* __restrict__ q, const u32* __restrict__ s,
                                       int q_stride, int s_stride, float* __restrict__ y, int k,
                                       int n, int ldy, int j0, int k0, int kt) {
    int e = active[blockIdx.y];
    if (e < 0) return;
    int p0 = offsets[e], p1 = offsets[e + 1];
    const W ws =
        tiles_from<W>(q + (size_t)e * q_stride, s + (size_t)e * s_stride, k, n, k0, kt);
    for (int c0 = p0; c0 < p1; c0 += GEMV_MAX_ROWS) {
        int m = min(GEMV_MAX_ROWS, p1 - c0);
        const GemvShared sh = gemv_shared(ws, m, k, k0, kt);
        const TileBatch<W> v = first_batch(ws);
        if constexpr (SWIGLU) {
            stage_swiglu(sh, static_cast<const float*>(in) + (size_t)c0 * 2 * kt, m, k);
        } else {
            stage_places(sh, static_cast<const half_t*>(in), order, gather, c0, m, k);
        }
        stage_sums(sh, ws, k);
        gemv_store(sh, ws, v, GemvOut{y + (size_t)c0 * ldy, ldy, j0, k0 > 0}, k, n);
    }
}

// The entry points, a pair per weights type (gemv.cu's names: q4f for WeightsQ4F, ...), for
// the layouts the files' experts come in: Q4_0, Q4_1, Q4_K, Q3_K, Q2_K, Q5_K, Q6_K, Q8_0 and
// IQ4_XS's (experts of other layouts are held as Q8_0's values).
extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4s(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4S, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4s_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4S, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4f(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4F, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4f_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4F, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4h(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4H, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q4h_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ4H, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q2h(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ2H, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q2h_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ2H, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q5f(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ5F, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q5f_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ5F, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q6h(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ6H, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q6h_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ6H, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q8s(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ8S, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_q8s_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsQ8S, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_iq4f(
    const half_t* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsIq4F, false>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}

extern "C" __global__ void __launch_bounds__(256, 3) moe_tc_iq4f_swiglu(
    const float* __restrict__ x, const int* __restrict__ order, const int* __restrict__ offsets,
    const int* __restrict__ active, int gather, const u32* __restrict__ q, const u32* __restrict__ s, int q_stride, int s_stride,
    float* __restrict__ y, int k, int n, int ldy, int j0, int k0, int kt) {
    pdl_begin();
    moe_tc<WeightsIq4F, true>(x, order, offsets, active, gather, q, s, q_stride, s_stride, y, k, n,
                                  ldy, j0, k0, kt);
}
