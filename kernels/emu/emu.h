// tollgate's CUDA emulator: what a kernel source (`kernels/cuda/*.cu`) needs from CUDA,
// for the host C++ compiler. Included before `common.cuh` in every emulator build (see
// `variant.cpp`); the runtime behind it is `runtime.cpp`.
//
// Each CUDA thread of a block is a fiber with its own stack; the block's fibers run on
// one OS thread, each until it reaches a synchronization point (`__syncthreads`, a warp
// shuffle) or exits, in an order shuffled per round. A launch's blocks run one at a time;
// launches on different OS threads (different emulated devices) run at once. Shared
// memory is a slot of the OS thread's own arena per declaration, poisoned when each block
// first reaches it. Misuse that is undefined or faults on a GPU fails the launch with a
// message: a barrier or shuffle some threads never reach (deadlock), threads waiting at
// different barriers at once (divergent `__syncthreads`), a shuffle reading a lane that did
// not take part, an access past a buffer's end (a fault: buffers end against an
// inaccessible page), one buffer passed for two of a kernel's `__restrict__` pointers where
// it writes through one, a block wider than LAUNCH_THREADS declares (the launcher's
// checks), and, where the C++ compiler takes `-fsanitize` (build.rs), an access through a
// pointer misaligned for its type, an index past an array's bounds, a shift past its
// word's width (`runtime.cpp`'s handlers); built with racecheck
// (TOLLGATE_EMU_RACECHECK=1), shared or global memory that two threads of a block access,
// one writing, with no barrier between, and global memory two blocks of a launch access so
// with no atomic ordering them (`runtime.cpp`'s racecheck).
#pragma once

#include <math.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include <utility>

#define TOLLGATE_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
// Shared memory: build.rs rewrites each `__shared__ T name[dims];` of a kernel source into
// `auto& name = emu::shared_var<T[dims], id>("name");` (below), so a declaration it did
// not rewrite fails to compile.
#define __shared__ __shared__declarations_are_rewritten_by_build_rs

struct dim3 {
    unsigned x, y, z;
};

struct alignas(8) uint2 {
    unsigned x, y;
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

struct alignas(8) float2 {
    float x, y;
};

struct alignas(16) float4 {
    float x, y, z, w;
};

#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

namespace emu {

// The bits of `v` as a `To` of the same size (C++20's std::bit_cast).
template <class To, class From>
inline To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast between sizes");
    To out;
    memcpy(&out, &v, sizeof(To));
    return out;
}

struct Fiber {
    void* sp;
    dim3 tid;
    unsigned linear;  // x + y·bx + z·bx·by: warp = linear / 32, lane = linear % 32
    bool done;
};

struct Launch {
    dim3 block_idx, block_dim, grid_dim;
    unsigned dynamic_shared;  // bytes of dynamic shared memory the launch asked for
};

extern thread_local Fiber* tl_fiber;
extern thread_local Launch* tl_launch;

// A shared-memory declaration's place in every OS thread's arena (the same in each).
struct SharedSlot {
    size_t offset, bytes;
    unsigned index;  // the declaration's number, for its per-thread poisoning stamp
    const char* name;
};
// A new slot of `bytes` bytes aligned to `align` for declaration `name` (once per
// declaration, any thread).
SharedSlot reserve_shared(size_t bytes, size_t align, const char* name);
// The slot in this OS thread's arena; filled with 0xff bytes (NaN as floats, -1 as ints)
// the first time the running block reaches it, so that a read before any thread of the
// block wrote it shows.
char* shared_at(const SharedSlot& slot);

// Declaration `ID`'s shared `T` (`name`) for the running block (build.rs numbers
// declarations).
template <class T, int ID>
inline T& shared_var(const char* name) {
    static const SharedSlot slot =
        reserve_shared(sizeof(T), alignof(T) > 16 ? alignof(T) : 16, name);
    return *reinterpret_cast<T*>(shared_at(slot));
}

// A barrier of the block at `file`:`line` (its `__syncthreads`): threads that wait at
// different ones at once fail the launch (divergent barriers are undefined on a GPU).
void syncthreads(const char* file, unsigned line);
uint64_t warp_exchange(uint64_t bits, int src_lane);
// Every lane of the warp publishes n (at most 4) words; returns all 32 lanes' words
// ([lane][4]), readable until the calling lane's next exchange or gather.
const uint64_t* warp_gather(const uint64_t* words, int n);
[[noreturn]] void fail(const char* why);

template <class T>
inline T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = warp_exchange(bits, src);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

inline int lane() { return (int)(tl_fiber->linear & 31u); }

}  // namespace emu

#define threadIdx (emu::tl_fiber->tid)
#define blockIdx (emu::tl_launch->block_idx)
#define blockDim (emu::tl_launch->block_dim)
#define gridDim (emu::tl_launch->grid_dim)

inline void __syncthreads(const char* file = __builtin_FILE(),
                          unsigned line = __builtin_LINE()) {
    emu::syncthreads(file, line);
}

// Full-warp shuffles (the only kind the kernels use: the mask must name all 32 lanes).
namespace emu {
inline void full_warp(unsigned mask) {
    if (mask != 0xffffffffu) fail("partial-warp shuffle");
}
}  // namespace emu

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    emu::full_warp(mask);
    return emu::exchange(v, emu::lane() ^ lane_mask);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    emu::full_warp(mask);
    int l = emu::lane(), src = l - (int)delta;
    return emu::exchange(v, src < 0 ? l : src);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    emu::full_warp(mask);
    int l = emu::lane(), src = l + (int)delta;
    return emu::exchange(v, src > 31 ? l : src);
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
    emu::full_warp(mask);
    return emu::exchange(v, src & 31);
}

// Atomics and fences: a launch's blocks run one at a time, each block's threads on one OS
// thread (and a device's launches one after another), so a plain read-modify-write is
// atomic and every write is already visible. Racecheck does not check them, and takes an
// atomic on global memory as ordering blocks (runtime.cpp).
#ifdef TOLLGATE_EMU_RACECHECK
namespace emu {
// Racecheck's record of an atomic on global memory (runtime.cpp): it orders blocks.
void racecheck_atomic(const void* p);
}  // namespace emu
#define EMU_UNCHECKED __attribute__((no_sanitize_thread, noinline))
#define EMU_ATOMIC(p) emu::racecheck_atomic(p)
#else
#define EMU_UNCHECKED
#define EMU_ATOMIC(p)
#endif
EMU_UNCHECKED inline int atomicAdd(int* p, int v) {
    EMU_ATOMIC(p);
    int old = *p;
    *p = old + v;
    return old;
}
EMU_UNCHECKED inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    EMU_ATOMIC(p);
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { return emu::bit_cast<float>(i); }
inline int __float_as_int(float f) { return emu::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return emu::bit_cast<float>(u); }

// f16 <-> f32 as PTX's cvt.f32.f16 and cvt.rn.f16.f32 (round to nearest even).
typedef unsigned short half_t;

#ifdef __F16C__
// The host's conversions (build.rs enables them where the building CPU has them): the
// same values, one instruction each.
inline float h2f(half_t h) { return _cvtsh_ss(h); }
inline half_t f2h(float f) { return (half_t)_cvtss_sh(f, 0); }  // 0: to nearest even
#else
inline float h2f(half_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0);  // inf, quiet NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: normalize
        int e = -1;
        do {
            ++e;
            man <<= 1;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    return emu::bit_cast<float>(bits);
}

inline half_t f2h(float f) {
    uint32_t x = emu::bit_cast<uint32_t>(f);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf or NaN (quiet, payload's top bits kept)
        return (half_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u) return (half_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax >= 0x38800000u) {  // normal half
        uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
        uint32_t keep = r >> 13, rest = r & 0x1fffu;
        keep += (rest > 0x1000u) || (rest == 0x1000u && (keep & 1u));
        return (half_t)(sign | keep);
    }
    if (ax < 0x33000000u) return (half_t)sign;  // below half the smallest subnormal
    // Subnormal half: shift the 24-bit significand.
    uint32_t man = (ax & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)(ax >> 23);  // 14 + (113 - exp)
    uint32_t keep = man >> shift, rest = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    keep += (rest > halfway) || (rest == halfway && (keep & 1u));
    return (half_t)(sign | keep);
}
#endif

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (common.cuh has the fragment
// layout): each lane gathers the A rows and B columns of its four outputs from the lanes
// holding them (one warp gather), and adds each output's 16 products to it in k order, one
// fused multiply-add at a time. A GPU's tensor cores add them in their own order: the
// emulator checks the kernel's indexing, the parity tests bound the rounding.
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    int l = emu::lane(), g = l >> 2, t = l & 3;
    uint64_t mine[3] = {(uint64_t)a[0] | ((uint64_t)a[1] << 32),
                        (uint64_t)a[2] | ((uint64_t)a[3] << 32),
                        (uint64_t)b0 | ((uint64_t)b1 << 32)};
    const uint64_t* all = emu::warp_gather(mine, 3);
    auto half_of = [](uint64_t w, int h) { return h2f((half_t)((w >> (16 * h)) & 0xffffu)); };
    float ar[2][16], bc[2][16];
    for (int i = 0; i < 4; ++i) {
        // Lane 4g + i: a[0], a[1] = rows g, g + 8 at k 2i, 2i + 1; a[2], a[3] at k 2i + 8,
        // 2i + 9. Lane 4n + i: column n at k 2i, 2i + 1 (b0) and 2i + 8, 2i + 9 (b1).
        const uint64_t* src = all + 4 * (4 * g + i);
        for (int e = 0; e < 2; ++e) {
            ar[0][2 * i + e] = half_of(src[0], e);
            ar[1][2 * i + e] = half_of(src[0], 2 + e);
            ar[0][8 + 2 * i + e] = half_of(src[1], e);
            ar[1][8 + 2 * i + e] = half_of(src[1], 2 + e);
        }
        for (int c = 0; c < 2; ++c) {
            uint64_t w = all[4 * (4 * (2 * t + c) + i) + 2];
            for (int e = 0; e < 2; ++e) {
                bc[c][2 * i + e] = half_of(w, e);
                bc[c][8 + 2 * i + e] = half_of(w, 2 + e);
            }
        }
    }
    for (int r = 0; r < 2; ++r) {
        for (int c = 0; c < 2; ++c) {
            float acc = d[2 * r + c];
            for (int k = 0; k < 16; ++k) acc = fmaf(ar[r][k], bc[c][k], acc);
            d[2 * r + c] = acc;
        }
    }
}

// lop3.b32 with the table of (a & b) | c.
inline unsigned and_or(unsigned a, unsigned b, unsigned c) { return (a & b) | c; }

// A kernel's trap: the launch fails with this message.
inline void __trap() { emu::fail("the kernel trapped (__trap)"); }

// The bytes of dynamic shared memory the launch gave each block (%dynamic_smem_size).
inline unsigned dynamic_smem_size() { return emu::tl_launch->dynamic_shared; }

// sub.rn.f16x2: each half of a minus the same half of b, rounded to f16.
inline unsigned hsub2(unsigned a, unsigned b) {
    unsigned d = 0;
    for (int h = 0; h < 2; ++h) {
        float v = h2f((half_t)(a >> (16 * h))) - h2f((half_t)(b >> (16 * h)));
        d |= (unsigned)f2h(v) << (16 * h);
    }
    return d;
}

// prmt.b32 (default mode): byte i of the result is byte (s >> 4i) & 7 of the pair
// (x: bytes 0–3, y: bytes 4–7).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    uint64_t pair = (uint64_t)x | ((uint64_t)y << 32);
    unsigned d = 0;
    for (int i = 0; i < 4; ++i) d |= (unsigned)((pair >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return d;
}

namespace emu {

// One letter per kernel parameter, for the launcher's check of a launch's arguments:
// scalars lower case, pointers upper case (h f16, f f32, u u32, i i32, l u64, b u8).
template <class T>
constexpr char code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        constexpr char c = code<std::remove_cv_t<std::remove_pointer_t<U>>>();
        return (char)(c - 'a' + 'A');
    } else if constexpr (std::is_same_v<U, unsigned short>) {
        return 'h';
    } else if constexpr (std::is_same_v<U, float>) {
        return 'f';
    } else if constexpr (std::is_same_v<U, unsigned int>) {
        return 'u';
    } else if constexpr (std::is_same_v<U, int>) {
        return 'i';
    } else if constexpr (std::is_same_v<U, unsigned long long> || std::is_same_v<U, unsigned long>) {
        return 'l';
    } else if constexpr (std::is_same_v<U, unsigned char>) {
        return 'b';
    } else {
        static_assert(sizeof(T) == 0, "kernel parameter of a type the emulator does not know");
        return '?';
    }
}

// How a kernel parameter reaches memory: 'r' a pointer to const, 'w' a pointer it may
// write through, '-' a value (for the launcher's check that no buffer is passed twice where
// one of them is written: the kernels' pointers are all `__restrict__`).
template <class T>
constexpr char access() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        return std::is_const_v<std::remove_pointer_t<U>> ? 'r' : 'w';
    } else {
        return '-';
    }
}

template <class F>
struct Kernel;

template <class... A>
struct Kernel<void (*)(A...)> {
    static constexpr char sig[sizeof...(A) + 1] = {code<A>()..., 0};
    static constexpr char access[sizeof...(A) + 1] = {emu::access<A>()..., 0};

    // Calls the kernel with its parameters read from `args` (one pointer per parameter,
    // to its value), as cuLaunchKernel's kernelParams.
    template <void (*F)(A...), size_t... I>
    static void call_with(void** args, std::index_sequence<I...>) {
        F(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    template <void (*F)(A...)>
    static void call(void** args) {
        call_with<F>(args, std::index_sequence_for<A...>{});
    }
};

struct Entry {
    const char* name;
    const char* sig;
    const char* access;
    void (*call)(void** args);
};

struct Variant {
    const char* name;
    unsigned max_group, max_dpl, max_warps;
    const Entry* entries;
    unsigned n_entries;
};

}  // namespace emu

#define EMU_ENTRY(k)                                                                      \
    {                                                                                     \
        #k, emu::Kernel<decltype(&k)>::sig, emu::Kernel<decltype(&k)>::access,            \
            &emu::Kernel<decltype(&k)>::call<&k>                                          \
    }
