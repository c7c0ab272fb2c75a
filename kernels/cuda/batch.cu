// The batching kernel: builds one step's packed inputs on the device from the single
// staging buffer the host sends in one copy.
//
// staging (u32): n_seqs headers of 4 words {start, len, pos0, logits}, then the T
// token ids, then n_seqs × max_blocks block-table entries, then (where `windowed`: the
// model's windowed layers keep a pool of their own) n_seqs × max_blocks more, the
// sequences' tables in that pool.
// A token word with its top bit set (FROM_LAST | r) stands for the token the step before
// sampled for its logits row r: read from `sampled`, which that step's `sample` wrote and
// this step's has not yet (the engine plans a step while the one before runs).
// A block-table entry with its top bit set (READ_ONLY | block, a padded row's) is read but
// not written: a row that reads it at its position gets slot −1.
// Outputs: tokens[T], positions[T], slot_mapping[T] (block × block_size + slot, where row
// r's key and value go; −1: nowhere), seq_of_row[T], block_tables[n_seqs × max_blocks] and
// logit_rows (the last `logits` rows of each sequence, packed in order: one row to draw
// from, or more for a prompt's log-probabilities; entries past them up to n_seqs −1);
// where `windowed`, slot_mapping_w[T] and block_tables_w[n_seqs × max_blocks] the same
// from the windowed layers' tables. Launch: one thread per max(n_tokens, n_seqs ×
// max_blocks), blocks of a multiple of 32 threads (block 0 also computes logit_rows).
extern "C" __global__ void build_batch(const u32* __restrict__ staging,
                                       const u32* __restrict__ sampled, int n_seqs, int n_tokens,
                                       int max_blocks, int block_size, u32* __restrict__ tokens,
                                       u32* __restrict__ positions, int* __restrict__ slot_mapping,
                                       int* __restrict__ seq_of_row, int* __restrict__ block_tables,
                                       int* __restrict__ logit_rows, int windowed,
                                       int* __restrict__ slot_mapping_w,
                                       int* __restrict__ block_tables_w) {
    pdl_begin();
    const u32* heads = staging;
    const u32* toks = staging + 4 * n_seqs;
    const u32* tables = toks + n_tokens;
    const u32* tables_w = tables + n_seqs * max_blocks;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_tokens) {
        // The sequence that holds row i: the last whose start is <= i.
        int lo = 0, hi = n_seqs - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if ((int)heads[4 * mid] <= i) lo = mid; else hi = mid - 1;
        }
        int s = lo;
        u32 pos = heads[4 * s + 2] + (u32)(i - (int)heads[4 * s]);
        u32 t = toks[i];
        tokens[i] = (t & 0x80000000u) ? sampled[t & 0x7fffffffu] : t;
        positions[i] = pos;
        seq_of_row[i] = s;
        u32 blk = tables[s * max_blocks + pos / block_size];
        slot_mapping[i] =
            (blk & 0x80000000u) ? -1 : (int)blk * block_size + (int)(pos % block_size);
        if (windowed) {
            u32 bw = tables_w[s * max_blocks + pos / block_size];
            slot_mapping_w[i] =
                (bw & 0x80000000u) ? -1 : (int)bw * block_size + (int)(pos % block_size);
        }
    }
    if (i < n_seqs * max_blocks) {
        block_tables[i] = (int)(tables[i] & 0x7fffffffu);
        if (windowed) block_tables_w[i] = (int)(tables_w[i] & 0x7fffffffu);
    }
    // logit_rows: an exclusive prefix count of the sequences that want logits, by block 0
    // alone in one pass: each thread counts a run of consecutive sequences, one
    // block-wide scan of those counts gives each run its first output entry, and each
    // thread writes its run's entries. One barrier round whatever n_seqs is, so block 0
    // finishes with the others.
    if (blockIdx.x == 0) {
        __shared__ int warp_sums[32];
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
        int per = (n_seqs + (int)blockDim.x - 1) / (int)blockDim.x;
        int j0 = min((int)threadIdx.x * per, n_seqs), j1 = min(j0 + per, n_seqs);
        int count = 0;
        for (int j = j0; j < j1; ++j) count += (int)heads[4 * j + 3];
        int v = count;  // inclusive scan within the warp
        for (int o = 1; o < 32; o <<= 1) {
            int t = __shfl_up_sync(0xffffffffu, v, o);
            if (lane >= o) v += t;
        }
        if (lane == 31) warp_sums[warp] = v;
        __syncthreads();
        if (warp == 0) {
            int w = lane < n_warps ? warp_sums[lane] : 0;
            for (int o = 1; o < 32; o <<= 1) {
                int t = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += t;
            }
            warp_sums[lane] = w;  // inclusive prefix over warps
        }
        __syncthreads();
        int at = v - count + (warp > 0 ? warp_sums[warp - 1] : 0);
        for (int j = j0; j < j1; ++j) {
            int end = (int)(heads[4 * j] + heads[4 * j + 1]);
            for (int r = end - (int)heads[4 * j + 3]; r < end; ++r) logit_rows[at++] = r;
        }
        // Entries past the last wanted one are unused.
        for (int j = warp_sums[n_warps - 1] + threadIdx.x; j < n_seqs; j += blockDim.x)
            logit_rows[j] = -1;
    }
}
