// The `gemv` kernels' device code (the entry points are gemv.cu, which the Rust side
// compiles after this file as one program: `SOURCES` in kernels/src/cuda/mod.rs; the
// emulator's build includes every .cuh before the .cu files).
//
// Products for a few rows: y[r, j] = x[r, :] · w[j, :] for r < m, f16 inputs, f32
// accumulation and output — the step's product (`y = x · wᵀ`, as cuBLAS computes it) for
// decode steps of few sequences, where reading the weights once is all the work. A
// candidate against cuBLAS: at load the backend times whole decode steps each way (cuBLAS,
// f16 rows, the file's blocks) and keeps the fastest per row count (`gpu_bench` also
// times each product each way).
//
// On tensor cores, with the weights as the wide operand: one mma.m16n8k16 takes 16 output
// columns (A: 16 rows of weights) by 8 input rows (B: the staged x; a second mma with the
// same A for rows 8 .. 15), so a weight costs a fraction of an instruction. (With a fused
// multiply-add a weight and input row, and a conversion a weight of the file's blocks, the
// CUDA cores could not issue fast enough to keep up with the memory: BENCHMARKS.md, "The
// small products on tensor cores".) The k order within each block of 32 is permuted
// alike for both operands (a dot product does not care): lane (g, t) of the mma's fragment
// layout holds inputs and weights 8t .. 8t + 7 of the block, so that its piece of
// weights is one 16-byte (f16), 8-byte (8-bit) or 4-byte (4-bit) load, and its inputs
// one 16-byte load from shared memory (with a scale per 16, inputs and weights 4t .. 4t + 3
// and 16 + 4t .. 16 + 4t + 3: the inputs two 8-byte loads).
//
// A block of 8 warps takes a group of 16 columns at a time (grid-stride over the groups),
// its warps splitting the group's blocks of 32 (warp w: blocks w, w + 8, ...), their sums
// added in a fixed order (the same bits whatever the grid); the inputs are staged once per
// block as f16, with each block of 32's sum (for the blocks' offsets), in dynamic shared
// memory sized by the launch (`gemv::shared_bytes`: ~17 bytes a weight of a row at 8
// rows, so rows up to ~13,000 wide on Hopper's 227 KB at 8 rows, ~6,500 at 16). Needs m <= GEMV_MAX_ROWS and k a
// multiple of 32; n any. The n columns may be part of wider output rows (GemvOut: ldy
// apart, from column j0), so that a stack whose parts need different kernels (Q4_K_M's
// QKV: Q4_K Q and K, Q6_K V) is a launch a part, each writing its columns. Rows too wide
// to stage whole (Llama-3-8B's ffn_down, 14,336, at 8-16 rows) are read in runs of their
// columns (GemvShared's k0, kt; `gemv::column_run`), a launch a run, each after the first
// adding its sums to y (GemvOut::add); with RoPE, the last run's epilogue rotates the
// whole sums.
//
// Three entry points fuse the kernels around the product into it, so that a decode step
// of few rows launches 5 kernels per layer instead of 9: `gemv_f16_norm` (add_rmsnorm,
// then the product), `gemv_f16_norm_rope` (the same, then rope_kv_write: the QKV
// product) and `gemv_f16_swiglu` (swiglu, then the product). Each block computes the
// input rows itself (a few thousand floats, from L2), and the epilogue its pairs, with the
// unfused kernels' arithmetic (the helpers in common.cuh), so the results have the same
// bits as the kernels launched one after the other.
//
// Each of the four reads its weights as f16 rows (`gemv_f16*`) or as the file's own 4-,
// 5- or 8-bit blocks (`gemv_q4*`, `gemv_q5*`, `gemv_q8*`: WeightsQ4, WeightsQ5, WeightsQ8
// below; the K-quants' under factored or f32 scales, `gemv_q4f*`, `gemv_q5f*`, `gemv_q8f*`,
// `gemv_q8h*`, `gemv_q4f32*`, ...; Q6_K's at 6 bits, `gemv_q6h*`: WeightsHighT; IQ4's levels
// from 4-bit indices, `gemv_iq4*`, `gemv_iq4f*`: WeightsIq4; Q4_0's, Q5_0's, Q8_0's and
// IQ4_NL's under their scales alone, `gemv_q4s*`, ...: ScalesF16D; Q3_K's at 4 bits
// under its scales per 16, `gemv_q4h*`: WeightsQ4H; Q2_K's at 2 bits under its scales
// and offsets per 16, `gemv_q2h*`: WeightsQ2H), one template.
#define GEMV_MAX_ROWS 16
#define GEMV_WARPS 8

// Staged inputs' row stride in halves: k, or k + 32 where k is a multiple of 64, so that
// rows g and g + 1 lie 64 bytes apart in the banks (a quarter warp's 16-byte loads, two
// rows of 64 bytes, in 32 distinct banks).
__device__ __forceinline__ int gemv_stride(int k) { return k % 64 ? k : k + 32; }

// The block's shared memory (dynamic: the launch sizes it, gemv::shared_bytes mirrors
// this layout): the warps' sums of a group, the m staged input rows (f16,
// `gemv_stride(k)` halves apart), and each row's sums over its blocks of 32 (for the
// blocks' offsets).
// On the emulator, one area of the most a block may have, for every gemv kernel.
#ifdef TOLLGATE_EMU
#define gemv_smem (::emu::shared_var<char[227 * 1024], 0>())
#else
extern __shared__ __align__(16) char gemv_smem[];
#endif

struct GemvShared {
    half_t* x;
    float* xsum;
    // Factored scales (ScalesFactored) staged for the group at hand: block b's, the lane's
    // columns g and g + 8, at sc[8b + g] (d, m of column g, then of g + 8).
    float4* sc;
    float (*part)[8][32];
    int m;
    // The product's k columns are columns k0 .. k0 + k of the input rows (and of the
    // weights' rows), which are kt long: a product over rows too wide for the shared
    // memory is a launch a run of columns, each adding its sums (gemv::shared_bytes).
    int k0, kt;
};

// The layout for m rows of k of weights W (with factored scales, W::STAGED, their pairs
// staged after the sums); a launch that gave the block less than it takes traps (the host
// sizes it by the same arithmetic, gemv::shared_bytes).
template <typename W>
__device__ __forceinline__ GemvShared gemv_shared(const W&, int m, int k, int k0, int kt) {
    // The warps' sums first, at a fixed place: their address is a constant, not a
    // register held through the product's loop.
    constexpr size_t PART = sizeof(float) * GEMV_WARPS * 8 * 32;
    GemvShared sh;
    sh.part = reinterpret_cast<float(*)[8][32]>(gemv_smem);
    sh.x = reinterpret_cast<half_t*>(gemv_smem + PART);
    // With an offset per 16 (W::HALVES and W::OFFSETS: ScalesHalfPairs), the inputs' sums
    // per 16 and two staged float4s a block and column pair.
    constexpr size_t PER16 = W::HALVES && W::OFFSETS ? 2 : 1;
    size_t x_bytes = (size_t)m * gemv_stride(k) * 2;
    sh.xsum = reinterpret_cast<float*>(gemv_smem + PART + x_bytes);
    sh.m = m;
    sh.k0 = k0, sh.kt = kt;
    size_t sums_end = PART + x_bytes + ((size_t)m * (k / 32) * 4 * PER16 + 15) / 16 * 16;
    sh.sc = reinterpret_cast<float4*>(gemv_smem + sums_end);
    size_t end = sums_end + (W::STAGED ? (size_t)(k / 32) * 8 * sizeof(float4) * PER16 : 0);
#ifdef TOLLGATE_EMU
    unsigned have = dynamic_smem_size();
#else
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
#endif
    if (end > have) __trap();
    return sh;
}

// L2 prefetches of [p, p + bytes) by the block's threads, a 128-byte line each.
__device__ __forceinline__ void prefetch_span(const void* p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const char* c = static_cast<const char*>(p);
    for (int o = threadIdx.x * 128; o < bytes; o += blockDim.x * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + o));
#endif
}

// Lane (g, t)'s 8 inputs of block b from staged row r0 + g, as four pairs of halves:
// inputs 8t .. 8t + 7, or with HALVES (weights with a scale per 16, whose first mma must
// take the block's first 16) inputs 4t .. 4t + 3 and 16 + 4t .. 16 + 4t + 3. Past the m
// rows, row m − 1's again: an mma's B column (an input row) makes only its own output row,
// and the rows past m are never written out (gemv_columns), so no predicate, no zeros —
// and the row's address does not change from block to block.
template <bool HALVES>
__device__ __forceinline__ uint4 input_piece(const GemvShared& sh, int stride, int b, int lane,
                                             int r0) {
    int r = min(r0 + (lane >> 2), sh.m - 1);
    const half_t* row = sh.x + r * stride + b * 32;
    if constexpr (HALVES) {
        uint2 lo = *reinterpret_cast<const uint2*>(row + (lane & 3) * 4);
        uint2 hi = *reinterpret_cast<const uint2*>(row + 16 + (lane & 3) * 4);
        return uint4{lo.x, lo.y, hi.x, hi.y};
    } else {
        return *reinterpret_cast<const uint4*>(row + (lane & 3) * 8);
    }
}

// A matrix's weights as the product reads them: `load(G, b, lane)` reads the lane's part
// of column group G's block b of 32 (columns 16G + g and 16G + g + 8, weights 8t .. 8t + 7),
// `add(tile, xb, xs0, xs1, acc)` adds the block's products to the lane's four sums (column
// g by input rows 2t, 2t + 1; column g + 8 by the same), with xb the lane's staged inputs
// and xs0, xs1 input rows 2t and 2t + 1's sums over the block. `prefetch` asks L2 for a
// group's bytes. f16 rows (the default, dequantized at load) here; the file's own 4- and
// 8-bit blocks below (WeightsQ4, WeightsQ8).
struct WeightsF16 {
    const half_t* __restrict__ w;  // from the product's first column
    int k, n, kt;                   // kt: the rows' length (k where they are read whole)
    static constexpr bool SCALED = false, OFFSETS = false, HALVES = false, STAGED = false;
    static constexpr int BATCH = 4;  // blocks of 32 a warp loads before it uses the first
    struct Tile {
        uint4 lo, hi;
    };
    __device__ __forceinline__ Tile load(int G, int b, int lane) const {
        int j = 16 * G + (lane >> 2), c = b * 32 + (lane & 3) * 8;
        Tile v = {{0, 0, 0, 0}, {0, 0, 0, 0}};
        if (j < n) v.lo = *reinterpret_cast<const uint4*>(w + (size_t)j * kt + c);
        if (j + 8 < n) v.hi = *reinterpret_cast<const uint4*>(w + (size_t)(j + 8) * kt + c);
        return v;
    }
    __device__ __forceinline__ void frags(const Tile& v, u32 (&a0)[4], u32 (&a1)[4]) const {
        a0[0] = v.lo.x, a0[1] = v.hi.x, a0[2] = v.lo.y, a0[3] = v.hi.y;
        a1[0] = v.lo.z, a1[1] = v.hi.z, a1[2] = v.lo.w, a1[3] = v.hi.w;
    }
    __device__ __forceinline__ void prefetch(int G) const {
        if (16 * G >= n) return;
        int rows = min(16, n - 16 * G);
        if (k == kt) {
            prefetch_span(w + (size_t)16 * G * k, rows * k * 2);
        } else {
            for (int r = 0; r < rows; ++r) prefetch_span(w + (size_t)(16 * G + r) * kt, k * 2);
        }
    }
};

// The file's own quantized blocks, for the same products (`gemv_q4*`, `gemv_q8*`): a
// decode step of few rows is the reading of its weights, and these are 5 or 9 bits a
// weight where f16 is 16 (the load-time timing chooses between them). Laid out at load
// (`gemv::QuantRows`) in tiles of 16 columns by a block of 32, each lane's part in one
// load; s holds each tile's 16 columns' scale d and offset m as f16 pairs (low half d).
// A weight is d · q + m — the value the file's block dequantizes to: the tensor cores
// multiply the exact q (small integers, exact in f16) by the inputs, and the epilogue of
// each block adds d times that sum and m times the inputs' sum over the block, in f32.
// With `center`, blk holds the sums of (q − center) · x, and the offset is m + center · d
// (exact in f32): the two terms then cancel less where the inputs' sum is large.
//
// The K-quant layouts' scales are products of two of the file's numbers (a super-block's
// f16 d times a sub-block's 6-bit scale: 17 significant bits, or Q6_K's 8-bit scale per
// 16), which f16 would round. They are held factored as the file does (ScalesFactored
// below): each column's block of 32 two signed bytes, its scale's and its offset's
// multiples (`gemv_q4f*` for Q4_K, `gemv_q8f*` for Q5_K, IQ4_XS), or, a scale per 16 and
// no offset, its two halves' (`gemv_q8h*`, Q6_K: the block's first mma takes its first
// 16 weights, its second the others, each sum under its own scale); each column's 8
// blocks of 32 (a super-block of 256) an f16 pair they multiply. d · n is exact in f32
// (11 bits by 8), so the weights are the file's own values: 4.625 bits a weight at 4
// bits, 8.625 at 8. The block's threads make a column group's pairs once, into shared
// memory (stage_scales), where each lane's tile reads its four floats in one load. As f32
// pairs (ScalesF32 below: `gemv_q4f32*`, `gemv_q8f32*`, `gemv_q8h32*`), 2 bits a weight,
// the tiles carry them: what does not factor, and the same products to time against.
__device__ __forceinline__ void scale_pair(u32 s, float& d, float& m) {
    d = h2f((half_t)(s & 0xffffu)), m = h2f((half_t)(s >> 16));
}
__device__ __forceinline__ void scale_pair(uint2 s, float& d, float& m) {
    d = __uint_as_float(s.x), m = __uint_as_float(s.y);
}
__device__ __forceinline__ void scale_pair(unsigned short s, float& d, float& m) {
    d = h2f((half_t)s), m = 0.0f;
}

// How a tile's columns hold their scales: `Held` the lane's (columns g and g + 8) as
// loaded with its weights (nothing where STAGED: ScalesFactored), `load(s, nb, G, B, g)`
// reading them for column group G's block B of the rows' nb (s: the whole rows' scales),
// `pairs` making the two columns' (d, m), and `prefetch` asking L2 for a group's blocks
// B0 .. B0 + blocks.
//
// A pair a column and block, its blocks' 16 in order: Word u32, f16 d and m (Q4_0, Q4_1,
// Q8_0 and the layouts converted to them with the same values: ScalesF16), or uint2, f32
// d and m (the K-quant layouts' scales unfactored, 2 bits a weight: ScalesF32,
// `gemv_q4f32*`, `gemv_q8f32*`, `gemv_q8h32*`, to be timed against the factored ones,
// which take fewer bytes); or a scale d alone, no offset (m = 0 after the tensor cores'
// centring: Q8_0's and IQ4_NL's m, Q4_0's −8d, Q5_0's −16d), Word unsigned short, an f16
// (ScalesF16D: `gemv_q4s*`, `gemv_q5s*`, `gemv_q8s*`, `gemv_iq4s*`; half the bytes of f16
// pairs, and no inputs' sums to add).
template <typename Word>
struct ScalesPairs {
    static constexpr bool STAGED = false, OFFSETS = sizeof(Word) != 2;
    struct Held {
        Word lo, hi;
    };
    static __device__ __forceinline__ Held load(const u32* __restrict__ s, int nb, int G, int B,
                                                int g) {
        const Word* t = reinterpret_cast<const Word*>(s) + ((size_t)G * nb + B) * 16 + g;
        return Held{t[0], t[8]};
    }
    static __device__ __forceinline__ void pairs(const Held& h, float& d0, float& m0, float& d1,
                                                 float& m1) {
        scale_pair(h.lo, d0, m0);
        scale_pair(h.hi, d1, m1);
    }
    static __device__ __forceinline__ void prefetch(const u32* s, int nb, int G, int B0,
                                                    int blocks) {
        constexpr int WORDS = (int)sizeof(Word) * 16 / 4;  // a block's
        prefetch_span(s + ((size_t)G * nb + B0) * WORDS, blocks * WORDS * 4);
    }
};
using ScalesF16 = ScalesPairs<u32>;
using ScalesF32 = ScalesPairs<uint2>;
using ScalesF16D = ScalesPairs<unsigned short>;


// Factored: a group's words are its blocks' (WORDS a block), then its super-blocks' (16
// each, 8 blocks a super-block: words 2g, 2g + 1 hold columns g and g + 8's f16 pairs D,
// M); column c's block is d = D · n_d, m = M · n_m, exact in f32, with n_d, n_m signed
// bytes of the block's words:
// - WORDS 8 (ScalesFactored): word g holds columns g and g + 8's n_d, n_m, of column g
//   then of g + 8. With a scale per 16, n_d and n_m are the halves' multiples, D and M
//   their factors.
// - WORDS 16 (ScalesHalfPairs: Q2_K's `d · sc` and `−dmin · m` for each 16, a scale and
//   an offset a half): words 2g, 2g + 1 hold columns g's and g + 8's, the halves' n_d,
//   then their n_m.
// Staged (stage_scales): the block's threads make each pair of a group once, into shared
// memory, and a lane reads its tile's four floats there in one load (two float4s with
// WORDS 16: the halves' d of columns g and g + 8, then their m; the four lanes of a
// column pair would otherwise each make the same, a conversion and a product each,
// beside the weights' loads); the tiles hold no scales.
template <int WORDS>
struct ScalesFactoredT {
    static constexpr bool STAGED = true, OFFSETS = true;
    struct Held {};
    static __device__ __forceinline__ size_t group_words(int nb) {
        return (size_t)nb * WORDS + (size_t)(nb + 7) / 8 * 16;
    }
    static __device__ __forceinline__ Held load(const u32* __restrict__, int, int, int, int) {
        return Held{};
    }
    // Columns g and g + 8's scales of the blocks B0 .. B0 + 7 of column group G's rows of
    // nb (a super-block of them), those the product takes (kb0 <= B < kb1), each to
    // out(b, ...) with b = B − kb0: (d0, m0, d1, m1), or with WORDS 16 two float4s (the
    // halves' d of column g, then of g + 8; then their m); the super-block's pairs (D, M)
    // made once.
    template <typename Out>
    static __device__ __forceinline__ void super_block(const u32* __restrict__ s, int nb,
                                                       int G, unsigned B0, unsigned g,
                                                       unsigned kb0, unsigned kb1, Out out) {
        const u32* base = s + (size_t)G * group_words(nb);
        // The super-blocks' words after the blocks': a uint2 a column pair, 8 a super-block.
        uint2 sup = reinterpret_cast<const uint2*>(base + (size_t)nb * WORDS)[B0 / 8 * 8 + g];
        float D0 = h2f((half_t)(sup.x & 0xffffu)), M0 = h2f((half_t)(sup.x >> 16));
        float D1 = h2f((half_t)(sup.y & 0xffffu)), M1 = h2f((half_t)(sup.y >> 16));
        auto byte = [](u32 w, int i) { return (float)(signed char)(w >> (8 * i)); };
#pragma unroll
        for (unsigned i = 0; i < 8; ++i) {
            unsigned B = B0 + i;
            if (B < kb0 || B >= kb1) continue;
            if constexpr (WORDS == 8) {
                u32 n = base[(size_t)B * 8 + g];
                out(B - kb0, D0 * byte(n, 0), M0 * byte(n, 1), D1 * byte(n, 2), M1 * byte(n, 3));
            } else {
                uint2 n = reinterpret_cast<const uint2*>(base)[(size_t)B * 8 + g];
                out(B - kb0,
                    float4{D0 * byte(n.x, 0), D0 * byte(n.x, 1), D1 * byte(n.y, 0), D1 * byte(n.y, 1)},
                    float4{M0 * byte(n.x, 2), M0 * byte(n.x, 3), M1 * byte(n.y, 2), M1 * byte(n.y, 3)});
            }
        }
    }
    static __device__ __forceinline__ void prefetch(const u32* s, int nb, int G, int B0,
                                                    int blocks) {
        const u32* base = s + (size_t)G * group_words(nb);
        prefetch_span(base + (size_t)B0 * WORDS, blocks * WORDS * 4);
        prefetch_span(base + (size_t)nb * WORDS, (nb + 7) / 8 * 64);
    }
};
using ScalesFactored = ScalesFactoredT<8>;
using ScalesHalfPairs = ScalesFactoredT<16>;

// A block's sums (columns g, g + 8 by input rows 2t, 2t + 1) under its columns' scales
// sc (d, m of column g, then of g + 8; tile_scales): d times the sums plus m times the
// inputs' sums over the block.
__device__ __forceinline__ void scale_block(const float (&blk)[4], const float (&sc)[4], float xs0,
                                            float xs1, float (&acc)[4]) {
    acc[0] = fmaf(sc[0], blk[0], fmaf(sc[1], xs0, acc[0]));
    acc[1] = fmaf(sc[0], blk[1], fmaf(sc[1], xs1, acc[1]));
    acc[2] = fmaf(sc[2], blk[2], fmaf(sc[3], xs0, acc[2]));
    acc[3] = fmaf(sc[2], blk[3], fmaf(sc[3], xs1, acc[3]));
}

// A block's two halves' sums (lo: weights 0 .. 15, hi: 16 .. 31) under their scales (sc:
// column g's two, then column g + 8's).
__device__ __forceinline__ void scale_halves(const float (&lo)[4], const float (&hi)[4],
                                             const float (&sc)[4], float (&acc)[4]) {
    acc[0] = fmaf(sc[1], hi[0], fmaf(sc[0], lo[0], acc[0]));
    acc[1] = fmaf(sc[1], hi[1], fmaf(sc[0], lo[1], acc[1]));
    acc[2] = fmaf(sc[3], hi[2], fmaf(sc[2], lo[2], acc[2]));
    acc[3] = fmaf(sc[3], hi[3], fmaf(sc[2], lo[3], acc[3]));
}

// A lane's part of a tile of 4 + HIGH bits: its two columns' low 4 bits as at 4 bits
// (words 2l, 2l + 1 of the tile), and their high bits (TileShape below).
template <int HIGH>
struct HighWords {
    uint2 lo;
    u32 high;
};

// A tile's words, and a lane's part of it: Words in order (uint2 at 4 bits, uint4 at 8),
// or at 5 and 6 bits the 64 words of low bits and 16 · HIGH of high bits: at 6 the lane's
// word of them; at 5 word l / 2, which holds lanes 2i's and 2i + 1's halves, shifted so
// that the lane's are bits 0 .. 7 and 16 .. 23.
template <typename Words>
struct TileShape {
    static constexpr int WORDS = (int)sizeof(Words) / 4 * 32;
    static __device__ __forceinline__ Words piece(const u32* tile, int lane) {
        return reinterpret_cast<const Words*>(tile)[lane];
    }
};
template <int HIGH>
struct TileShape<HighWords<HIGH>> {
    static constexpr int WORDS = 64 + 16 * HIGH;
    static __device__ __forceinline__ HighWords<HIGH> piece(const u32* tile, int lane) {
        u32 high = HIGH == 2 ? tile[64 + lane] : tile[64 + lane / 2] >> (8 * (lane & 1));
        return HighWords<HIGH>{reinterpret_cast<const uint2*>(tile)[lane], high};
    }
};

// The file's blocks in tiles of the fragments' shape (`gemv::QuantRows`), Words a lane's
// part of a tile (uint2 at 4 bits, HighWords at 5 and 6, uint4 at 8), S how the columns hold their
// scales (ScalesF16, ScalesFactored): loading them and their scales, and the L2 prefetch
// of a group's, are the same for every size (WeightsQ4, WeightsQ5, WeightsQ8 below).
template <typename Words, typename S>
struct BlockTiles {
    const u32* __restrict__ q;  // from the product's first block of 32 (tiles_from)
    const u32* __restrict__ s;  // the whole rows' scales
    int k, n, kt, kb0;          // kb0: the product's first block of the rows' kt / 32
    static constexpr bool SCALED = true, OFFSETS = S::OFFSETS, HALVES = false, STAGED = S::STAGED;
    static constexpr int TILE_WORDS = TileShape<Words>::WORDS;
    using Scales = S;
    struct Tile {
        Words w;
        typename S::Held s;
    };
    __device__ __forceinline__ Tile load(int G, int b, int lane) const {
        size_t tile = (size_t)G * (kt / 32) + b;
        return Tile{TileShape<Words>::piece(q + tile * TILE_WORDS, lane),
                    S::load(s, kt / 32, G, kb0 + b, lane >> 2)};
    }
    __device__ __forceinline__ void prefetch(int G) const {
        if (16 * G >= n) return;
        size_t tiles = (size_t)G * (kt / 32);
        prefetch_span(q + tiles * TILE_WORDS, k / 32 * TILE_WORDS * 4);
        S::prefetch(s, kt / 32, G, kb0, k / 32);
    }
};

// 4-bit (Q4_0 with m = −8d, Q4_1; Q4_K's sub-blocks with factored scales): a tile is 64
// words, lane l's two (columns g, g + 8) at 2l, 2l + 1; weights 2p and 2p + 1 of a piece
// in bits 4p and 16 + 4p, so that one mask and an or with 1024's bits make the pair
// 1024 + q as halves. The tensor cores take q − 8 (Q4_0's offset is then 0).
template <typename S>
struct WeightsQ4T : BlockTiles<uint2, S> {
    using Tile = typename BlockTiles<uint2, S>::Tile;
    static constexpr int BATCH = 6;
    static constexpr float CENTER = 8.0f;
    static __device__ __forceinline__ u32 pair(u32 word, int p) {
        return hsub2(and_or(word >> (4 * p), 0x000f000fu, 0x64006400u), 0x64086408u);
    }
    __device__ __forceinline__ void frags(const Tile& v, u32 (&a0)[4], u32 (&a1)[4]) const {
        a0[0] = pair(v.w.x, 0), a0[1] = pair(v.w.y, 0), a0[2] = pair(v.w.x, 1), a0[3] = pair(v.w.y, 1);
        a1[0] = pair(v.w.x, 2), a1[1] = pair(v.w.y, 2), a1[2] = pair(v.w.x, 3), a1[3] = pair(v.w.y, 3);
    }
};
using WeightsQ4 = WeightsQ4T<ScalesF16>;
using WeightsQ4S = WeightsQ4T<ScalesF16D>;
using WeightsQ4F = WeightsQ4T<ScalesFactored>;
using WeightsQ4F32 = WeightsQ4T<ScalesF32>;

// 4-bit integers with a scale per 16, factored (Q3_K's, `gemv_q4h*`: its 3-bit q, or the
// CPU's sc·q over the greatest divisor of each 16, + 8): pieces as with Q6_K's scale per
// 16, the tensor cores taking q − 8; no offsets.
struct WeightsQ4H : WeightsQ4T<ScalesFactored> {
    static constexpr bool OFFSETS = false, HALVES = true;
};

// 2-bit integers with a scale and an offset per 16, factored (Q2_K's q under d · sc and
// −dmin · m, `gemv_q2h*`: 3.125 bits a weight where f16 rows take 16): a tile is 32 words,
// lane l's word l its 8 weights of column g and 8 of g + 8 (pieces as with a scale per
// 16), weights 2p and 2p + 1 of column H's (0: g, 1: g + 8) at bits 2(4H + p) and 16 +
// 2(4H + p), so that a shift, a mask and an or with 1024's bits make the pair 1024 + q as
// halves. The tensor cores take q − 2; each half's offset then adds m + 2d times the
// inputs' sum over the half (stage_sums makes them per 16).
struct WeightsQ2H : BlockTiles<u32, ScalesHalfPairs> {
    using Tile = typename BlockTiles<u32, ScalesHalfPairs>::Tile;
    static constexpr bool HALVES = true;
    static constexpr int BATCH = 8;
    static constexpr float CENTER = 2.0f;
    template <int H, int P>
    static __device__ __forceinline__ u32 pair(u32 word) {
        return hsub2(and_or(word >> (2 * (4 * H + P)), 0x00030003u, 0x64006400u), 0x64026402u);
    }
    __device__ __forceinline__ void frags(const Tile& v, u32 (&a0)[4], u32 (&a1)[4]) const {
        u32 w = v.w;
        a0[0] = pair<0, 0>(w), a0[1] = pair<1, 0>(w), a0[2] = pair<0, 1>(w), a0[3] = pair<1, 1>(w);
        a1[0] = pair<0, 2>(w), a1[1] = pair<1, 2>(w), a1[2] = pair<0, 3>(w), a1[3] = pair<1, 3>(w);
    }
};

// 5- and 6-bit integers (HIGH bits past the low 4): the low 4 bits as at 4 bits, the high
// bits of the lane's 16 weights (HighWords) placed so that one constant shift (`at` − 4)
// puts pair p's (weights 2p, 2p + 1) at bits 4 and 20 (and 5, 21): or'ed into the pair,
// 1024 + q as halves.
// - 5 bits (Q5_1's integers 0 .. 31 under f16 pairs, `gemv_q5*`; Q5_K's under factored
//   scales, `gemv_q5f*`; Q5_0's under its scale alone, `gemv_q5s*`): pair p's of column g
//   at bits p and 16 + p, of column g + 8 at 4 + p and 20 + p. The tensor cores take q
//   itself, as the 8-bit kernels do the same integers (the same sums, the same bits);
//   without offsets, q − 16.
// - 6 bits (Q6_K's integers, q − 32 for q in 0 .. 63, under factored scales per 16,
//   `gemv_q6h*`): pieces as with a scale per 16; pair p's of column g at bits 4 + 2p and
//   20 + 2p, of column g + 8 at 12, 14, 0, 2 and 16 more for p = 0 .. 3 (the 16 bits column
//   g leaves). The tensor cores take q − 32, the 8-bit form's integers (the same sums, the
//   same bits), 6.625 bits a weight where that takes 8.625.
template <typename S, int HIGH>
struct WeightsHighT : BlockTiles<HighWords<HIGH>, S> {
    using Tile = typename BlockTiles<HighWords<HIGH>, S>::Tile;
    static constexpr bool OFFSETS = HIGH == 1 && S::OFFSETS, HALVES = HIGH == 2;
    static constexpr int BATCH = 6;
    static constexpr float CENTER = 0.0f;
    static constexpr u32 MASK = HIGH == 2 ? 0x00300030u : 0x00100010u;
    static constexpr u32 BIAS = HIGH == 2 ? 0x64206420u : S::OFFSETS ? 0x64006400u : 0x64106410u;
    // Column H's (0: g, 1: g + 8) pair P: 1024 + q − BIAS as halves.
    template <int H, int P>
    static __device__ __forceinline__ u32 pair(u32 word, u32 high) {
        constexpr int at = HIGH == 1 ? (H == 0 ? P : 4 + P)
                                     : (H == 0 ? 4 + 2 * P : (P < 2 ? 12 + 2 * P : 2 * P - 4));
        u32 h = at >= 4 ? high >> (at - 4) : high << (4 - at);
        u32 top = and_or(h, MASK, 0x64006400u);
        return hsub2(and_or(word >> (4 * P), 0x000f000fu, top), BIAS);
    }
    __device__ __forceinline__ void frags(const Tile& v, u32 (&a0)[4], u32 (&a1)[4]) const {
        u32 x = v.w.lo.x, y = v.w.lo.y, h = v.w.high;
        a0[0] = pair<0, 0>(x, h), a0[1] = pair<1, 0>(y, h);
        a0[2] = pair<0, 1>(x, h), a0[3] = pair<1, 1>(y, h);
        a1[0] = pair<0, 2>(x, h), a1[1] = pair<1, 2>(y, h);
        a1[2] = pair<0, 3>(x, h), a1[3] = pair<1, 3>(y, h);
    }
};
using WeightsQ5 = WeightsHighT<ScalesF16, 1>;
using WeightsQ5S = WeightsHighT<ScalesF16D, 1>;
using WeightsQ5F = WeightsHighT<ScalesFactored, 1>;
using WeightsQ6H = WeightsHighT<ScalesFactored, 2>;

// IQ4's 16 levels (ggml's kvalues_iq4nl: −127, −104, …, 113) plus 128, as bytes, four a
// word: entry i is byte i % 4 of word i / 4.
#define IQ4_T0 0x3f2d1801u
#define IQ4_T1 0x766a5d4fu
#define IQ4_T2 0xa6998d81u
#define IQ4_T3 0xf1d9c5b5u

// 4-bit indices into IQ4's levels (IQ4_NL under f16 pairs, `gemv_iq4*`; IQ4_XS under
// factored scales, `gemv_iq4f*`): tiles as at 4 bits, but a piece's weights e = 0 .. 3 in
// bits 4e and e = 4 .. 7 in 16 + 4(e − 4), so that a half word's four indices are one byte
// permute's selector. Two permutes look each up among levels 0 .. 7 and 8 .. 15 (the
// index's low 3 bits), a third keeps the one its high bit says: four levels + 128 as
// bytes, which become pairs of halves as at 8 bits. No offsets: m = 0.
template <typename S>
struct WeightsIq4T : BlockTiles<uint2, S> {
    using Tile = typename BlockTiles<uint2, S>::Tile;
    static constexpr bool OFFSETS = false;
    static constexpr int BATCH = 6;
    static constexpr float CENTER = 0.0f;
    // The levels + 128 of the four indices in bits 0 .. 15 of `word`, byte i index i's.
    static __device__ __forceinline__ u32 levels(u32 word) {
        u32 low = __byte_perm(IQ4_T0, IQ4_T1, word & 0x7777u);
        u32 high = __byte_perm(IQ4_T2, IQ4_T3, word & 0x7777u);
        return __byte_perm(low, high, ((word >> 1) & 0x4444u) | 0x3210u);
    }
    // Bytes 2p, 2p + 1 of four levels + 128, as halves.
    static __device__ __forceinline__ u32 pair(u32 bytes, int p) {
        return hsub2(__byte_perm(bytes, 0x64646464u, p ? 0x4342u : 0x4140u), 0x64806480u);
    }
    __device__ __forceinline__ void frags(const Tile& v, u32 (&a0)[4], u32 (&a1)[4]) const {
        u32 g0 = levels(v.w.x), g1 = levels(v.w.x >> 16);  // column g
        u32 h0 = levels(v.w.y), h1 = levels(v.w.y >> 16);  // column g + 8
        a0[0] = pair(g0, 0), a0[1] = pair(h0, 0), a0[2] = pair(g0, 1), a0[3] = pair(h0, 1);
        a1[0] = pair(g1, 0), a1[1] = pair(h1, 0), a1[2] = pair(g1, 1), a1[3] = pair(h1, 1);
    }
};
using WeightsIq4 = WeightsIq4T<ScalesF16>;
using WeightsIq4S = WeightsIq4T<ScalesF16D>;
using WeightsIq4F = WeightsIq4T<ScalesFactored>;

// 8-bit (Q8_0, m = 0; with factored scales the 8-bit layouts of K-quant sub-blocks, or
// with H a scale per 16): a tile is 128 words, lane l's four at 4l (two words of column g, two
// of g + 8), weight h of a piece its signed byte h. A byte permute puts two bytes (offset
// by 128) under 1024's high byte: the pair 1152 + q as halves.
template <typename S, bool H>
struct WeightsQ8T : BlockTiles<uint4, S> {
    using Tile = typename BlockTiles<uint4, S>::Tile;
    static constexpr bool OFFSETS = !H && S::OFFSETS, HALVES = H;
    static constexpr int BATCH = 4;
    static constexpr float CENTER = 0.0f;
    // Weights 2p, 2p + 1 of the piece in words (lo, hi), as halves.
    static __device__ __forceinline__ u32 pair(u32 lo, u32 hi, int p) {
        u32 word = (p < 2 ? lo : hi) ^ 0x80808080u;
        u32 sel = p & 1 ? 0x4342u : 0x4140u;
        return hsub2(__byte_perm(word, 0x64646464u, sel), 0x64806480u);
    }
    __device__ __forceinline__ void frags(const Tile& v, u32 (&a0)[4], u32 (&a1)[4]) const {
        a0[0] = pair(v.w.x, v.w.y, 0), a0[1] = pair(v.w.z, v.w.w, 0);
        a0[2] = pair(v.w.x, v.w.y, 1), a0[3] = pair(v.w.z, v.w.w, 1);
        a1[0] = pair(v.w.x, v.w.y, 2), a1[1] = pair(v.w.z, v.w.w, 2);
        a1[2] = pair(v.w.x, v.w.y, 3), a1[3] = pair(v.w.z, v.w.w, 3);
    }
};
using WeightsQ8 = WeightsQ8T<ScalesF16, false>;
using WeightsQ8S = WeightsQ8T<ScalesF16D, false>;
using WeightsQ8F = WeightsQ8T<ScalesFactored, false>;
using WeightsQ8H = WeightsQ8T<ScalesFactored, true>;
using WeightsQ8F32 = WeightsQ8T<ScalesF32, false>;
using WeightsQ8H32 = WeightsQ8T<ScalesF32, true>;

// Tiles W over q and s (the whole rows' tiles and scales, kt long) for the product's
// columns k0 .. k0 + k.
template <typename W>
__device__ __forceinline__ W tiles_from(const u32* q, const u32* s, int k, int n, int k0, int kt) {
    W w;
    w.q = q + (size_t)(k0 / 32) * W::TILE_WORDS;
    w.s = s;
    w.k = k, w.n = n, w.kt = kt, w.kb0 = k0 / 32;
    return w;
}

// The scales of a tile as rows_block applies them: (d, m) of columns g and g + 8, m plus
// W::CENTER · d; with a scale per 16, the halves' of each.
template <typename W>
__device__ __forceinline__ void centered(float (&sc)[4]) {
    if constexpr (!W::HALVES) {
        if (W::CENTER != 0.0f) {
            sc[1] = fmaf(W::CENTER, sc[0], sc[1]);
            sc[3] = fmaf(W::CENTER, sc[2], sc[3]);
        }
    }
}

// The lane's tile's (block b's) scales, made once for both of its calls to rows_block:
// read from shared memory where they are staged, else made from the pairs the tile
// holds; none for f16 rows. With an offset per 16, the halves' scales in sc and their
// offsets (centered) in om: columns g's two, then g + 8's.
template <typename W>
__device__ __forceinline__ void tile_scales(const GemvShared& sh, const typename W::Tile& v,
                                            int b, int lane, float (&sc)[4], float (&om)[4]) {
    if constexpr (W::HALVES && W::OFFSETS) {
        float4 f = sh.sc[(b * 8 + (lane >> 2)) * 2], o = sh.sc[(b * 8 + (lane >> 2)) * 2 + 1];
        sc[0] = f.x, sc[1] = f.y, sc[2] = f.z, sc[3] = f.w;
        om[0] = o.x, om[1] = o.y, om[2] = o.z, om[3] = o.w;
    } else if constexpr (W::STAGED) {
        float4 f = sh.sc[b * 8 + (lane >> 2)];
        sc[0] = f.x, sc[1] = f.y, sc[2] = f.z, sc[3] = f.w;
    } else if constexpr (W::SCALED) {
        W::Scales::pairs(v.s, sc[0], sc[1], sc[2], sc[3]);
        centered<W>(sc);
    }
}

// With factored scales, column group G's (tile_scales' four floats a block and column
// pair, centered) staged in shared memory by the block's threads; nothing otherwise.
template <typename W>
__device__ __forceinline__ void stage_scales(const GemvShared& sh, const W& w, int G) {
    if constexpr (W::STAGED) {
        if (16 * G >= w.n) return;
        // A thread a column pair g and super-block of the blocks the product takes (kb0 ..
        // kb1 of the rows': a run of columns may start or end inside a super-block).
        unsigned kb0 = w.kb0, kb1 = kb0 + w.k / 32, first = kb0 / 8;
        unsigned items = ((kb1 + 7) / 8 - first) * 8;
        for (unsigned e = threadIdx.x; e < items; e += blockDim.x) {
            unsigned g = e % 8;
            if constexpr (W::HALVES && W::OFFSETS) {
                // The halves' offsets plus CENTER times their scales.
                W::Scales::super_block(w.s, w.kt / 32, G, (first + e / 8) * 8, g, kb0, kb1,
                                       [&](unsigned b, float4 d, float4 m) {
                                           m.x = fmaf(W::CENTER, d.x, m.x);
                                           m.y = fmaf(W::CENTER, d.y, m.y);
                                           m.z = fmaf(W::CENTER, d.z, m.z);
                                           m.w = fmaf(W::CENTER, d.w, m.w);
                                           sh.sc[(b * 8 + g) * 2] = d;
                                           sh.sc[(b * 8 + g) * 2 + 1] = m;
                                       });
            } else {
                W::Scales::super_block(w.s, w.kt / 32, G, (first + e / 8) * 8, g, kb0, kb1,
                                       [&](unsigned b, float d0, float m0, float d1, float m1) {
                                           float sc[4] = {d0, m0, d1, m1};
                                           centered<W>(sc);
                                           sh.sc[b * 8 + g] = float4{sc[0], sc[1], sc[2], sc[3]};
                                       });
            }
        }
    }
}

// Block b's products for the 8 input rows r0 .. r0 + 7 (two mma, the A fragments a0, a1 of
// the lane's tile) added to the lane's four sums (columns g, g + 8 by rows r0 + 2t,
// r0 + 2t + 1): with the blocks' scales sc (tile_scales), d times the block's sums plus m
// times the inputs' block sums (without offsets, IQ4's, d times the sums; with a scale per
// 16, each half's sums times its scale, and with an offset per 16 too, om's times the
// inputs' sums over each half).
template <typename W>
__device__ __forceinline__ void rows_block(const GemvShared& sh, const W&, const float (&sc)[4],
                                           const float (&om)[4], const u32 (&a0)[4],
                                           const u32 (&a1)[4], int stride, int nb, int b,
                                           int lane, int r0, float (&acc)[4]) {
    uint4 xb = input_piece<W::HALVES>(sh, stride, b, lane, r0);
    if constexpr (W::HALVES) {
        float lo[4] = {0.0f, 0.0f, 0.0f, 0.0f}, hi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_16816(lo, a0, xb.x, xb.y);
        mma_16816(hi, a1, xb.z, xb.w);
        if constexpr (W::OFFSETS) {
            // Input rows r, r + 1's sums over the block's halves (past the m rows, row
            // m − 1's: see input_piece).
            int r = r0 + 2 * (lane & 3);
            float2 s0 = reinterpret_cast<const float2*>(sh.xsum)[min(r, sh.m - 1) * nb + b];
            float2 s1 = reinterpret_cast<const float2*>(sh.xsum)[min(r + 1, sh.m - 1) * nb + b];
            acc[0] = fmaf(om[1], s0.y, fmaf(om[0], s0.x, acc[0]));
            acc[1] = fmaf(om[1], s1.y, fmaf(om[0], s1.x, acc[1]));
            acc[2] = fmaf(om[3], s0.y, fmaf(om[2], s0.x, acc[2]));
            acc[3] = fmaf(om[3], s1.y, fmaf(om[2], s1.x, acc[3]));
        }
        scale_halves(lo, hi, sc, acc);
    } else if constexpr (!W::SCALED) {
        mma_16816(acc, a0, xb.x, xb.y);
        mma_16816(acc, a1, xb.z, xb.w);
    } else {
        float blk[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_16816(blk, a0, xb.x, xb.y);
        mma_16816(blk, a1, xb.z, xb.w);
        if constexpr (W::OFFSETS) {
            // Input rows r, r + 1's sums (past the m rows, row m − 1's: see input_piece).
            int r = r0 + 2 * (lane & 3);
            float xs0 = sh.xsum[min(r, sh.m - 1) * nb + b];
            float xs1 = sh.xsum[min(r + 1, sh.m - 1) * nb + b];
            scale_block(blk, sc, xs0, xs1, acc);
        } else {
            acc[0] = fmaf(sc[0], blk[0], acc[0]);
            acc[1] = fmaf(sc[0], blk[1], acc[1]);
            acc[2] = fmaf(sc[2], blk[2], acc[2]);
            acc[3] = fmaf(sc[2], blk[3], acc[3]);
        }
    }
}

// A warp's batch of tiles: blocks b0, b0 + 8, ... (those below k / 32) of column group G,
// loaded together so that the warp has its loads in flight at once (one batch covers a
// row of 1,536 at 4 bits, 1,024 at 8 and f16: within the registers of 3 blocks an SM).
template <typename W>
struct TileBatch {
    typename W::Tile v[W::BATCH];
    __device__ __forceinline__ void load(const W& w, int G, int b0, int lane) {
        if (16 * G >= w.n) return;
#pragma unroll
        for (int i = 0; i < W::BATCH; ++i) {
            int b = b0 + GEMV_WARPS * i;
            if (b < w.k / 32) v[i] = w.load(G, b, lane);
        }
    }
};

// The warp's first batch of the block's first column group: loaded before the inputs are
// staged, so that the weights' latency and the staging's overlap.
template <typename W>
__device__ __forceinline__ TileBatch<W> first_batch(const W& w) {
    TileBatch<W> v;
    v.load(w, blockIdx.x, threadIdx.x >> 5, threadIdx.x & 31);
    return v;
}

// After the input rows are staged (sh.x): the block's first column group's factored
// scales (stage_scales), and the rows' sums over each block of 32 (with an offset per 16,
// each 16), where the weights have offsets. A thread adds a piece of 8 (16 bytes: a warp
// reads 512 contiguous bytes, no bank conflicts), four lanes a block (two a 16); every
// lane of a warp takes part in each round's shuffles (the rounds' bound is the block's).
template <typename W>
__device__ __forceinline__ void stage_sums(const GemvShared& sh, const W& w, int k) {
    stage_scales(sh, w, blockIdx.x);
    __syncthreads();
    if (W::OFFSETS) {
        int pieces = k / 8, stride = gemv_stride(k), all = sh.m * pieces;
        for (int base = 0; base < all; base += blockDim.x) {
            int e = base + threadIdx.x, r = e / pieces, c = e % pieces;
            float sum = 0.0f;
            if (e < all) {
                uint4 v = *reinterpret_cast<const uint4*>(sh.x + r * stride + c * 8);
                u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int h = 0; h < 4; ++h)
                    sum += h2f((half_t)(w[h] & 0xffffu)) + h2f((half_t)(w[h] >> 16));
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            if constexpr (W::HALVES) {
                // Offsets per 16 (ScalesHalfPairs): a sum a half, two lanes each.
                if (e < all && c % 2 == 0) sh.xsum[r * (k / 16) + c / 2] = sum;
            } else {
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                if (e < all && c % 4 == 0) sh.xsum[r * (k / 32) + c / 4] = sum;
            }
        }
        __syncthreads();
    }
}

// The product of the staged rows and the weights W, for each column group of the block
// (grid-stride): for each row r < m (sh.m, the staged rows), one thread calls out(r, j, sums) with the sums of
// columns j .. j + COLS − 1 (COLS 1 or 2, j a multiple of COLS, j < n). `v` holds the
// warp's first batch of the first group (first_batch); each group's first batch of the
// next is loaded before the group's sums are added up and written.
template <int COLS, typename W, typename Out>
__device__ __forceinline__ void gemv_columns(const GemvShared& sh, const W& w, TileBatch<W> v,
                                             int k, int n, Out out) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, m = sh.m;
    int nb = k / 32, stride = gemv_stride(k), groups = (n + 15) / 16;
    for (int G = blockIdx.x; G < groups; G += gridDim.x) {
        w.prefetch(G + gridDim.x);
        // Rows 0 .. 7, and 8 .. 15 where m > 8 (the same A fragments, a second B).
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        for (int b0 = warp; b0 < nb; b0 += GEMV_WARPS * W::BATCH) {
            if (b0 != warp) v.load(w, G, b0, lane);
#pragma unroll
            for (int i = 0; i < W::BATCH; ++i) {
                int b = b0 + GEMV_WARPS * i;
                if (b >= nb) break;
                u32 a0[4], a1[4];
                w.frags(v.v[i], a0, a1);
                float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, om[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                tile_scales<W>(sh, v.v[i], b, lane, sc, om);
                rows_block(sh, w, sc, om, a0, a1, stride, nb, b, lane, 0, acc[0]);
                if (m > 8) rows_block(sh, w, sc, om, a0, a1, stride, nb, b, lane, 8, acc[1]);
            }
        }
        v.load(w, G + gridDim.x, warp, lane);
#pragma unroll
        for (int c = 0; c < 8; ++c) sh.part[warp][c][lane] = acc[c / 4][c % 4];
        __syncthreads();
        // Every warp is past this group's scales: the next group's, while the sums are added.
        stage_scales(sh, w, G + gridDim.x);
        // Output (column q, row r) is sum c = 4(r / 8) + 2(q / 8) + r % 2 of lane
        // 4(q % 8) + (r % 8) / 2.
        for (int e = threadIdx.x; e < 16 / COLS * GEMV_MAX_ROWS; e += blockDim.x) {
            int q = e / GEMV_MAX_ROWS * COLS, r = e % GEMV_MAX_ROWS, j = 16 * G + q;
            if (r >= m || j >= n) continue;
            float sums[COLS];
#pragma unroll
            for (int h = 0; h < COLS; ++h) {
                int c = 4 * (r / 8) + 2 * ((q + h) / 8) + r % 2, l = 4 * ((q + h) % 8) + r % 8 / 2;
                float sum = 0.0f;
                for (int p = 0; p < GEMV_WARPS; ++p) sum += sh.part[p][c][l];
                sums[h] = sum;
            }
            out(r, j, sums);
        }
        __syncthreads();
    }
}

// Where a product's n columns go: column j of row r to y[r · ldy + j0 + j] — a matrix of
// its own (ldy = n, j0 = 0), or a part of a stack whose parts the kernels read apart
// (`gemv::QuantRows::stack`: e.g. the V rows of a QKV stack in another layout than Q and
// K's), its columns j0 .. j0 + n of the stack's ldy.
struct GemvOut {
    float* __restrict__ y;
    int ldy, j0;
    bool add;  // adds the sums to y's (a later run of the rows' columns) instead
    __device__ __forceinline__ float* at(int r, int j) const {
        return y + (size_t)r * ldy + j0 + j;
    }
};

// The plain product's output: y[r, j] = the sum.
template <typename W>
__device__ __forceinline__ void gemv_store(const GemvShared& sh, const W& w, const TileBatch<W>& v,
                                           GemvOut y, int k, int n) {
    gemv_columns<1>(sh, w, v, k, n, [=](int r, int j, const float* sums) {
        float* p = y.at(r, j);
        *p = y.add ? *p + sums[0] : sums[0];
    });
}

// The f16 rows of x (m × k), staged.
__device__ __forceinline__ void stage_rows(const GemvShared& sh, const half_t* __restrict__ x, int m,
                                           int k) {
    int stride = gemv_stride(k), pieces = k / 8;
    for (int e = threadIdx.x; e < m * pieces; e += blockDim.x) {
        int r = e / pieces, c = e % pieces;
        *reinterpret_cast<uint4*>(sh.x + r * stride + c * 8) =
            reinterpret_cast<const uint4*>(x + (size_t)r * sh.kt + sh.k0)[c];
    }
}

// add_rmsnorm's rows staged (warp i of the block makes rows i and i + 8; see gemv_f16_norm).
__device__ __forceinline__ void stage_norm(const GemvShared& sh, const float* __restrict__ x,
                                           const float* __restrict__ delta,
                                           const float* __restrict__ nw, float* __restrict__ x_out,
                                           const int* __restrict__ rows, float eps, int m, int k) {
    int lane = threadIdx.x & 31;
    for (int i = threadIdx.x >> 5; i < m; i += blockDim.x >> 5) {
        int r = rows ? rows[i] : i;
        half_t* xr = sh.x + i * gemv_stride(k);
        if (r < 0) {
            for (int d = lane; d < k; d += 32) xr[d] = 0;
        } else {
            // The norm is the whole row's; the product's columns k0 .. k0 + k are staged.
            int kt = sh.kt, k0 = sh.k0;
            size_t at = (size_t)r * kt;
            const float* src = x + at;
            const float* dr = delta ? delta + at : nullptr;
            float inv = add_rms_row(src, dr, nullptr, kt, eps);
            if (x_out && blockIdx.x == 0) {
                for (int d = lane; d < kt; d += 32) x_out[at + d] = dr ? src[d] + dr[d] : src[d];
            }
            for (int d = lane; d < k; d += 32) {
                float v = src[k0 + d];
                if (dr) v += dr[k0 + d];
                xr[d] = f2h(v * inv * nw[k0 + d]);
            }
        }
    }
}

// The products' bodies, for each weights type W (the entry points below): the input rows
// staged by the kernel that would otherwise run before the product, then the product.

// The plain product of f16 rows x.
template <typename W>
__device__ __forceinline__ void rows_product(const GemvShared& sh, const half_t* __restrict__ x,
                                             const W& w, GemvOut y, int m, int k,
                                             int n) {
    const TileBatch<W> v = first_batch(w);
    stage_rows(sh, x, m, k);
    stage_sums(sh, w, k);
    gemv_store(sh, w, v, y, k, n);
}

// add_rmsnorm fused with the product: input row i is row rows[i] of x (row i when rows
// is null) plus the same row of delta (when not null), normalized and scaled by nw, then
// rounded to f16 as add_rmsnorm writes it; rows[i] < 0 is a row of zeros. Block 0 writes
// the sums x + delta to x_out (when not null), which must not be x: the other blocks
// still read x. Warp i of each block prepares input rows i and i + 8.
template <typename W>
__device__ __forceinline__ void norm_product(const GemvShared& sh, const float* __restrict__ x,
                                             const float* __restrict__ delta,
                                             const float* __restrict__ nw,
                                             float* __restrict__ x_out,
                                             const int* __restrict__ rows, float eps, const W& w,
                                             GemvOut y, int m, int k, int n) {
    const TileBatch<W> v = first_batch(w);
    stage_norm(sh, x, delta, nw, x_out, rows, eps, m, k);
    stage_sums(sh, w, k);
    gemv_store(sh, w, v, y, k, n);
}

// The norm's product for the QKV rows, with rope_kv_write in its epilogue: y is the QKV
// rows ((n_heads + 2 · n_kv_heads) · head_dim columns: q heads, k heads, v heads; the
// product's n columns are those from y.j0, an even column: all of them, or a part of the
// stack), each q and k pair of output row i rotated at positions[i], and the rotated keys and the
// values written to the paged f16 cache at slot_mapping[i], as rope_kv_write does (the
// helpers in common.cuh). A thread of the epilogue takes a rotation pair, two adjacent
// columns. In runs of the rows' columns, the runs before the last are gemv_*_norm
// launches; this one, the last, adds their sums before it rotates.
template <typename W>
__device__ __forceinline__ void norm_rope_product(
    const GemvShared& sh, const float* __restrict__ x, const float* __restrict__ delta,
    const float* __restrict__ nw, float* __restrict__ x_out, const int* __restrict__ rows,
    float eps, const W& w, GemvOut y, int m, int k, int n,
    const u32* __restrict__ positions, const int* __restrict__ slot_mapping,
    half_t* __restrict__ kc, half_t* __restrict__ vc, int n_heads, int n_kv_heads, int head_dim,
    int block_size, float base) {
    const TileBatch<W> v = first_batch(w);
    stage_norm(sh, x, delta, nw, x_out, rows, eps, m, k);
    stage_sums(sh, w, k);
    int qd = n_heads * head_dim, kvd = n_kv_heads * head_dim;
    gemv_columns<2>(sh, w, v, k, n, [=](int r, int jp, const float* sums) {
        float* out = y.at(r, jp);
        // The last run of columns adds the earlier runs' sums (gemv_*_norm wrote them).
        float pair[2] = {sums[0], sums[1]};
        if (y.add) {
            pair[0] = out[0] + pair[0];
            pair[1] = out[1] + pair[1];
        }
        int j = y.j0 + jp, in_head = j % head_dim;  // the column of the QKV rows
        if (j < qd + kvd) {
            float s, c;
            rope_sincos(positions[r], in_head / 2, head_dim, base, &s, &c);
            rotate(pair, c, s);
        }
        out[0] = pair[0];
        out[1] = pair[1];
        if (j < qd) return;
        // A key or a value pair: entry in_head of (block, kv head, slot).
        bool key = j < qd + kvd;
        int kvh = (j - qd - (key ? 0 : kvd)) / head_dim;
        int slot_all = slot_mapping[r];
        int blk = slot_all / block_size, slot = slot_all - blk * block_size;
        size_t e = (((size_t)blk * n_kv_heads + kvh) * block_size + slot) * head_dim + in_head;
        *(u32*)((key ? kc : vc) + e) = (u32)f2h(pair[0]) | ((u32)f2h(pair[1]) << 16);
    });
}

// swiglu fused with the product: input row r is silu(gu[r, j]) · gu[r, k + j] over
// j < k, rounded to f16 as swiglu writes it (gu holds rows of 2k: gate, then up).
template <typename W>
__device__ __forceinline__ void swiglu_product(const GemvShared& sh, const float* __restrict__ gu,
                                               const W& w, GemvOut y, int m, int k,
                                               int n) {
    const TileBatch<W> v = first_batch(w);
    int stride = gemv_stride(k);
    // Columns k0 .. k0 + k of the rows' kt: gate at k0 + j, up at kt + k0 + j.
    int kt = sh.kt;
    const float* gate = gu + sh.k0;
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) {
        const float* row = gate + (size_t)(e / k) * 2 * kt;
        int j = e % k;
        sh.x[(e / k) * stride + j] = f2h(silu_mul(row[j], row[kt + j]));
    }
    stage_sums(sh, w, k);
    gemv_store(sh, w, v, y, k, n);
}
