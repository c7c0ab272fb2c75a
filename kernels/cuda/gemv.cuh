// The `gemv` kernels' device code, in three headers: this one (the block's shared memory,
// the staged inputs, f16 weights), gemv_blocks.cuh (weights in the file's own blocks) and
// gemv_product.cuh (the product itself). The entry points are gemv.cu; the Rust side
// compiles the three and it, in that order, as one program (`SOURCES` in
// kernels/src/cuda/mod.rs), and the emulator's build includes them before every source
// (`HEADERS` in kernels/build.rs).
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
// in gemv_blocks.cuh; the K-quants' under factored or f32 scales, `gemv_q4f*`, `gemv_q5f*`, `gemv_q8f*`,
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
#define gemv_smem (::emu::shared_var<char[227 * 1024], 0>("gemv_smem"))
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
// 8-bit blocks in gemv_blocks.cuh (WeightsQ4, WeightsQ8).
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
