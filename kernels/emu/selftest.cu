// Kernels that check the emulator itself (built into the emulator only, never for a GPU):
// thread and block indices over 3-D grids, a block-wide barrier, and the misuse it must
// report rather than run through (a shared-memory race where built with racecheck).

// out[linear global thread] = its (block, thread) coordinates packed in one word, with
// every thread of a block first meeting at a barrier after writing a shared slot that a
// neighbour then reads.
extern "C" __global__ void emu_selftest_ids(u32* __restrict__ out) {
    __shared__ u32 slot[1024];
    u32 t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    u32 n = blockDim.x * blockDim.y * blockDim.z;
    u32 b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    slot[t] = t;
    __syncthreads();
    u32 neighbour = slot[(t + 1) % n];
    out[b * n + t] = (blockIdx.z << 28) | (blockIdx.y << 24) | (blockIdx.x << 16) |
                     (threadIdx.z << 12) | (threadIdx.y << 8) | ((neighbour + n - 1) % n);
}

// Lane 0 of each warp waits at a shuffle while its warp waits at a barrier: a deadlock.
extern "C" __global__ void emu_selftest_deadlock(float* __restrict__ out) {
    float v = 1.0f;
    if ((threadIdx.x & 31) == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}

// The first warp waits at one barrier, the second at another.
extern "C" __global__ void emu_selftest_divergent_barrier(float* __restrict__ out) {
    if (threadIdx.x < 32) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.0f;
    }
}

// The upper half of the warp exits before the lower half reads it.
extern "C" __global__ void emu_selftest_exited_lane(float* __restrict__ out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 16);
}

// Every lane adds up the warp (a butterfly of shuffles), as warp_sum.
extern "C" __global__ void emu_selftest_warp_sum(const float* __restrict__ in,
                                                 float* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = warp_sum(in[i]);
}

// Reads shared memory no thread wrote (undefined on a GPU): the emulator's poison shows.
extern "C" __global__ void emu_selftest_unwritten_shared(float* __restrict__ out) {
    __shared__ float never_written[64];
    out[blockIdx.x * blockDim.x + threadIdx.x] = never_written[threadIdx.x];
    __syncthreads();
    never_written[threadIdx.x] = 1.0f;  // the next block must not see this
}

// Thread i loads a `uint4` 4 bytes past a 16-byte boundary: a fault on a GPU
// (CUDA_ERROR_MISALIGNED_ADDRESS), a failed launch here.
extern "C" __global__ void emu_selftest_misaligned(const float* __restrict__ in,
                                                   float* __restrict__ out) {
    uint4 v = *reinterpret_cast<const uint4*>(in + 1 + 4 * threadIdx.x);
    out[threadIdx.x] = (float)v.x;
}

// Thread 4 and past read a thread's array of 4 past its end.
extern "C" __global__ void emu_selftest_past_bounds(float* __restrict__ out) {
    float r[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    out[threadIdx.x] = r[threadIdx.x];
}

// Thread 4 and past shift a word by its width or more.
extern "C" __global__ void emu_selftest_wide_shift(u32* __restrict__ out) {
    out[threadIdx.x] = 1u << (threadIdx.x + 28);
}

// Thread t writes its slot, then reads its neighbour's: the next thread's (`mode` 0, 1) or
// the next lane's of its warp (2, 3), with a barrier between (1), a shuffle of the warp
// (2), or nothing (0, 3: a race on a GPU, which racecheck reports); block b into its own
// slots of `out`.
extern "C" __global__ void emu_selftest_shared_race(u32* __restrict__ out, int mode) {
    __shared__ u32 slots[1024];
    u32 t = threadIdx.x;
    slots[t] = t;
    if (mode == 1) __syncthreads();
    if (mode == 2) (void)__shfl_xor_sync(0xffffffffu, t, 1);
    u32 next = mode >= 2 ? (t & ~31u) | ((t + 1) & 31u) : (t + 1) % blockDim.x;
    out[blockIdx.x * blockDim.x + t] = slots[next];
}

// Thread t of block b writes its slot of `parts` (blockDim.x a block), then reads slots
// other threads wrote: the next block's (`mode` 0: nothing orders two blocks, a race); every
// block's, in the block that arrived last (1: `last_to_arrive`'s atomic orders them) or in
// the block numbered last (2: a race); its neighbour's in its own block with a barrier
// between (3) or nothing (4: a race).
extern "C" __global__ void emu_selftest_global_race(float* __restrict__ parts,
                                                    int* __restrict__ count,
                                                    float* __restrict__ out, int mode) {
    __shared__ int last;
    u32 t = threadIdx.x, n = blockDim.x, b = blockIdx.x;
    parts[b * n + t] = (float)(b * n + t);
    float v = 0.0f;
    if (mode == 0) v = parts[(b + 1) % gridDim.x * n + t];
    if (mode == 1 || mode == 2) {
        bool merge = mode == 1 ? last_to_arrive(count, (int)gridDim.x, &last)
                               : b == gridDim.x - 1;
        if (!merge) return;
        for (u32 i = 0; i < gridDim.x; ++i) v += parts[i * n + t];
    }
    if (mode >= 3) {
        if (mode == 3) __syncthreads();
        v = parts[b * n + (t ^ 1)];
    }
    out[b * n + t] = v;
}
