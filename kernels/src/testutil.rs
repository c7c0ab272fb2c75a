//! What the crate's unit tests share: reproducible pseudo-random inputs.

/// `n` values in [−1, 1) from a 64-bit LCG seeded with `seed`.
pub fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Q8_0 blocks with one value in each set to −128: the conversions at load
/// ([`crate::kquant`]) write it (Q3_K's product 128 under a negated scale), though the
/// Q8_0 quantizer stops at −127, so every kernel is tested with it.
pub fn with_q8_0_minimum(data: &mut [u8]) {
    for (i, b) in data.chunks_exact_mut(34).enumerate() {
        b[2 + (7 * i) % 32] = 0x80;
    }
}
