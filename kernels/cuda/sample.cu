// Sampling on the GPU: one block of 1024 threads per sequence.
//
// temperature <= 0: greedy (the lowest index among the maximal logits). Otherwise, with
// p_i = exp((x_i − max) / temperature): keep the tokens with p_i >= a threshold found by
// bisection so that at least top_k remain (top_k 0 = all; ties at the k-th value are all
// kept), then raise it so that the kept mass stays >= top_p of the top-k mass; draw
// u = uniform(seed, step) × kept mass and return the first token (in vocabulary order)
// whose running kept mass reaches u. `uniform` is SplitMix64 of (seed, step): the same
// seed and step give the same token, on the GPU and in its CPU twin.
//
// A row may first be adjusted in place (its CPU twin: `Adjust::apply`): adjust[s] is
// 0xFFFFFFFF for none, else where the row's words start in `extra`: {n_deltas,
// mask_words, (token, delta as f32 bits) × n_deltas, mask words}. The deltas (penalties,
// logit bias; one per token) are added, then every token whose mask bit is clear (or past
// the mask's words) becomes −∞: a grammar's mask costs its bits in the step's staging copy
// instead of the row's logits read back.
#define SAMPLE_THREADS 1024
#define BISECT 40

__device__ __forceinline__ float uniform01(u64 seed, u32 step) {
    u64 z = seed + 0x9E3779B97F4A7C15ull * ((u64)step + 1ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

extern "C" __global__ void sample(float* __restrict__ logits, int vocab,
                                  const float* __restrict__ temperature,
                                  const int* __restrict__ top_k, const float* __restrict__ top_p,
                                  const u64* __restrict__ seeds, const u32* __restrict__ steps,
                                  const u32* __restrict__ adjust, const u32* __restrict__ extra,
                                  u32* __restrict__ out) {
    __shared__ float red[32];
    __shared__ float chunk_mass[SAMPLE_THREADS];
    int s = blockIdx.x;
    float* x = logits + (size_t)s * vocab;
    u32 at = adjust[s];
    if (at != 0xFFFFFFFFu) {
        const u32* a = extra + at;
        u32 n_deltas = a[0], mask_words = a[1];
        for (u32 j = threadIdx.x; j < n_deltas; j += blockDim.x) {
            u32 t = a[2 + 2 * j];
            if (t < (u32)vocab) x[t] += __int_as_float((int)a[3 + 2 * j]);
        }
        __syncthreads();
        const u32* mask = a + 2 + 2 * n_deltas;
        if (mask_words > 0)
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                u32 w = (u32)i >> 5;
                if (w >= mask_words || !((mask[w] >> (i & 31)) & 1u)) x[i] = -INFINITY;
            }
        __syncthreads();
    }
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int lo_i = threadIdx.x * per, hi_i = min(vocab, lo_i + per);
    float mx = -INFINITY;
    for (int i = lo_i; i < hi_i; ++i) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, red);
    float temp = temperature[s];
    if (temp <= 0.0f) {
        // Lowest index holding the maximum.
        float first = (float)vocab;
        for (int i = lo_i; i < hi_i; ++i)
            if (x[i] == mx) { first = (float)i; break; }
        first = -block_max(-first, red);
        if (threadIdx.x == 0) out[s] = (u32)first;
        return;
    }
    float inv_t = 1.0f / temp;
    int k = top_k[s];
    // Top-k threshold: the largest t (by bisection) with count(p >= t) >= k.
    float keep = 0.0f;
    if (k > 0 && k < vocab) {
        float lo = 0.0f, hi = 1.0f;
        for (int it = 0; it < BISECT; ++it) {
            float mid = 0.5f * (lo + hi);
            float c = 0.0f;
            for (int i = lo_i; i < hi_i; ++i) c += expf((x[i] - mx) * inv_t) >= mid ? 1.0f : 0.0f;
            c = block_sum(c, red);
            if (c >= (float)k) lo = mid; else hi = mid;
        }
        keep = lo;
    }
    // Top-p: the largest t >= keep whose kept mass is still >= top_p × the top-k mass.
    float mass_k = 0.0f;
    for (int i = lo_i; i < hi_i; ++i) {
        float p = expf((x[i] - mx) * inv_t);
        mass_k += p >= keep ? p : 0.0f;
    }
    mass_k = block_sum(mass_k, red);
    float tp = top_p[s];
    if (tp < 1.0f) {
        float lo = keep, hi = 1.0f;
        for (int it = 0; it < BISECT; ++it) {
            float mid = 0.5f * (lo + hi);
            float m = 0.0f;
            for (int i = lo_i; i < hi_i; ++i) {
                float p = expf((x[i] - mx) * inv_t);
                m += p >= mid ? p : 0.0f;
            }
            m = block_sum(m, red);
            if (m >= tp * mass_k) lo = mid; else hi = mid;
        }
        keep = lo;
    }
    // Each thread's kept mass over its chunk, then a walk over chunks in order.
    float mine = 0.0f;
    for (int i = lo_i; i < hi_i; ++i) {
        float p = expf((x[i] - mx) * inv_t);
        mine += p >= keep ? p : 0.0f;
    }
    chunk_mass[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int c = 0; c < blockDim.x; ++c) total += chunk_mass[c];
        float u = uniform01(seeds[s], steps[s]) * total;
        float run = 0.0f;
        u32 pick = 0;
        bool found = false;
        for (int c = 0; c < blockDim.x && !found; ++c) {
            if (run + chunk_mass[c] < u && c + 1 < (int)blockDim.x) { run += chunk_mass[c]; continue; }
            int a = c * per, b = min(vocab, a + per);
            for (int i = a; i < b; ++i) {
                float p = expf((x[i] - mx) * inv_t);
                if (p < keep) continue;
                pick = (u32)i;
                run += p;
                if (run >= u) { found = true; break; }
            }
            if (!found && c + 1 >= (int)blockDim.x) found = true;
        }
        out[s] = pick;
    }
}
