// Sampling on the GPU: one block of 1024 threads per sequence, every pass over the row
// coalesced (thread t reads elements t, t + 1024, …).
//
// temperature <= 0: greedy (the lowest index among the maximal logits), in one pass.
// Otherwise each token gets p_i = sample_exp((x_i − max) / temperature) in (0, 1] (0 for
// a refused token), its key (p_i's bits, which order as p_i does) and its mass
// floor(p_i · 2^40), an integer. The cuts are exact selections over the keys, by radix
// (four passes of 8-bit digits, histograms in shared memory):
//   min_p (0 = none): keep the tokens whose key is >= min_p's bits (p_i >= min_p × the
//                     largest p, which is 1), vLLM's first cut;
//   top_k (0 = none): of those, keep the tokens whose key is >= the k-th largest key
//                     (ties kept; all of them where fewer are left);
//   top_p (< 1):      of those, keep the tokens whose key is >= t, t the largest key
//                     whose kept mass at or above it is >= top_p × the top-k mass.
// The draw: r = floor(u · kept mass) with u = uniform(seed, step) (24 bits, SplitMix64 of
// seed and step), and the token is the first (in vocabulary order) whose running kept
// mass passes r. Masses are integers, so every sum is exact whatever its order: the same
// logits, seed and step give the same token on any GPU, on any launch, and in the CPU twin
// (`twins::sample`), which computes sample_exp with the same fused multiply-adds.
// About 10 passes over the row with both cuts (the bisection this replaced made ~80).
//
// A row may first be adjusted (its CPU twin: `Adjust::apply_after`): adjust[s] is
// 0xFFFFFFFF for none, else where the row's words start in `extra`: {n_deltas | CARRIED |
// REPEATED, mask_words, (token, delta as f32 bits) × n_deltas, mask words, when CARRIED
// (bit 31): fresh, alt × n_deltas, and when REPEATED (bit 30): factor, n_seen | LAST |
// BITS, seen × n_seen}. A repetition penalty first scales the seen tokens' logits (x /
// factor where x > 0, else x × factor), listed (sorted, each once) or with BITS (bit 30)
// as a bitmask of the vocabulary, whichever the host found shorter; with LAST (bit 31)
// the row's input token too where it is not seen. The deltas (penalties, logit bias; one per token) are
// added, then every token whose mask bit is clear (or past the mask's words) becomes −∞:
// a grammar's mask costs its bits in the step's staging copy instead of the row's logits
// read back. A carried row's input token (tokens[logit_rows[s]]: drawn by the step
// before, which the host had not seen when it planned this one) is counted by the
// penalties too: its delta is alt[j] if it is the j-th listed token, else fresh.
// The adjusted row is written to row s of `adjusted` and sampled from there: `logits`
// stays the model's, so that a row read back for its log-probabilities is the model's
// distribution whatever the row's penalties or grammar (the host keeps the device's draw).
// One pass copies the row with the mask applied; the repetition penalty then scales
// (a refused token's −∞ stays), and the deltas go only to allowed tokens (a refused
// token's delta would be lost to its −∞ anyway).
#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define FULL_WARP 0xffffffffu
// Copies of a radix level's histogram, warp w adding to copy w % SAMPLE_COPIES: most of
// a row's tokens fall in a few bins of the first level, whose atomics would otherwise
// all wait on each other.
#define SAMPLE_COPIES 8

// e^z for z <= 0 (0 below about e^-86.6, and for NaN): z = n·ln 2 + r (Cody and Waite's
// two-part ln 2), then Cephes' expf polynomial for e^r, all in explicit fused
// multiply-adds, times 2^n; so that the twin computes the same bits (relative error
// < 2e-7 against exp, and it never rises as z falls).
__device__ __forceinline__ float sample_exp(float z) {
    float t = z * 1.44269504088896341f;
    if (!(t >= -125.0f)) return 0.0f;
    float n = rintf(t);
    float r = fmaf(n, -0.693359375f, z);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float e = fmaf(p, r * r, r) + 1.0f;
    return e * __int_as_float(((int)n + 127) << 23);
}

// A repetition penalty's logit (twin: `Repeat::of`).
__device__ __forceinline__ float repeat_penalty(float factor, float x) {
    return x > 0.0f ? x / factor : x * factor;
}

// Whether sorted `list` of n tokens holds t.
__device__ __forceinline__ bool sorted_has(const u32* list, u32 n, u32 t) {
    u32 lo = 0, hi = n;
    while (lo < hi) {
        u32 mid = (lo + hi) >> 1;
        if (list[mid] < t)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && list[lo] == t;
}

// A token's mass: floor(p · 2^40).
__device__ __forceinline__ u64 sample_mass(float p) { return (u64)(p * 1099511627776.0f); }

__device__ __forceinline__ u32 sample_key(float p) { return (u32)__float_as_int(p); }

__device__ __forceinline__ u32 draw24(u64 seed, u32 step) {
    u64 z = seed + 0x9E3779B97F4A7C15ull * ((u64)step + 1ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (u32)(z >> 40);
}

// Inclusive sum over the warp's lanes, in lane order.
__device__ __forceinline__ u64 warp_scan(u64 v) {
    int lane = threadIdx.x & 31;
    for (int o = 1; o < 32; o <<= 1) {
        u64 u = __shfl_up_sync(FULL_WARP, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

// The lowest lane for which `yes` holds, or 32.
__device__ __forceinline__ int first_lane(bool yes) {
    int c = yes ? (threadIdx.x & 31) : 32;
    for (int o = 16; o > 0; o >>= 1) c = min(c, __shfl_xor_sync(FULL_WARP, c, o));
    return c;
}

// The warp's largest (value, index), the lowest index among equal values, in every lane.
__device__ __forceinline__ void warp_argmax(float& mx, int& mi) {
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(FULL_WARP, mx, o);
        int j = __shfl_xor_sync(FULL_WARP, mi, o);
        if (v > mx || (v == mx && j < mi)) {
            mx = v;
            mi = j;
        }
    }
}

// Whether token t is allowed by a row's mask of `mask_words` words (every token when it
// has none).
__device__ __forceinline__ bool sample_allowed(const u32* mask, u32 mask_words, u32 t) {
    if (mask_words == 0u) return true;
    u32 w = t >> 5;
    return w < mask_words && ((mask[w] >> (t & 31u)) & 1u);
}

// One radix level's answer (written by one lane of warp 0).
struct Select {
    u32 digit;  // the level's digit of the key
    u64 want;   // the weight the level looked for
    u64 above;  // the weight of the level's bins above `digit`
};

// One radix level, by warp 0: the digit d (from 255 down) at which the bins' running
// weight first reaches `want` (0 if none does), and the weight above it. With `top_p` >= 0
// (the first level of a top-p cut), `want` is top_p × the bins' total (at least 1).
__device__ __forceinline__ void select_digit(const u64* bin, u64 want, float top_p, Select* sel) {
    int lane = threadIdx.x & 31;
    // Lane l holds bins 255 − 8l down to 248 − 8l.
    u64 mine = 0;
    for (int j = 0; j < 8; ++j) mine += bin[255 - 8 * lane - j];
    u64 cum = warp_scan(mine);
    if (top_p >= 0.0f) {
        u64 w = (u64)((double)top_p * (double)__shfl_sync(FULL_WARP, cum, 31));
        want = w > 1ull ? w : 1ull;
    }
    int at = first_lane(cum >= want);
    if (lane == (at < 32 ? at : 31)) {
        u64 run = cum - mine;
        int d = 255 - 8 * lane, last = d - 7;
        for (; d > last; --d) {
            if (run + bin[d] >= want) break;
            run += bin[d];
        }
        sel->digit = (u32)d;
        sel->want = want;
        sel->above = run;
    }
}

// A token's key and weight in `sample`'s cuts: its probability's bits, and a count of 1
// or (`by_mass`) its integer mass.
struct ProbKey {
    const float* x;
    float mx, inv_t;
    bool by_mass;
    __device__ __forceinline__ bool at(int i, u32& key, u64& w) const {
        float p = sample_exp((x[i] - mx) * inv_t);
        key = sample_key(p);
        w = by_mass ? sample_mass(p) : 1ull;
        return true;
    }
};

// The largest key t among the tokens whose key is >= floor such that the weight (count,
// or mass when `top_p` >= 0) of those with key >= t reaches `want` (by mass: top_p × their
// total mass); `keys.at(i, key, weight)` gives token i's (false: a token that counts for
// nothing). Every thread of the block calls it and gets t.
template <class Keys>
__device__ u32 select_key(const Keys& keys, int vocab, u32 floor, u64 want, float top_p, u64* bin,
                          Select* sel) {
    u32 prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256 * SAMPLE_COPIES; i += blockDim.x) bin[i] = 0;
        __syncthreads();
        u64* mine = bin + 256 * ((threadIdx.x >> 5) % SAMPLE_COPIES);
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            u32 key;
            u64 w;
            if (keys.at(i, key, w) && key >= floor && (key & mask) == prefix)
                atomicAdd(&mine[(key >> shift) & 255u], w);
        }
        __syncthreads();
        for (int d = threadIdx.x; d < 256; d += blockDim.x)
            for (int c = 1; c < SAMPLE_COPIES; ++c) bin[d] += bin[256 * c + d];
        __syncthreads();
        if (threadIdx.x < 32) select_digit(bin, want, shift == 24 ? top_p : -1.0f, sel);
        __syncthreads();
        prefix |= sel->digit << shift;
        want = sel->want - sel->above;
        mask |= 255u << shift;
    }
    return prefix;
}

extern "C" __global__ void sample(const float* __restrict__ logits,
                                  float* __restrict__ adjusted, int vocab,
                                  const float* __restrict__ temperature,
                                  const int* __restrict__ top_k, const float* __restrict__ top_p,
                                  const float* __restrict__ min_p,
                                  const u64* __restrict__ seeds, const u32* __restrict__ steps,
                                  const u32* __restrict__ adjust, const u32* __restrict__ extra,
                                  const u32* __restrict__ tokens,
                                  const int* __restrict__ logit_rows, u32* __restrict__ out) {
    pdl_begin();
    __shared__ float best_v[SAMPLE_WARPS];
    __shared__ int best_i[SAMPLE_WARPS];
    __shared__ u64 bin[256 * SAMPLE_COPIES];
    __shared__ u64 warp_mass[SAMPLE_WARPS];
    __shared__ Select sel;
    __shared__ int pick_warp;
    __shared__ u64 pick_rest;
    __shared__ int listed;
    int s = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* x = logits + (size_t)s * vocab;
    u32 at = adjust[s];
    if (at != 0xFFFFFFFFu) {
        const u32* a = extra + at;
        u32 n_deltas = a[0] & 0x3fffffffu, mask_words = a[1];
        bool carried = (a[0] >> 31) != 0u, repeated = ((a[0] >> 30) & 1u) != 0u;
        const u32* mask = a + 2 + 2 * n_deltas;
        const u32* carry = mask + mask_words;
        const u32* rep = carry + (carried ? 1u + n_deltas : 0u);
        bool rep_last = repeated && (rep[1] >> 31) != 0u;
        float* y = adjusted + (size_t)s * vocab;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            y[i] = sample_allowed(mask, mask_words, (u32)i) ? x[i] : -INFINITY;
        u32 last = carried || rep_last ? tokens[logit_rows[s]] : 0u;
        if (carried && threadIdx.x == 0) listed = 0;  // the same for the whole block
        __syncthreads();
        if (repeated) {
            float factor = __int_as_float((int)rep[0]);
            u32 n_seen = rep[1] & 0x3fffffffu;
            bool bits = ((rep[1] >> 30) & 1u) != 0u;
            const u32* seen = rep + 2;
            if (bits) {
                for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                    if (n_seen > 0u && sample_allowed(seen, n_seen, (u32)i))
                        y[i] = repeat_penalty(factor, y[i]);
            } else {
                for (u32 j = threadIdx.x; j < n_seen; j += blockDim.x)
                    if (seen[j] < (u32)vocab) y[seen[j]] = repeat_penalty(factor, y[seen[j]]);
            }
            if (rep_last && threadIdx.x == 0 && last < (u32)vocab) {
                bool has = bits ? n_seen > 0u && sample_allowed(seen, n_seen, last)
                                : sorted_has(seen, n_seen, last);
                if (!has) y[last] = repeat_penalty(factor, y[last]);
            }
            __syncthreads();
        }
        for (u32 j = threadIdx.x; j < n_deltas; j += blockDim.x) {
            u32 t = a[2 + 2 * j], d = a[3 + 2 * j];
            if (carried && t == last) {
                d = carry[1 + j];
                listed = 1;
            }
            if (t < (u32)vocab && sample_allowed(mask, mask_words, t))
                y[t] += __int_as_float((int)d);
        }
        __syncthreads();
        if (carried) {
            if (threadIdx.x == 0 && !listed && last < (u32)vocab &&
                sample_allowed(mask, mask_words, last))
                y[last] += __int_as_float((int)carry[0]);
            __syncthreads();
        }
        x = y;
    }
    // The largest logit and its lowest index: each thread's (its elements rise), then the
    // warp's, then the block's.
    float mx = -INFINITY;
    int mi = vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (x[i] > mx || mi == vocab) {
            mx = x[i];
            mi = i;
        }
    warp_argmax(mx, mi);
    if (lane == 0) {
        best_v[warp] = mx;
        best_i[warp] = mi;
    }
    __syncthreads();
    int nw = blockDim.x >> 5;
    mx = lane < nw ? best_v[lane] : -INFINITY;
    mi = lane < nw ? best_i[lane] : vocab;
    warp_argmax(mx, mi);
    float temp = temperature[s];
    if (temp <= 0.0f || !(mx > -INFINITY)) {
        if (threadIdx.x == 0) out[s] = (u32)(mi < vocab ? mi : 0);
        return;
    }
    float inv_t = 1.0f / temp;
    int k = top_k[s];
    float tp = top_p[s], mp = min_p[s];
    u32 min_key = mp > 0.0f ? sample_key(fminf(mp, 1.0f)) : 0u;
    u32 keep = min_key;
    if (k > 0 && k < vocab)
        keep = max(min_key, select_key(ProbKey{x, mx, inv_t, false}, vocab, min_key, (u64)k,
                                       -1.0f, bin, &sel));
    if (tp < 1.0f)
        keep = max(keep, select_key(ProbKey{x, mx, inv_t, true}, vocab, keep, 0ull,
                                    fmaxf(tp, 0.0f), bin, &sel));
    // The draw. Warp w owns the elements [w·span, (w + 1)·span): their kept masses' sum,
    // then the warp holding the draw walks its span 32 elements at a time.
    int span = (vocab + nw - 1) / nw;
    int lo = warp * span, hi = min(vocab, lo + span);
    u64 m = 0;
    for (int i = lo + lane; i < hi; i += 32) {
        float p = sample_exp((x[i] - mx) * inv_t);
        if (sample_key(p) >= keep) m += sample_mass(p);
    }
    for (int o = 16; o > 0; o >>= 1) m += __shfl_xor_sync(FULL_WARP, m, o);
    if (lane == 0) warp_mass[warp] = m;
    __syncthreads();
    if (warp == 0) {
        u64 mine = lane < nw ? warp_mass[lane] : 0ull;
        u64 cum = warp_scan(mine);
        u64 total = __shfl_sync(FULL_WARP, cum, 31);
        u64 u = draw24(seeds[s], steps[s]);
        u64 r = (total >> 24) * u + (((total & 0xFFFFFFull) * u) >> 24);
        int w = first_lane(cum > r);
        if (lane == (w < 32 ? w : 0)) {
            pick_warp = w < 32 ? w : -1;
            pick_rest = r - (cum - mine);
        }
    }
    __syncthreads();
    if (warp != pick_warp) {
        if (pick_warp < 0 && threadIdx.x == 0) out[s] = (u32)mi;  // no mass kept: greedy
        return;
    }
    u64 rest = pick_rest, run = 0;
    for (int base = lo; base < hi; base += 32) {
        int i = base + lane;
        u64 mine = 0;
        if (i < hi) {
            float p = sample_exp((x[i] - mx) * inv_t);
            if (sample_key(p) >= keep) mine = sample_mass(p);
        }
        u64 cum = warp_scan(mine);
        int l = first_lane(run + cum > rest);
        if (l < 32) {
            if (lane == l) out[s] = (u32)i;
            return;
        }
        run += __shfl_sync(FULL_WARP, cum, 31);
    }
}

// Log-probabilities on the device (the OpenAI API's `logprobs`; CPU twin:
// `logprobs::token_logprobs`), so that a step reads back LOGPROB_WORDS words for a row
// instead of its logits (196 KB for SmolLM2's vocabulary). One block of SAMPLE_THREADS per
// scored row i: spec[3i .. 3i + 3] = {logits row, token, top}: the token whose
// log-probability is reported (LOGPROB_DRAWN: the one `sample` drew for the row,
// sampled[row]) and how many of the most likely tokens (at most LOGPROB_TOP). Over the
// model's logits (NaN counts as impossible): lse = max + log Σ e^(x − max), then
// out[i · LOGPROB_WORDS ..] = {token, its x − lse, n, its rank (how many logits are at
// least its own, itself included: vLLM's; 0 where it has none), then n pairs (id,
// x − lse), the largest logits first, equal ones by lower id}. The n-th largest logit is found by radix
// selection over keys that order as the logits do (`select_key`, as `sample`'s cuts); the
// tokens above it and the lowest-id ones equal to it are gathered and sorted.
#define LOGPROB_TOP 20
#define LOGPROB_WORDS (4 + 2 * LOGPROB_TOP)
#define LOGPROB_DRAWN 0xFFFFFFFFu

// A logit's key, ordered as the logits are (−0 as +0); NaN counts for nothing.
struct LogitKey {
    const float* x;
    __device__ __forceinline__ static u32 of(float v) {
        u32 u = (u32)__float_as_int(v);
        if ((u << 1) == 0u) u = 0u;
        return (u >> 31) ? ~u : (u | 0x80000000u);
    }
    __device__ __forceinline__ bool at(int i, u32& key, u64& w) const {
        float v = x[i];
        key = of(v);
        w = 1ull;
        return v == v;
    }
};

extern "C" __global__ void logprobs(const float* __restrict__ logits, int vocab,
                                    const u32* __restrict__ spec,
                                    const u32* __restrict__ sampled, u32* __restrict__ out) {
    pdl_begin();
    __shared__ float red[32];
    __shared__ u64 bin[256 * SAMPLE_COPIES];
    __shared__ Select sel;
    __shared__ int n_above;
    __shared__ u32 warp_eq[SAMPLE_WARPS];
    __shared__ int cand[LOGPROB_TOP];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    u32 row = spec[3 * blockIdx.x], token = spec[3 * blockIdx.x + 1];
    int top = min((int)spec[3 * blockIdx.x + 2], LOGPROB_TOP);
    const float* x = logits + (size_t)row * vocab;
    u32* o = out + (size_t)blockIdx.x * LOGPROB_WORDS;
    if (token == LOGPROB_DRAWN) token = sampled[row];
    float t = token < (u32)vocab ? x[token] : __int_as_float(0x7fc00000);
    // The normalizer, how many logits are numbers, and how many are at least the token's
    // (exact as floats up to 2^24).
    float mx = -INFINITY, valid = 0.0f, at_least = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = x[i];
        mx = fmaxf(mx, v);
        valid += v == v ? 1.0f : 0.0f;
        at_least += v >= t ? 1.0f : 0.0f;
    }
    mx = block_max(mx, red);
    valid = block_sum(valid, red);
    at_least = block_sum(at_least, red);
    float sum = 0.0f;
    if (mx > -INFINITY && mx < INFINITY)
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float v = x[i];
            if (v == v) sum += expf(v - mx);
        }
    sum = block_sum(sum, red);
    float lse = mx > -INFINITY && mx < INFINITY ? mx + logf(sum) : mx;
    int n = min(top, (int)valid);
    if (threadIdx.x == 0) n_above = 0;
    __syncthreads();
    if (n > 0) {
        u32 kth = select_key(LogitKey{x}, vocab, 0u, (u64)n, -1.0f, bin, &sel);
        // The tokens above the n-th largest (fewer than n), in any order.
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float v = x[i];
            if (v == v && LogitKey::of(v) > kth) cand[atomicAdd(&n_above, 1)] = i;
        }
        // Then the lowest-id ones equal to it: warp w counts its span's, and takes its
        // share of the places left in the order of the spans.
        int span = (vocab + nw - 1) / nw;
        int lo = warp * span, hi = min(vocab, lo + span);
        u64 eq = 0;
        for (int i = lo + lane; i < hi; i += 32) {
            float v = x[i];
            eq += v == v && LogitKey::of(v) == kth;
        }
        for (int s = 16; s > 0; s >>= 1) eq += __shfl_xor_sync(FULL_WARP, eq, s);
        if (lane == 0) warp_eq[warp] = (u32)eq;
        __syncthreads();
        int need = n - n_above;
        u64 before = 0;
        for (int w = 0; w < warp; ++w) before += warp_eq[w];
        for (int base = lo; base < hi && (int)before < need; base += 32) {
            int i = base + lane;
            float v = i < hi ? x[i] : 0.0f;
            u64 mine = i < hi && v == v && LogitKey::of(v) == kth;
            u64 cum = warp_scan(mine);
            u64 at = before + cum - 1;
            if (mine && (int)at < need) cand[n_above + (int)at] = i;
            before += __shfl_sync(FULL_WARP, cum, 31);
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    // Largest first, equal logits by lower id.
    for (int a = 1; a < n; ++a) {
        int c = cand[a], b = a;
        for (; b > 0; --b) {
            float p = x[cand[b - 1]], v = x[c];
            if (p > v || (p == v && cand[b - 1] < c)) break;
            cand[b] = cand[b - 1];
        }
        cand[b] = c;
    }
    o[0] = token;
    o[1] = (u32)__float_as_int(t == t ? t - lse : -INFINITY);
    o[2] = (u32)n;
    o[3] = (u32)at_least;
    for (int j = 0; j < n; ++j) {
        o[4 + 2 * j] = (u32)cand[j];
        o[5 + 2 * j] = (u32)__float_as_int(x[cand[j]] - lse);
    }
}
