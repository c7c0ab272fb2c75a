// Kernels that check the emulator itself (built into the emulator only, never for a GPU):
// thread and block indices over 3-D grids, a block-wide barrier, and the misuse it must
// report rather than run through.

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
