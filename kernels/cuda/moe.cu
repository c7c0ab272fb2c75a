// A mixture of experts' feed-forward block (Qwen3-MoE's, Qwen2-MoE's, Mixtral's): each
// token's `used` experts chosen from its router scores, the tokens' places sorted by
// expert, each expert's two products over the rows routed to it, and the weighted sum back
// into the token's row. With T rows and k = used, a step's k·T places are numbered by
// expert (expert 0's first, each expert's in row order):
//
//   logits[T,E]        = h · Wrouterᵀ                 (a product like any other)
//   moe_route          : expert[r·k + j], weight[r·k + j] (j-th choice of row r)
//   moe_sort           : offsets[E+1], order[place] = r·k + j, slot[r·k + j] = place
//   moe_gemv (gather)  : gu[place, 2F] = h[order[place] / k] · W_gate|up[e]ᵀ
//   swiglu             : g[place, F]
//   moe_gemv           : y[place, D]  = g[place] · W_down[e]ᵀ
//   moe_combine        : out[r] = Σ_j weight[r·k + j] · y[slot[r·k + j]]  (+ σ(h[r]·g)·s[r])
//
// Every launch's grid depends on T alone (experts with no rows leave their blocks idle), so
// a captured graph replays it whatever the routing. Each output element is summed in an
// order that does not depend on which other rows share its expert: a row's results are the
// same alone and in any batch.

// Experts a mixture may have (moe_sort's block: one thread per expert).
#define MOE_MAX_EXPERTS 256
// Places moe_sort stages in shared memory at a time.
#define MOE_STAGE 2048
// Places moe_gemv's warps take at a time (each reads its weight row once for them).
#define MOE_ROWS 8

// One warp per row, 8 rows per block of 256 threads. The j-th choice is the greatest logit
// after the (j−1)-th in the order (logit descending, index ascending), weighted by its
// softmax probability over every expert; divided by the chosen ones' sum where `norm`.
extern "C" __global__ void moe_route(const float* __restrict__ logits, int n_rows, int n_experts,
                                     int used, int norm, int* __restrict__ expert,
                                     float* __restrict__ weight) {
    pdl_begin();
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= n_rows) return;
    const float* l = logits + (size_t)r * n_experts;
    float mx = -INFINITY;
    for (int e = lane; e < n_experts; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float total = 0.0f;
    for (int e = lane; e < n_experts; e += 32) total += expf(l[e] - mx);
    total = warp_sum(total);
    float prev_v = INFINITY, chosen = 0.0f;
    int prev_i = -1;
    for (int j = 0; j < used; j++) {
        float bv = -INFINITY;
        int bi = n_experts;
        for (int e = lane; e < n_experts; e += 32) {
            float v = l[e];
            bool after = v < prev_v || (v == prev_v && e > prev_i);
            if (after && (v > bv || (v == bv && e < bi))) {
                bv = v;
                bi = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        float p = expf(bv - mx);
        chosen += p;
        if (lane == 0) {
            expert[r * used + j] = bi;
            weight[r * used + j] = p;
        }
        prev_v = bv;
        prev_i = bi;
    }
    if (lane == 0) {
        float over = norm ? chosen : total;
        for (int j = 0; j < used; j++) weight[r * used + j] /= over;
    }
}

// One block of MOE_MAX_EXPERTS threads, thread e counting and placing expert e's entries
// (of the n = T·k in `expert`): offsets[e] = the places before expert e's (offsets[E] = n),
// and each entry's place, in entry order within its expert.
extern "C" __global__ void moe_sort(const int* __restrict__ expert, int n, int n_experts,
                                    int* __restrict__ offsets, int* __restrict__ order,
                                    int* __restrict__ slot) {
    pdl_begin();
    __shared__ int staged[MOE_STAGE];
    __shared__ int start[MOE_MAX_EXPERTS + 1];
    int e = threadIdx.x;
    int count = 0;
    for (int base = 0; base < n; base += MOE_STAGE) {
        int m = min(MOE_STAGE, n - base);
        __syncthreads();
        for (int i = threadIdx.x; i < m; i += blockDim.x) staged[i] = expert[base + i];
        __syncthreads();
        for (int i = 0; i < m; i++) count += staged[i] == e;
    }
    start[e + 1] = count;
    if (e == 0) start[0] = 0;
    __syncthreads();
    if (e == 0)
        for (int i = 1; i <= n_experts; i++) start[i] += start[i - 1];
    __syncthreads();
    if (e < n_experts) offsets[e] = start[e];
    if (e == 0) offsets[n_experts] = n;
    int at = start[e];
    for (int base = 0; base < n; base += MOE_STAGE) {
        int m = min(MOE_STAGE, n - base);
        __syncthreads();
        for (int i = threadIdx.x; i < m; i += blockDim.x) staged[i] = expert[base + i];
        __syncthreads();
        if (e < n_experts)
            for (int i = 0; i < m; i++)
                if (staged[i] == e) {
                    order[at] = base + i;
                    slot[base + i] = at;
                    at++;
                }
    }
}

// acc += the 8 halves of x · the 8 halves of w, in order.
__device__ __forceinline__ float moe_fma8(uint4 x, uint4 w, float acc) {
    u32 xs[4] = {x.x, x.y, x.z, x.w}, ws[4] = {w.x, w.y, w.z, w.w};
    for (int j = 0; j < 4; j++) {
        acc = fmaf(h2f((half_t)(xs[j] & 0xffffu)), h2f((half_t)(ws[j] & 0xffffu)), acc);
        acc = fmaf(h2f((half_t)(xs[j] >> 16)), h2f((half_t)(ws[j] >> 16)), acc);
    }
    return acc;
}

// y[p, c] = Σ_i x[row(p), i] · w[e][c][i] for expert e = blockIdx.y's places p in
// [offsets[e], offsets[e+1]): row(p) = order[p] / gather where gather > 0 (the first
// product reads the token's row of h), p itself where 0 (the second reads the rows the
// first made, in place order). w is [E][n][k] f16, k a multiple of 8. Blocks of 8 warps, a
// warp per column c = blockIdx.x·8 + warp, MOE_ROWS places at a time, the lanes over i in
// runs of 8 (16-byte loads): each sum is lane-strided then reduced across the warp,
// whatever the places beside it.
extern "C" __global__ void moe_gemv(const half_t* __restrict__ x, const int* __restrict__ order,
                                    const int* __restrict__ offsets, int gather,
                                    const half_t* __restrict__ w, float* __restrict__ y, int k,
                                    int n) {
    pdl_begin();
    int e = blockIdx.y, lane = threadIdx.x & 31;
    int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int p0 = offsets[e], p1 = offsets[e + 1];
    if (c >= n || p0 == p1) return;
    int runs = k >> 3;
    const uint4* wr = (const uint4*)(w + ((size_t)e * n + c) * k);
    for (int p = p0; p < p1; p += MOE_ROWS) {
        int m = min(MOE_ROWS, p1 - p);
        const uint4* xr[MOE_ROWS];
        float acc[MOE_ROWS];
        for (int r = 0; r < MOE_ROWS; r++) {
            int q = p + min(r, m - 1);
            int row = gather > 0 ? order[q] / gather : q;
            xr[r] = (const uint4*)(x + (size_t)row * k);
            acc[r] = 0.0f;
        }
        for (int i = lane; i < runs; i += 32) {
            uint4 wv = wr[i];
            for (int r = 0; r < MOE_ROWS; r++) acc[r] = moe_fma8(xr[r][i], wv, acc[r]);
        }
        for (int r = 0; r < MOE_ROWS; r++) {
            float s = warp_sum(acc[r]);
            if (lane == 0 && r < m) y[(size_t)(p + r) * n + c] = s;
        }
    }
}

// One block per row r: out[r, i] = Σ_j weight[r·k + j] · y[slot[r·k + j], i] in choice
// order, then, where `gate` is given (Qwen2-MoE's shared expert, output s), + σ(h[r]·gate) ·
// s[r, i].
extern "C" __global__ void moe_combine(const float* __restrict__ y, const int* __restrict__ slot,
                                       const float* __restrict__ weight, int used,
                                       const half_t* __restrict__ h,
                                       const float* __restrict__ gate,
                                       const float* __restrict__ s, float* __restrict__ out,
                                       int d) {
    pdl_begin();
    __shared__ float red[32];
    int r = blockIdx.x;
    float g = 0.0f;
    if (gate != nullptr) {
        float v = 0.0f;
        for (int i = threadIdx.x; i < d; i += blockDim.x)
            v = fmaf(h2f(h[(size_t)r * d + i]), gate[i], v);
        v = block_sum(v, red);
        g = 1.0f / (1.0f + expf(-v));
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < used; j++)
            acc = fmaf(weight[r * used + j], y[(size_t)slot[r * used + j] * d + i], acc);
        if (gate != nullptr) acc = fmaf(g, s[(size_t)r * d + i], acc);
        out[(size_t)r * d + i] = acc;
    }
}
