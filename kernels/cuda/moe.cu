// A mixture of experts' feed-forward block (Qwen3-MoE's, Qwen2-MoE's, Mixtral's): each
// token's `used` experts chosen from its router scores, the tokens' places sorted by
// expert, each expert's two products over the rows routed to it, and the weighted sum back
// into the token's row. With T rows and k = used, a step's k·T places are numbered by
// expert (expert 0's first, each expert's in row order):
//
//   logits[T,E]        = h · Wrouterᵀ                 (a product like any other)
//   moe_route          : expert[r·k + j], weight[r·k + j] (j-th choice of row r)
//   moe_sort           : offsets[E+1], order[place] = r·k + j, slot[r·k + j] = place,
//                        active[E] = the experts with places, in order (then −1s)
//   moe_gemv (gather)  : gu[place, 2F] = h[order[place] / k] · W_gate|up[e]ᵀ
//   swiglu             : g[place, F]
//   moe_gemv           : y[place, D]  = g[place] · W_down[e]ᵀ
//   moe_combine        : out[r] = Σ_j weight[r·k + j] · y[slot[r·k + j]]  (+ σ(h[r]·g)·s[r])
//
// (moe_gemv_q8 in place of moe_gemv for experts held as signed bytes under an f16 scale
// per 32: Q8_0's values.)
//
// Every launch's grid depends on T alone, so a captured graph replays it whatever the
// routing: the experts' products take min(E, k·T) slots of blocks, slot y the y-th expert
// with places (active[y]; a slot past the experts chosen returns at once), so that a decode
// step of few rows launches blocks for the few experts it chose, not for all E. Each output element is summed in an
// order that does not depend on which other rows share its expert: a row's results are the
// same alone and in any batch.

// Experts a mixture may have (moe_sort's block: one thread per expert).
#define MOE_MAX_EXPERTS 256
// moe_sort's warps (its block: MOE_MAX_EXPERTS threads).
#define MOE_SORT_WARPS 8
// Places moe_gemv's warps take at a time (each reads its weight row once for them).
#define MOE_ROWS 8

// One warp per row, 8 rows per block of 256 threads. The j-th choice is the greatest logit
// after the (j−1)-th in the order (logit descending, index ascending), weighted by its
// softmax probability over every expert; divided by the chosen ones' sum where `norm`.
// NaN logits (a row whose activations overflowed) compare with nothing: once every other
// expert is chosen, the choices go on through them in index order, so that a row names
// each expert at most once (the twins' `moe::choice_order`).
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
    int prev_i = -1, past = -1;  // past: the choices made among the NaNs, from the first on
    for (int j = 0; j < used; j++) {
        float bv = -INFINITY;
        int bi = n_experts;
        for (int e = lane; e < n_experts && past < 0; e += 32) {
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
        // No logit after the last choice compares: the next NaN one in index order (every
        // lane walks the same row, so all agree).
        if (bi >= n_experts) {
            past++;
            int seen = 0;
            bi = 0;
            for (int e = 0; e < n_experts; e++) {
                if (isnan(l[e]) && seen++ == past) {
                    bi = e;
                    break;
                }
            }
            bv = -INFINITY;
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

// One block of MOE_MAX_EXPERTS threads (MOE_SORT_WARPS warps), placing the n = T·k entries
// of `expert` by expert: offsets[e] = the places before expert e's (offsets[E] = n), each
// entry's place, in entry order within its expert, and active[0 .. E] the experts with
// places in index order, then −1s. Warp w takes a contiguous share of the entries: it
// counts them by expert (shared atomics: the counts whatever their order), thread e turns
// the counts into each warp's first place for expert e (the warps before it first), then
// each warp places its share 32 entries at a time, in order — an entry's place is its
// expert's cursor plus the lanes before it with the same expert, and the last such lane
// moves the cursor on —, so the places are the same as one thread's walk through the
// entries would give.
extern "C" __global__ void moe_sort(const int* __restrict__ expert, int n, int n_experts,
                                    int* __restrict__ offsets, int* __restrict__ order,
                                    int* __restrict__ slot, int* __restrict__ active) {
    pdl_begin();
    __shared__ int cursor[MOE_SORT_WARPS][MOE_MAX_EXPERTS];
    __shared__ int start[MOE_MAX_EXPERTS + 1];
    int e = threadIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int w = 0; w < MOE_SORT_WARPS; w++) cursor[w][e] = 0;
    __syncthreads();
    // Warp w's share: entries lo .. hi, `per` (a multiple of 32) a warp.
    int per = (n + MOE_SORT_WARPS * 32 - 1) / (MOE_SORT_WARPS * 32) * 32;
    int lo = min(n, warp * per), hi = min(n, lo + per);
    for (int i = lo + lane; i < hi; i += 32) {
        int x = expert[i];
        if ((unsigned)x < (unsigned)n_experts) atomicAdd(&cursor[warp][x], 1);
    }
    __syncthreads();
    int total = 0;
    for (int w = 0; w < MOE_SORT_WARPS; w++) total += cursor[w][e];
    start[e + 1] = total;
    if (e == 0) start[0] = 0;
    __syncthreads();
    if (e == 0) {
        int a = 0;
        for (int i = 1; i <= n_experts; i++) {
            if (start[i] > 0) active[a++] = i - 1;
            start[i] += start[i - 1];
        }
        for (; a < n_experts; a++) active[a] = -1;
    }
    __syncthreads();
    if (e < n_experts) offsets[e] = start[e];
    if (e == 0) offsets[n_experts] = n;
    // Each warp's first place for expert e: the places before e's, then the warps before.
    int at = start[e];
    for (int w = 0; w < MOE_SORT_WARPS; w++) {
        int c = cursor[w][e];
        cursor[w][e] = at;
        at += c;
    }
    __syncthreads();
    for (int base = 0; base < per; base += 32) {
        int i = lo + base + lane;
        int x = i < hi ? expert[i] : -1;
        bool valid = (unsigned)x < (unsigned)n_experts;
        int before = 0;
        bool last = true;
        for (int o = 0; o < 32; o++) {
            int y = __shfl_sync(0xffffffffu, x, o);
            if (y == x && o < lane) before++;
            if (y == x && o > lane) last = false;
        }
        int p = valid ? cursor[warp][x] + before : 0;
        // Every lane has read its cursor before the last lane of its expert moves it.
        __syncthreads();
        if (valid) {
            order[p] = i;
            slot[i] = p;
            if (last) cursor[warp][x] = p + 1;
        }
        __syncthreads();
    }
}

// Σ of the 8 halves of x times the 8 halves of w, in order.
__device__ __forceinline__ float moe_dot8(uint4 x, uint4 w) {
    u32 xs[4] = {x.x, x.y, x.z, x.w}, ws[4] = {w.x, w.y, w.z, w.w};
    float acc = 0.0f;
    for (int j = 0; j < 4; j++) {
        acc = fmaf(h2f((half_t)(xs[j] & 0xffffu)), h2f((half_t)(ws[j] & 0xffffu)), acc);
        acc = fmaf(h2f((half_t)(xs[j] >> 16)), h2f((half_t)(ws[j] >> 16)), acc);
    }
    return acc;
}

// acc + the 4 halves of (xa, xb) times the 4 signed bytes of q, in order.
__device__ __forceinline__ float moe_dot4_q8(u32 xa, u32 xb, u32 q, float acc) {
    acc = fmaf(h2f((half_t)(xa & 0xffffu)), (float)(signed char)(q & 0xffu), acc);
    acc = fmaf(h2f((half_t)(xa >> 16)), (float)(signed char)((q >> 8) & 0xffu), acc);
    acc = fmaf(h2f((half_t)(xb & 0xffffu)), (float)(signed char)((q >> 16) & 0xffu), acc);
    acc = fmaf(h2f((half_t)(xb >> 16)), (float)(signed char)(q >> 24), acc);
    return acc;
}

// An expert matrix's row in f16, read in runs of 8 (one 16-byte load).
struct MoeRowF16 {
    typedef uint4 Run;
    static const int RUN = 8;
    const uint4* w;
    __device__ __forceinline__ Run load(int i) const { return w[i]; }
    __device__ __forceinline__ float dot(const half_t* xrow, int i, Run r) const {
        return moe_dot8(((const uint4*)xrow)[i], r);
    }
};

// An expert matrix's row as signed bytes under an f16 scale per 32 (Q8_0's values, the
// bytes and scales apart), read in runs of 16: Σ x·q over the run, times its scale.
struct MoeRowQ8 {
    struct Run {
        uint4 q;
        float s;
    };
    static const int RUN = 16;
    const uint4* q;
    const half_t* s;
    __device__ __forceinline__ Run load(int i) const {
        Run r;
        r.q = q[i];
        r.s = h2f(s[i >> 1]);
        return r;
    }
    __device__ __forceinline__ float dot(const half_t* xrow, int i, Run r) const {
        const uint4* xv = (const uint4*)xrow + 2 * i;
        uint4 a = xv[0], b = xv[1];
        float t = moe_dot4_q8(a.x, a.y, r.q.x, 0.0f);
        t = moe_dot4_q8(a.z, a.w, r.q.y, t);
        t = moe_dot4_q8(b.x, b.y, r.q.z, t);
        t = moe_dot4_q8(b.z, b.w, r.q.w, t);
        return r.s * t;
    }
};

// y[p, c] = Σ_i x[row(p), i] · w[c][i] for the places p in [p0, p1) of the expert whose
// column c's row is `w`: row(p) = order[p] / gather where gather > 0 (the first product
// reads the token's row of h), p itself where 0 (the second reads the rows the first
// made, in place order). One warp, MOE_ROWS places at a time, the lanes over the row's
// runs: each sum is lane-strided then reduced across the warp, whatever the places beside
// it.
template <class W>
__device__ __forceinline__ void moe_column(const half_t* __restrict__ x,
                                           const int* __restrict__ order, int p0, int p1,
                                           int gather, W w, float* __restrict__ y, int k,
                                           int n, int c) {
    int lane = threadIdx.x & 31, runs = k / W::RUN;
    for (int p = p0; p < p1; p += MOE_ROWS) {
        int m = min(MOE_ROWS, p1 - p);
        const half_t* xr[MOE_ROWS];
        float acc[MOE_ROWS];
        for (int r = 0; r < MOE_ROWS; r++) {
            int q = p + min(r, m - 1);
            int row = gather > 0 ? order[q] / gather : q;
            xr[r] = x + (size_t)row * k;
            acc[r] = 0.0f;
        }
        for (int i = lane; i < runs; i += 32) {
            typename W::Run wv = w.load(i);
            for (int r = 0; r < MOE_ROWS; r++) acc[r] += w.dot(xr[r], i, wv);
        }
        for (int r = 0; r < MOE_ROWS; r++) {
            float s = warp_sum(acc[r]);
            if (lane == 0 && r < m) y[(size_t)(p + r) * n + c] = s;
        }
    }
}

// The experts' product over f16 weights: expert e = active[blockIdx.y]'s places
// (moe_column; none where e < 0), w [E][n][k] f16, k a multiple of 8. Blocks of 8 warps, a
// warp per column c = blockIdx.x·8 + warp.
extern "C" __global__ void moe_gemv(const half_t* __restrict__ x, const int* __restrict__ order,
                                    const int* __restrict__ offsets,
                                    const int* __restrict__ active, int gather,
                                    const half_t* __restrict__ w, float* __restrict__ y, int k,
                                    int n) {
    pdl_begin();
    int e = active[blockIdx.y];
    int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= n || e < 0) return;
    int p0 = offsets[e], p1 = offsets[e + 1];
    MoeRowF16 row;
    row.w = (const uint4*)(w + ((size_t)e * n + c) * k);
    moe_column(x, order, p0, p1, gather, row, y, k, n, c);
}

// The same over signed bytes: wq [E][n][k] (k a multiple of 32), ws their scales
// [E][n][k / 32].
extern "C" __global__ void moe_gemv_q8(const half_t* __restrict__ x,
                                       const int* __restrict__ order,
                                       const int* __restrict__ offsets,
                                       const int* __restrict__ active, int gather,
                                       const unsigned char* __restrict__ wq,
                                       const half_t* __restrict__ ws, float* __restrict__ y,
                                       int k, int n) {
    pdl_begin();
    int e = active[blockIdx.y];
    int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= n || e < 0) return;
    int p0 = offsets[e], p1 = offsets[e + 1];
    size_t at = (size_t)e * n + c;
    MoeRowQ8 row;
    row.q = (const uint4*)(wq + at * k);
    row.s = ws + at * (k >> 5);
    moe_column(x, order, p0, p1, gather, row, y, k, n, c);
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
