// The `gemv` kernels' weights in the file's own quantized blocks (after gemv.cuh, whose
// WeightsF16 gives the interface each type here follows; the products that read them are
// gemv_product.cuh's).
//
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
