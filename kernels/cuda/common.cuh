// Shared helpers for tollgate's kernels (prepended to every .cu file by the Rust loader,
// so NVRTC needs no include path). f16 values travel as raw 16-bit words and are
// converted with PTX cvt instructions: no cuda_fp16.h needed.
typedef unsigned short half_t;
typedef unsigned int u32;
typedef unsigned long long u64;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef TOLLGATE_EMU  // the CPU emulator (kernels/emu/emu.h) brings its own conversions
__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_t f2h(float f) {
    half_t h;
    asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}

// d += A·B on tensor cores, one warp (all 32 lanes): A 16×16 f16 (row-major fragment),
// B 16×8 f16 (column-major fragment), d 16×8 f32. Lane l (group g = l / 4, t = l % 4)
// holds a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
// a[3] = A[g+8][2t+8, 2t+9]; b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; d[0..1] =
// D[g][2t, 2t+1], d[2..3] = D[g+8][2t, 2t+1] (each pair of halves low element first).
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (a & b) | c in one instruction (lop3; the compiler makes two of it with two constants).
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// a − b for each of the two f16 halves of a and b (sub.rn.f16x2).
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
#endif

// Merges partial softmax state (m, l, a) into the running (M, L, A): one output element's
// (attention's chunks). Explicit fused multiply-adds, so that every merge of the same
// states rounds the same.
__device__ __forceinline__ void merge(float& M, float& L, float& A, float m, float l, float a) {
    float mx = fmaxf(M, m);
    float c1 = L > 0.0f ? expf(M - mx) : 0.0f;
    float c2 = l > 0.0f ? expf(m - mx) : 0.0f;
    L = fmaf(L, c1, l * c2);
    A = fmaf(A, c1, a * c2);
    M = mx;
}

// For a result split over `n` blocks: publishes this block's writes, counts it in at
// `count`, and says whether it is the last of the n to arrive (whose reads then see every
// block's writes). The last sets the count back to 0 for the next launch. `flag` is one
// shared int; every thread of the block must call it.
__device__ __forceinline__ bool last_to_arrive(int* count, int n, int* flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        *flag = atomicAdd(count, 1) == n - 1;
        if (*flag) *count = 0;
    }
    __syncthreads();
    bool last = *flag;
    if (last) __threadfence();
    return last;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024). `shared` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? shared[lane] : 0.0f;
    v = warp_sum(v);
    return v;
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? shared[lane] : -INFINITY;
    v = warp_max(v);
    return v;
}

// RMSNorm's row, one warp (add_rmsnorm's arithmetic, shared with the product that fuses
// it): v = src[d] (+ delta[d] when delta is not null) for the lane's d = lane, lane + 32,
// ..., stored to dst[d] (dst may be src: then stored only when delta adds something; a null
// dst stores nothing). Returns 1 / rms(v) for the whole row, the same in every lane.
__device__ __forceinline__ float add_rms_row(const float* src, const float* delta, float* dst,
                                             int dim, float eps) {
    bool store = dst && (delta || dst != src);
    float ss = 0.0f;
#pragma unroll 4
    for (int d = threadIdx.x & 31; d < dim; d += 32) {
        float v = src[d];
        if (delta) v += delta[d];
        if (store) dst[d] = v;
        ss += v * v;
    }
    ss = warp_sum(ss);
    return rsqrtf(ss / dim + eps);
}

// RoPE's angle for a rotation pair (entries 2p, 2p + 1 of each head) of frequency
// inv_freq (the model's table, entry p: base^(−2p/head_dim), over the file's factor where
// it has them) at position pos: its sine and cosine (rope_kv_write's, and the QKV
// product's that fuses it).
__device__ __forceinline__ void rope_sincos(u32 pos, float inv_freq, float* s, float* c) {
    sincosf((float)pos * inv_freq, s, c);
}

// The same for pair p of an unscaled model, its frequency base^(−2p/head_dim) computed in
// place: the QKV product's fused epilogue, whose register budget has no room for the
// table's pointer (a model with scaled RoPE takes rope_kv_write instead).
__device__ __forceinline__ void rope_sincos(u32 pos, int p, int head_dim, float base, float* s,
                                            float* c) {
    rope_sincos(pos, 1.0f / powf(base, (2.0f * p) / head_dim), s, c);
}

// Turns the pair x[0], x[1] by the angle whose cosine is c and sine s, in place.
__device__ __forceinline__ void rotate(float* x, float c, float s) {
    float a = x[0], b = x[1];
    x[0] = a * c - b * s;
    x[1] = a * s + b * c;
}

// SwiGLU's element, silu(g) · u (the `swiglu` kernel's, and the product that fuses it).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Programmatic dependent launch (Hopper and later; nothing on older devices and on the
// emulator). The step's kernels are launched so that each may be scheduled while the one
// before it is still running; every kernel's first statement is pdl_begin(): it waits
// until the previous kernel has finished and its writes are visible, then lets the next
// kernel be scheduled. Before any access to memory that another kernel writes, and before
// any return (a kernel that returned without waiting could finish before the one it
// follows, and the kernel after it would not wait for that one).
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// pdl_begin(), after the block asks L2 for its first share of a matrix that no kernel
// writes (w.prefetch(blockIdx.x): gemv.cuh's weights), so that the loads overlap the
// previous kernel's end. Returns w.
template <typename W>
__device__ __forceinline__ W pdl_begin_prefetch(const W& w) {
    w.prefetch(blockIdx.x);
    pdl_begin();
    return w;
}
