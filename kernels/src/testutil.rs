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
