// The batching kernel: builds one step's packed inputs on the device from the single
// staging buffer the host sends in one copy.
//
// staging (u32): n_seqs headers of 4 words {start, len, pos0, want_logits}, then the T
// token ids, then n_seqs × max_blocks block-table entries.
// Outputs: tokens[T], positions[T], slot_mapping[T] (block × block_size + slot, where row
// r's key and value go), seq_of_row[T], block_tables[n_seqs × max_blocks] and
// logit_rows[n_seqs] (the last row of each sequence that wants logits, packed in order;
// unused entries −1).
extern "C" __global__ void build_batch(const u32* __restrict__ staging, int n_seqs, int n_tokens,
                                       int max_blocks, int block_size, u32* __restrict__ tokens,
                                       u32* __restrict__ positions, int* __restrict__ slot_mapping,
                                       int* __restrict__ seq_of_row, int* __restrict__ block_tables,
                                       int* __restrict__ logit_rows) {
    const u32* heads = staging;
    const u32* toks = staging + 4 * n_seqs;
    const u32* tables = toks + n_tokens;
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
        tokens[i] = toks[i];
        positions[i] = pos;
        seq_of_row[i] = s;
        int blk = (int)tables[s * max_blocks + pos / block_size];
        slot_mapping[i] = blk * block_size + (int)(pos % block_size);
    }
    if (i < n_seqs * max_blocks) block_tables[i] = (int)tables[i];
    if (i < n_seqs) {
        int before = 0;
        for (int j = 0; j < i; ++j) before += heads[4 * j + 3] != 0;
        if (heads[4 * i + 3] != 0) logit_rows[before] = (int)(heads[4 * i] + heads[4 * i + 1] - 1);
        int total = before;
        for (int j = i; j < n_seqs; ++j) total += heads[4 * j + 3] != 0;
        // Entries past the last wanted one are unused.
        if (i >= total) logit_rows[i] = -1;
    }
}
