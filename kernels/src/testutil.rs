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

/// `n` 8-bit weights −32..32 (Q6_K's integers) and a scale per 16 of them, either sign,
/// of magnitude up to `scale`, each an f16.
pub fn runs16_weights(n: usize, seed: u64, scale: f32) -> (Vec<i8>, Vec<f32>) {
    let values = rand(n, seed)
        .iter()
        .map(|v| (v * 32.0).floor().clamp(-32.0, 31.0) as i8)
        .collect();
    let scales = rand(n / 16, seed + 1)
        .iter()
        .map(|v| f32::from(half::f16::from_f32(v * scale)))
        .collect();
    (values, scales)
}
